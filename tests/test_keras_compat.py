"""The Keras multi-worker shim is pinned to the Keras it fixes.

`tftransfer.keras_compat` replaces two functions of Keras 3.15's TensorFlow
trainer (keras-team/keras#20329, #20585). Any Keras upgrade, or any change
to those two functions, fails here on purpose: re-run
tests/test_multiworker.py without the shim (comment out
`apply_multi_worker_fixes()` in tftransfer/distribute.py); if `fit` works,
delete the shim, else adapt it and update the pins below.
"""

import hashlib
import inspect

import keras

from tftransfer import keras_compat

# sha256[:16] of the source of the two replaced Keras functions (3.15.1).
PINNED_SOURCES = {
    "TensorFlowTrainer._maybe_symbolic_build": "92a504f5eba9b29f",
    "reduce_per_replica": "2e7d54b1e6edc29a",
}


def _originals():
    from keras.src.backend.tensorflow import trainer

    build = keras_compat._ORIGINALS.get("build", trainer.TensorFlowTrainer._maybe_symbolic_build)
    reduce = keras_compat._ORIGINALS.get("reduce", trainer.reduce_per_replica)
    return {"TensorFlowTrainer._maybe_symbolic_build": build, "reduce_per_replica": reduce}


def test_shim_is_pinned_to_the_keras_it_fixes():
    assert keras.__version__.startswith(keras_compat.FIXED_KERAS_VERSION), (
        f"Keras {keras.__version__} is not the {keras_compat.FIXED_KERAS_VERSION}x the multi-worker shim "
        f"was written for: re-check tftransfer/keras_compat.py (see this file's docstring)."
    )
    for name, function in _originals().items():
        digest = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]
        assert digest == PINNED_SOURCES[name], (
            f"Keras changed {name}: the multi-worker shim in tftransfer/keras_compat.py may now be "
            f"wrong or unnecessary; re-check it (see this file's docstring)."
        )


def test_the_bugs_the_shim_fixes_are_still_in_keras():
    sources = {name: inspect.getsource(f) for name, f in _originals().items()}
    # 1. The whole nested batch is reduced (keras-team/keras#20329).
    assert "self.distribute_strategy.reduce(" in sources["TensorFlowTrainer._maybe_symbolic_build"]
    # 2. Scalar logs are reduced with axis=0 (keras-team/keras#20585).
    assert 'strategy.reduce("MEAN", v, axis=0)' in sources["reduce_per_replica"]
