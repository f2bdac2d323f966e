"""Which epoch ships: per-epoch history and the best epoch, both resume-safe.

`EpochRecord` is a Keras callback that, at every epoch end,
- appends the epoch's logs (train and validation, every head, and what other
  callbacks added: unfreezing stage, learning rates) to a JSON record, and
- when the monitored value improves, saves the weights as the best epoch's.

The record is rewritten atomically each epoch and read back when a killed
run resumes, so the history covers every epoch of the run, not only those
of the last process, and the best value survives the restart.
`keras.callbacks.ModelCheckpoint(save_best_only=True)` cannot do the
latter: it forgets its best value on restart, so a resumed run would
overwrite a better checkpoint with the first epoch it sees. Keras'
`History` has the former problem.

`select(...)` then applies `train.keep` after `fit`: `best` loads the best
epoch's weights, `last` keeps the final ones, and it returns the epoch the
shipped model comes from.
"""

import json
import math
import os

import keras

from tftransfer import keras_private

KEEP_CHOICES = ("best", "last")


def monitor_mode(monitor):
    """`"min"` for losses and errors, `"max"` for everything else (accuracy, AUC, F1)."""
    name = monitor.split("val_", 1)[-1]
    return "min" if ("loss" in name or "error" in name or name in ("mse", "mae")) else "max"


def read_record(path):
    """The JSON record at `path`, or an empty one."""
    if not os.path.exists(path):
        return {"epochs": [], "best_epoch": None, "best_value": None, "monitor": None}
    with open(path) as f:
        return json.load(f)


def _atomic_write_json(path, data):
    from tftransfer.workdir import write_json

    write_json(path, data)


class EpochRecord(keras.callbacks.Callback):
    """Record every epoch's logs and keep the best epoch's weights.

    Args:
        record_path: str. The JSON record (`W/history.json`).
        best_weights_path: str. Where the best epoch's weights go
            (`W/checkpoints/best.weights.h5`).
        monitor: str. The logged value that decides "best". Defaults to
            `"val_loss"`.
        mode: str. `"min"`, `"max"` or `"auto"` (from the name, see
            `monitor_mode`). Defaults to `"auto"`.

    Epoch numbers in the record are 1-based, as Keras prints them
    ("Epoch 3/10" is epoch 3).
    """

    def __init__(self, record_path, best_weights_path, monitor="val_loss", mode="auto"):
        super().__init__()
        if mode not in ("min", "max", "auto"):
            raise ValueError(f"EpochRecord: mode must be min, max or auto. Received: mode={mode!r}.")
        self.record_path = record_path
        self.best_weights_path = best_weights_path
        self.monitor = monitor
        self.mode = monitor_mode(monitor) if mode == "auto" else mode
        self._saved = None  # (epoch, path) of this process's last best-weights write
        self._writer = keras_private.WeightsWriter()  # save_weights, without Keras' walk every epoch

    def on_train_begin(self, logs=None):
        self.record = read_record(self.record_path)
        if self.record.get("monitor") not in (None, self.monitor):
            # A different monitor: earlier "best" values are not comparable.
            self.record.update(best_epoch=None, best_value=None)
        self.record["monitor"] = self.monitor
        self.record["mode"] = self.mode

    def on_epoch_end(self, epoch, logs=None):
        epoch += 1  # 1-based, as printed
        logs = {k: _number(v) for k, v in (logs or {}).items()}
        epochs = [e for e in self.record["epochs"] if e["epoch"] != epoch]  # a re-run epoch replaces itself
        epochs.append({"epoch": epoch, **logs})
        self.record["epochs"] = sorted(epochs, key=lambda e: e["epoch"])
        value = logs.get(self.monitor)
        if value is not None and math.isfinite(value) and self._better(value):
            os.makedirs(os.path.dirname(self.best_weights_path) or ".", exist_ok=True)
            tmp = self.best_weights_path + ".tmp.weights.h5"
            self._writer.save(self.model, tmp)
            os.replace(tmp, self.best_weights_path)
            self.record.update(best_epoch=epoch, best_value=value)
            self._saved = (epoch, self.best_weights_path)
        _atomic_write_json(self.record_path, self.record)

    def saved_at(self, epoch):
        """The best-weights file if it was written at the end of (1-based) `epoch`
        and the weights have not changed since (the same epoch end), else None."""
        saved = self._saved
        return saved[1] if saved and saved[0] == epoch and os.path.isfile(saved[1]) else None

    def _better(self, value):
        best = self.record.get("best_value")
        if best is None:
            return True
        return value < best if self.mode == "min" else value > best


def select(model, keep, record_path, best_weights_path):
    """Apply `keep` after `fit`; return `(selected_epoch, record)`.

    Args:
        model: the trained keras.Model (its weights are replaced for `best`).
        keep: str. `"best"` (the best epoch's weights, when one was recorded)
            or `"last"`.
        record_path, best_weights_path: as given to `EpochRecord`.

    Returns:
        tuple. The (1-based) epoch the model's weights now come from (None
        when no epoch ran) and the record (history and best epoch).
    """
    if keep not in KEEP_CHOICES:
        raise ValueError(f"keep must be one of {KEEP_CHOICES}. Received: keep={keep!r}.")
    record = read_record(record_path)
    last = record["epochs"][-1]["epoch"] if record["epochs"] else None
    best = record.get("best_epoch")
    if keep == "best" and best is not None and best != last and os.path.exists(best_weights_path):
        model.load_weights(best_weights_path)
        return best, record
    return last, record


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value
