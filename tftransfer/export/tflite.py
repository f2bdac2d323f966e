"""TFLite export: the preprocessed signature as `<export_base>/<version>/model.tflite`.

TFLite has no image decoder and no TF Text tokenizer, so the `.tflite` model
takes preprocessed input, exactly like the SavedModel's `serve_preprocessed`
signature, and the client (an app) decodes, resizes and normalises (images)
or tokenises (text) itself: `tftransfer.json` beside the model records the
preprocessing (image size, scale, offset / tokenizer settings) and
`labels.txt` the class names.

- Image models: input `image`, float32 `(batch, height, width, 3)`.
- Text models: inputs `token_ids`, `segment_ids`, `padding_mask`, int32
  `(batch, sequence_length)`; the vocabulary is copied to `vocabulary.txt`.

Outputs are those of the SavedModel minus the string ones (`class_name`,
`top_k_class_names`): `probabilities`, `class_id`, `top_k_class_ids`,
`top_k_probabilities` (per head, prefixed with several heads).

Quantisation (`quantize`):
- `none`: float32, matches the SavedModel to float rounding (~1e-6).
- `float16`: weights stored as float16 (about half the size), computed in
  float32 on CPU.
- `dynamic_range`: weights stored as int8 (about a quarter of the size),
  activations quantised on the fly.
- `int8`: int8 weights *and* int8 activations, with activation ranges
  calibrated on `representative_data` (examples of the run's own training
  data). Input and output stay float32 / int32 (the interpreter quantises
  the input and dequantises the outputs), so clients call it exactly like
  the float model. Image models (ResNet): full-integer, what an int8-only
  accelerator needs. Text (BERT family): every weight is int8; the
  embedding lookups and the query / key projections have static int8
  activations; the feed-forward, value and attention-output projections
  quantise their float input per token at run time
  (`DYNAMIC_INT8_LAYERS_TEXT`); the layer normalisations, residual
  additions, GELU, the attention-mask select, softmax, attention matrix
  products and transposes, and the heads' mean pooling run in float32
  between a dequantise and a quantise (`FLOAT_OPS_TEXT_INT8`): mixed, not
  full-integer, and the default because it keeps the float model's
  accuracy. `integer_only=True` (`--integer_only`): every op int8, for
  int8-only accelerators, at a measured cost in accuracy (0.8 points on
  MiniLM, with BERT's outlier channels in int8 ranges of their own and the
  attention products' right operands zero-centred for XNNPACK;
  `tftransfer.export.integer_text` and BENCHMARKS.md) and in CPU latency.
  `tftransfer.json` names what is not int8
  (`tflite.float_ops`, `tflite.dynamic_int8_ops`, `tflite.integer_only`).
The tolerances the tests hold are in `TOLERANCE`.

Every quantised export measures what it costs in validation accuracy when
given `validation_data` (see `tftransfer.export.quantize`), records it under
`accuracy` in `tftransfer.json`, and is refused (nothing written) over
`max_accuracy_drop`.
"""

import contextlib
import json
import os
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

from tftransfer.errors import UserError
from tftransfer.export import integer_text as integer_text_lib
from tftransfer.export import quantize as quantize_lib
from tftransfer.export import saved_model

QUANTIZE_MODES = ("none", "float16", "dynamic_range", "int8")
TFLITE_FILE = "model.tflite"
# Max abs difference of `probabilities` against the SavedModel, held by the tests
# (tiny random-init models; measured values are in BENCHMARKS.md).
TOLERANCE = {"none": 1e-5, "float16": 1e-2, "dynamic_range": 5e-2, "int8": 5e-2}


