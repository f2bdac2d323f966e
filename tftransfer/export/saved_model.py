"""SavedModel export for TF Serving: versioned, atomic, preprocessing inside.

`export_saved_model` writes `<export_base>/<version>/`, a SavedModel with
two signatures:

- `serving_default`: the raw input a client has, with decoding, resizing and
  normalisation (images) or tokenisation (text) inside the graph.
  Images: `image_bytes`, a batch of encoded JPEG/PNG/GIF/BMP/WebP strings (the
  `_bytes` suffix makes TF Serving's REST API accept `{"b64": "..."}`).
  Text: `text`, a batch of UTF-8 strings; sentence-pair models take `text`
  and `text_pair` (the second segment, same batch size).
- `serve_preprocessed`: already-preprocessed tensors. Images: `image`,
  float32 `(batch, height, width, 3)` after the backbone's normalisation.
  Text: `token_ids`, `segment_ids`, `padding_mask`, int32 `(batch, length)`.

Outputs are named per head (see `head_outputs`). Class names travel in
`assets/labels.txt` (one per line, line i = class id i); `assets/
tftransfer.json` records the backbone, the inputs, the preprocessing, the
heads and the training config.

Text models need the TF Text ops wherever the SavedModel loads (keras-hub's
tokenizer), even to call `serve_preprocessed`: a SavedModel loads all its
functions at once. So a text export also writes a *core-ops twin*,
`<export_base>_token_ids/<version>/`, a SavedModel with only the token-id
signature (as `serving_default` and `serve_preprocessed`) that loads with
plain TensorFlow (and any TF Serving build).

Atomicity: each version is written to a temporary directory inside its
export base (same filesystem; name `.tmp-export-*`, never all digits, so TF
Serving ignores it) and renamed into place, so a server polling the base
never sees a partial version. A failed export leaves neither a version nor a
temporary directory behind. A killed one (SIGKILL skips the roll-back) can:
its temporary directories name their process and host, and the next export
into the same base removes those whose process is gone (restoring a version
it had moved aside).
"""

import datetime
import errno
import json
import os
import shutil
import socket
import tempfile

import keras
import tensorflow as tf

from tftransfer.data import images
from tftransfer.heads import head_to_dict
from tftransfer.errors import UserError

TMP_PREFIX = ".tmp-export-"
OLD_PREFIX = ".tmp-replaced-"
LABELS_FILE = "labels.txt"
METADATA_FILE = "tftransfer.json"
VOCABULARY_FILE = "vocabulary.txt"
TOKEN_IDS_SUFFIX = "_token_ids"
RAW_SIGNATURE = "serving_default"
PREPROCESSED_SIGNATURE = "serve_preprocessed"
# The raw-input names of a sentence-pair model's serving_default.
PAIR_INPUTS = ("text", "text_pair")
TOP_K = 5
MAX_VERSION = 2**63 - 1
FORMAT_VERSION = 1
# Magic numbers of the encodings `tf.io.decode_image` reads (RIFF: WebP).
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"RIFF")


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------


def class_names_of(head):
    """The head's class names, or `"0"`, `"1"`, ... when it has none."""
    if head.class_names:
        return [str(n) for n in head.class_names]
    return [str(i) for i in range(head.num_classes)]


