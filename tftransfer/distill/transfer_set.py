"""Unlabelled transfer data: extra inputs the student learns on from soft targets only."""

import numpy as np
import tensorflow as tf

from tftransfer.data import Split
from tftransfer.data.sources import read_texts
from tftransfer.losses import UNLABELLED


def load_transfer_text(path, text_key="text", where=None):
    """Unlabelled text as a `Split` whose labels are all `-1`.

    Args:
        path: str. `.txt` (one example per non-empty line), `.csv` (header
            row, column `text_key`) or `.jsonl` (key `text_key`).
        text_key: str. Column / key holding the text. Defaults to `"text"`.
        where: str. The config key naming the file, for errors. Defaults to
            `"distill.transfer_path"`.

    Returns:
        `tftransfer.data.Split` of `(text, -1)`.

    Example:
    ```python
    extra = load_transfer_text("data/unlabelled.txt")
    ```
    """
    texts = read_texts(path, text_key, where or "distill.transfer_path")
    labels = np.full(len(texts), UNLABELLED, "int32")
    return Split(tf.data.Dataset.from_tensor_slices((texts, labels)), len(texts))


def concatenate(*splits):
    """One `Split` with the examples of several, in order."""
    splits = [s for s in splits if s is not None]
    ds = splits[0].dataset
    for split in splits[1:]:
        ds = ds.concatenate(split.dataset)
    return Split(ds, sum(s.num_examples for s in splits))