def tflite_function(model, preprocessor, modality, heads):
    """The preprocessed-input serving function as a `tf.function` with a fixed input signature."""
    if modality == "image":
        height, width = preprocessor.image_size

        @tf.function(input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32, name="image")])
        def serve(image):
            return saved_model.head_outputs(heads, model(image, training=False), include_strings=False)

        return serve
    length = preprocessor.sequence_length

    @tf.function(input_signature=[
        tf.TensorSpec([None, length], tf.int32, name=n) for n in ("token_ids", "segment_ids", "padding_mask")
    ])
    def serve(token_ids, segment_ids, padding_mask):
        inputs = {"token_ids": token_ids, "segment_ids": segment_ids, "padding_mask": padding_mask}
        return saved_model.head_outputs(heads, model(inputs, training=False), include_strings=False)

    return serve


@contextlib.contextmanager
def saved_model_converter(model, preprocessor, modality, heads):
    """A `tf.lite.TFLiteConverter` of the preprocessed serving function (valid inside the `with`)."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", tflite_function(model, preprocessor, modality, heads))
    with tempfile.TemporaryDirectory(prefix="tftransfer-tflite-") as tmp:
        archive.write_out(tmp, verbose=False)
        yield tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=["serving_default"])


def convert(model, preprocessor, modality, heads, quantize="none", representative_data=None, integer_only=False):
    """The model (preprocessed input, no string outputs) as TFLite flatbuffer bytes.

    Args:
        model: keras.Model from `tftransfer.build_model`.
        preprocessor: the backbone's image converter / text preprocessor.
        modality: str. `"image"` or `"text"`.
        heads: list of `HeadSpec`.
        quantize: str. One of `none`, `float16`, `dynamic_range`, `int8`.
            Defaults to `"none"`.
        representative_data: int8 only: iterable of dicts `{input name:
            array}` (one batch each, preprocessed like the model's input),
            drawn from the training data. Defaults to None.
        integer_only: bool. int8 text models: every op int8 (see the module
            docstring). Image int8 is always integer-only. Defaults to False.

    Returns:
        bytes.
    """
    if quantize not in QUANTIZE_MODES:
        raise UserError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}. Received: {quantize!r}.")
    if quantize == "int8":
        representative_data = list(representative_data or [])
        if not representative_data:
            raise UserError("--quantize=int8 needs representative examples (the training data) to calibrate; none given.")
    check_integer_only(quantize, integer_only)
    integer_text = integer_only and modality == "text"
    rewrites = contextlib.nullcontext()
    if integer_text:
        groups = integer_text_lib.residual_channel_groups(model, representative_data)
        rewrites = integer_text_lib.integer_friendly_text_ops(channel_groups=groups)
    with rewrites, saved_model_converter(model, preprocessor, modality, heads) as converter:
        if quantize != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if quantize == "int8":
            dtype = "float32" if modality == "image" else "int32"  # the signature's (a bool mask is cast)
            converter.representative_dataset = lambda: (
                {k: np.asarray(v).astype(dtype) for k, v in batch.items()} for batch in representative_data
            )
            # Int8 kernels only: conversion fails rather than silently keep
            # float ops (the converter itself keeps NEG in float; see above).
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        try:
            if quantize == "int8" and modality == "text":
                return _int8_integer_text(converter) if integer_text else _int8_text(converter, model, heads)
            return converter.convert()
        except Exception as e:  # the converter raises ConverterError and others.
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            remedy = ("drop --integer_only (mixed int8) or export a SavedModel (--format=saved_model)"
                      if integer_text else "export a SavedModel instead (--format=saved_model)")
            raise UserError(f"TFLite conversion of this {modality} model failed ({first[:200]}); {remedy}.")


def check_integer_only(quantize, integer_only, format="tflite"):
    """UserError when `integer_only` is asked of an export without int8 activations."""
    if integer_only and (format != "tflite" or quantize != "int8"):
        raise UserError(f"--integer_only applies to --format=tflite --quantize=int8 only (received "
                        f"--format={format} --quantize={quantize}); drop --integer_only or pass those.")


def interpreter_predict(flatbuffer):
    """`predict` for `quantize.accuracy`: the TFLite model's signature on a batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    runner = interpreter.get_signature_runner()
    dtypes = {name: d["dtype"] for name, d in runner.get_input_details().items()}

    def predict(inputs):
        if not isinstance(inputs, dict):
            inputs = {"image": inputs}
        return runner(**{k: np.asarray(v).astype(dtypes[k]) for k, v in inputs.items()})

    return predict


# Text int8 keeps some ops in float32 (TFLite's selective quantisation), each
# between a dequantise and a quantise; measured on MiniLM drug reviews with
# `tools/int8_debug.py` and `tools/int8_ablate.py` (BENCHMARKS.md, "int8"):
# - The attention core: BERT masks padding by selecting -1e9 before the
#   softmax. Calibrated per tensor, the select's input gets a scale of ~4e6,
#   and TRANSPOSE (a layout op between the query x key product and the
#   select) inherits that range: in int8 every real attention logit rounds to
#   the zero point and the attention becomes uniform. So the select, the
#   softmax, both attention matrix products (`BATCH_MATMUL`: int8
#   probabilities have a step of 1/255, coarser than a typical weight over 64
#   positions) and the attention layout `TRANSPOSE`s stay float. (Before
#   TRANSPOSE was kept float, MiniLM lost 10 points on the held-out data; with
#   it, 3.3.)
# - Layer normalisation: the variance (MEAN of squared differences) and its
#   RSQRT of the residual stream, which has a few outlier dimensions, lose
#   everything in int8 (RMSE 18-186x the quantisation step, against 0.29 for
#   rounding). Every op inside a `LayerNormalization` layer stays float, and
#   so does the heads' masked mean pooling (a sum over the sequence).
# - The residual additions (`ADD`): the residual stream's outlier dimensions
#   set a per-tensor int8 step too coarse for all the others.
# - `GELU`: its output is the feed-forward output projection's input (below).
FLOAT_OPS_TEXT_INT8 = ("SELECT_V2", "SOFTMAX", "BATCH_MATMUL", "ADD", "TRANSPOSE", "GELU")
# Projections whose activations carry BERT's outlier channels (Bondarenko et
# al. 2021), which no single calibrated int8 range fits: the feed-forward
# intermediate (reads the attention layer norm, writes the pre-GELU
# activations) and output (reads GELU, writes into the residual stream), the
# value and the attention output (the value path into the residual stream).
# They keep int8 weights (per output channel) but quantise their input per
# token at run time (TFLite's hybrid kernel, `dynamic_int8_fully_connected`).
# Chosen on a held-out part of MiniLM's training split with
# `tools/int8_ablate.py` (mean |probability difference| to the float model:
# 0.036 with every projection static, 0.009 feed-forward output dynamic,
# 0.006 both feed-forward, 0.0049 these four, 0.0044 every projection
# dynamic: query / key stay static at no measured cost). BENCHMARKS.md.
DYNAMIC_INT8_LAYERS_TEXT = ("feedforward_intermediate_dense", "feedforward_output_dense", "value", "attention_output")


def float_scopes(model, heads):
    """A regex matching the TFLite tensor names made inside `model`'s LayerNormalization and pooling layers."""
    import re

    from tftransfer.heads import pool_layer_name
    from tftransfer.keras_private import sublayers

    names = {l.name for l in sublayers(model) if isinstance(l, keras.layers.LayerNormalization)}
    names |= {pool_layer_name(h) for h in heads}
    names |= {f"{h.name}_normalize" for h in heads if getattr(h, "normalize", False)}  # heads.py build_head
    return re.compile("/(" + "|".join(re.escape(n) for n in sorted(names)) + r")(_\d+)?/")


def dynamic_scopes(model):
    """A regex matching the TFLite tensor names made inside the `DYNAMIC_INT8_LAYERS_TEXT` projections (None: none)."""
    import re

    from tftransfer.keras_private import sublayers

    names = {l.name for l in sublayers(model)
             if isinstance(l, (keras.layers.Dense, keras.layers.EinsumDense)) and l.name in DYNAMIC_INT8_LAYERS_TEXT}
    if not names:
        return None
    return re.compile("/(" + "|".join(re.escape(n) for n in sorted(names)) + r")(_\d+)?/")


def calibrated_integer_text(converter):
    """The converter's model calibrated on its representative dataset, not yet quantised, with every
    `BATCH_MATMUL`'s right operand zero-centred (`integer_text.symmetric_batch_matmul_operands`:
    XNNPACK computes it wrongly otherwise).

    The converter's own calibration step (`TFLiteConverter._experimental_calibrate_only`,
    as `tf.lite.experimental.QuantizationDebugger` calibrates); `tools/int8_integer_only_ablate.py`
    quantises it its own ways.
    """
    converter._experimental_calibrate_only = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the calibrator's tf.lite.Interpreter deprecation notice
        return integer_text_lib.symmetric_batch_matmul_operands(converter.convert())


def _int8_integer_text(converter):
    """Full-integer conversion of a text model traced under `integer_text.integer_friendly_text_ops`:
    `calibrated_integer_text`, then the converter's own quantisation step."""
    from tensorflow.lite.python import convert as tflite_convert

    flatbuffer = bytes(tflite_convert.mlir_quantize(calibrated_integer_text(converter), disable_per_channel=False,
                                                    fully_quantize=False))
    left = float_ops(flatbuffer)
    if left:
        raise ValueError(f"ops left in float: {', '.join(left)}")
    return flatbuffer


def _int8_text(converter, model, heads):
    """Int8 conversion: `FLOAT_OPS_TEXT_INT8` and `float_scopes` float, `dynamic_scopes` with dynamic int8 inputs."""
    import re

    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(FLOAT_OPS_TEXT_INT8))
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=converter.representative_dataset, debug_options=options
    )
    scopes, dynamic = float_scopes(model, heads), dynamic_scopes(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        calibrated = tf.lite.Interpreter(model_content=debugger.calibrated_model)
    names = [d["name"] for d in calibrated.get_tensor_details()]
    nodes = [n for n in names if scopes.search(n) or (dynamic and dynamic.search(n))]
    debugger.options = tf.lite.experimental.QuantizationDebugOptions(  # re-quantised, not re-calibrated
        denylisted_ops=list(FLOAT_OPS_TEXT_INT8), denylisted_nodes=nodes)
    flatbuffer = debugger.get_nondebug_quantized_model()
    if dynamic is not None:
        flatbuffer, _ = dynamic_int8_fully_connected(flatbuffer, dynamic)
    return bytes(flatbuffer)


def dynamic_int8_fully_connected(flatbuffer, pattern):
    """Give float `FULLY_CONNECTED` ops whose output name matches `pattern` int8 weights (TFLite's hybrid kernel).

    The weights are quantised per output channel, symmetric, exactly as
    `--quantize=dynamic_range` stores them, and the op quantises its float
    input at run time, each row (token) with its own range
    (`asymmetric_quantize_inputs`): an int8 x int8 product whose activation
    range is the token's own, not one calibrated range for all inputs.

    Args:
        flatbuffer: bytes. A TFLite model.
        pattern: compiled regex over tensor names (the op's output or its weights).

    Returns:
        (bytes, int): the model and how many ops were changed.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    users = {}  # buffer -> tensors that read it: a shared float buffer is left alone
    for graph in model.subgraphs:
        for t in graph.tensors:
            users.setdefault(t.buffer, []).append(t)
    changed = 0
    for graph in model.subgraphs:
        for op in graph.operators:
            if codes[op.opcodeIndex] != schema.BuiltinOperator.FULLY_CONNECTED:
                continue
            data, weight = (graph.tensors[i] for i in op.inputs[:2])
            if not any(pattern.search(t.name.decode()) for t in (graph.tensors[op.outputs[0]], weight)):
                continue
            buffer = model.buffers[weight.buffer]
            if (data.type != schema.TensorType.FLOAT32 or weight.type != schema.TensorType.FLOAT32
                    or buffer.data is None or len(users[weight.buffer]) != 1):
                continue
            w = np.frombuffer(np.asarray(buffer.data, np.uint8).tobytes(), "<f4").reshape(weight.shape)
            scale = np.maximum(np.abs(w).max(axis=1), 1e-12) / 127.0
            q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
            buffer.data = np.frombuffer(q.tobytes(), np.uint8)
            weight.type = schema.TensorType.INT8
            weight.quantization = schema.QuantizationParametersT()
            weight.quantization.scale = scale.astype(np.float32).tolist()
            weight.quantization.zeroPoint = [0] * len(scale)
            weight.quantization.quantizedDimension = 0
            op.builtinOptions.asymmetricQuantizeInputs = True
            changed += 1
    return flatbuffer_utils.convert_object_to_bytearray(model), changed


def _op_details(flatbuffer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(  # no XNNPACK: its DELEGATE node would hide the ops it takes
            model_content=flatbuffer,
            experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    dtypes = {d["index"]: d["dtype"] for d in interpreter.get_tensor_details()}
    return interpreter._get_ops_details(), dtypes  # private: no public op listing


def _is_hybrid(op, dtypes):
    """A FULLY_CONNECTED with float input, int8 weights, float output (TFLite's dynamic-range kernel)."""
    return (op["op_name"] == "FULLY_CONNECTED" and dtypes.get(op["inputs"][0]) == np.float32
            and dtypes.get(op["inputs"][1]) == np.int8)


def float_ops(flatbuffer):
    """Sorted names of the ops that compute in float32 (not counting (de)quantise, nor `dynamic_int8_ops`)."""
    ops, dtypes = _op_details(flatbuffer)
    return sorted({o["op_name"] for o in ops
                   if o["op_name"] not in ("QUANTIZE", "DEQUANTIZE") and not _is_hybrid(o, dtypes)
                   and any(dtypes.get(i) == np.float32 for i in o["outputs"])})


def dynamic_int8_ops(flatbuffer):
    """`{op name: count}` of the ops with int8 weights and float input quantised per token at run time."""
    ops, dtypes = _op_details(flatbuffer)
    counts = {}
    for o in ops:
        if _is_hybrid(o, dtypes):
            counts[o["op_name"]] = counts.get(o["op_name"], 0) + 1
    return counts


def export_tflite(model, preprocessor, modality, heads, export_base, version=None,
                  overwrite=False, quantize="none", metadata=None, representative_data=None,
                  validation_data=None, max_accuracy_drop=quantize_lib.DEFAULT_MAX_ACCURACY_DROP,
                  integer_only=False):
    """Write `<export_base>/<version>/model.tflite` (+ labels, metadata) atomically.

    Args:
        model: keras.Model from `tftransfer.build_model`.
        preprocessor: the backbone's image converter / text preprocessor.
        modality: str. `"image"` or `"text"`.
        heads: list of `HeadSpec`.
        export_base: str. Parent directory of the versions.
        version: int. Defaults to None: the next integer.
        overwrite: bool. Replace an existing version. Defaults to False.
        quantize: str. `none`, `float16`, `dynamic_range` or `int8`.
            Defaults to `"none"`.
        metadata: dict. Extra fields for `tftransfer.json`. Defaults to None.
        representative_data: int8: iterable of input dicts (see `convert`).
            Defaults to None.
        validation_data: iterable of `(inputs, {head: labels})` batches. When
            given with a quantised mode, the float model and the TFLite model
            are scored on it (`quantize.accuracy`), both numbers go into
            `tftransfer.json` under `accuracy`, and a drop over
            `max_accuracy_drop` raises UserError before anything is written.
            Defaults to None (not measured).
        max_accuracy_drop: float. Fraction (0.01 = 1 point). Defaults to
            `quantize.DEFAULT_MAX_ACCURACY_DROP`.
        integer_only: bool. int8 text: every op int8 (see `convert`).
            Defaults to False.

    Returns:
        dict. `path` (version dir), `tflite_file`, `size_bytes`,
        `float32_weights_bytes` (4 bytes x parameters: what an unquantised
        model stores), `size_ratio` (size / float32 weights),
        `accuracy` (the record, or None when not measured) and, for int8,
        `float_ops` (ops still computing in float32), `dynamic_int8_ops`
        (`{op: count}` with int8 weights and per-token int8 inputs) and
        `integer_only`.

    Example:
    ```python
    info = export_tflite(model, loaded.preprocessor, "image", heads, "/tmp/tflite", quantize="float16")
    interpreter = tf.lite.Interpreter(model_path=info["tflite_file"])
    interpreter.get_signature_runner()(image=x)["probabilities"]
    ```
    """
    if quantize not in QUANTIZE_MODES:
        raise UserError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}. Received: {quantize!r}.")
    max_accuracy_drop = quantize_lib.check_max_accuracy_drop(max_accuracy_drop)
    if version is not None and not overwrite and os.path.exists(os.path.join(export_base, str(version))):
        raise UserError(f"export version {os.path.join(export_base, str(version))!r} exists; "
                        f"pass --overwrite or another --version.")
    # Convert and score before any directory is made: a refused export leaves nothing.
    flatbuffer = convert(model, preprocessor, modality, heads, quantize, representative_data, integer_only)
    record = None
    if quantize != "none" and validation_data is not None:
        validation_data = list(validation_data)
        float_accuracy = quantize_lib.accuracy(quantize_lib.keras_predict(model, heads), validation_data, heads)
        quantized_accuracy = quantize_lib.accuracy(interpreter_predict(flatbuffer), validation_data, heads)
        record = quantize_lib.compare(float_accuracy, quantized_accuracy, heads, quantize, max_accuracy_drop,
                                      integer_only=integer_only and modality == "text")
    weights_bytes = 4 * model.count_params()
    info = dict(size_bytes=len(flatbuffer), float32_weights_bytes=weights_bytes,
                size_ratio=round(len(flatbuffer) / weights_bytes, 4), quantize=quantize)
    if quantize == "int8":  # what is not integer, named (text: layer norms, mask select, softmax)
        info["float_ops"] = float_ops(flatbuffer)
        info["dynamic_int8_ops"] = dynamic_int8_ops(flatbuffer)
        info["integer_only"] = not info["float_ops"] and not info["dynamic_int8_ops"]

    def write(directory):
        with open(os.path.join(directory, TFLITE_FILE), "wb") as f:
            f.write(flatbuffer)
        saved_model.write_labels(directory, heads)
        record_ = saved_model.describe_export(model, preprocessor, modality, heads, raw=False)
        record_["signatures"] = {"serving_default": record_["signatures"][saved_model.PREPROCESSED_SIGNATURE]}
        record_["outputs"] = sorted(
            saved_model.head_outputs(
                heads, {h.name: tf.zeros((1, h.num_classes)) for h in heads}, include_strings=False
            )
        )
        record_["tflite"] = dict(info)
        if quantize != "none":
            record_["accuracy"] = record
        if modality == "text":
            saved_model.write_vocabulary(directory, preprocessor)
        for key, value in (metadata or {}).items():
            record_.setdefault(key, value)
        with open(os.path.join(directory, saved_model.METADATA_FILE), "w") as f:
            json.dump(record_, f, indent=2, default=str)

    path = saved_model.write_versions([export_base], version, overwrite, {export_base: write})[0]
    return {"path": path, "tflite_file": os.path.join(path, TFLITE_FILE), **info, "accuracy": record}