def head_outputs(heads, outputs, include_strings=True):
    """Model logits -> named serving outputs.

    Classification heads give `probabilities` (float32 `(b, classes)`),
    `class_id` (int32 `(b,)`), `class_name` (string `(b,)`),
    `top_k_class_ids` (int32 `(b, k)`), `top_k_probabilities` (float32
    `(b, k)`) and `top_k_class_names` (string `(b, k)`), with
    `k = min(5, num_classes)`. Multi-label heads give `probabilities` and
    `labels` (bool per class, probability > 0.5). Regression heads give
    `values`. With several heads every name is prefixed `<head name>_`.

    Args:
        heads: list of `HeadSpec`.
        outputs: dict `{head name: logits}` (the model's output).
        include_strings: bool. False leaves out the string outputs (TFLite).
            Defaults to True.

    Returns:
        dict of output name -> tensor.
    """
    named = {}
    single = len(heads) == 1
    for head in heads:
        logits = tf.cast(outputs[head.name], tf.float32)
        prefix = "" if single else f"{head.name}_"
        if head.type == "classification":
            probabilities = tf.nn.softmax(logits, axis=-1)
            class_id = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
            k = min(TOP_K, head.num_classes)
            top_p, top_ids = tf.math.top_k(probabilities, k=k)
            named[f"{prefix}probabilities"] = probabilities
            named[f"{prefix}class_id"] = class_id
            named[f"{prefix}top_k_class_ids"] = top_ids
            named[f"{prefix}top_k_probabilities"] = top_p
            if include_strings:
                names = tf.constant(class_names_of(head))
                named[f"{prefix}class_name"] = tf.gather(names, class_id)
                named[f"{prefix}top_k_class_names"] = tf.gather(names, top_ids)
        elif head.type == "multilabel":
            probabilities = tf.sigmoid(logits)
            named[f"{prefix}probabilities"] = probabilities
            named[f"{prefix}labels"] = probabilities > 0.5
        else:
            named[f"{prefix}values"] = logits
    return named


def outputs_or_empty(heads, inputs, run_model):
    """`head_outputs` of `run_model()`, or empty outputs for an empty batch.

    The network never runs on zero rows: with TensorFlow's oneDNN
    optimisations (on by default on x86 CPUs with AVX-512 BF16/AMX) a fused
    Conv2D + BatchNorm in inference mode fails on a `(0, h, w, c)` batch
    (`Incompatible shapes: [C] vs. [0,...]`), and fused kernels on other
    devices have had the same weak spot (tensorflow/tensorflow#14657). An
    empty request instead gets every output with 0 rows and its usual dtype,
    built from zero-row logits, so the two branches have one structure.

    Args:
        heads: list of `HeadSpec`.
        inputs: the model's input (a tensor or a dict of tensors); its first
            leaf's leading dimension is the batch size.
        run_model: callable returning the model's `{head name: logits}`.

    Returns:
        dict of output name -> tensor, as `head_outputs`.
    """
    batch = tf.shape(tf.nest.flatten(inputs)[0])[0]

    def empty():
        return head_outputs(heads, {h.name: tf.zeros((0, h.num_classes)) for h in heads})

    return tf.cond(batch > 0, lambda: head_outputs(heads, run_model()), empty)


# ---------------------------------------------------------------------------
# Serving functions
# ---------------------------------------------------------------------------


def decode_image_bytes(image_bytes, preprocessor, background=images.WHITE):
    """Encoded image strings -> the model's float image batch, in-graph.

    Decoding is `tftransfer.data.images.decode_image`, the function the
    training data goes through (alpha over a fixed background, EXIF
    orientation, grey / palette / 16-bit / GIF), so served pixels equal
    trained ones. Every element is checked first: an empty string, or bytes that are not
    JPEG/PNG/GIF/BMP/WebP, fail with an `InvalidArgumentError` that names
    `image_bytes[i]`; bytes with a valid header but corrupt data fail in
    the decoder (op `decode_image_bytes/...`). A failing request never
    affects the next one.

    Args:
        image_bytes: string tensor `(batch,)`.
        preprocessor: the backbone's image converter (0-255 RGB in).
        background: 3 floats. RGB 0-255 that transparent pixels are
            composited over; must be the training data's
            (`data.image_background`). Defaults to white.

    Returns:
        float32 `(batch, height, width, 3)`.
    """
    height, width = preprocessor.image_size

    def one(args):
        index, contents = args
        with tf.name_scope("check_image_bytes"):
            head = tf.strings.substr(contents, 0, 4)
            known = tf.reduce_any(
                [tf.strings.substr(head, 0, len(m)) == m for m in _IMAGE_MAGIC]
            )
            empty = tf.strings.length(contents) == 0
            message = tf.cond(
                empty,
                lambda: tf.strings.format("image_bytes[{}] is an empty string; send encoded JPEG/PNG bytes", index),
                lambda: tf.strings.format(
                    "image_bytes[{}] is not a JPEG/PNG/GIF/BMP/WebP image (it starts with {}); "
                    "send the encoded file bytes (REST: b64 of the file)",
                    [index, head], summarize=-1,
                ),
            )
            check = tf.debugging.Assert(known, [message], name="image_bytes_format")
        with tf.control_dependencies([check]), tf.name_scope("decode_image_bytes"):
            image = images.decode_image(contents, background)
        return preprocessor(image)

    count = tf.shape(image_bytes, out_type=tf.int32)[0]
    return tf.map_fn(
        one, (tf.range(count), image_bytes),
        fn_output_signature=tf.TensorSpec((height, width, 3), tf.float32),
        parallel_iterations=16,
    )


