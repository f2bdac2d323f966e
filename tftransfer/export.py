"""SavedModel export for TF Serving: versioned, atomic, preprocessing inside.

`export_saved_model` writes `<export_base>/<version>/` with two signatures:

- `serving_default`: the raw input a client has — `image_bytes` (a batch of
  encoded JPEG/PNG strings; the `_bytes` suffix lets TF Serving's REST API
  take `{"b64": ...}`) or `text` (UTF-8 strings) — with decoding, resizing,
  normalisation or tokenisation inside the graph;
- `serve_preprocessed`: already-preprocessed tensors (float images, or token
  ids / segment ids / padding mask; core TF ops only).

Outputs are named per head (see `head_outputs`). The version is written to a
temporary directory beside the target and renamed into place, so a server
polling `<export_base>` never sees a partial version.
"""

import json
import os
import shutil
import tempfile

import keras
import tensorflow as tf

from tftransfer.errors import UserError

TMP_PREFIX = ".tmp-export-"


def next_version(export_base):
    """1 + the largest integer version under `export_base` (1 if none)."""
    if not os.path.isdir(export_base):
        return 1
    versions = [int(d) for d in os.listdir(export_base) if d.isdigit()]
    return max(versions, default=0) + 1


def head_outputs(heads, outputs, prefix_single=False):
    """Model logits -> named serving outputs.

    Classification: `probabilities`, `class_id`, `class_name`; multi-label:
    `probabilities`, `labels` (bool per class); regression: `values`. With
    several heads every name is prefixed `<head>_`.
    """
    named = {}
    single = len(heads) == 1 and not prefix_single
    for head in heads:
        logits = tf.cast(outputs[head.name], tf.float32)
        prefix = "" if single else f"{head.name}_"
        if head.type == "classification":
            probabilities = tf.nn.softmax(logits, axis=-1)
            class_id = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
            named[f"{prefix}probabilities"] = probabilities
            named[f"{prefix}class_id"] = class_id
            if head.class_names:
                named[f"{prefix}class_name"] = tf.gather(tf.constant(list(head.class_names)), class_id)
        elif head.type == "multilabel":
            probabilities = tf.sigmoid(logits)
            named[f"{prefix}probabilities"] = probabilities
            named[f"{prefix}labels"] = probabilities > 0.5
        else:
            named[f"{prefix}values"] = logits
    return named


def export_saved_model(model, preprocessor, modality, heads, export_base,
                       version=None, overwrite=False, metadata=None):
    """Write a TF Serving SavedModel version atomically.

    Args:
        model: keras.Model from `tftransfer.build_model`.
        preprocessor: the backbone's preprocessor (image converter or text
            preprocessor).
        modality: str. `"image"` or `"text"`.
        heads: list of `HeadSpec` (names, types, class names).
        export_base: str. Directory TF Serving polls.
        version: int. None: next free integer.
        overwrite: bool. Replace an existing version. Defaults to False.
        metadata: dict. Stored as `assets/tftransfer.json`.

    Returns:
        str. The version directory.
    """
    if os.path.exists(export_base) and not os.path.isdir(export_base):
        raise UserError(f"export base {export_base!r} is a file; pass a directory.")
    try:
        os.makedirs(export_base, exist_ok=True)
    except OSError as e:
        raise UserError(f"export base {export_base!r} cannot be created ({e.strerror}).")
    if not os.access(export_base, os.W_OK):
        raise UserError(f"export base {export_base!r} is not writable; pass a writable directory.")
    version = int(version) if version is not None else next_version(export_base)
    if version < 1:
        raise UserError(f"--version must be a positive integer. Received: {version}.")
    final = os.path.join(export_base, str(version))
    if os.path.exists(final) and not overwrite:
        raise UserError(f"export version {final!r} exists; pass --overwrite or another --version.")

    archive = build_archive(model, preprocessor, modality, heads)
    tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=export_base)
    try:
        archive.write_out(tmp, verbose=False)
        assets = os.path.join(tmp, "assets")
        os.makedirs(assets, exist_ok=True)
        for head in heads:
            if head.class_names:
                name = "labels.txt" if head is heads[0] else f"labels_{head.name}.txt"
                with open(os.path.join(assets, name), "w") as f:
                    f.write("\n".join(head.class_names) + "\n")
        with open(os.path.join(assets, "tftransfer.json"), "w") as f:
            json.dump(metadata or {}, f, indent=2, default=str)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def build_archive(model, preprocessor, modality, heads):
    """A `keras.export.ExportArchive` with the raw and preprocessed endpoints."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.track(preprocessor)

    def predict(inputs):
        return head_outputs(heads, model(inputs, training=False))

    if modality == "image":
        height, width = preprocessor.image_size

        def serve_bytes(image_bytes):
            def one(contents):
                image = tf.io.decode_image(contents, channels=3, expand_animations=False)
                return preprocessor(tf.cast(image, tf.float32))

            images = tf.map_fn(
                one, image_bytes, fn_output_signature=tf.TensorSpec((height, width, 3), tf.float32)
            )
            return predict(images)

        archive.add_endpoint(
            "serving_default", serve_bytes,
            input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
        )
        archive.add_endpoint(
            "serve_preprocessed", predict,
            input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32, name="image")],
        )
    else:

        def serve_text(text):
            return predict(preprocessor(text))

        archive.add_endpoint(
            "serving_default", serve_text,
            input_signature=[tf.TensorSpec([None], tf.string, name="text")],
        )

        def serve_ids(token_ids, segment_ids, padding_mask):
            return predict(
                {"token_ids": token_ids, "segment_ids": segment_ids, "padding_mask": padding_mask}
            )

        archive.add_endpoint(
            "serve_preprocessed", serve_ids,
            input_signature=[
                tf.TensorSpec([None, None], tf.int32, name="token_ids"),
                tf.TensorSpec([None, None], tf.int32, name="segment_ids"),
                tf.TensorSpec([None, None], tf.int32, name="padding_mask"),
            ],
        )
    return archive
