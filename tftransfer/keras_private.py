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


class WeightsWriter:
    """`model.save_weights(path)` for a model saved again and again (every epoch).

    Writes the same `.weights.h5` file as Keras (the same groups, `name`
    attributes and datasets; `model.load_weights` reads it), ~5x faster for
    small models: Keras' `save_weights_only` walks the whole object graph
    (`saving_lib._save_state`: `dir()` and attribute tracking of every layer,
    ~8 ms even for a linear head, a third of an epoch on cached features)
    on every call. Here the walk runs once per model with a recording store
    (a `saving_lib.H5IOStore` subclass, which `_save_state` requires), and
    later calls replay what it recorded — group paths, metadata and the
    variables each `save_own_variables` stored — straight to h5py, reading
    each variable's current value. Written here because Keras has no public
    way to reuse the walk.

    The plan is walked again when the model's, its optimizer's or its
    metrics' variables are not the same objects as before (the optimizer
    rebuilt on unfreezing, metrics built on the first step). Where a layer
    stores a computed value rather than a variable (Keras' LoRA merges
    its adapters into the kernel at save time), Keras' own `save_weights`
    writes the file.
    """

    def __init__(self):
        self._signature, self._plan = None, None

    def save(self, model, path):
        signature = _variables_signature(model)
        if signature != self._signature:
            self._signature, self._plan = signature, _record_plan(model)
        if self._plan is None:
            model.save_weights(path, overwrite=True)
            return
        _write_plan(self._plan, path)


def _variables_signature(model):
    optimizer = getattr(model, "optimizer", None)
    variables = list(model.variables) + list(getattr(model, "metrics_variables", []))
    if optimizer is not None:
        variables += list(optimizer.variables)
    return tuple(id(v) for v in variables)


def _record_plan(model):
    """`[(path, metadata, [(key, variable)])]` in Keras' write order, or None
    when something stored is not a variable."""
    from keras.src.saving import saving_lib

    class Recording(saving_lib.H5IOStore):
        def __init__(self):  # No file: only what `_save_state` would write.
            self.entries = []

        def __bool__(self):
            return True

        def make(self, path, metadata=None):
            self.entries.append((path, dict(metadata) if metadata else None, []))
            return self

        def __setitem__(self, key, value):
            self.entries[-1][2].append((key, value))

    store = Recording()
    saving_lib._save_state(model, weights_store=store, assets_store=None, inner_path="",
                           visited_saveables=set())
    optimizer = getattr(model, "optimizer", None)
    plan = []
    for path, metadata, items in store.entries:
        if not all(isinstance(value, keras.Variable) for _, value in items):
            # `BaseOptimizer.save_own_variables` stores `variables[i].numpy()` as "i".
            if path != "optimizer" or optimizer is None or not _are_values_of(items, optimizer.variables):
                return None
            items = [(key, variable) for (key, _), variable in zip(items, optimizer.variables)]
        plan.append((path, metadata, items))
    return plan


def _are_values_of(items, variables):
    """Whether `items` are `("0", variables[0].numpy()), ("1", ...)`, in order."""
    import numpy as np

    def same(i, key, value, variable):
        current = variable.numpy()
        return (key == str(i) and isinstance(value, np.ndarray | np.generic)
                and np.asarray(value).dtype == current.dtype and np.array_equal(value, current))

    return len(items) == len(variables) and all(
        same(i, key, value, v) for i, ((key, value), v) in enumerate(zip(items, variables)))


def _write_plan(plan, path):
    """What `H5IOStore` writes for `plan`: a `vars` group per entry that has
    metadata or values (`name` attribute from the metadata), a dataset per value."""
    import h5py
    from keras.src import backend

    with h5py.File(path, "w") as f:
        for entry_path, metadata, items in plan:
            if not metadata and not items:
                continue
            group = f.create_group(entry_path).create_group("vars") if entry_path else f.create_group("vars")
            for k, v in (metadata or {}).items():
                group.attrs[k] = v
            for key, variable in items:
                value = backend.convert_to_numpy(variable)
                if backend.standardize_dtype(value.dtype) == "bfloat16":
                    group.create_dataset(key, data=value).attrs["dtype"] = "bfloat16"
                else:
                    group[key] = value


class TensorBoard(keras.callbacks.TensorBoard):
    """`keras.callbacks.TensorBoard`, with each epoch's scalars written by one compiled call.

    Keras writes every epoch-end scalar with its own eager
    `tf.summary.scalar` (~0.45 ms of Python and op dispatch each): a run with
    progressive unfreezing and the validation report logs ~16 per epoch,
    ~7 ms, a fifth of an epoch when the head trains on cached features.
    Here one `tf.function` per writer and set of names writes them all. The
    events are Keras' (tags, steps, float32 values; tested against Keras'
    own callback). Overrides `TensorBoard._log_epoch_metrics` (Keras 3.15:
    `logs` split into train and `val_` scalars, plus the learning rate and
    optionally steps per second) and reuses `_collect_learning_rate`,
    `_compute_steps_per_second`, `_train_writer` and `_val_writer`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._epoch_writers = {}

    def on_train_begin(self, logs=None):
        self._epoch_writers = {}  # Keras makes new writers for each fit
        super().on_train_begin(logs)

    def _log_epoch_metrics(self, epoch, logs):
        if not logs:
            return
        train_logs = {k: v for k, v in logs.items() if not k.startswith("val_")}
        val_logs = {k[len("val_"):]: v for k, v in logs.items() if k.startswith("val_")}
        train_logs = self._collect_learning_rate(train_logs)
        if self.write_steps_per_second:
            train_logs["steps_per_second"] = self._compute_steps_per_second()
        if train_logs:
            self._write_epoch_scalars(self._train_writer, train_logs, epoch)
        if val_logs:
            self._write_epoch_scalars(self._val_writer, val_logs, epoch)

    def _write_epoch_scalars(self, writer, values, epoch):
        import tensorflow as tf

        names = tuple(values)
        write = self._epoch_writers.get((writer, names))
        if write is None:

            @tf.function
            def write(values, step):
                with writer.as_default():
                    for name in names:
                        tf.summary.scalar(f"epoch_{name}", values[name], step=step)

            self._epoch_writers[(writer, names)] = write
        write({n: tf.constant(float(values[n]), tf.float32) for n in names}, tf.constant(epoch, tf.int64))
