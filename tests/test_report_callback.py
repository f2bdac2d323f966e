"""tftransfer.report.callback.ValidationReport: per-epoch numbers equal the report's, small splits kept."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tftransfer.heads import HeadSpec
from tftransfer.report import callback as callback_lib
from tftransfer.report import metrics


def _fit(dataset, epochs=3):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), name="features")
    model = keras.Model({"label": inputs}, {"label": keras.layers.Dense(3, name="label")(inputs)})
    model.compile(keras.optimizers.Adam(0.05),
                  loss={"label": keras.losses.SparseCategoricalCrossentropy(from_logits=True)})
    report = callback_lib.ValidationReport(dataset, [HeadSpec(name="label", num_classes=3)], top_k=2)
    seen = []

    class Spy(keras.callbacks.Callback):  # after the report: what it logged, and the model's own numbers
        def on_epoch_end(self, epoch, logs=None):
            x, y = next(iter(dataset.unbatch().batch(1000)))
            probabilities = tf.nn.softmax(self.model(x)["label"]).numpy()
            expected = metrics.classification_metrics(y["label"].numpy(), probabilities, top_k=2)
            seen.append({k: (logs[f"val_{k}"], expected[k]) for k in callback_lib.LOGGED})

    x = np.random.default_rng(0).normal(size=(30, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + (x[:, 1] > 1).astype("int64")
    model.fit({"label": x}, {"label": y}, epochs=epochs, verbose=0, callbacks=[report, Spy()])
    return report, seen


@pytest.mark.parametrize("keep_bytes", [callback_lib.KEEP_BYTES, 100])
def test_logged_numbers_are_the_reports_and_a_small_split_is_read_once(monkeypatch, keep_bytes):
    monkeypatch.setattr(callback_lib, "KEEP_BYTES", keep_bytes)
    reads = tf.Variable(0, dtype=tf.int64)

    def count(x, y):
        reads.assign_add(1)
        return x, y

    x = np.random.default_rng(1).normal(size=(20, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    dataset = tf.data.Dataset.from_tensor_slices(({"label": x}, {"label": y})).map(count).batch(8)
    report, seen = _fit(dataset)
    for epoch in seen:
        for key, (logged, expected) in epoch.items():
            assert logged == pytest.approx(expected, abs=1e-6), key
    spy_reads = 20 * len(seen)  # the Spy reads the split once per epoch
    if keep_bytes == 100:  # 20 x 4 floats + labels > 100 bytes: read every epoch
        assert int(reads.numpy()) - spy_reads == 20 * 3 and report._kept is None
    else:  # kept after the first epoch, as tensors
        assert int(reads.numpy()) - spy_reads == 20 and len(report._kept) == 3
