"""Data sources -> labelled examples, checked before any training starts.

Every loader returns a `LabelledData`: a train and optional validation
`Split` of `(raw_input, label)` examples plus the class names. Raw inputs are
what a client would send: RGB pixels as float32 0-255 (`(h, w, 3)`, any
size) for images, UTF-8 strings for text (a `(first, second)` tuple of
strings for sentence pairs). Labels are int32 class ids
(classification), a multi-hot float vector (multilabel) or floats
(regression).

Problems a user can fix (missing path, undecodable image, label outside the
classes, empty split) raise `UserError` here, naming the file or value.
"""

import csv
import dataclasses
import io
import json
import math
import os

import numpy as np
import tensorflow as tf

from tftransfer.data import images
from tftransfer.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


@dataclasses.dataclass
class Split:
    """dataset: tf.data.Dataset of `(raw_input, label)`; num_examples: int.

    names: list of str, one per example in order (image files), or None.
    """

    dataset: tf.data.Dataset
    num_examples: int
    names: list = None


@dataclasses.dataclass
class LabelledData:
    modality: str
    train: Split
    validation: Split
    class_names: list
    label_type: str = "classification"
    # Labels in the data were integer class ids (so classes absent from the
    # data are legitimate), not class names.
    integer_ids: bool = False
    # Image files left out because they did not decode (data.skip_bad_images).
    skipped: list = dataclasses.field(default_factory=list)
    # k-shot: positions of the kept training examples in the source's
    # training split (None: all of them). Written to the work dir.
    train_ids: list = None
    # Text inputs are `(first, second)` sentence pairs (two input keys).
    pair: bool = False
    # Multi-task: {head name: TaskLabels}; the examples' labels are then
    # dicts keyed by head name (see `load_text_tasks`). None: one label.
    tasks: dict = None

    @property
    def num_classes(self):
        return len(self.class_names) if self.class_names is not None else None


# A missing multi-task label inside a dataset: class id -1 (as TFDS writes
# unlabelled examples), a multi-hot row of -1, or NaN (regression). The
# pipeline turns it into a sample weight of 0 for that head.
MISSING_CLASS = -1


@dataclasses.dataclass
class TaskLabels:
    """One head's labels in multi-task data.

    label_type: str. classification, multilabel or regression.
    class_names: list of str, or None (regression).
    integer_ids: bool. Labels were integer class ids.
    num_labelled: int. Training examples that have this head's label.
    label_key: str. The column / key / feature they come from.
    """

    label_type: str
    class_names: list
    integer_ids: bool = False
    num_labelled: int = 0
    label_key: str = None

    @property
    def num_classes(self):
        return len(self.class_names) if self.class_names is not None else None


# ---------------------------------------------------------------------------
# scikit-learn digits (offline, real handwritten images)
# ---------------------------------------------------------------------------


