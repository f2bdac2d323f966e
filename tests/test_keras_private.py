"""Every Keras internal behind `tftransfer.keras_private` still behaves as relied on.

A Keras upgrade that renames or changes one of them fails here, loudly and
by name, instead of silently mis-training (e.g. a frozen layer group that
never unfreezes, a learning-rate multiplier that finds no variable).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tftransfer import keras_private


def test_checked_keras_version():
    assert keras.__version__.startswith(keras_private.CHECKED_KERAS_VERSION.rsplit(".", 1)[0]), (
        f"Keras {keras.__version__}: re-check every function in tftransfer/keras_private.py, then "
        f"update CHECKED_KERAS_VERSION")


def test_sublayers_finds_layers_held_in_attributes():
    class Block(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.inner = {"dense": keras.layers.Dense(2, name="held")}

        def call(self, x):
            return self.inner["dense"](x)

    inputs = keras.Input((3,))
    model = keras.Model(inputs, Block()(inputs))
    names = [l.name for l in keras_private.sublayers(model)]
    assert "held" in names and model.name not in names  # Model.layers would miss "held"
    assert keras_private.sublayers(model, include_self=True)[0] is model
    assert "held" not in [l.name for l in keras_private.sublayers(model, recursive=False)]


def test_optimizer_variable_key_tracking_and_weight_decay():
    a, b = keras.Variable(np.ones(2), name="a"), keras.Variable(np.ones(2), name="bias")
    optimizer = keras.optimizers.AdamW(weight_decay=0.1)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    optimizer.build([a, b])
    c = keras.Variable(np.ones(2), name="c")
    assert keras_private.tracks_variable(optimizer, a) and not keras_private.tracks_variable(optimizer, c)
    assert keras_private.variable_key(optimizer, a) != keras_private.variable_key(optimizer, b)
    assert keras_private.uses_weight_decay(optimizer, a) and not keras_private.uses_weight_decay(optimizer, b)
    assert type(optimizer)._apply_weight_decay in keras_private.default_weight_decay_methods()


def test_stateless_seed_depends_only_on_its_seed():
    def draws(seed):
        generator = keras_private.StatelessSeed(tf.constant(seed, tf.int64))
        return [keras.random.uniform((4,), seed=generator).numpy() for _ in range(2)]

    first, again, other = draws([1, 2]), draws([1, 2]), draws([1, 3])
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not np.allclose(first[0], first[1])  # each draw is a new one
    assert not np.allclose(first[0], other[0])


def test_kernel_variable_and_adding_weights_to_a_built_layer():
    dense = keras.layers.EinsumDense("ab,bcd->acd", output_shape=(2, 3))
    dense.build((None, 4))
    embedding = keras.layers.Embedding(5, 3)
    embedding.build((None,))
    assert keras_private.kernel_variable(dense) is dense.kernel  # no Keras LoRA: the variable itself
    assert keras_private.kernel_variable(embedding) is embedding.embeddings
    dense.enable_lora(1)  # the public property is now the merged value, not the variable
    assert keras_private.kernel_variable(dense) is not dense.kernel
    assert isinstance(keras_private.kernel_variable(dense), keras.Variable)
    before = len(dense.weights)
    with pytest.raises(ValueError):
        dense.add_weight(name="extra", shape=(1,))  # a built layer refuses new weights
    with keras_private.weights_unlocked(dense):
        dense.extra = dense.add_weight(name="extra", shape=(1,))
    assert len(dense.weights) == before + 1