def build_archive(model, preprocessor, modality, heads, raw=True, image_background=None, pair=False):
    """A `keras.export.ExportArchive` with the serving signatures.

    Args:
        model: keras.Model from `tftransfer.build_model`.
        preprocessor: the backbone's image converter or text preprocessor.
        modality: str. `"image"` or `"text"`.
        heads: list of `HeadSpec`.
        raw: bool. Include the raw-input `serving_default` signature. False
            (text core-ops twin): `serving_default` is the preprocessed
            signature and nothing of the preprocessor is saved.
            Defaults to True.
        image_background: 3 floats (RGB 0-255) that transparent pixels of
            served images are composited over: the training data's
            `data.image_background`. Defaults to None (white).
        pair: bool. Text: `serving_default` takes two string batches,
            `text` and `text_pair`, packed as one sentence pair each
            (`[CLS] text [SEP] text_pair [SEP]`). Defaults to False.

    Returns:
        keras.export.ExportArchive.
    """
    archive = keras.export.ExportArchive()
    archive.track(model)
    background = images.WHITE if image_background is None else image_background

    def predict(inputs):
        return outputs_or_empty(heads, inputs, lambda: model(inputs, training=False))

    if modality == "image":
        height, width = preprocessor.image_size
        if raw:
            _build(preprocessor, tf.zeros((height, width, 3)))
            archive.track(preprocessor)

            def serve_bytes(image_bytes):
                return predict(decode_image_bytes(image_bytes, preprocessor, background))

            archive.add_endpoint(
                RAW_SIGNATURE, serve_bytes,
                input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
            )

        def serve_image(image):
            image = tf.ensure_shape(image, [None, height, width, 3], name="check_image_shape")
            return predict(image)

        archive.add_endpoint(
            PREPROCESSED_SIGNATURE, serve_image,
            input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32, name="image")],
        )
        return archive

    if raw and pair:
        if not preprocessor.built:
            preprocessor(x=(tf.constant(["a"]), tf.constant(["b"])))
        archive.track(preprocessor)

        def serve_pair(text, text_pair):
            return predict(preprocessor(x=(text, text_pair)))

        archive.add_endpoint(
            RAW_SIGNATURE, serve_pair,
            input_signature=[tf.TensorSpec([None], tf.string, name=name) for name in PAIR_INPUTS],
        )
    elif raw:
        _build(preprocessor, tf.constant(["a"]))
        archive.track(preprocessor)

        def serve_text(text):
            return predict(preprocessor(text))

        archive.add_endpoint(
            RAW_SIGNATURE, serve_text,
            input_signature=[tf.TensorSpec([None], tf.string, name="text")],
        )

    def serve_ids(token_ids, segment_ids, padding_mask):
        return predict(
            {"token_ids": token_ids, "segment_ids": segment_ids, "padding_mask": padding_mask}
        )

    spec = [
        tf.TensorSpec([None, None], tf.int32, name=name)
        for name in ("token_ids", "segment_ids", "padding_mask")
    ]
    archive.add_endpoint(PREPROCESSED_SIGNATURE, serve_ids, input_signature=spec)
    if not raw:
        archive.add_endpoint(RAW_SIGNATURE, serve_ids, input_signature=spec)
    return archive


