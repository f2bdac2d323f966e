"""A run's per-epoch history, read back from its TensorBoard logs.

Training writes every epoch's logs (loss, metrics, learning rate, the
unfreezing stage, the distillation alpha / temperature) through
`keras.callbacks.TensorBoard` to `W/logs/train` and `W/logs/validation` as
`epoch_<name>` scalars. Reading those event files back (TensorBoard's own
`EventAccumulator`) gives the learning curves without a second recorder, and
works for runs that finished, were resumed, or were killed.
"""

import os

import numpy as np

EPOCH_PREFIX = "epoch_"


def read_history(log_dir):
    """Per-epoch scalars from a Keras TensorBoard log directory.

    Args:
        log_dir: str. The directory given to `keras.callbacks.TensorBoard`
            (`W/logs`), holding `train/` and `validation/` event files.

    Returns:
        dict `{"train": {name: [(epoch, value), ...]}, "validation": {...}}`
        with `epoch_` stripped from the names and epochs counted from 0. A
        resumed run logs some epochs twice: the last write wins. Empty
        dicts when there are no logs.
    """
    import logging

    from tensorboard.backend.event_processing import event_accumulator as ea

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # per-file INFO lines otherwise
    history = {}
    for split in ("train", "validation"):
        path = os.path.join(log_dir, split)
        history[split] = {}
        if not os.path.isdir(path):
            continue
        acc = ea.EventAccumulator(path, size_guidance={ea.TENSORS: 0, ea.SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags().get("tensors", []):
            if not tag.startswith(EPOCH_PREFIX):
                continue
            latest = {}
            for event in acc.Tensors(tag):
                value = _scalar(event.tensor_proto)
                if value is not None and (event.step not in latest or event.wall_time >= latest[event.step][0]):
                    latest[event.step] = (event.wall_time, value)
            if latest:
                history[split][tag[len(EPOCH_PREFIX):]] = sorted((s, v) for s, (_, v) in latest.items())
    return history


def _scalar(proto):
    import tensorflow as tf

    if proto.dtype not in (tf.float32.as_datatype_enum, tf.float64.as_datatype_enum,
                           tf.float16.as_datatype_enum, tf.int32.as_datatype_enum,
                           tf.int64.as_datatype_enum):
        return None
    value = tf.make_ndarray(proto)
    return float(value) if np.ndim(value) == 0 else None


def stage_changes(history, key="unfrozen_groups"):
    """Epochs (0-based) where `key` changes, with the new value.

    For the unfreezing stage (`unfrozen_groups`) this is where progressive
    unfreezing let more backbone groups train.

    Returns:
        list of `(epoch, value)`, including the first epoch.
    """
    series = history.get("train", {}).get(key, [])
    changes, previous = [], None
    for epoch, value in series:
        if value != previous:
            changes.append((epoch, value))
            previous = value
    return changes
