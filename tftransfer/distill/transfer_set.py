"""Unlabelled transfer data: extra inputs the student learns on from soft targets only."""

import csv
import json
import os

import numpy as np
import tensorflow as tf

from tftransfer.data import Split
from tftransfer.errors import UserError
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
    where = f"{where or 'distill.transfer_path'} {path!r}"
    if not os.path.isfile(path):
        raise UserError(f"{where}: no such file; pass a .txt, .csv or .jsonl file of unlabelled text.")
    texts = []
    with open(path, newline="", encoding="utf-8") as f:
        if path.endswith(".csv"):
            reader = csv.DictReader(f)
            if text_key not in (reader.fieldnames or []):
                raise UserError(f"{where}: no column {text_key!r}; columns are {reader.fieldnames}. Set data.input_key.")
            texts = [row[text_key] for row in reader]
        elif path.endswith(".jsonl"):
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(str(json.loads(line)[text_key]))
                except (ValueError, KeyError, TypeError):
                    raise UserError(f"{where} line {n}: not a JSON object with key {text_key!r}.")
        else:
            texts = [line.strip() for line in f if line.strip()]
    if not texts:
        raise UserError(f"{where} holds no examples.")
    labels = np.full(len(texts), UNLABELLED, "int32")
    return Split(tf.data.Dataset.from_tensor_slices((texts, labels)), len(texts))


def concatenate(*splits):
    """One `Split` with the examples of several, in order."""
    splits = [s for s in splits if s is not None]
    ds = splits[0].dataset
    for split in splits[1:]:
        ds = ds.concatenate(split.dataset)
    return Split(ds, sum(s.num_examples for s in splits))
