"""Arrays computed once from a split, kept on disk under a content key.

The one implementation shared by the teacher-output cache
(`tftransfer.distill.cache`) and the feature cache
(`tftransfer.feature_cache`): a short key from JSON-able details
(`digest`), preprocessed input batches of a split in its order
(`preprocessed_inputs`), and nested dicts of arrays written atomically as
`.npz` (`write_arrays` / `read_arrays`; `/` in a name marks nesting).
"""

import hashlib
import json
import os

import numpy as np
import tensorflow as tf

from tftransfer.data.pipeline import preprocess

AUTOTUNE = tf.data.AUTOTUNE


def digest(**details):
    """sha256 (16 hex digits) of JSON-able `details` (key order does not matter)."""
    text = json.dumps(details, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def preprocessed_inputs(split, preprocessor, batch_size, with_labels=False):
    """Batches of `split`'s inputs after `preprocessor`, in the split's order.

    Args:
        split: `tftransfer.data.Split` of raw `(input, label)` examples; a
            sentence pair's input is a `(first, second)` tuple.
        preprocessor: the backbone's preprocessor.
        batch_size: int.
        with_labels: bool. Yield `(inputs, labels)` instead of inputs.
    """
    ds = split.dataset.batch(batch_size)
    if with_labels:
        ds = ds.map(lambda x, y: (preprocess(preprocessor, x), y), num_parallel_calls=AUTOTUNE)
    else:
        ds = ds.map(lambda x, y: preprocess(preprocessor, x), num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


def _flatten(outputs, prefix=""):
    flat = {}
    for key, value in outputs.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def write_arrays(path, outputs):
    """A nested dict of arrays to `path` (`.npz`), atomically (temporary name, then rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **_flatten(outputs))
    os.replace(tmp, path)


def read_arrays(path):
    """The nested dict of arrays `write_arrays` wrote."""
    outputs = {}
    with np.load(path) as data:
        for name in data.files:
            node = outputs
            *parents, leaf = name.split("/")
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = data[name]
    return outputs