def _build(layer, example):
    if not layer.built:
        layer(example)


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------


def export_saved_model(model, preprocessor, modality, heads, export_base,
                       version=None, overwrite=False, metadata=None, image_background=None, pair=False):
    """Write a TF Serving SavedModel version atomically.

    Args:
        model: keras.Model from `tftransfer.build_model` (preprocessed input
            -> `{head name: logits}`).
        preprocessor: the backbone's preprocessor (`LoadedBackbone.
            preprocessor`: keras-hub image converter or text preprocessor).
        modality: str. `"image"` or `"text"`.
        heads: list of `HeadSpec` (names, types, class names).
        export_base: str. The directory TF Serving polls
            (`--model_base_path`). Text models also get the core-ops twin
            `<export_base>_token_ids/`.
        version: int. Version to write. Defaults to None: 1 + the largest
            existing version.
        overwrite: bool. Replace an existing version. Defaults to False.
        metadata: dict. Extra JSON-able fields for `assets/tftransfer.json`
            (e.g. `backbone`, `config`). Defaults to None.
        image_background: see `build_archive`. Defaults to None (white).
        pair: bool. A sentence-pair text model (see `build_archive`).
            Defaults to False.

    Returns:
        str. The version directory, `<export_base>/<version>`.

    Raises:
        UserError: the export base is a file or not writable, the version
            exists (without `overwrite`) or is not a positive integer.

    Example:
    ```python
    path = export_saved_model(model, loaded.preprocessor, "image", heads, "/tmp/serving/flowers")
    serving = tf.saved_model.load(path)
    serving.signatures["serving_default"](image_bytes=tf.constant([jpeg_bytes]))["class_name"]
    ```
    """
    if modality not in ("image", "text"):
        raise UserError(f"export: modality must be image or text. Received: modality={modality!r}.")
    from tftransfer.callbacks import check_finite_weights

    check_finite_weights(model, "export")
    bases = [export_base]
    if modality == "text":
        bases.append(token_ids_base(export_base))
    def write(directory, raw):
        _write_saved_model(directory, model, preprocessor, modality, heads, raw, metadata, image_background,
                           pair)

    writers = {export_base: lambda d: write(d, True)}
    if modality == "text":
        writers[bases[1]] = lambda d: write(d, False)
    paths = write_versions(bases, version, overwrite, writers)
    return paths[0]


def token_ids_base(export_base):
    """The export base of a text model's core-ops twin: `<base>_token_ids`."""
    return os.path.normpath(export_base) + TOKEN_IDS_SUFFIX


def _write_saved_model(directory, model, preprocessor, modality, heads, raw, metadata, image_background=None,
                       pair=False):
    archive = build_archive(model, preprocessor, modality, heads, raw=raw, image_background=image_background,
                            pair=pair)
    archive.write_out(directory, verbose=False)
    assets = os.path.join(directory, "assets")
    write_labels(assets, heads)
    if modality == "text":
        write_vocabulary(assets, preprocessor)
    info = describe_export(model, preprocessor, modality, heads, raw, metadata, pair)
    info["custom_ops"] = custom_ops(directory)
    with open(os.path.join(assets, METADATA_FILE), "w") as f:
        json.dump(info, f, indent=2, default=str)


def write_labels(assets_dir, heads):
    """`labels.txt` (first classification/multi-label head) and `labels_<head>.txt` (all)."""
    os.makedirs(assets_dir, exist_ok=True)
    first = True
    for head in heads:
        if head.type == "regression":
            continue
        text = "\n".join(class_names_of(head)) + "\n"
        names = [f"labels_{head.name}.txt"] if len(heads) > 1 else []
        if first:
            names.insert(0, LABELS_FILE)
            first = False
        for name in names:
            with open(os.path.join(assets_dir, name), "w") as f:
                f.write(text)


