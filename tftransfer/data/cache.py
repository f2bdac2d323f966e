"""The preprocessed-example cache: decide memory / disk / none, and apply it.

`data.cache` (`CACHE_MODES`):

- `memory` (`true` in old configs): `Dataset.cache()` in RAM.
- `disk`: `Dataset.cache(filename)` under `W/cache/data/` (per worker:
  each process writes under its own output dir, see `Run.path`), in a
  directory keyed by a digest of the data (the raw dataset's graph, the
  files' sizes and modification times), the preprocessing (the
  preprocessor's config: image size, normalisation, tokenizer) and the
  modality, so a stale cache is never read. Files a killed run left (TF's
  `*.lockfile`, `*.tempstate*`, no `.index`) and caches of other keys are
  removed before use.
- `false`: no cache (text is then tokenised per batch).
- `auto` (default): the cached size (examples x bytes per preprocessed
  example) against a memory budget (`data.cache_memory_budget_mb`, default
  `MEMORY_FRACTION` of the available RAM): memory when it fits, else disk.

Images are cached compactly where that is exact: a decoded image whose
pixels are whole numbers 0-255 (8-bit files without partial transparency,
TFDS images) and whose uint8 source is no larger than the float32
preprocessed image is cached as uint8 source pixels, and the preprocessor
(resize + normalisation) runs after the cache on the pixels cast back to
float32, the very values an uncached run feeds it; any other image is
cached as its float32 preprocessed output. So a cached run's batches equal
an uncached run's bit for bit. (The resized pixels are not whole numbers:
bilinear resizing interpolates, so uint8 *after* the resize would round.)
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil

CACHE_MODES = ("auto", "memory", "disk", "false")
MEMORY_FRACTION = 0.5  # of the available RAM: the default budget of `auto`
_FORMAT = 1  # bump when what a disk cache holds changes


def setting(value):
    """`data.cache` as one of `CACHE_MODES` (`true` -> memory, `false` -> false)."""
    if value is True:
        return "memory"
    if value is False or value is None:
        return "false"
    return value


def available_memory_mb():
    """Available RAM in MiB (psutil if installed, else /proc/meminfo), or None."""
    try:
        import psutil

        return psutil.virtual_memory().available / 2**20
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@dataclasses.dataclass
class CachePlan:
    """How the pipelines cache: `mode` memory / disk / false, and why.

    requested: str. The `data.cache` setting. estimated_mb / budget_mb:
    float or None (auto's comparison). directory: str. Where disk caches go
    (`W/cache/data` of this process) or None. reason: str.
    """

    mode: str
    requested: str = None
    estimated_mb: float = None
    budget_mb: float = None
    directory: str = None
    reason: str = ""

    def summary(self):
        """metrics.json `data_cache`."""
        out = {"mode": self.mode, "requested": self.requested or self.mode, "reason": self.reason}
        if self.estimated_mb is not None:
            out["estimated_mb"] = round(self.estimated_mb, 3)
        if self.budget_mb is not None:
            out["budget_mb"] = round(self.budget_mb, 3)
        return out


def plan(requested, estimated_bytes, budget_mb=None, directory=None):
    """The `CachePlan` for a `data.cache` setting and the estimated cached bytes.

    Args:
        requested: a `data.cache` value (see `setting`).
        estimated_bytes: int. All the splits to cache together.
        budget_mb: float or None. auto's memory budget; None:
            `MEMORY_FRACTION` of the available RAM.
        directory: str or None. Disk caches' directory (`W/cache/data`);
            None: disk is unavailable (auto then keeps memory).
    """
    requested = setting(requested)
    if requested not in CACHE_MODES:
        raise ValueError(f"data.cache must be one of {', '.join(CACHE_MODES)}. Received: {requested!r}.")
    estimated_mb = estimated_bytes / 2**20
    if requested != "auto":
        if requested == "disk" and directory is None:
            raise ValueError("data.cache disk needs a cache directory")
        return CachePlan(requested, requested, estimated_mb, budget_mb, directory, "set by data.cache")
    if budget_mb is None:
        available = available_memory_mb()
        budget_mb = None if available is None else available * MEMORY_FRACTION
        source = f"{MEMORY_FRACTION:.0%} of the available RAM"
    else:
        source = "data.cache_memory_budget_mb"
    if budget_mb is None:
        mode, reason = ("disk", "available RAM unknown") if directory else ("memory", "available RAM unknown")
    elif estimated_mb <= budget_mb:
        mode, reason = "memory", f"estimated {estimated_mb:.1f} MB fits the budget of {budget_mb:.1f} MB ({source})"
    elif directory is None:
        mode, reason = "false", (f"estimated {estimated_mb:.1f} MB exceeds the budget of {budget_mb:.1f} MB "
                                 f"({source}) and no disk cache directory is set")
    else:
        mode, reason = "disk", (f"estimated {estimated_mb:.1f} MB exceeds the budget of {budget_mb:.1f} MB "
                                f"({source})")
    return CachePlan(mode, "auto", estimated_mb, budget_mb, directory, reason)


# ---------------------------------------------------------------------------
# Estimate
# ---------------------------------------------------------------------------


def estimate_bytes(split, preprocessor, modality):
    """Bytes the cache of `split` holds at most: examples x bytes per preprocessed example.

    From the preprocessed element's static shapes (float32 images, int32
    token ids, the label); a dimension unknown statically is read from the
    first example.
    """
    import numpy as np
    import tensorflow as tf

    from tftransfer.data.pipeline import preprocess

    ds = split.dataset.map(lambda x, y: (preprocess(preprocessor, x), y))
    specs = tf.nest.flatten(ds.element_spec)
    if all(s.shape.is_fully_defined() for s in specs):
        per_example = sum(int(np.prod(s.shape)) * s.dtype.size for s in specs)
    else:
        first = tf.nest.flatten(next(iter(ds.take(1))))
        per_example = sum(int(np.prod(t.shape)) * t.dtype.size for t in first)
    return split.num_examples * per_example


# ---------------------------------------------------------------------------
# Apply
# ---------------------------------------------------------------------------


def cached(ds, preprocessor, modality, mode, directory=None, role="train", split=None,
           fill=False):
    """`(raw x, y)` examples -> `(preprocessed x, y)`, cached as `mode` says.

    Args:
        ds: dataset of `(raw input, label)` (images: float32 0-255 pixels).
        preprocessor: the backbone's preprocessor.
        modality: str. `"image"` or `"text"`.
        mode: str. `memory`, `disk` or `false` (a `CachePlan.mode`).
        directory: str. Disk: the cache directory (`W/cache/data`).
        role: str. Disk: the split's name in the cache path (train, validation).
        split: `Split` or None. Disk: its file names join the key.
        fill: bool. Fill the cache now, in one complete pass, so that every
            later iterator only reads it. For a dataset that several
            consumers iterate (validation: Keras' `evaluate` and
            `ValidationReport` in the same epoch): tf.data shares one cache
            between a dataset's iterators, and an iterator that starts
            while another has only partly written it can read a truncated
            cache, so validation metrics came from a varying subset of the
            split from run to run (measured: 77, 217 or 237 of 237 digits).
    """
    import tensorflow as tf

    from tftransfer.data.pipeline import AUTOTUNE, preprocess

    if mode == "false":
        return ds.map(lambda x, y: (preprocess(preprocessor, x), y), num_parallel_calls=AUTOTUNE)
    filename = ""
    if mode == "disk":
        if directory is None:
            raise ValueError("cache='disk' needs a cache directory (cache_dir, e.g. W/cache/data)")
        filename = disk_file(directory, role, key(ds, preprocessor, modality, split))
    if modality != "image":
        return filled(ds.map(lambda x, y: (preprocess(preprocessor, x), y),
                              num_parallel_calls=AUTOTUNE).cache(filename), fill)

    out_spec = ds.map(lambda x, y: preprocess(preprocessor, x)).element_spec
    out_elements = out_spec.shape.num_elements()  # None: unknown statically
    empty_u8 = tf.zeros([0, 0, 3], tf.uint8)
    empty_out = tf.zeros([0] * out_spec.shape.rank, out_spec.dtype)

    def encode(x, y):
        whole = tf.round(x)
        compact = tf.reduce_all(tf.equal(whole, x)) & tf.reduce_all(x >= 0) & tf.reduce_all(x <= 255)
        if out_elements is not None:  # uint8 source no larger than the float32 output
            compact &= tf.size(x) <= out_elements * out_spec.dtype.size
        pixels = tf.cond(compact, lambda: tf.cast(whole, tf.uint8), lambda: empty_u8)
        output = tf.cond(compact, lambda: empty_out, lambda: preprocess(preprocessor, x))
        return (pixels, output), y

    def decode(stored, y):
        pixels, output = stored
        x = tf.cond(tf.size(pixels) > 0,
                    lambda: tf.cast(preprocess(preprocessor, tf.cast(pixels, tf.float32)), out_spec.dtype),
                    lambda: output)
        return tf.ensure_shape(x, out_spec.shape), y

    ds = filled(ds.map(encode, num_parallel_calls=AUTOTUNE).cache(filename), fill)
    return ds.map(decode, num_parallel_calls=AUTOTUNE)


def filled(cache, fill=True):
    """`cache` (a `Dataset.cache`), completed by one full pass when `fill`."""
    if fill:
        import tensorflow as tf

        cache.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1)
    return cache


def key(ds, preprocessor, modality, split=None):
    """16 hex digits naming what a disk cache holds: data, preprocessing, modality.

    The data: the raw dataset's graph (in-memory values, file paths, TFDS
    record files, decoding; traced function counters removed) plus each
    named file's size and modification time (`Split.names`).
    """
    import tensorflow as tf

    graph = tf.compat.v1.GraphDef.FromString(ds._as_serialized_graph(strip_device_assignment=True).numpy())
    graph_text = re.sub(r"(__inference_\w+?)_\d+\b", r"\1", str(graph))
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": _FORMAT, "modality": modality, "preprocessor": _config(preprocessor)},
                             sort_keys=True, default=str).encode())
    digest.update(graph_text.encode())
    for name in (split.names or []) if split is not None else []:
        try:
            stat = os.stat(name)
            digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{name}\0missing\n".encode())
    return digest.hexdigest()[:16]


def _config(preprocessor):
    try:
        import keras

        return keras.saving.serialize_keras_object(preprocessor)
    except Exception:  # not a Keras object: its type and attributes
        return {"type": type(preprocessor).__name__, "vars": sorted(vars(preprocessor).items(), key=str)}


def disk_file(directory, role, digest):
    """`directory/<role>-<digest>/cache` (TF's file-cache prefix), ready to use.

    A complete cache (`cache.index` present) is kept; otherwise what a
    killed run left there (partial data, TF's lockfiles) is removed, as are
    this role's caches of other keys (stale: different data or preprocessing).
    """
    os.makedirs(directory, exist_ok=True)
    name = f"{role}-{digest}"
    for other in os.listdir(directory):
        if other.startswith(f"{role}-") and other != name:
            shutil.rmtree(os.path.join(directory, other), ignore_errors=True)
    folder = os.path.join(directory, name)
    prefix = os.path.join(folder, "cache")
    if not os.path.exists(prefix + ".index"):
        shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, exist_ok=True)
    return prefix
