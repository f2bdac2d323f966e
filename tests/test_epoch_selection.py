"""tftransfer.epoch_selection: per-epoch history and the best epoch, across a resume."""

import json

import keras
import numpy as np
import pytest

from tftransfer import epoch_selection


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.5), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


class _Spy(keras.callbacks.Callback):
    """Keeps each epoch's weights, to compare with what selection loads."""

    def on_train_begin(self, logs=None):
        self.weights = {}

    def on_epoch_end(self, epoch, logs=None):
        self.weights[epoch + 1] = [w.numpy().copy() for w in self.model.weights]


def test_monitor_mode_from_the_name():
    assert epoch_selection.monitor_mode("val_loss") == "min"
    assert epoch_selection.monitor_mode("val_label_loss") == "min"
    assert epoch_selection.monitor_mode("val_accuracy") == "max"
    assert epoch_selection.monitor_mode("loss") == "min"


def test_best_epoch_is_kept_recorded_and_survives_a_restart(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)), rng.integers(0, 3, 32)
    vx, vy = rng.normal(size=(16, 4)), rng.integers(0, 3, 16)  # noise: val loss rises as it overfits
    record, best = str(tmp_path / "history.json"), str(tmp_path / "best.weights.h5")
    model, spy = _model(), _Spy()
    model.fit(x, y, validation_data=(vx, vy), epochs=6, verbose=0,
              callbacks=[epoch_selection.EpochRecord(record, best), spy])
    data = json.load(open(record))
    losses = [e["val_loss"] for e in data["epochs"]]
    assert [e["epoch"] for e in data["epochs"]] == list(range(1, 7))
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(data["epochs"][0])
    assert data["best_epoch"] == 1 + int(np.argmin(losses)) and data["best_value"] == min(losses)
    assert data["best_epoch"] < 6  # so "best" and "last" differ below

    last_weights = [w.numpy().copy() for w in model.weights]
    epoch, _ = epoch_selection.select(model, "last", record, best)
    assert epoch == 6 and all(np.array_equal(a, w.numpy()) for a, w in zip(last_weights, model.weights))
    epoch, _ = epoch_selection.select(model, "best", record, best)
    assert epoch == data["best_epoch"]
    for want, got in zip(spy.weights[epoch], model.weights):
        np.testing.assert_array_equal(want, got.numpy())

    # A second process resumes at epoch 6: the history grows and a worse epoch
    # does not replace the best (ModelCheckpoint would forget its best value).
    resumed = _model()
    resumed.fit(x, y, validation_data=(vx, vy), epochs=8, initial_epoch=6, verbose=0,
                callbacks=[epoch_selection.EpochRecord(record, best)])
    data2 = json.load(open(record))
    assert [e["epoch"] for e in data2["epochs"]] == list(range(1, 9))
    all_losses = [e["val_loss"] for e in data2["epochs"]]
    assert data2["best_epoch"] == 1 + int(np.argmin(all_losses))
    with pytest.raises(ValueError, match="keep must be one of"):
        epoch_selection.select(model, "median", record, best)


def test_write_json_is_strict_json(tmp_path):
    from tftransfer import workdir

    path = tmp_path / "m.json"
    workdir.write_json(str(path), {"loss": float("nan"), "x": [np.float32(1.5), float("inf")]})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c)) == {"loss": None, "x": [1.5, None]}