def load_digits(classes=tuple(range(10)), train_per_class=None, seed=0):
    """The 8x8 handwritten digits scikit-learn ships, as RGB 0-255 images.

    Args:
        classes: digits to keep; they become class ids 0..len-1 in order.
        train_per_class: labelled training images per class (few-shot);
            every other image validates. None: 80% train.
        seed: int. Which images are picked for training.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for digit in classes:
        idx = np.flatnonzero(digits.target == digit)
        rng.shuffle(idx)
        n = train_per_class if train_per_class is not None else int(0.8 * len(idx))
        if n >= len(idx):
            raise UserError(
                f"data.train_per_class={n} leaves no validation images for digit "
                f"{digit} ({len(idx)} images); use a smaller value."
            )
        train_idx.extend(idx[:n])
        val_idx.extend(idx[n:])
    # Pixels are 0..16: rescale to 0..255 and repeat to RGB so the images
    # look like any other image source to the preprocessing.
    images = np.repeat((digits.images * (255.0 / 16.0)).astype("float32")[..., None], 3, axis=-1)
    class_of = {d: i for i, d in enumerate(classes)}
    labels = np.array([class_of.get(t, -1) for t in digits.target], dtype="int32")

    def split(idx):
        idx = np.array(sorted(idx))
        return Split(tf.data.Dataset.from_tensor_slices((images[idx], labels[idx])), len(idx))

    return LabelledData(
        modality="image",
        train=split(train_idx),
        validation=split(val_idx),
        class_names=[str(d) for d in classes],
        train_ids=sorted(int(i) for i in train_idx) if train_per_class is not None else None,
    )


# ---------------------------------------------------------------------------
# Image folders: root/<class>/*.jpg|png
# ---------------------------------------------------------------------------


def load_image_folder(train_path, validation_path=None, validation_fraction=0.0,
                      seed=0, validate_images=True, background=images.WHITE,
                      skip_bad_images=False):
    """Images in `root/<class name>/*`; class ids follow sorted class names.

    Files are decoded by `tftransfer.data.images.decode_image` (alpha over
    `background`, EXIF orientation, grey/palette/16-bit/GIF), the function
    the serving signature uses too. With `validate_images`, every file is
    decoded once up front: an undecodable one is a `UserError` naming it, or,
    with `skip_bad_images`, left out and counted in `LabelledData.skipped`.
    """
    class_names = _folder_classes(train_path, "data.train_path")
    paths, labels = _folder_files(train_path, class_names, "data.train_path")
    skipped = []
    if validate_images:
        paths, labels = _check_images_decode(paths, labels, background, skip_bad_images, skipped)
    val = None
    if validation_path:
        val_names = _folder_classes(validation_path, "data.validation_path")
        if val_names != class_names:
            raise UserError(
                f"data.validation_path {validation_path!r} has classes {val_names}, "
                f"train has {class_names}; both folders need the same class sub-folders."
            )
        vpaths, vlabels = _folder_files(validation_path, class_names, "data.validation_path")
        if validate_images:
            vpaths, vlabels = _check_images_decode(vpaths, vlabels, background, skip_bad_images, skipped)
        val = _image_split(vpaths, vlabels, background)
    elif validation_fraction:
        paths, labels, vpaths, vlabels = _holdout(paths, labels, validation_fraction, seed)
        val = _image_split(vpaths, vlabels, background)
    data = LabelledData("image", _image_split(paths, labels, background), val, class_names)
    data.skipped = skipped
    return data


def _folder_classes(root, where):
    if not os.path.isdir(root):
        raise UserError(f"{where} {root!r}: no such directory; expected root/<class name>/<images>.")
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not names:
        raise UserError(f"{where} {root!r} has no class sub-folders; expected root/<class name>/<images>.")
    return names


def _folder_files(root, class_names, where):
    paths, labels = [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        for file in sorted(os.listdir(folder)):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(folder, file))
                labels.append(label)
    if not paths:
        raise UserError(
            f"{where} {root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders."
        )
    return paths, labels


def decode_image(contents, background=images.WHITE):
    """Encoded image bytes -> float32 RGB 0-255 `(h, w, 3)` (see `data.images`)."""
    return images.decode_image(contents, background)


def _check_images_decode(paths, labels, background, skip_bad, skipped):
    """Decode every file once (parallel, native) and name the ones that fail.

    tf.data errors inside `fit` do not say which file broke; this pass does,
    before anything is written. Set `data.validate_images: false` to skip it,
    or `data.skip_bad_images: true` to leave bad files out (counted).
    """
    indices = tf.data.Dataset.range(len(paths))
    files = tf.data.Dataset.from_tensor_slices(paths)
    decoded = tf.data.Dataset.zip((indices, files)).map(
        lambda i, p: (i, tf.shape(decode_image(tf.io.read_file(p), background))[0]),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).ignore_errors()
    ok = {int(i) for i, _ in decoded.as_numpy_iterator()}
    bad = [p for i, p in enumerate(paths) if i not in ok]
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(
            f"Image file {bad[0]!r}{more} does not decode as JPEG/PNG/BMP/GIF/WebP (corrupt or "
            f"truncated); delete or replace it, or set data.skip_bad_images: true to leave it out."
        )
    if bad:
        from absl import logging

        skipped.extend(bad)
        logging.warning("data.skip_bad_images: left out %d undecodable image(s), e.g. %s", len(bad), bad[0])
        if len(bad) == len(paths):
            raise UserError(f"Every image file failed to decode (e.g. {bad[0]!r}); nothing to train on.")
    keep = [i for i in range(len(paths)) if i in ok]
    return [paths[i] for i in keep], [labels[i] for i in keep]


def _image_split(paths, labels, background=images.WHITE):
    ds = tf.data.Dataset.from_tensor_slices((paths, np.array(labels, "int32")))
    ds = ds.map(lambda p, y: (decode_image(tf.io.read_file(p), background), y),
                num_parallel_calls=tf.data.AUTOTUNE)
    return Split(ds, len(paths), names=list(paths))


def _holdout(inputs, labels, fraction, seed):
    order = np.random.default_rng(seed).permutation(len(inputs))
    n_val = max(1, int(round(fraction * len(inputs))))
    val, train = sorted(order[:n_val]), sorted(order[n_val:])
    pick = lambda xs, idx: [xs[i] for i in idx]  # noqa: E731
    return pick(inputs, train), pick(labels, train), pick(inputs, val), pick(labels, val)


# ---------------------------------------------------------------------------
# CSV / JSONL text
# ---------------------------------------------------------------------------


def load_text_file(fmt, train_path, validation_path=None, validation_fraction=0.0,
                   text_key="text", label_key="label", label_type="classification",
                   class_names=None, seed=0):
    """Text + label columns from a CSV (header row) or JSONL file.

    `text_key` may be two keys `[first, second]`: each example's input is
    then the pair of strings `(first, second)` (sentence-pair tasks).
    Labels may be class names (mapped to sorted ids) or integer ids.
    Multilabel: a list (JSONL) or `|`-separated names. Regression: numbers.
    """
    texts, raw_labels = _read_rows(fmt, train_path, text_key, label_key, "data.train_path")
    val_rows = None
    if validation_path:
        val_rows = _read_rows(fmt, validation_path, text_key, label_key, "data.validation_path")
    all_labels = raw_labels + (val_rows[1] if val_rows else [])
    integer_ids = False
    if label_type == "regression":
        encode, class_names = _regression_encoder(train_path), None
    else:
        _check_one_label_type(all_labels, label_key, train_path)
        if not class_names:
            class_names, integer_ids = _infer_class_names(all_labels, label_type)
        encode = _class_encoder(class_names, label_type, label_key)
    labels = [encode(v, i) for i, v in enumerate(raw_labels)]
    if label_type == "classification":
        _check_classes(labels, [encode(v, i) for i, v in enumerate(val_rows[1])] if val_rows else [],
                       class_names, label_key, train_path, validation_path)
    if val_rows:
        val = _text_split(val_rows[0], [encode(v, i) for i, v in enumerate(val_rows[1])])
    elif validation_fraction:
        texts, labels, vtexts, vlabels = _holdout(texts, labels, validation_fraction, seed)
        val = _text_split(vtexts, vlabels)
    else:
        val = None
    return LabelledData("text", _text_split(texts, labels), val, class_names, label_type, integer_ids,
                        pair=not isinstance(text_key, str))


def load_text_tasks(fmt, train_path, validation_path=None, validation_fraction=0.0, text_key="text",
                    tasks=(), seed=0):
    """Multi-task text: one text column (or two: a pair) and one label column per head (CSV / JSONL).

    A row may leave a head's label out (empty CSV cell, JSONL key absent or
    null): it then trains the other heads only. Each head's labels are
    checked as `load_text_file` checks one label column (one label type,
    at least two classes, no validation class unseen in training).

    Args:
        tasks: list of `(head name, label_key, label_type)`.

    Returns:
        LabelledData whose examples are `(text, {head name: label})`, with
        a missing label stored as `MISSING_CLASS` (class ids, multi-hot rows
        of it) or NaN (regression), and `tasks` describing each head's labels.
    """
    keys = tuple(key for _, key, _ in tasks)
    texts, rows = _read_rows(fmt, train_path, text_key, keys, "data.train_path")
    val_texts, val_rows = _read_rows(fmt, validation_path, text_key, keys, "data.validation_path") \
        if validation_path else ([], [])
    train_columns, val_columns, info = {}, {}, {}
    for t, (name, key, label_type) in enumerate(tasks):
        train_values, val_values = [r[t] for r in rows], [r[t] for r in val_rows]
        present = [v for v in train_values if v is not None]
        if not present:
            raise UserError(f"data.train_path {train_path!r}: no example has a label in {key!r} (head "
                            f"{name!r}); fill the column or set that head's label_key.")
        seen = present + [v for v in val_values if v is not None]
        integer_ids, class_names = False, None
        if label_type == "regression":
            encode = _regression_encoder(train_path)
            missing = float("nan")
        else:
            _check_one_label_type(seen, key, train_path)
            class_names, integer_ids = _infer_class_names(seen, label_type)
            encode = _class_encoder(class_names, label_type, key)
            missing = MISSING_CLASS if label_type == "classification" else \
                np.full(len(class_names), MISSING_CLASS, "float32")

        def column(values):
            return [missing if v is None else encode(v, i) for i, v in enumerate(values)]

        train_columns[name], val_columns[name] = column(train_values), column(val_values)
        if label_type == "classification":
            _check_classes([v for v in train_columns[name] if v != MISSING_CLASS],
                           [v for v in val_columns[name] if v != MISSING_CLASS],
                           class_names, key, train_path, validation_path)
        info[name] = TaskLabels(label_type, class_names, integer_ids, len(present), key)
    index = list(range(len(texts)))
    val = None
    if validation_path:
        val = _task_split(val_texts, val_columns, list(range(len(val_texts))))
    elif validation_fraction:
        index, _, val_index, _ = _holdout(index, index, validation_fraction, seed)
        val = _task_split(texts, train_columns, val_index)
        for t, (name, _, _) in enumerate(tasks):
            info[name].num_labelled = sum(rows[i][t] is not None for i in index)
    data = LabelledData("text", _task_split(texts, train_columns, index), val, None, "multitask",
                        pair=not isinstance(text_key, str))
    data.tasks = info
    return data


def _task_split(texts, columns, index):
    labels = {}
    for name, values in columns.items():
        array = np.array([values[i] for i in index])
        labels[name] = array.astype("int32") if array.dtype.kind in "iu" else array.astype("float32")
    inputs = [texts[i] for i in index]
    if inputs and isinstance(inputs[0], tuple):  # sentence pairs: ((first...), (second...))
        inputs = tuple(list(column) for column in zip(*inputs))
    return Split(tf.data.Dataset.from_tensor_slices((inputs, labels)), len(index))


def _check_one_label_type(labels, label_key, path):
    """JSONL labels 1, 1.0, true and "1" would become four classes: refuse a mix."""
    kinds = {}
    for row, value in enumerate(labels):
        kinds.setdefault(type(value).__name__, (row, value))
    if len(kinds) > 1:
        seen = ", ".join(f"{kind} {value!r} (row {row})" for kind, (row, value) in kinds.items())
        raise UserError(
            f"data {path!r}: labels in {label_key!r} mix types: {seen}; write every label "
            f"the same way (all class names, or all integer ids)."
        )


def _check_classes(train_labels, val_labels, class_names, label_key, train_path, validation_path):
    """At least two classes in training, and no validation class that training never saw."""
    seen = set(int(l) for l in train_labels)
    if len(seen) < 2:
        raise UserError(
            f"data.train_path {train_path!r}: every label in {label_key!r} is "
            f"{class_names[next(iter(seen))]!r}; classification needs at least two classes."
        )
    unseen = sorted(set(int(l) for l in val_labels) - seen)
    if unseen:
        names = [class_names[i] for i in unseen]
        raise UserError(
            f"data.validation_path {validation_path!r}: label(s) {names[:5]} in {label_key!r} never occur in "
            f"data.train_path {train_path!r}; add training examples for them or drop them."
        )


def _read_rows(fmt, path, text_key, label_key, where):
    """`(inputs, labels)`: inputs are strings, or `(first, second)` tuples for two text keys.

    label_key: a tuple of keys for multi-task data: each row's label is then a
    tuple, None where the cell is empty or the JSONL key absent / null. None:
    unlabelled text (labels returned as None).
    """
    text_keys = [text_key] if isinstance(text_key, str) else list(text_key)
    tasks = label_key if isinstance(label_key, tuple) else None
    label_keys = tasks or (() if label_key is None else (label_key,))
    if not os.path.isfile(path):
        raise UserError(f"{where} {path!r}: no such file.")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        content = raw.decode("utf-8-sig")  # a UTF-8 BOM (Excel) is fine
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(
            f"{where} {path!r} line {line}: not UTF-8 text (byte {raw[e.start]:#04x}); "
            f"re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
        )
    rows = []
    with io.StringIO(content, newline="") as f:
        if fmt == "csv":
            reader = csv.DictReader(f)
            missing = [k for k in (*text_keys, *label_keys) if k not in (reader.fieldnames or [])]
            if missing:
                raise UserError(
                    f"{where} {path!r}: no column {missing[0]!r}; columns are "
                    f"{reader.fieldnames}. Set data.input_key / data.label_key."
                )
            rows = list(reader)
        else:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where} {path!r} line {n}: not valid JSON ({e.msg}).")
                for k in (*text_keys,) if tasks else (*text_keys, *label_keys):
                    if k not in row:
                        raise UserError(f"{where} {path!r} line {n}: no key {k!r}.")
                rows.append(row)
    if not rows:
        raise UserError(f"{where} {path!r} holds no examples.")
    for n, r in enumerate(rows, 1):
        if tasks is None and label_key is not None and _label_or_none(r[label_key]) is None:
            raise UserError(
                f"{where} {path!r} example {n}: no label in {label_key!r}; label it or remove the row."
            )
        for k in text_keys:
            if r[k] is None:
                raise UserError(f"{where} {path!r} example {n}: no text in {k!r}.")
    if len(text_keys) == 2:
        inputs = [(str(r[text_keys[0]]), str(r[text_keys[1]])) for r in rows]
    else:
        inputs = [str(r[text_key]) for r in rows]
    if tasks:
        return inputs, [tuple(_label_or_none(r.get(k)) for k in tasks) for r in rows]
    return inputs, None if label_key is None else [r[label_key] for r in rows]


def read_texts(path, text_key="text", where="data.train_path"):
    """Unlabelled texts from `.txt` (one per non-empty line), `.csv` (column
    `text_key`) or `.jsonl` (key `text_key`): the transfer sets of
    distillation and the corpora of domain-adaptive pretraining. CSV/JSONL
    go through the labelled sources' reader (same encoding checks, same
    errors).

    Raises:
        UserError: a missing, empty or non-UTF-8 file, or a missing column/key,
            naming `where` and the path.
    """
    if path.endswith((".csv", ".jsonl")):
        return _read_rows(path.rsplit(".", 1)[1], path, text_key, None, where)[0]
    if not os.path.isfile(path):
        raise UserError(f"{where} {path!r}: no such file; pass a .txt, .csv or .jsonl file of unlabelled text.")
    try:
        with open(path, encoding="utf-8-sig") as f:
            texts = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError:
        raise UserError(f"{where} {path!r}: not UTF-8 text; re-save the file as UTF-8.")
    if not texts:
        raise UserError(f"{where} {path!r} holds no examples.")
    return texts


def _label_or_none(value):
    """A multi-task label cell: None when missing (empty CSV cell, JSONL null or absent key)."""
    return None if value is None or (isinstance(value, str) and not value.strip()) else value


def _as_int(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _split_multi(value):
    if isinstance(value, list):
        return [str(v) for v in value]
    return [v for v in str(value).split("|") if v]


def _infer_class_names(labels, label_type):
    values = [v for l in labels for v in _split_multi(l)] if label_type == "multilabel" else labels
    ints = [_as_int(v) for v in values]
    if all(i is not None for i in ints):
        # Integer ids: classes 0..max (the label range check is against num_classes).
        return [str(i) for i in range(max(ints) + 1)], True
    return sorted({str(v) for v in values}), False


def _class_encoder(class_names, label_type, label_key):
    index = {name: i for i, name in enumerate(class_names)}

    def one(value, row):
        key = str(value)
        if key in index:
            return index[key]
        raise UserError(
            f"data row {row}: label {value!r} in {label_key!r} is not one of the "
            f"{len(class_names)} classes {class_names[:10]}; fix the label or heads.num_classes."
        )

    if label_type == "multilabel":
        def encode(value, row):
            hot = np.zeros(len(class_names), "float32")
            for v in _split_multi(value):
                hot[one(v, row)] = 1.0
            return hot
        return encode
    return one


def _regression_encoder(path):
    def encode(value, row):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{path!r} row {row}: regression label {value!r} is not a number.")
        if not math.isfinite(number):
            raise UserError(f"{path!r} row {row}: regression label {value!r} is not finite; fix or drop the row.")
        return number
    return encode


def _text_split(texts, labels):
    labels = np.array(labels)
    if labels.dtype.kind in "iu":
        labels = labels.astype("int32")
    else:
        labels = labels.astype("float32")
    inputs = texts
    if texts and isinstance(texts[0], tuple):  # sentence pairs: ((first...), (second...))
        inputs = tuple(list(column) for column in zip(*texts))
    return Split(tf.data.Dataset.from_tensor_slices((inputs, labels)), len(texts))


# ---------------------------------------------------------------------------
# TFDS
# ---------------------------------------------------------------------------


def load_tfds(name, train_split="train", validation_split=None, data_dir=None,
              input_key=None, label_key="label", download=True, tasks=None):
    """A TFDS dataset by name and split (images or text, one class label).

    `input_key` may be two text features `[first, second]` (sentence pairs).
    tasks: list of `(head name, feature, label_type)` for multi-task data: a
    `ClassLabel` feature per classification head (-1: no label, as TFDS
    stores unlabelled examples), a scalar number per regression head (NaN:
    no label). Examples are then `(input, {head name: label})`.
    """
    try:
        import tensorflow_datasets as tfds
        # Imported lazily inside TFDS (and not declared by it): a missing one
        # would surface later as a misleading "could not provide" error.
        import importlib_resources  # noqa: F401
        import tensorflow_datasets.core.dataset_builder  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"data.source tfds needs tensorflow-datasets and its dependencies ({e}); "
            f"pip install 'tftransfer[tfds]'."
        )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:
        raise UserError(
            f"data.name {name!r}: TFDS does not know it ({str(e).splitlines()[0][:160]}); "
            f"check the name, or pass data.data_dir holding a prepared copy."
        )
    if download and not builder.is_prepared():
        _check_download_hosts(name, builder, data_dir)
        try:
            builder.download_and_prepare()
        except Exception as e:
            raise UserError(
                f"data.name {name!r}: TFDS could not download and prepare it "
                f"({str(e).splitlines()[0][:160]}); pass data.data_dir holding a prepared copy."
            )
    features = builder.info.features
    info = _tfds_tasks(name, features, tasks, tfds) if tasks else None
    if not tasks and label_key not in features:
        raise UserError(f"data.label_key {label_key!r} is not a feature of {name}: {list(features)}.")
    pair = input_key is not None and not isinstance(input_key, str)
    if input_key is None:
        input_key = _default_input_key(features, tfds)
    for key in (input_key if pair else [input_key]):
        if key not in features:
            raise UserError(f"data.input_key {key!r} is not a feature of {name}: {list(features)}.")
        if pair and not isinstance(features[key], tfds.features.Text):
            raise UserError(f"data.input_key {key!r} of {name} is not a text feature; a sentence pair "
                            f"takes two text features.")
    modality = "text" if pair else "image" if isinstance(features[input_key], tfds.features.Image) else "text"
    label_feature = None if tasks else features[label_key]
    class_names = list(label_feature.names) if hasattr(label_feature, "names") else None

    def split(spec):
        try:
            ds = builder.as_dataset(split=spec, shuffle_files=False)
        except Exception as e:
            raise UserError(f"data split {spec!r} of {name}: {str(e).splitlines()[0][:200]}")
        n = _num_examples(builder, spec, ds)
        if n == 0:
            raise UserError(f"data split {spec!r} of {name} is empty.")
        if tasks:
            cast = tf.cast if modality == "image" else (lambda x, _: x)
            read = (lambda ex: (ex[input_key[0]], ex[input_key[1]])) if pair else \
                (lambda ex: cast(ex[input_key], tf.float32))
            ds = ds.map(lambda ex: (read(ex), {
                n: tf.cast(ex[k], tf.int32 if t == "classification" else tf.float32) for n, k, t in tasks}),
                num_parallel_calls=tf.data.AUTOTUNE)
        elif modality == "image":
            ds = ds.map(lambda ex: (tf.cast(ex[input_key], tf.float32), tf.cast(ex[label_key], tf.int32)),
                        num_parallel_calls=tf.data.AUTOTUNE)
        elif pair:
            ds = ds.map(lambda ex: ((ex[input_key[0]], ex[input_key[1]]), tf.cast(ex[label_key], tf.int32)),
                        num_parallel_calls=tf.data.AUTOTUNE)
        else:
            ds = ds.map(lambda ex: (ex[input_key], tf.cast(ex[label_key], tf.int32)),
                        num_parallel_calls=tf.data.AUTOTUNE)
        return Split(ds, n)

    val = split(validation_split) if validation_split else None
    data = LabelledData(modality, split(train_split), val, class_names, pair=pair)
    if tasks:
        data.class_names, data.label_type, data.tasks = None, "multitask", info
        for n, _, t in tasks:  # the degenerate-label checks load_text_tasks makes
            if t == "classification":
                _check_task_classes(data, n, info[n])
    return data


def _tfds_tasks(name, features, tasks, tfds):
    info = {}
    for head, key, label_type in tasks:
        if key not in features:
            raise UserError(f"head {head!r}: label_key {key!r} is not a feature of {name}: {list(features)}.")
        feature = features[key]
        if label_type == "classification" and isinstance(feature, tfds.features.ClassLabel):
            info[head] = TaskLabels(label_type, list(feature.names), label_key=key)
        elif label_type == "regression" and getattr(feature, "shape", None) == () and \
                np.dtype(getattr(feature, "np_dtype", "object")).kind in "iuf":
            info[head] = TaskLabels(label_type, None, label_key=key)
        else:
            raise UserError(f"head {head!r} ({label_type}): TFDS feature {key!r} of {name} is "
                            f"{type(feature).__name__}; classification heads need a ClassLabel feature, "
                            f"regression heads a scalar number (multilabel: use csv or jsonl).")
    return info


def _check_task_classes(data, head, task):
    """>= 2 classes seen in training, no validation class unseen there (TFDS multi-task)."""
    from tftransfer.data.kshot import labels_of

    train = labels_of(data.train, head)
    task.num_labelled = int((train >= 0).sum())
    val = labels_of(data.validation, head) if data.validation is not None else np.zeros(0, int)
    seen = set(train[train >= 0].tolist())
    if len(seen) < 2:
        raise UserError(f"data.train_split: head {head!r} has labels {[task.class_names[c] for c in seen]} "
                        f"in feature {task.label_key!r}; classification needs at least two classes.")
    unseen = sorted(set(val[val >= 0].tolist()) - seen)
    if unseen:
        raise UserError(f"data.validation_split: label(s) {[task.class_names[c] for c in unseen][:5]} of "
                        f"{task.label_key!r} never occur in data.train_split; add training examples or drop them.")


def _check_download_hosts(name, builder, data_dir, timeout=5.0):
    """UserError at once when a host the dataset downloads from is unreachable.

    TFDS retries a failed download with back-off for minutes (urllib3's
    Retry); offline, the user should hear that at once, with what to do.
    Only the hosts the builder declares (its registered checksums) are
    probed; a builder that declares none downloads as usual.
    """
    import socket
    import urllib.parse

    hosts = {}
    for url in (getattr(builder, "url_infos", None) or {}):
        parsed = urllib.parse.urlparse(str(url))
        if parsed.hostname:
            hosts[parsed.hostname] = parsed.port or (443 if parsed.scheme == "https" else 80)
    for host, port in sorted(hosts.items()):
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            where = data_dir or "~/tensorflow_datasets"
            raise UserError(
                f"data.name {name!r} is not prepared in {where} and its download host {host} "
                f"is unreachable ({e}); prepare it where there is network "
                f"(tfds build {name} --data_dir=DIR) and pass data.data_dir=DIR."
            )


def _num_examples(builder, spec, ds):
    """Examples in a split: TFDS metadata when present, else counted."""
    try:
        return int(builder.info.splits[spec].num_examples)
    except Exception:  # No split metadata (e.g. tfds.testing.mock_data).
        n = int(ds.cardinality())
        if n >= 0:
            return n
        return int(ds.reduce(0, lambda count, _: count + 1))


def _default_input_key(features, tfds):
    for key, feature in features.items():
        if isinstance(feature, tfds.features.Image):
            return key
    for key, feature in features.items():
        if isinstance(feature, tfds.features.Text):
            return key
    raise UserError(f"data.input_key: no image or text feature among {list(features)}; set it.")
