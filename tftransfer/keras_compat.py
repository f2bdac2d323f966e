"""Keras 3.15 fixes for `fit` under `MultiWorkerMirroredStrategy` (only).

Keras 3.15's TensorFlow trainer breaks `model.fit` under
`tf.distribute.MultiWorkerMirroredStrategy` in two places:

1. `TensorFlowTrainer._maybe_symbolic_build` reduces the whole nested first
   batch with `strategy.reduce("MEAN", batch)`, which this strategy cannot
   do for a dict of `PerReplica` values ("Attempt to convert a value
   ({'token_ids': PerReplica:{...}}) with an unsupported type (<class
   'dict'>) to a Tensor"), keras-team/keras#20329. The build only needs the
   batch's structure and shapes: the fix takes the first local value of
   every distributed leaf.
2. `reduce_per_replica` reduces every scalar log with
   `strategy.reduce("MEAN", v, axis=0)` ("Invalid reduction dimension 0 for
   input with 0 dimensions"), the failure behind keras-team/keras#20585. The
   fix reduces scalars with `axis=None` (tensors with a batch axis keep
   `axis=0`).

`apply_multi_worker_fixes()` installs both replacements once; each one
checks the strategy and hands everything that is not a multi-worker
collective strategy to Keras' own function unchanged, so single-process
runs behave exactly as without the shim. `tests/test_keras_compat.py` pins
the Keras version and the source of the two replaced functions: a Keras
upgrade fails that test loudly, to re-check whether the shim is still
right or still needed.
"""

import keras

FIXED_KERAS_VERSION = "3.15."
_ORIGINALS = {}


def _trainer_module():
    from keras.src.backend.tensorflow import trainer

    return trainer


def _is_multi_worker(strategy):
    return _trainer_module()._collective_all_reduce_multi_worker(strategy)


def apply_multi_worker_fixes():
    """Install the two replacements (idempotent). Returns True if installed."""
    if not keras.__version__.startswith(FIXED_KERAS_VERSION) or _ORIGINALS:
        return bool(_ORIGINALS)
    import tensorflow as tf

    trainer = _trainer_module()
    original_build = trainer.TensorFlowTrainer._maybe_symbolic_build
    original_reduce = trainer.reduce_per_replica
    _ORIGINALS.update(build=original_build, reduce=original_reduce)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if strategy is None or iterator is None or not _is_multi_worker(strategy):
            return original_build(self, iterator=iterator, data_batch=data_batch)
        for _, _, it in iterator:
            batch = next(it)
            break

        def local(value):
            if isinstance(value, tf.distribute.DistributedValues):
                return strategy.experimental_local_results(value)[0]
            return value

        batch = tf.nest.map_structure(local, batch)
        with strategy.scope():
            self._symbolic_build(data_batch=batch)

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("mean", "auto") or not _is_multi_worker(strategy):
            return original_reduce(values, strategy, reduction)

        def one(v):
            if not isinstance(v, (tf.Tensor, tf.distribute.DistributedValues, tf.Variable)):
                return v
            local_value = strategy.experimental_local_results(v)[0]
            axis = None if local_value.shape.rank == 0 else 0
            return strategy.reduce("MEAN", v, axis=axis)

        return tf.nest.map_structure(one, values)

    trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    trainer.reduce_per_replica = reduce_per_replica
    return True
