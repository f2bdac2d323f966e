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
  activations quantised on the fly; the largest deviation.
The tolerances the tests hold are in `TOLERANCE`.
"""

import json
import os
import tempfile

import keras
import tensorflow as tf

from tftransfer.errors import UserError
from tftransfer.export import saved_model

QUANTIZE_MODES = ("none", "float16", "dynamic_range")
TFLITE_FILE = "model.tflite"
# Max abs difference of `probabilities` against the SavedModel, held by the tests
# (tiny random-init models; measured values are in BENCHMARKS.md).
TOLERANCE = {"none": 1e-5, "float16": 1e-2, "dynamic_range": 5e-2}


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


def convert(model, preprocessor, modality, heads, quantize="none"):
    """The model (preprocessed input, no string outputs) as TFLite flatbuffer bytes.

    Args:
        model: keras.Model from `tftransfer.build_model`.
        preprocessor: the backbone's image converter / text preprocessor.
        modality: str. `"image"` or `"text"`.
        heads: list of `HeadSpec`.
        quantize: str. One of `none`, `float16`, `dynamic_range`.
            Defaults to `"none"`.

    Returns:
        bytes.
    """
    if quantize not in QUANTIZE_MODES:
        raise UserError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}. Received: {quantize!r}.")
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", tflite_function(model, preprocessor, modality, heads))
    with tempfile.TemporaryDirectory(prefix="tftransfer-tflite-") as tmp:
        archive.write_out(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=["serving_default"])
        if quantize != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        try:
            return converter.convert()
        except Exception as e:  # the converter raises ConverterError and others.
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"TFLite conversion of this {modality} model failed ({first[:200]}); "
                f"export a SavedModel instead (--format=saved_model)."
            )


def export_tflite(model, preprocessor, modality, heads, export_base, version=None,
                  overwrite=False, quantize="none", metadata=None):
    """Write `<export_base>/<version>/model.tflite` (+ labels, metadata) atomically.

    Args:
        model: keras.Model from `tftransfer.build_model`.
        preprocessor: the backbone's image converter / text preprocessor.
        modality: str. `"image"` or `"text"`.
        heads: list of `HeadSpec`.
        export_base: str. Parent directory of the versions.
        version: int. Defaults to None: the next integer.
        overwrite: bool. Replace an existing version. Defaults to False.
        quantize: str. `none`, `float16` or `dynamic_range`. Defaults to
            `"none"`.
        metadata: dict. Extra fields for `tftransfer.json`. Defaults to None.

    Returns:
        dict. `path` (version dir), `tflite_file`, `size_bytes`,
        `float32_weights_bytes` (4 bytes x parameters: what an unquantised
        model stores) and `size_ratio` (size / float32 weights).

    Example:
    ```python
    info = export_tflite(model, loaded.preprocessor, "image", heads, "/tmp/tflite", quantize="float16")
    interpreter = tf.lite.Interpreter(model_path=info["tflite_file"])
    interpreter.get_signature_runner()(image=x)["probabilities"]
    ```
    """
    if quantize not in QUANTIZE_MODES:
        raise UserError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}. Received: {quantize!r}.")
    info = {}

    def write(directory):
        # Converted here, after write_versions checked the base and version.
        flatbuffer = convert(model, preprocessor, modality, heads, quantize)
        weights_bytes = 4 * model.count_params()
        info.update(size_bytes=len(flatbuffer), float32_weights_bytes=weights_bytes,
                    size_ratio=round(len(flatbuffer) / weights_bytes, 4), quantize=quantize)
        with open(os.path.join(directory, TFLITE_FILE), "wb") as f:
            f.write(flatbuffer)
        saved_model.write_labels(directory, heads)
        record = saved_model.describe_export(model, preprocessor, modality, heads, raw=False)
        record["signatures"] = {"serving_default": record["signatures"][saved_model.PREPROCESSED_SIGNATURE]}
        record["outputs"] = sorted(
            saved_model.head_outputs(
                heads, {h.name: tf.zeros((1, h.num_classes)) for h in heads}, include_strings=False
            )
        )
        record["tflite"] = dict(info)
        if modality == "text":
            saved_model.write_vocabulary(directory, preprocessor)
        for key, value in (metadata or {}).items():
            record.setdefault(key, value)
        with open(os.path.join(directory, saved_model.METADATA_FILE), "w") as f:
            json.dump(record, f, indent=2, default=str)

    path = saved_model.write_versions([export_base], version, overwrite, {export_base: write})[0]
    return {"path": path, "tflite_file": os.path.join(path, TFLITE_FILE), **info}

