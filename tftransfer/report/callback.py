"""`ValidationReport`: the report's classification numbers, per epoch, in the logs.

Keras computes loss and accuracy on the validation data during `fit`; the
report's other numbers (macro / weighted F1, top-k accuracy, expected
calibration error) are not Keras metrics. This callback computes them with
`tftransfer.report.metrics` on the validation pipeline at each epoch end and
adds them to the epoch logs as `val_<head>_<metric>` (`val_<metric>` for one
head), so `History`, `CSVLogger` and `keras.callbacks.TensorBoard` (placed
after it) record them: `W/logs/validation`, `epoch_macro_f1` etc.

It costs one extra prediction pass over the validation data per epoch. A
validation split of at most `KEEP_BYTES` (cached features, small sets) is
kept in memory as tensors after the first epoch: starting a `tf.data`
iterator costs ~5-10 ms, which was a tenth of an epoch on cached features.
"""

import keras
import tensorflow as tf

from tftransfer.report import metrics as metrics_lib
from tftransfer.report import predictions

LOGGED = ("macro_f1", "weighted_f1", "top_k_accuracy", "ece")
# Validation batches up to this many bytes in all are kept in memory after the first epoch.
KEEP_BYTES = 16 * 2 ** 20


def _nbytes(batch):
    return sum(int(tf.size(t)) * t.dtype.size for t in tf.nest.flatten(batch))


class ValidationReport(keras.callbacks.Callback):
    """Add macro/weighted F1, top-k accuracy and ECE on `dataset` to each epoch's logs.

    Args:
        dataset: tf.data.Dataset of `(x, {head: label})` (the validation pipeline).
        heads: list of `HeadSpec`; only classification heads are measured.
        top_k: int. Defaults to 5 (capped below the number of classes).

    Example:
    ```python
    model.fit(train_ds, validation_data=val_ds, epochs=5,
              callbacks=[ValidationReport(val_ds, heads), keras.callbacks.TensorBoard("logs")])
    ```
    """

    def __init__(self, dataset, heads, top_k=metrics_lib.TOP_K):
        super().__init__()
        self.dataset = dataset
        self.heads = [h for h in heads if h.type == "classification"]
        if not self.heads:
            raise ValueError("ValidationReport needs at least one classification head.")
        self.top_k = top_k
        self._single = len(heads) == 1
        self._predict = None
        self._kept, self._may_keep = None, True

    def on_train_begin(self, logs=None):
        self._predict = predictions.keras_predictor(self.model, self.heads)  # traced once per fit

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if self._predict is None:
            self.on_train_begin()
        collected = predictions.collect(self._predict, self._batches(), self.heads, verbose=0)
        for h in self.heads:
            labels, probabilities = collected[h.name]
            m = metrics_lib.epoch_metrics(labels, probabilities, top_k=self.top_k)
            for key in LOGGED:
                logs[f"val_{key}" if self._single else f"val_{h.name}_{key}"] = m[key]

    def _batches(self):
        """The validation batches: kept ones, or the dataset's (kept while they fit `KEEP_BYTES`)."""
        if self._kept is not None:
            yield from self._kept
            return
        kept, size = ([] if self._may_keep else None), 0
        for batch in self.dataset:
            if kept is not None:
                size += _nbytes(batch)
                if size > KEEP_BYTES:
                    kept, self._may_keep = None, False
                else:
                    kept.append(batch)
            yield batch
        if kept is not None:
            self._kept = kept