def write_vocabulary(directory, preprocessor):
    """The tokenizer's vocabulary as `vocabulary.txt` (line i = token id i), for clients that tokenise."""
    vocabulary = preprocessor.tokenizer.get_vocabulary()
    with open(os.path.join(directory, VOCABULARY_FILE), "w", encoding="utf-8") as f:
        f.write("\n".join(vocabulary) + "\n")


def describe_export(model, preprocessor, modality, heads, raw=True, metadata=None, pair=False):
    """The JSON record stored as `assets/tftransfer.json`."""
    from tftransfer import __version__

    if modality == "image":
        height, width = preprocessor.image_size
        inputs = {PREPROCESSED_SIGNATURE: {"image": [None, height, width, 3], "dtype": "float32"}}
        if raw:
            inputs[RAW_SIGNATURE] = {"image_bytes": [None], "dtype": "string",
                                     "encoding": "JPEG/PNG/GIF/BMP/WebP file bytes"}
    else:
        length = getattr(preprocessor, "sequence_length", None)
        ids = {"token_ids": [None, length], "segment_ids": [None, length],
               "padding_mask": [None, length], "dtype": "int32"}
        inputs = {PREPROCESSED_SIGNATURE: ids}
        text = {name: [None] for name in (PAIR_INPUTS if pair else ("text",))}
        inputs[RAW_SIGNATURE] = {**text, "dtype": "string"} if raw else ids
    info = {
        "format_version": FORMAT_VERSION,
        "tftransfer_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "modality": modality,
        "model": model.name,
        "signatures": inputs,
        "outputs": sorted(_output_names(heads)),
        "preprocessing": keras.saving.serialize_keras_object(preprocessor),
        "heads": [head_to_dict(h) for h in heads],
    }
    for key, value in (metadata or {}).items():
        info.setdefault(key, value)
    return info


def _output_names(heads):
    fake = {h.name: tf.zeros((1, h.num_classes)) for h in heads}
    return head_outputs(heads, fake).keys()


