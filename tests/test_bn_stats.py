"""tftransfer.bn_stats: precise BatchNorm statistics after a short from-scratch run."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tftransfer
from tftransfer import bn_stats
from tftransfer.heads import HeadSpec

from conftest import TINY_RESNET


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    loaded = tftransfer.load_backbone(spec=dict(TINY_RESNET), image_size=16, load_weights=False)
    heads = [HeadSpec(num_classes=3)]
    model = tftransfer.build_model(loaded, heads)
    tftransfer.compile_for_heads(model, heads, keras.optimizers.Adam(1e-2))
    rng = np.random.RandomState(0)
    x = (rng.rand(48, 16, 16, 3) * 2 + np.repeat(np.arange(3), 16)[:, None, None, None]).astype("float32")
    y = np.repeat(np.arange(3), 16)
    before = bn_stats.snapshot(model)
    model.fit(x, {"label": y}, batch_size=8, epochs=1, verbose=0)  # 6 steps: stale averages
    return model, x, before, loaded


def test_training_changes_exactly_the_trainable_batchnorm_layers(trained):
    model, _, before, _ = trained
    changed = bn_stats.changed_layers(model, before)
    assert changed and {l.path for l in changed} == {l.path for l in bn_stats.trainable_batchnorm_layers(model)}
    assert bn_stats.changed_layers(model, bn_stats.snapshot(model)) == []


def test_recompute_sets_the_average_of_per_batch_statistics(trained):
    model, x, _, loaded = trained
    first_bn = next(l for l in bn_stats.batchnorm_layers(model) if l.name == "conv1_bn")
    # Independent reference: the first BatchNorm's input (a convolution's output,
    # the same in training and inference mode), its per-batch moments averaged.
    feed = keras.Model(loaded.model.inputs, first_bn.input)
    batches = [x[i:i + 8] for i in range(0, 40, 8)]
    acts = [np.asarray(feed(b, training=False), "float64") for b in batches]
    want_mean = np.mean([a.mean(axis=(0, 1, 2)) for a in acts], axis=0)
    want_var = np.mean([a.var(axis=(0, 1, 2)) for a in acts], axis=0)
    assert not np.allclose(first_bn.moving_mean.numpy(), want_mean, atol=1e-3)  # stale before
    weights = [w.numpy() for w in model.trainable_weights]
    momentum = first_bn.momentum
    used = bn_stats.recompute(model, tf.data.Dataset.from_tensor_slices(x).batch(8), num_batches=5)
    assert used == 5 and first_bn.momentum == momentum
    np.testing.assert_allclose(first_bn.moving_mean.numpy(), want_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(first_bn.moving_variance.numpy(), want_var, rtol=1e-4, atol=1e-5)
    for before, after in zip(weights, model.trainable_weights):  # only statistics change
        np.testing.assert_array_equal(before, after.numpy())


def test_frozen_batchnorm_layers_are_left_alone(trained):
    model, x, _, _ = trained
    layers = [next(l for l in bn_stats.batchnorm_layers(model) if l.name == "conv1_bn")]
    layers[0].trainable = False
    try:
        frozen = layers[0].moving_mean.numpy().copy()
        bn_stats.recompute(model, tf.data.Dataset.from_tensor_slices(x[:8]).batch(8))
        np.testing.assert_array_equal(layers[0].moving_mean.numpy(), frozen)
    finally:
        layers[0].trainable = True
    assert bn_stats.recompute(model, [], layers=[]) == 0
    with pytest.raises(ValueError, match="no batches"):
        bn_stats.recompute(model, tf.data.Dataset.from_tensor_slices(x[:0]).batch(8))
