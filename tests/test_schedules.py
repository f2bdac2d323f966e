"""SlantedTriangular: ULMFiT's values, graph mode, serialization, validation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tftransfer.errors import UserError
from tftransfer.schedules import SlantedTriangular


def test_values_at_given_steps():
    s = SlantedTriangular(1e-3, total_steps=100)  # cut = 10, ratio 32
    expected = {
        0: 1e-3 / 32,                       # start low
        5: 1e-3 * (1 + 0.5 * 31) / 32,      # halfway up
        10: 1e-3,                           # peak at cut
        55: 1e-3 * (1 + 0.5 * 31) / 32,     # halfway down
        100: 1e-3 / 32,                     # back down at the end
        250: 1e-3 / 32,                     # and stays there
    }
    for step, value in expected.items():
        np.testing.assert_allclose(float(s(step)), value, rtol=1e-6, err_msg=str(step))


def test_paper_formula_with_custom_cut_frac_and_ratio():
    s = SlantedTriangular(0.01, total_steps=50, cut_frac=0.2, ratio=10)  # cut = 10
    for t in range(0, 60, 3):
        cut = 10
        p = t / cut if t < cut else max(0.0, 1 - (t - cut) / (cut * (1 / 0.2 - 1)))
        np.testing.assert_allclose(float(s(t)), 0.01 * (1 + p * 9) / 10, rtol=1e-6, err_msg=str(t))


def test_short_schedules_still_peak_once():
    s = SlantedTriangular(1.0, total_steps=5)  # cut_frac * total < 1: cut = 1
    values = [float(s(t)) for t in range(6)]
    assert values[1] == pytest.approx(1.0)
    assert values[0] == pytest.approx(1 / 32) and values[5] == pytest.approx(1 / 32)
    assert all(a >= b for a, b in zip(values[1:], values[2:]))


def test_works_in_graph_mode_with_int64_iterations():
    s = SlantedTriangular(1e-3, total_steps=100)
    fn = tf.function(lambda step: s(step))
    np.testing.assert_allclose(float(fn(tf.constant(10, tf.int64))), 1e-3, rtol=1e-6)
    optimizer = keras.optimizers.Adam(s)
    optimizer.iterations.assign(55)
    np.testing.assert_allclose(float(optimizer.learning_rate), 1e-3 * 16.5 / 32, rtol=1e-6)


def test_serialization_round_trip():
    s = SlantedTriangular(2e-3, total_steps=40, cut_frac=0.25, ratio=16)
    restored = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(s))
    assert isinstance(restored, SlantedTriangular)
    assert restored.get_config() == s.get_config()
    optimizer = keras.optimizers.Adam.from_config(keras.optimizers.Adam(s).get_config())
    assert isinstance(optimizer._learning_rate, SlantedTriangular)
    assert float(optimizer._learning_rate(10)) == pytest.approx(2e-3)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_lr": 0.0, "total_steps": 10}, "max_lr must be"),
    ({"max_lr": 1e-3, "total_steps": 0}, "total_steps must be"),
    ({"max_lr": 1e-3, "total_steps": 10.5}, "total_steps must be"),
    ({"max_lr": 1e-3, "total_steps": 10, "cut_frac": 1.0}, "cut_frac must be"),
    ({"max_lr": 1e-3, "total_steps": 10, "ratio": 0.5}, "ratio must be"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(UserError, match=match):
        SlantedTriangular(**kwargs)
