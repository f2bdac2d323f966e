"""The Keras internals tftransfer relies on, each behind one small function.

Keras 3 has no public API for these needs; each function below names what
it reads and why no public route exists. All were checked against Keras
3.15.1 (`CHECKED_KERAS_VERSION`). `tests/test_keras_private.py` exercises
every one of them and fails loudly when a Keras upgrade changes or removes
an internal, so the fix is one place, found at once, not silent wrong
training. (The multi-worker `fit` fixes are in `tftransfer.keras_compat`;
the keras-hub internals the Hugging Face loader reuses are in
`tftransfer.hf_bert`, pinned by its numerics test.)
"""

import keras

CHECKED_KERAS_VERSION = "3.15.1"


def sublayers(layer, include_self=False, recursive=True):
    """Every layer nested in `layer` (depth first), optionally with itself.

    `Layer._flatten_layers`: Keras' own traversal (it follows layers held in
    attributes, lists and dicts, which `Model.layers` does not: a
    keras-hub backbone's transformer blocks hold their dense layers as
    attributes).
    """
    return list(layer._flatten_layers(include_self=include_self, recursive=recursive))


def kernel_variable(layer):
    """The stored kernel variable of a `Dense` / `EinsumDense` (`_kernel`) or
    the table of an `Embedding` (`_embeddings`).

    The public `kernel` / `embeddings` properties return the LoRA-merged
    value once Keras' adapters are on, not the variable; LoRA merging and
    our own adapters (`tftransfer.lora`) must read and assign the variable.
    """
    return layer._kernel if hasattr(layer, "_kernel") else layer._embeddings


class weights_unlocked:
    """Context manager: add weights to an already built layer
    (`Layer._tracker.unlock()` / `lock()`, as Keras' own `enable_lora` does;
    a built layer refuses new variables otherwise)."""

    def __init__(self, layer):
        self.tracker = layer._tracker

    def __enter__(self):
        self.tracker.unlock()

    def __exit__(self, *exc):
        self.tracker.lock()
        return False


def variable_key(optimizer, variable):
    """The optimizer's key for `variable` (`BaseOptimizer._var_key`).

    The optimizer indexes its per-variable state and the gradients of
    `apply` by this key; the per-variable learning-rate multipliers must
    use the same key to find a variable again inside `update_step`.
    """
    return optimizer._var_key(variable)


def tracks_variable(optimizer, variable):
    """Whether the built `optimizer` holds state for `variable`.

    `BaseOptimizer._trainable_variables_indices`: an optimizer builds its
    slots once, for the trainable variables of its first `apply`; a
    variable made trainable later (gradual unfreezing) has no slots, and
    Keras raises on it. Checking here lets the caller rebuild first.
    """
    return variable_key(optimizer, variable) in optimizer._trainable_variables_indices


def uses_weight_decay(optimizer, variable):
    """Whether `optimizer` decays `variable` (`BaseOptimizer._use_weight_decay`,
    which applies `exclude_from_weight_decay`)."""
    return optimizer._use_weight_decay(variable)


def default_weight_decay_methods():
    """Keras' own `_apply_weight_decay` implementations (base and TensorFlow).

    The per-variable learning-rate multipliers re-implement decoupled weight
    decay with a scaled rate, which is only right for optimizers that keep
    Keras' default decay; a subclass with its own decay is left alone.
    """
    from keras.src.optimizers import base_optimizer

    methods = [base_optimizer.BaseOptimizer._apply_weight_decay]
    if keras.backend.backend() == "tensorflow":
        from keras.src.backend.tensorflow import optimizer as tf_optimizer

        methods.append(tf_optimizer.TFOptimizer._apply_weight_decay)
    return methods


class StatelessSeed(keras.random.SeedGenerator):
    """A seed "generator" that derives every draw from one given seed tensor.

    Keras' random ops accept an int or a `SeedGenerator`, whose `next()`
    reads and advances a variable: that state cannot be made per batch
    inside a parallel tf.data map (the order of draws across map threads is
    not fixed, and a resumed run starts the variable again). Here `next()`
    folds a call counter into `seed` (a `(2,)` integer tensor) without any
    variable, so a batch's augmentation depends only on its own seed.
    Relies on `keras.random` calling `seed.next()` for `SeedGenerator`
    instances (`keras.src.random.seed_generator.draw_seed`).
    """

    def __init__(self, seed):  # No super().__init__: that makes the state variable.
        import tensorflow as tf

        self._seed = tf.cast(seed, tf.int64)
        self._draws = 0

    def next(self, ordered=True):
        import tensorflow as tf

        self._draws += 1
        return tf.random.experimental.stateless_fold_in(self._seed, self._draws)
