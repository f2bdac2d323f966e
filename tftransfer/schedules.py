"""Learning-rate schedules for fine-tuning (Keras-serializable)."""

import keras

from tftransfer.errors import UserError


@keras.saving.register_keras_serializable(package="tftransfer")
class SlantedTriangular(keras.optimizers.schedules.LearningRateSchedule):
    """ULMFiT's slanted triangular learning rate (Howard & Ruder, 2018).

    A short linear warm-up from `max_lr / ratio` to `max_lr` over the first
    `cut = max(1, floor(cut_frac * total_steps))` steps, then a long linear
    decay back to `max_lr / ratio` at `total_steps`; it stays there after.
    With `p = t / cut` while `t < cut`, else
    `p = 1 - (t - cut) / (total_steps - cut)` (clipped to [0, 1]):

        lr(t) = max_lr * (1 + p * (ratio - 1)) / ratio

    This is the paper's formula; the decay denominator `total_steps - cut`
    equals the paper's `cut * (1 / cut_frac - 1)` whenever
    `cut_frac * total_steps` is a whole number, and otherwise makes the
    schedule end exactly at `max_lr / ratio`.

    Under `tftransfer.ProgressiveUnfreezing` with `lr_decay`, each layer
    group follows the same shape scaled by its multiplier.

    Args:
        max_lr: float. Peak learning rate, reached at step `cut`.
        total_steps: int. Length of the schedule (usually epochs x steps per
            epoch).
        cut_frac: float in (0, 1). Fraction of steps spent increasing.
            Defaults to 0.1.
        ratio: float >= 1. How much smaller the lowest rate is than
            `max_lr`. Defaults to 32.
        name: str. Defaults to `"SlantedTriangular"`.

    Example:
    ```python
    schedule = SlantedTriangular(1e-3, total_steps=100)
    float(schedule(0)), float(schedule(10)), float(schedule(100))
    # (3.125e-05, 0.001, 3.125e-05)
    optimizer = keras.optimizers.Adam(schedule)
    ```
    """

    def __init__(self, max_lr, total_steps, cut_frac=0.1, ratio=32, name="SlantedTriangular"):
        super().__init__()
        if isinstance(max_lr, bool) or not isinstance(max_lr, (int, float)) or not max_lr > 0:
            raise UserError(f"SlantedTriangular: max_lr must be a number > 0. Received: max_lr={max_lr!r}.")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise UserError(
                f"SlantedTriangular: total_steps must be an integer >= 1. "
                f"Received: total_steps={total_steps!r}."
            )
        if not (isinstance(cut_frac, (int, float)) and 0.0 < cut_frac < 1.0):
            raise UserError(
                f"SlantedTriangular: cut_frac must be in (0, 1). Received: cut_frac={cut_frac!r}."
            )
        if not (isinstance(ratio, (int, float)) and ratio >= 1):
            raise UserError(f"SlantedTriangular: ratio must be >= 1. Received: ratio={ratio!r}.")
        self.max_lr = float(max_lr)
        self.total_steps = int(total_steps)
        self.cut_frac = float(cut_frac)
        self.ratio = float(ratio)
        self.name = name
        self.cut = max(1, int(self.total_steps * self.cut_frac))

    def __call__(self, step):
        with keras.name_scope(self.name):
            t = keras.ops.cast(step, "float32")
            cut = float(self.cut)
            up = t / cut
            down = 1.0 - (t - cut) / float(max(self.total_steps - self.cut, 1))
            p = keras.ops.clip(keras.ops.where(t < cut, up, down), 0.0, 1.0)
            return self.max_lr * (1.0 + p * (self.ratio - 1.0)) / self.ratio

    def get_config(self):
        return {
            "max_lr": self.max_lr,
            "total_steps": self.total_steps,
            "cut_frac": self.cut_frac,
            "ratio": self.ratio,
            "name": self.name,
        }
