"""tftransfer.export.integer_text: the int8-friendly rewrites compute the same function and are undone on exit."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tftransfer
from tftransfer.export import integer_text
from tftransfer.heads import HeadSpec

from conftest import tiny_bert_spec


def _methods():
    return (keras.layers.Softmax.call, keras.layers.LayerNormalization.call,
            keras.layers.GlobalAveragePooling1D.call, keras.layers.MultiHeadAttention._compute_attention)


def test_rewrites_compute_the_same_function_and_restore_keras():
    keras.utils.set_random_seed(3)
    loaded = tftransfer.load_backbone(spec=tiny_bert_spec(), sequence_length=16)
    model = tftransfer.build_model(loaded, [HeadSpec(num_classes=3, pooling="mean")])
    ids = loaded.preprocessor(tf.constant(["the movie was good", "awful", "a very good movie , not bad"]))
    assert (np.asarray(ids["padding_mask"]) == 0).any()
    expected = model(ids, training=False)["label"].numpy()
    before = _methods()
    with integer_text.integer_friendly_text_ops():
        assert all(a is not b for a, b in zip(_methods(), before))  # every rewrite is in place
        rewritten = model(ids, training=False)["label"].numpy()
    assert _methods() == before
    np.testing.assert_allclose(rewritten, expected, atol=1e-5)
    with pytest.raises(RuntimeError):
        with integer_text.integer_friendly_text_ops():
            raise RuntimeError("conversion failed")
    assert _methods() == before


def test_masked_softmax_gives_padding_no_weight_and_keeps_the_logit_range():
    logits = tf.constant([[2.0, -1.0, 0.5, 3.0], [0.0, 0.0, 0.0, 0.0]])
    mask = tf.constant([[True, True, False, True], [True, False, False, False]])
    weights = integer_text.masked_softmax(logits, mask).numpy()
    reference = tf.nn.softmax(tf.where(mask, logits, -1e9)).numpy()
    np.testing.assert_allclose(weights, reference, atol=1e-6)
    assert weights[0, 2] == 0 and weights[1, 1:].sum() == 0
