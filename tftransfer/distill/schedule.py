"""`DistillationSchedule`: alpha and temperature that change during `fit`.

The distiller keeps `alpha` and `temperature` in non-trainable
`keras.Variable`s that the compiled train step *reads*; this callback only
assigns them. The train function is therefore traced once and every change
takes effect at the next step (a Python float would be baked into the graph
as a constant, and changing it would do nothing without a retrace).
"""

import math

import keras

from tftransfer.errors import UserError

SCHEDULES = ("constant", "linear", "cosine")
UNITS = ("epoch", "step")


def schedule_value(schedule, start, end, progress):
    """The value of a schedule at `progress` in [0, 1] (clipped).

    Args:
        schedule: str. `constant` (always `start`), `linear`, or `cosine`
            (half cosine from `start` to `end`, flat at both ends).
        start: float. Value at progress 0.
        end: float. Value at progress 1.
        progress: float. Fraction of the schedule done.

    Example:
    ```python
    schedule_value("linear", 0.0, 1.0, 0.25)  # 0.25
    schedule_value("cosine", 0.0, 1.0, 0.5)   # 0.5
    ```
    """
    p = min(max(float(progress), 0.0), 1.0)
    if schedule == "constant":
        return float(start)
    if schedule == "linear":
        return float(start + (end - start) * p)
    if schedule == "cosine":
        return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p)))
    raise UserError(f"schedule must be one of {', '.join(SCHEDULES)}. Received: schedule={schedule!r}.")


class DistillationSchedule(keras.callbacks.Callback):
    """Move the distillation weight `alpha` and temperature `T` on a schedule.

    Each value goes from its start to its end value over `duration` epochs
    or steps (then stays at the end value), and is written into the model's
    `alpha` / `temperature` variables at the start of every epoch (unit
    `epoch`) or batch (unit `step`). The values also appear in the epoch
    logs (`history.history["alpha"]`, `["temperature"]`).

    Position is a pure function of the epoch (and batch), so a run resumed
    by `keras.callbacks.BackupAndRestore` gets the same values.

    Args:
        alpha: float. Weight of the hard-label loss at the start, in [0, 1].
            (Required: the callback overwrites the model's value.)
        temperature: float. Softmax temperature at the start, > 0.
        alpha_end: float. Value of alpha at the end. Defaults to None (stay
            at `alpha`).
        temperature_end: float. Temperature at the end. Defaults to None
            (stay at `temperature`).
        schedule: str. `constant`, `linear` or `cosine`. Defaults to
            `"constant"`.
        unit: str. `epoch` or `step`. Defaults to `"epoch"`.
        duration: int. Epochs or steps from start to end value. Defaults to
            None: the whole `fit` (the last epoch / step gets the end value).
        target: object with `alpha` and `temperature` variables. Defaults to
            None: the model being fit (`tftransfer.distill.Distiller`).

    Example:
    ```python
    distiller = tftransfer.distill.Distiller(teacher, student, heads)
    distiller.compile("adam", metrics=...)
    schedule = DistillationSchedule(alpha=0.0, alpha_end=0.5, temperature=4.0,
                                    temperature_end=1.0, schedule="linear")
    distiller.fit(train_ds, epochs=5, callbacks=[schedule])
    # epochs 0..4: alpha 0.0, 0.125, 0.25, 0.375, 0.5; T 4.0, 3.25, 2.5, 1.75, 1.0
    ```
    """

    def __init__(self, alpha, temperature, alpha_end=None, temperature_end=None,
                 schedule="constant", unit="epoch", duration=None, target=None):
        super().__init__()
        if schedule not in SCHEDULES:
            raise UserError(
                f"DistillationSchedule: schedule must be one of {', '.join(SCHEDULES)}. "
                f"Received: schedule={schedule!r}."
            )
        if unit not in UNITS:
            raise UserError(f"DistillationSchedule: unit must be epoch or step. Received: unit={unit!r}.")
        alpha_end = alpha if alpha_end is None else alpha_end
        temperature_end = temperature if temperature_end is None else temperature_end
        for name, value in (("alpha", alpha), ("alpha_end", alpha_end)):
            if not 0.0 <= value <= 1.0:
                raise UserError(f"DistillationSchedule: {name} must be in [0, 1]. Received: {name}={value}.")
        for name, value in (("temperature", temperature), ("temperature_end", temperature_end)):
            if not value > 0.0:
                raise UserError(f"DistillationSchedule: {name} must be > 0. Received: {name}={value}.")
        if duration is not None and (isinstance(duration, bool) or not isinstance(duration, int) or duration < 1):
            raise UserError(f"DistillationSchedule: duration must be an integer >= 1. Received: duration={duration!r}.")
        if schedule == "constant" and (alpha_end != alpha or temperature_end != temperature):
            raise UserError(
                "DistillationSchedule: schedule='constant' with an end value; use "
                "schedule='linear' or 'cosine', or drop alpha_end / temperature_end."
            )
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.alpha_end = float(alpha_end)
        self.temperature_end = float(temperature_end)
        self.schedule = schedule
        self.unit = unit
        self.duration = duration
        self.target = target
        self._length = duration
        self._epoch = self._base = self._seen = 0
        self._steps = None
        self._target = None

    def value_at(self, position):
        """`(alpha, temperature)` at an epoch or step index (0-based)."""
        length = self._length or 1
        progress = position / length
        return (
            schedule_value(self.schedule, self.alpha, self.alpha_end, progress),
            schedule_value(self.schedule, self.temperature, self.temperature_end, progress),
        )

    def on_train_begin(self, logs=None):
        target = self.target if self.target is not None else self.model
        for name in ("alpha", "temperature"):
            if not isinstance(getattr(target, name, None), keras.Variable):
                raise UserError(
                    f"DistillationSchedule needs a model with an `{name}` keras.Variable "
                    f"(tftransfer.distill.Distiller); {type(target).__name__} has none."
                )
        self._target = target
        epochs = self.params.get("epochs") or 1
        self._steps = self.params.get("steps")
        if self.duration is not None:
            self._length = self.duration
        elif self.unit == "epoch":
            self._length = max(epochs - 1, 1)
        else:
            if not self._steps:
                raise UserError(
                    "DistillationSchedule(unit='step'): the number of steps per epoch is unknown; "
                    "pass duration= (steps) or steps_per_epoch to fit."
                )
            self._length = max(epochs * self._steps - 1, 1)
        self._epoch = self._base = self._seen = 0
        self._assign(0)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        # Steps before this epoch: exact when the epoch length is known
        # (also after a resume), else counted.
        self._base = epoch * self._steps if self._steps else self._seen
        self._assign(epoch if self.unit == "epoch" else self._base)

    def on_train_batch_begin(self, batch, logs=None):
        if self.unit == "step":
            self._assign(self._base + batch)

    def on_train_batch_end(self, batch, logs=None):
        self._seen = self._base + batch + 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["alpha"] = float(keras.ops.convert_to_numpy(self._target.alpha))
            logs["temperature"] = float(keras.ops.convert_to_numpy(self._target.temperature))

    def _assign(self, position):
        alpha, temperature = self.value_at(position)
        self._target.alpha.assign(alpha)
        self._target.temperature.assign(temperature)