def custom_ops(saved_model_dir):
    """Op types in the SavedModel that core TensorFlow does not define.

    These (e.g. TF Text's `RegexSplitWithOffsets`) must be registered in the
    process or TF Serving build that loads the model.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    ops = set()
    for meta_graph in proto.meta_graphs:
        ops.update(n.op for n in meta_graph.graph_def.node)
        for function in meta_graph.graph_def.library.function:
            ops.update(n.op for n in function.node_def)
    core = set(dir(tf.raw_ops))
    return sorted(op for op in ops if op not in core and not op.startswith("_"))


# ---------------------------------------------------------------------------
# Versions
# ---------------------------------------------------------------------------


def next_version(*export_bases):
    """1 + the largest integer version under any of `export_bases` (1 if none)."""
    versions = [0]
    for base in export_bases:
        if os.path.isdir(base):
            versions += [int(d) for d in os.listdir(base) if d.isdigit()]
    return max(versions) + 1


def check_export_base(export_base):
    """Create `export_base` if needed; UserError when it is a file or read-only."""
    if os.path.exists(export_base) and not os.path.isdir(export_base):
        raise UserError(f"export base {export_base!r} is a file; pass a directory (--export_base).")
    try:
        os.makedirs(export_base, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"export base {export_base!r} cannot be created ({e.strerror}); "
            f"pass a writable directory (--export_base)."
        )
    if not os.access(export_base, os.W_OK | os.X_OK):
        raise UserError(f"export base {export_base!r} is not writable; pass a writable directory (--export_base).")


def write_versions(export_bases, version, overwrite, writers):
    """Write one version under each export base, all or nothing.

    Each `writers[base](tmp_dir)` fills a temporary directory inside `base`;
    only when every writer succeeded are the directories renamed to
    `<base>/<version>`. On any failure (also KeyboardInterrupt) the temporary
    directories are removed and versions already renamed in this call are
    taken back (a replaced version is restored).

    Args:
        export_bases: list of str.
        version: int or None (next free version across all bases).
        overwrite: bool. Replace existing versions.
        writers: dict base -> callable(directory).

    Returns:
        list of str. The version directories, in `export_bases` order.
    """
    for base in export_bases:
        check_export_base(base)
    if version is None:
        version = next_version(*export_bases)
    try:
        version = int(version)
    except (TypeError, ValueError):
        version = -1
    if version < 1:
        raise UserError(f"export version must be a positive integer (--version). Received: {version}.")
    if version > MAX_VERSION:  # TF Serving parses version directories as int64
        raise UserError(f"export version {version} is beyond what TF Serving reads (int64, at most "
                        f"{MAX_VERSION}); pass a smaller --version.")
    finals = [os.path.join(base, str(version)) for base in export_bases]
    for final in finals:
        if os.path.exists(final) and not overwrite:
            raise UserError(f"export version {final!r} exists; pass --overwrite or another --version.")

    for base in export_bases:
        remove_stale_temporaries(base)
    temps, published, replaced = [], [], []
    try:
        for base in export_bases:
            try:
                temps.append(tempfile.mkdtemp(prefix=_temporary_prefix(TMP_PREFIX, version), dir=base))
                # mkdtemp makes 0700; the server may run as another user.
                os.chmod(temps[-1], 0o755)
            except PermissionError as e:
                raise UserError(f"export base {base!r} is not writable ({e.strerror}); pass a writable directory.")
            writers[base](temps[-1])
        for tmp, final in zip(temps, finals):
            if os.path.exists(final):
                old = tempfile.mkdtemp(prefix=_temporary_prefix(OLD_PREFIX, version), dir=os.path.dirname(final))
                os.rename(final, os.path.join(old, "v"))
                replaced.append((old, final))
            try:
                os.rename(tmp, final)
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY) and final not in [f for _, f in replaced]:
                    raise UserError(
                        f"export version {final!r} appeared while exporting; another export "
                        f"wrote it. Pass another --version (or --overwrite)."
                    )
                raise
            published.append(final)
    except BaseException:
        _roll_back(temps, published, replaced)
        raise
    for old, _ in replaced:
        shutil.rmtree(old, ignore_errors=True)
    return finals


def _temporary_prefix(kind, version):
    # `<kind><pid>@<host>@<version>@<random>`: enough for a later export to
    # tell a dead process's leftovers from a running export's.
    return f"{kind}{os.getpid()}@{socket.gethostname()}@{version}@"


def remove_stale_temporaries(export_base):
    """Remove what killed exports on this host left in `export_base`.

    A `.tmp-export-*` directory of a process that no longer runs is removed;
    a `.tmp-replaced-*` one holds a version that export had moved aside, so
    it is renamed back when that version is missing, else removed.
    Temporaries of live processes, other hosts (a shared filesystem) or an
    unknown naming are left alone.
    """
    host = socket.gethostname()
    for name in os.listdir(export_base):
        kind = next((k for k in (TMP_PREFIX, OLD_PREFIX) if name.startswith(k)), None)
        if kind is None:
            continue
        fields = name[len(kind):].split("@")
        if len(fields) != 4 or not fields[0].isdigit() or fields[1] != host or _process_alive(int(fields[0])):
            continue
        path = os.path.join(export_base, name)
        final = os.path.join(export_base, fields[2])
        if kind == OLD_PREFIX and fields[2].isdigit() and os.path.isdir(os.path.join(path, "v")) \
                and not os.path.exists(final):
            os.rename(os.path.join(path, "v"), final)
        shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _roll_back(temps, published, replaced):
    """Best effort: remove what this export published, restore what it replaced."""
    for final in published:
        shutil.rmtree(final, ignore_errors=True)
    for old, final in replaced:
        try:
            if not os.path.exists(final):
                os.rename(os.path.join(old, "v"), final)
            shutil.rmtree(old, ignore_errors=True)
        except OSError:  # keep the old version in `old` rather than lose it
            pass
    for tmp in temps:
        shutil.rmtree(tmp, ignore_errors=True)
