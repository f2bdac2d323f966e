"""Per-variable learning-rate multipliers for any Keras 3 optimizer.

Discriminative fine-tuning (ULMFiT) trains each layer group at its own
learning rate. Keras 3 optimizers take one learning rate (a float or a
`LearningRateSchedule`) and hand it to `update_step(gradient, variable,
learning_rate)` once per variable. `set_lr_multipliers` wraps that method on
one optimizer instance so that a listed variable's update sees
`learning_rate * multiplier`:

- it works with every optimizer that implements `update_step` (SGD, Adam,
  AdamW, RMSprop, Lion, ...) and with learning-rate schedules, because it
  scales the learning rate itself, never the gradient (scaling the gradient
  would cancel out in Adam's `m / sqrt(v)`);
- decoupled weight decay (`weight_decay=`) is scaled the same way, as in
  fastai, since Keras multiplies it by the learning rate;
- `keras.optimizers.LossScaleOptimizer` (mixed_float16) is unwrapped: the
  multipliers go on its inner optimizer;
- under `tf.distribute` the update runs per replica on the variable's
  components; `optimizer._var_key` maps a component back to its variable,
  the same lookup the optimizer uses for its own slots.

The multipliers live on the optimizer object only. `model.save` /
`save_weights` write the unwrapped optimizer (its class, config, schedule and
slot variables) unchanged, so saving and `safe_mode` loading work; a reloaded
optimizer trains with one learning rate until multipliers are set again (a
`tftransfer.ProgressiveUnfreezing` with `lr_decay` does it at the start of
every `fit`).
"""

import keras

from tftransfer.errors import UserError
from tftransfer.keras_private import default_weight_decay_methods, uses_weight_decay, variable_key

# ULMFiT (Howard & Ruder, 2018): each layer group trains at the rate of the
# group above it divided by 2.6.
ULMFIT_LR_DECAY = 1 / 2.6

_STATE = "_tftransfer_lr_state"


