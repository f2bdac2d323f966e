"""tftransfer.losses: Hinton's distillation loss, its Loss class, the feature hint."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tftransfer import losses
from tftransfer.errors import UserError


def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_hand_computed_value_includes_t_squared():
    # One example, two classes, T = 2: student logits [2, 0], teacher [4, 0], label 0.
    p_teacher = _softmax([4 / 2, 0 / 2])  # [0.8808, 0.1192]
    p_student = _softmax([2 / 2, 0 / 2])  # [0.7311, 0.2689]
    kl = sum(t * math.log(t / s) for t, s in zip(p_teacher, p_student))  # 0.067131
    ce = -math.log(_softmax([2, 0])[0])  # 0.126928
    expected = 0.1 * ce + 0.9 * 2**2 * kl
    assert expected == pytest.approx(0.254364, abs=1e-5)
    got = losses.distillation_loss([0], [[2.0, 0.0]], [[4.0, 0.0]], temperature=2.0, alpha=0.1)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    soft = losses.soft_target_loss([[2.0, 0.0]], [[4.0, 0.0]], temperature=2.0)
    assert float(soft[0]) == pytest.approx(4 * kl, rel=1e-5)


def test_alpha_one_is_plain_cross_entropy_and_batch_mean():
    rng = np.random.RandomState(0)
    y = np.array([0, 2, 1, 2])
    student, teacher = rng.randn(4, 3).astype("float32"), rng.randn(4, 3).astype("float32")
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, student)
    got = losses.distillation_loss(y, student, teacher, temperature=5.0, alpha=1.0)
    assert float(got) == pytest.approx(float(ce), rel=1e-5)
    # alpha = 0: soft targets only; the mean over the batch.
    soft = losses.soft_target_loss(student, teacher, 5.0)
    assert float(losses.distillation_loss(y, student, teacher, 5.0, alpha=0.0)) == pytest.approx(
        float(np.mean(soft)), rel=1e-5)


def test_label_smoothing_matches_keras_and_one_hot_labels_work():
    rng = np.random.RandomState(1)
    y = np.array([1, 0, 2])
    student, teacher = rng.randn(3, 3).astype("float32"), rng.randn(3, 3).astype("float32")
    expected = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2)(
        np.eye(3)[y], student)
    for labels in (y, np.eye(3, dtype="float32")[y]):
        got = losses.distillation_loss(labels, student, teacher, alpha=1.0, label_smoothing=0.2)
        assert float(got) == pytest.approx(float(expected), rel=1e-5)


def test_unlabelled_examples_contribute_soft_targets_only():
    rng = np.random.RandomState(2)
    student, teacher = rng.randn(2, 3).astype("float32"), rng.randn(2, 3).astype("float32")
    soft = np.asarray(losses.soft_target_loss(student, teacher, 3.0))
    ce0 = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(np.array([1]), student[:1]))
    got = losses.distillation_loss([1, -1], student, teacher, temperature=3.0, alpha=0.25)
    expected = ((0.25 * ce0 + 0.75 * soft[0]) + 0.75 * soft[1]) / 2
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # The same with one-hot rows: an all-zero row is unlabelled.
    onehot = np.array([[0, 1, 0], [0, 0, 0]], "float32")
    assert float(losses.distillation_loss(onehot, student, teacher, 3.0, 0.25)) == pytest.approx(expected, rel=1e-5)
    # No labels at all.
    assert float(losses.distillation_loss(None, student, teacher, 3.0, 0.25)) == pytest.approx(
        0.75 * soft.mean(), rel=1e-5)


def test_t_squared_keeps_the_gradient_scale_independent_of_t():
    rng = np.random.RandomState(3)
    teacher = tf.constant(rng.randn(8, 5), "float32")
    student = tf.Variable(rng.randn(8, 5), dtype="float32")
    norms = []
    for t in (8.0, 16.0, 32.0):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(losses.soft_target_loss(student, teacher, t))
        norms.append(float(tf.norm(tape.gradient(loss, student))))
    # Without T**2 the gradient would shrink 4x per doubling of T.
    assert norms[1] / norms[0] == pytest.approx(1.0, abs=0.05)
    assert norms[2] / norms[1] == pytest.approx(1.0, abs=0.02)


def test_temperature_and_alpha_can_be_variables():
    t, a = keras.Variable(2.0), keras.Variable(0.1)
    fn = tf.function(lambda: losses.distillation_loss([0], [[2.0, 0.0]], [[4.0, 0.0]], t, a))
    first = float(fn())
    a.assign(1.0)
    assert float(fn()) == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-5)
    assert first != float(fn())


def test_loss_class_with_packed_targets_equals_the_function():
    rng = np.random.RandomState(4)
    y = np.array([0, 1, -1, 2])
    student, teacher = rng.randn(4, 3).astype("float32"), rng.randn(4, 3).astype("float32")
    loss = losses.DistillationLoss(temperature=3.0, alpha=0.3)
    expected = losses.distillation_loss(y, student, teacher, 3.0, 0.3)
    assert float(loss(losses.pack_distillation_targets(y, teacher), student)) == pytest.approx(float(expected), rel=1e-5)
    onehot = np.vstack([np.eye(3)[[0, 1]], np.zeros((1, 3)), np.eye(3)[[2]]]).astype("float32")
    assert float(loss(losses.pack_distillation_targets(onehot, teacher), student)) == pytest.approx(float(expected), rel=1e-5)
    restored = losses.DistillationLoss.from_config(loss.get_config())
    assert restored.temperature == 3.0 and restored.alpha == 0.3
    with pytest.raises(UserError, match="temperature must be > 0"):
        losses.DistillationLoss(temperature=0.0)
    with pytest.raises(UserError, match="pack_distillation_targets"):
        loss(np.zeros((4, 5), "float32"), student)
    # It trains a plain Keras model from cached teacher logits.
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3)])
    model.compile("sgd", loss=loss)
    history = model.fit(rng.randn(4, 3), losses.pack_distillation_targets(y, teacher), verbose=0, epochs=2)
    assert np.isfinite(history.history["loss"]).all()


def test_similarity_preserving_hint_is_width_agnostic():
    rng = np.random.RandomState(5)
    features = rng.randn(6, 12).astype("float32")
    rotation, _ = np.linalg.qr(rng.randn(12, 12))
    assert float(losses.similarity_preserving_loss(features, features @ rotation.astype("float32"))) < 1e-10
    narrow = rng.randn(6, 4).astype("float32")
    assert float(losses.similarity_preserving_loss(features, narrow)) > 1e-3
