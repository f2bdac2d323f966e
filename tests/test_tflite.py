"""Full-integer (int8) TFLite and the accuracy cost of every quantised export."""

import json
import os
import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tftransfer
from tftransfer import data as data_lib
from tftransfer import experiment
from tftransfer.export import quantize as quantize_lib
from tftransfer.export import tflite as tflite_lib
from tftransfer.heads import HeadSpec

from conftest import TINY_RESNET, add_outlier_channel, run_cli, tiny_bert_spec

SENTENCES = ["the movie was good", "a film is not fun", "the movie was very boring !", "great great film",
             "awful", "the film was bad", "a very good movie", "not bad"]
# Ops whose every float input in the float model is a weight or an activation.
COMPUTE_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "GATHER")


def interpreter(flatbuffer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        it = tf.lite.Interpreter(  # no XNNPACK: every op visible, none folded into a DELEGATE node
            model_content=flatbuffer,
            experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    return it


def assert_compute_is_int8(it, compute_ops=COMPUTE_OPS):
    """Every weight and activation of the compute ops is int8 (biases int32, indices int32)."""
    dtypes = {d["index"]: d["dtype"] for d in it.get_tensor_details()}
    ops = [o for o in it._get_ops_details() if o["op_name"] in compute_ops]
    assert ops
    for op in ops:
        if op["op_name"] == "GATHER":  # embedding table int8, ids int32
            params, ids = op["inputs"][:2]
            if dtypes[params] in (np.int32, np.int64):
                continue  # shape plumbing, not a weight
            assert dtypes[params] == np.int8 and dtypes[ids] == np.int32, op
        else:
            data = [i for i in op["inputs"][:2] if i >= 0]
            assert all(dtypes[i] == np.int8 for i in data), (op, [dtypes[i] for i in data])
            assert all(dtypes[i] == np.int32 for i in op["inputs"][2:] if i >= 0), op  # bias
        assert all(dtypes[i] == np.int8 for i in op["outputs"]), op
    return dtypes


def test_int8_image_weights_and_activations_are_int8_and_agree_with_float(tmp_path):
    keras.utils.set_random_seed(0)
    loaded = tftransfer.load_backbone(spec=dict(TINY_RESNET), image_size=16)
    heads = [HeadSpec(num_classes=3)]
    model = tftransfer.build_model(loaded, heads)
    digits = data_lib.load_digits([0, 1, 2], 20, seed=0)
    ds = data_lib.make_pipeline(digits.train, loaded.preprocessor, "image", heads, 1)
    representative = [{"image": x} for x, _ in ds.take(30).as_numpy_iterator()]
    val = list(data_lib.make_pipeline(digits.validation, loaded.preprocessor, "image", heads, 64)
               .as_numpy_iterator())
    info = tflite_lib.export_tflite(model, loaded.preprocessor, "image", heads, str(tmp_path), quantize="int8",
                                    representative_data=representative, validation_data=val,
                                    max_accuracy_drop=float("inf"))
    with open(info["tflite_file"], "rb") as f:
        it = interpreter(f.read())
    dtypes = assert_compute_is_int8(it)
    # Float32 only at the interface: the input image and the probability outputs.
    floats = {i for i, d in dtypes.items() if d == np.float32}
    io = {d["index"] for d in it.get_input_details() + it.get_output_details()}
    assert floats <= io, floats - io
    x = val[0][0][:16]
    out = it.get_signature_runner()(image=x)
    expected = tf.nn.softmax(model(x, training=False)["label"]).numpy()
    assert np.abs(out["probabilities"] - expected).max() <= tflite_lib.TOLERANCE["int8"]
    assert info["size_bytes"] <= 0.3 * 4 * model.count_params()
    with open(os.path.join(info["path"], "tftransfer.json")) as f:
        record = json.load(f)
    assert record["tflite"]["integer_only"] is True and record["tflite"]["float_ops"] == []
    accuracy = record["accuracy"]
    assert accuracy["examples"] == digits.validation.num_examples
    assert set(accuracy["float"]) == set(accuracy["quantized"]) == {"label"}
    assert accuracy["drop"] == pytest.approx(accuracy["float"]["label"] - accuracy["quantized"]["label"])


def _tiny_text(pooling="mean", outlier=False):
    """A tiny BERT classifier (with `outlier`: an outlier channel in its residual stream, as trained BERTs
    have), token ids of SENTENCES (with padding) and one-sentence calibration batches."""
    keras.utils.set_random_seed(1)
    loaded = tftransfer.load_backbone(spec=tiny_bert_spec(), sequence_length=16)
    heads = [HeadSpec(num_classes=2, pooling=pooling)]
    model = tftransfer.build_model(loaded, heads)
    if outlier:
        add_outlier_channel(model)
    ids = {k: np.asarray(v).astype("int32") for k, v in loaded.preprocessor(tf.constant(SENTENCES)).items()}
    assert (ids["padding_mask"] == 0).any()  # padding: the attention mask's -1e9 is in play
    representative = [{k: v[i:i + 1] for k, v in ids.items()} for i in range(len(SENTENCES))]
    return loaded, heads, model, ids, representative


def test_int8_text_on_token_ids(tmp_path):
    loaded, heads, model, ids, representative = _tiny_text()
    info = tflite_lib.export_tflite(model, loaded.preprocessor, "text", heads, str(tmp_path), quantize="int8",
                                    representative_data=representative)
    with open(info["tflite_file"], "rb") as f:
        flatbuffer = f.read()
    with open(os.path.join(info["path"], "tftransfer.json")) as f:
        recorded = json.load(f)["tflite"]
    assert recorded["dynamic_int8_ops"] == {"FULLY_CONNECTED": 8} and recorded["integer_only"] is False
    assert "TRANSPOSE" in recorded["float_ops"] and "FULLY_CONNECTED" not in recorded["float_ops"]
    it = interpreter(flatbuffer)
    details = {d["index"]: d for d in it.get_tensor_details()}
    dtypes = {i: d["dtype"] for i, d in details.items()}
    names = {i: d["name"] for i, d in details.items()}
    dynamic = tflite_lib.dynamic_scopes(model)
    ops = it._get_ops_details()
    # The feed-forward, value and attention-output projections: int8 weights, one scale per
    # output channel, float input quantised per token at run time (the hybrid kernel).
    hybrid = [o for o in ops if o["op_name"] == "FULLY_CONNECTED" and dynamic.search(names[o["outputs"][0]])]
    assert len(hybrid) == 4 * 2  # 4 projections x 2 layers
    for op in hybrid:
        weight = details[op["inputs"][1]]
        assert dtypes[op["inputs"][0]] == np.float32 and weight["dtype"] == np.int8, op
        assert len(weight["quantization_parameters"]["scales"]) == weight["shape"][0] > 1
    assert tflite_lib.dynamic_int8_ops(flatbuffer) == {"FULLY_CONNECTED": 8}
    # Query / key projections and the embedding lookups: static int8.
    static = [o for o in ops if o["op_name"] == "FULLY_CONNECTED" and o not in hybrid]
    assert any("query" in names[o["outputs"][0]] for o in static)
    assert_compute_is_int8(it, ("GATHER",))
    for op in static:
        assert all(dtypes[i] == np.int8 for i in [*op["inputs"][:2], *op["outputs"]]), op
    # No int8 tensor carries the padding mask's -1e9: the attention logits (and the layout ops
    # between their matrix product and the mask select) stay float, else every real logit
    # would round to the zero point (a scale of ~4e6 on MiniLM).
    scales = [d["quantization"][0] for d in details.values() if d["dtype"] == np.int8]
    assert scales and max(scales) < 1.0, max(scales)
    # Everything else that computes in float32 is an op kept float on purpose.
    scopes = tflite_lib.float_scopes(model, heads)
    outside = {o["op_name"] for o in ops
               if any(dtypes.get(i) == np.float32 for i in o["outputs"])
               and not any(scopes.search(names[i]) or dynamic.search(names[i]) for i in o["outputs"])}
    assert outside <= {"DEQUANTIZE", *tflite_lib.FLOAT_OPS_TEXT_INT8}, outside
    assert {"RSQRT", "MEAN", "SOFTMAX", "SELECT_V2", "BATCH_MATMUL", "ADD", "SUM", "TRANSPOSE"} <= set(
        tflite_lib.float_ops(flatbuffer))
    assert "FULLY_CONNECTED" not in tflite_lib.float_ops(flatbuffer)
    out = it.get_signature_runner()(**ids)
    expected = tf.nn.softmax(model(ids, training=False)["label"]).numpy()
    assert np.abs(out["probabilities"] - expected).max() <= tflite_lib.TOLERANCE["int8"]


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_int8_text_integer_only_every_op_is_int8(tmp_path, pooling):
    loaded, heads, model, ids, representative = _tiny_text(pooling, outlier=True)
    info = tflite_lib.export_tflite(model, loaded.preprocessor, "text", heads, str(tmp_path), quantize="int8",
                                    representative_data=representative, integer_only=True)
    with open(os.path.join(info["path"], "tftransfer.json")) as f:
        recorded = json.load(f)["tflite"]
    assert recorded["integer_only"] is True and recorded["float_ops"] == [] and recorded["dynamic_int8_ops"] == {}
    with open(info["tflite_file"], "rb") as f:
        flatbuffer = f.read()
    it = interpreter(flatbuffer)
    details = {d["index"]: d for d in it.get_tensor_details()}
    dtypes = assert_compute_is_int8(it, ("FULLY_CONNECTED", "BATCH_MATMUL", "GATHER"))
    # Float32 only at the interface: the outputs (the inputs are int32 token ids).
    floats = {i for i, d in dtypes.items() if d == np.float32}
    assert floats <= {d["index"] for d in it.get_output_details()}, floats
    ops = it._get_ops_details()
    assert {o["op_name"] for o in ops if any(dtypes[i] == np.float32 for i in o["outputs"])} <= {"DEQUANTIZE"}
    # Layer norms, residual adds, the masked softmax, GELU and the mean pooling compute in int8.
    int8_ops = {o["op_name"] for o in ops if any(dtypes[i] == np.int8 for i in o["outputs"])}
    assert {"MEAN", "RSQRT", "ADD", "SELECT_V2", "SOFTMAX", "GELU"} <= int8_ops, int8_ops
    assert ("SUM" in int8_ops) == (pooling == "mean") and ("TANH" in int8_ops) == (pooling == "cls")
    # Each head has its own logits and context products (own int8 ranges): 2 x heads x layers. Each
    # layer norm's mean square is one more: the embeddings' once, the encoders' once per channel
    # group -- their residual stream is computed in 2 groups, the outlier channel alone.
    matmuls = [o for o in ops if o["op_name"] == "BATCH_MATMUL"]
    assert len(matmuls) == 2 * 2 * 2 + 1 + 2 * 2 * 2
    # Every right operand is zero-centred: XNNPACK would take its zero point as 0 otherwise.
    assert all(details[o["inputs"][1]]["quantization"][1] == 0 for o in matmuls)
    # No masked attention logit carries a -1e9 mask value (scale ~4e6 on MiniLM).
    scales = [details[o["outputs"][0]]["quantization"][0] for o in ops if o["op_name"] == "SELECT_V2"]
    assert scales and max(scales) < 1.0, max(scales)
    expected = tf.nn.softmax(model(ids, training=False)["label"]).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default_runtime = tf.lite.Interpreter(model_content=flatbuffer)  # with XNNPACK, as users run it
    for runner in (it.get_signature_runner(), default_runtime.get_signature_runner()):
        assert np.abs(runner(**ids)["probabilities"] - expected).max() <= tflite_lib.TOLERANCE["int8"]


def test_dynamic_int8_fully_connected_quantises_weights_per_channel_and_keeps_float_io():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((24,))
    hidden = keras.layers.Dense(32, name="first")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(8, name="second")(hidden))
    float_model = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    fb, changed = tflite_lib.dynamic_int8_fully_connected(float_model, re.compile("second"))
    assert changed == 1 and len(fb) < len(float_model)
    it = interpreter(fb)
    dtypes = {d["index"]: d for d in it.get_tensor_details()}
    fcs = [o for o in it._get_ops_details() if o["op_name"] == "FULLY_CONNECTED"]
    kinds = sorted(dtypes[o["inputs"][1]]["dtype"].__name__ for o in fcs)
    assert kinds == ["float32", "int8"]  # only the matching op changed
    x = np.random.RandomState(0).randn(5, 24).astype("float32")
    it.resize_tensor_input(it.get_input_details()[0]["index"], x.shape)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    got = it.get_tensor(it.get_output_details()[0]["index"])
    want = model(x).numpy()
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()
    assert tflite_lib.dynamic_int8_ops(fb) == {"FULLY_CONNECTED": 1}


def test_int8_needs_representative_data(tmp_path):
    loaded = tftransfer.load_backbone(spec=dict(TINY_RESNET), image_size=16)
    heads = [HeadSpec(num_classes=3)]
    with pytest.raises(tftransfer.UserError, match="needs representative examples"):
        tflite_lib.convert(tftransfer.build_model(loaded, heads), loaded.preprocessor, "image", heads, "int8")


def test_accuracy_budget(tmp_path):
    heads = [HeadSpec(num_classes=2)]
    f = {"label": 0.90, "examples": 100}
    q = {"label": 0.88, "examples": 100}
    record = quantize_lib.compare(f, q, heads, "int8", max_accuracy_drop=0.02 + 1e-9)
    assert record["drop"] == pytest.approx(0.02)
    with pytest.raises(tftransfer.UserError, match=r"costs 2.00 points .*0.9000 -> 0.8800"):
        quantize_lib.compare(f, q, heads, "int8", max_accuracy_drop=0.01)
    with pytest.raises(tftransfer.UserError, match=r"--quantize=int8 --integer_only costs 2.00 points .*"
                                                   r"Use int8 without --integer_only"):
        quantize_lib.compare(f, q, heads, "int8", max_accuracy_drop=0.01, integer_only=True)
    with pytest.raises(tftransfer.UserError, match="--max_accuracy_drop must be >= 0"):
        quantize_lib.check_max_accuracy_drop(-0.1)


def test_cli_int8_prints_and_records_accuracy_then_refuses_over_budget(tiny_digits_workdir):
    digits_workdir = tiny_digits_workdir  # a finished TINY_DIGITS_YAML run (conftest)
    base = os.path.join(digits_workdir, "tflite")
    proc = run_cli("tftransfer.export", f"--workdir={digits_workdir}", "--format=tflite", "--quantize=int8",
                   "--max_accuracy_drop=0.05", "--representative_examples=50")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation accuracy (" in proc.stdout and " int8 (drop " in proc.stdout
    with open(os.path.join(base, "1", "tftransfer.json")) as f:
        record = json.load(f)["accuracy"]
    assert record["quantize"] == "int8" and record["max_accuracy_drop"] == 0.05
    assert 0 < record["float"]["label"] <= 1 and 0 < record["quantized"]["label"] <= 1

    # Over budget: refused, nothing written. Whether a real int8 model loses accuracy
    # depends on the model (this tiny one may lose none), so the measured quantised
    # accuracy is lowered by 10 points on its way to the budget check.
    from tftransfer.errors import UserError
    from tftransfer.export.assets import export_workdir

    real_compare = quantize_lib.compare

    def lossy(float_accuracy, quantized_accuracy, heads, *args, **kwargs):
        worse = {k: (v - 0.1 if k != "examples" else v) for k, v in quantized_accuracy.items()}
        return real_compare(float_accuracy, worse, heads, *args, **kwargs)

    quantize_lib.compare = lossy
    try:
        representative, validation = experiment.quantisation_data(digits_workdir, "int8", 0.05, 50)
        with pytest.raises(UserError, match=r"costs 10.00 points of validation accuracy.*nothing was exported"):
            export_workdir(digits_workdir, export_base=base + "_strict", format="tflite", quantize="int8",
                           representative_data=representative, validation_data=validation,
                           max_accuracy_drop=0.05)
    finally:
        quantize_lib.compare = real_compare
    assert not os.path.exists(base + "_strict")
    assert sorted(os.listdir(base)) == ["1"]
