"""Teacher-output cache: run the teacher once, train the student many epochs.

When the transfer set is not augmented, the teacher's outputs for an
example never change (the teacher is frozen and runs in inference mode), so
running it at every step of every epoch is waste. `teacher_outputs`
computes them once, in the split's order; `cached_pipeline` (the one
pipeline builder, `make_pipeline(teacher_outputs=...)`) pairs each
example with its outputs *before* caching and shuffling (so pairs stay aligned) and
yields `({"student_inputs": x, "teacher_outputs": t}, {head: label})`,
which `tftransfer.distill.Distiller` reads instead of calling the teacher.
With the same seed the batches come in the same order as
`tftransfer.data.make_pipeline`, so cached and uncached training see the
same data.

`load_or_compute(..., cache_dir=W/cache)` keeps the outputs on disk
(`.npz`, keyed by a fingerprint of the teacher files, the data and the
preprocessing), so a resumed or repeated run skips the teacher entirely.
Augmenting pipelines must not use a cache (the teacher would see other
inputs than the student).
"""

import os

import numpy as np
import tensorflow as tf

from tftransfer.data.array_cache import digest, preprocessed_inputs, read_arrays, write_arrays
from tftransfer.data.pipeline import make_pipeline
from tftransfer import workdir
from tftransfer.errors import UserError

CACHE_MODES = ("none", "memory", "disk")


def teacher_outputs(distiller, split, preprocessor, modality, batch_size=64):
    """The teacher's outputs for every example of `split`, in order.

    Args:
        distiller: `tftransfer.distill.Distiller`.
        split: `tftransfer.data.Split` of raw `(input, label)` examples.
        preprocessor: the student's preprocessing (teacher and student
            share it).
        modality: str. `"image"` or `"text"`.
        batch_size: int. Teacher inference batch. Defaults to 64.

    Returns:
        nested dict of numpy arrays with `split.num_examples` rows:
        `{"final_output": {head: logits}, <hint layer>: features}`.
    """
    ds = preprocessed_inputs(split, preprocessor, batch_size)
    from tftransfer.progress import keras_verbose

    # Progress: a bar on a terminal, one line when done in a log (the teacher
    # pass over a large transfer set can take long).
    outputs = distiller.teacher_output_model().predict(ds, verbose=keras_verbose("auto"))
    outputs = tf.nest.map_structure(np.asarray, outputs)
    for array in tf.nest.flatten(outputs):
        if len(array) != split.num_examples:
            raise UserError(
                f"teacher cache: {len(array)} outputs for {split.num_examples} examples; "
                f"the data changed while caching."
            )
    return outputs


def cached_pipeline(split, outputs, preprocessor, modality, heads, global_batch_size, **kwargs):
    """`tftransfer.data.make_pipeline` with the teacher's outputs in `x`.

    Args:
        split: `tftransfer.data.Split`.
        outputs: nested dict of arrays from `teacher_outputs` (same order).
        preprocessor, modality, heads, global_batch_size, **kwargs: as for
            `make_pipeline` (one builder: the same seed gives the same
            batches with and without teacher outputs).

    Returns:
        tf.data.Dataset of `({"student_inputs": x, "teacher_outputs": t},
        {head: label})`.
    """
    return make_pipeline(split, preprocessor, modality, heads, global_batch_size,
                         teacher_outputs=outputs, **kwargs)


def fingerprint(teacher_paths, **details):
    """A short key that changes when the teacher files or the data change.

    Args:
        teacher_paths: list of str. Teacher work dirs / `.keras` files
            (their model files' size and modification time count).
        **details: JSON-able values (data config, preprocessing, split name).
    """
    parts = []
    for path in teacher_paths:
        model = os.path.join(path, workdir.MODEL) if os.path.isdir(path) else path
        stat = os.stat(model)
        parts.append([os.path.abspath(model), stat.st_size, int(stat.st_mtime_ns)])
    return digest(teacher=parts, **details)


def load_or_compute(distiller, split, preprocessor, modality, mode="memory", cache_dir=None,
                    key=None, name="train", batch_size=64):
    """Teacher outputs from `cache_dir` when present, else computed (and saved).

    Args:
        distiller, split, preprocessor, modality, batch_size: see
            `teacher_outputs`.
        mode: str. `memory` (compute, keep in memory) or `disk` (also
            read/write `<cache_dir>/teacher_<name>_<key>.npz`).
            Defaults to `"memory"`.
        cache_dir: str. Directory for mode `disk`.
        key: str. Fingerprint (see `fingerprint`). Required for `disk`.
        name: str. Split name in the file name. Defaults to `"train"`.

    Returns:
        `(outputs, info)`: the nested dict of arrays, and a dict with
        `source` (`computed` / `disk`), `seconds` and `path`.
    """
    import time

    if mode not in ("memory", "disk"):
        raise UserError(f"distill.cache must be one of {', '.join(CACHE_MODES)}. Received: {mode!r}.")
    path = None
    if mode == "disk":
        if not cache_dir or not key:
            raise UserError("teacher cache on disk needs cache_dir and key.")
        path = os.path.join(cache_dir, f"teacher_{name}_{key}.npz")
        if os.path.isfile(path):
            start = time.perf_counter()
            outputs = read_arrays(path)
            rows = {len(a) for a in tf.nest.flatten(outputs)}
            if rows == {split.num_examples}:
                return outputs, {"source": "disk", "seconds": time.perf_counter() - start, "path": path}
    start = time.perf_counter()
    outputs = teacher_outputs(distiller, split, preprocessor, modality, batch_size)
    seconds = time.perf_counter() - start
    if path:
        write_arrays(path, outputs)
    return outputs, {"source": "computed", "seconds": seconds, "path": path}