class _MultiplierState:
    """What `set_lr_multipliers` attaches to an optimizer instance."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.table = {}
        self.owner = None
        self.original_update_step = optimizer.update_step
        self.patched_weight_decay = _uses_default_weight_decay(optimizer)

    def multiplier(self, variable):
        return self.table.get(variable_key(self.optimizer, variable), 1.0)


def inner_optimizer(optimizer):
    """The optimizer that runs `update_step` (unwraps LossScaleOptimizer)."""
    while isinstance(getattr(optimizer, "inner_optimizer", None), keras.optimizers.Optimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


def set_lr_multipliers(optimizer, multipliers, owner=None):
    """Scale the learning rate per variable inside `optimizer`'s update step.

    Replaces multipliers set earlier on the same optimizer. Variables not
    listed train at the optimizer's own learning rate. Takes effect in train
    functions traced afterwards (`model.make_train_function(force=True)`;
    `tftransfer.ProgressiveUnfreezing` does it).

    Args:
        optimizer: `keras.optimizers.Optimizer`, possibly a
            `LossScaleOptimizer`.
        multipliers: iterable of `(variables, multiplier)` pairs:
            `variables` a list of `keras.Variable`, `multiplier` a float > 0.
        owner: str or None. Who set them (see `clear_lr_multipliers`).
            Defaults to None.

    Returns:
        The optimizer (the same object).

    Example:
    ```python
    optimizer = keras.optimizers.Adam(1e-3)
    set_lr_multipliers(optimizer, [(backbone.trainable_variables, 0.1)])
    model.compile(optimizer=optimizer, loss="mse")  # backbone at 1e-4
    ```
    """
    target = inner_optimizer(optimizer)
    pairs = [(list(variables), float(m)) for variables, m in multipliers]
    for _, m in pairs:
        if not m > 0:
            raise UserError(
                f"set_lr_multipliers: every multiplier must be > 0. Received: {m!r}."
            )
    state = target.__dict__.get(_STATE)
    if state is None:
        state = _MultiplierState(target)
        # object.__setattr__: plain Python state, kept out of Keras/TF
        # tracking so it never reaches a checkpoint or a saved config.
        object.__setattr__(target, _STATE, state)
        object.__setattr__(target, "update_step", _scaled_update_step(state))
        if state.patched_weight_decay:
            object.__setattr__(target, "_apply_weight_decay", _scaled_weight_decay(state))
    table = {}
    for variables, m in pairs:
        for variable in variables:
            table[variable_key(target, variable)] = m
    state.table = table
    state.owner = owner
    return optimizer


def clear_lr_multipliers(optimizer, owner=None):
    """Every variable back to the optimizer's own learning rate.

    With `owner`, only multipliers set with that same `owner` are cleared.
    """
    target = inner_optimizer(optimizer)
    state = target.__dict__.get(_STATE)
    if state is not None and (owner is None or state.owner == owner):
        state.table = {}
        state.owner = None
    return optimizer


def discriminative_multipliers(group_names, decay=ULMFIT_LR_DECAY):
    """ULMFiT's learning-rate multipliers, head first.

    The head (every variable outside the backbone's groups) trains at the
    full rate; the top backbone group at `decay`, the one below at
    `decay**2`, ..., the bottom group at `decay**len(group_names)`.

    Args:
        group_names: list of str. Backbone layer groups, bottom to top.
        decay: float in (0, 1]. Defaults to `1 / 2.6`.

    Returns:
        dict `{"head": 1.0, group_name: decay**depth}`.

    Example:
    ```python
    discriminative_multipliers(["stem", "stack0", "stack1"], 0.5)
    # {'head': 1.0, 'stem': 0.125, 'stack0': 0.25, 'stack1': 0.5}
    ```
    """
    if not (isinstance(decay, (int, float)) and 0.0 < decay <= 1.0):
        raise UserError(f"lr_decay must be a number in (0, 1]. Received: lr_decay={decay!r}.")
    n = len(group_names)
    out = {"head": 1.0}
    for i, name in enumerate(group_names):
        out[name] = float(decay) ** (n - i)
    return out


# ---------------------------------------------------------------------------
# The wrapped methods
# ---------------------------------------------------------------------------


def _scaled_update_step(state):
    def update_step(gradient, variable, learning_rate):
        m = state.multiplier(variable)
        if m != 1.0:
            learning_rate = learning_rate * m
        return state.original_update_step(gradient, variable, learning_rate)

    return update_step


def _uses_default_weight_decay(optimizer):
    """True if the optimizer keeps Keras' own `lr * wd` decoupled decay."""
    return type(optimizer)._apply_weight_decay in default_weight_decay_methods()


def _scaled_weight_decay(state):
    """Keras' `_apply_weight_decay` with the learning rate scaled per variable."""
    optimizer = state.optimizer

    def decay_one(variable):
        if uses_weight_decay(optimizer, variable):
            lr = keras.ops.cast(optimizer.learning_rate, variable.dtype) * state.multiplier(variable)
            wd = keras.ops.cast(optimizer.weight_decay, variable.dtype)
            variable.assign_sub(variable * wd * lr)

    if keras.backend.backend() != "tensorflow":

        def apply_weight_decay(variables):
            if optimizer.weight_decay is None:
                return
            for variable in variables:
                decay_one(variable)

        return apply_weight_decay

    import tensorflow as tf

    def apply_weight_decay(variables):
        # Same as keras/src/backend/tensorflow/optimizer.py, plus the
        # multiplier: merge_call + extended.update reach every replica.
        if optimizer.weight_decay is None:
            return

        def distributed(distribution, variables, **kwargs):
            for variable in variables:
                if isinstance(variable, keras.Variable):
                    variable = variable.value
                distribution.extended.update(variable, decay_one, group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(
            distributed, optimizer._distribution_strategy, variables
        )

    return apply_weight_decay
