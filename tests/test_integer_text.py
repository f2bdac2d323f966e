"""tftransfer.export.integer_text: the int8-friendly rewrites compute the same function and are undone on exit."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tftransfer
from tftransfer.export import integer_text
from tftransfer.heads import HeadSpec

from conftest import add_outlier_channel, tiny_bert_spec


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


def test_channel_groups_isolate_the_outlier_channel_and_compute_the_same_function():
    keras.utils.set_random_seed(3)
    loaded = tftransfer.load_backbone(spec=tiny_bert_spec(), sequence_length=16)
    model = add_outlier_channel(tftransfer.build_model(loaded, [HeadSpec(num_classes=3, pooling="mean")]))
    ids = loaded.preprocessor(tf.constant(["the movie was good", "awful", "a very good movie , not bad"]))
    expected = model(ids, training=False)["label"].numpy()
    groups = integer_text.residual_channel_groups(model, [ids])
    assert len(groups) == 2  # both encoder layers
    for partition in groups.values():
        assert sorted(np.concatenate(partition).tolist()) == list(range(16))  # a partition of the channels
        assert [3] in [g.tolist() for g in partition]  # the outlier channel has a range of its own
    with integer_text.integer_friendly_text_ops(channel_groups=groups):
        grouped = model(ids, training=False)["label"].numpy()
    np.testing.assert_allclose(grouped, expected, atol=1e-5)


def test_mean_square_equals_the_mean_of_squares():
    x = np.random.default_rng(0).normal(size=(2, 5, 7)).astype("float32")
    np.testing.assert_allclose(integer_text.mean_square(tf.constant(x)).numpy(), (x * x).mean(-1, keepdims=True),
                               rtol=1e-5)


def _product_model(calibration):
    """Calibrated (not quantised) TFLite of a @ b whose right operand `b` is calibrated on [0.5, 1.5]."""
    shape_a, shape_b = (2, 6, 8), (2, 8, 4)

    @tf.function(input_signature=[tf.TensorSpec(shape_a, tf.float32), tf.TensorSpec(shape_b, tf.float32)])
    def product(a, b):
        return {"out": tf.matmul(a * 1.0, b * 1.0)}

    converter = tf.lite.TFLiteConverter.from_concrete_functions([product.get_concrete_function()], product)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: iter(calibration)
    converter._experimental_calibrate_only = True
    return converter.convert()


def test_batch_matmul_right_operands_get_zero_point_zero_and_run_right_under_xnnpack():
    from tensorflow.lite.python import convert

    rng = np.random.default_rng(0)
    calibration = [[rng.uniform(-1, 1, (2, 6, 8)).astype("float32"),
                    rng.uniform(0.5, 1.5, (2, 8, 4)).astype("float32")] for _ in range(8)]
    a, b = calibration[0]
    fixed = bytes(convert.mlir_quantize(integer_text.symmetric_batch_matmul_operands(_product_model(calibration)),
                                        disable_per_channel=False, fully_quantize=False))
    for resolver in ("AUTO", "BUILTIN_WITHOUT_DEFAULT_DELEGATES"):  # XNNPACK, TFLite's own kernels
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            it = tf.lite.Interpreter(model_content=fixed, experimental_op_resolver_type=getattr(
                tf.lite.experimental.OpResolverType, resolver))
        it.allocate_tensors()
        details = {d["index"]: d for d in it.get_tensor_details()}
        (matmul,) = [o for o in it._get_ops_details() if o["op_name"] == "BATCH_MATMUL"]
        assert details[matmul["inputs"][1]]["quantization"][1] == 0
        for d in it.get_input_details():
            it.set_tensor(d["index"], a if tuple(d["shape"]) == a.shape else b)
        it.invoke()
        out = it.get_tensor(it.get_output_details()[0]["index"])
        # Unedited, XNNPACK's product is ~80% off (it takes the operand's zero point -128 as 0).
        assert np.abs(out - a @ b).mean() <= 0.03 * np.abs(a @ b).mean(), resolver


def test_masked_softmax_gives_padding_no_weight_and_keeps_the_logit_range():
    logits = tf.constant([[2.0, -1.0, 0.5, 3.0], [0.0, 0.0, 0.0, 0.0]])
    mask = tf.constant([[True, True, False, True], [True, False, False, False]])
    weights = integer_text.masked_softmax(logits, mask).numpy()
    reference = tf.nn.softmax(tf.where(mask, logits, -1e9)).numpy()
    np.testing.assert_allclose(weights, reference, atol=1e-6)
    assert weights[0, 2] == 0 and weights[1, 1:].sum() == 0
