"""k-shot sampling: exactly k labelled training examples per class, from any source.

`sample_per_class` takes a loaded training `Split` (any source: TFDS, image
folder, CSV/JSONL, ...) and keeps k examples of each class, stratified and
seeded. It returns the positions of the kept examples in the split's order
(which every loader keeps fixed: files sorted, TFDS without file shuffling),
so a run's draw is written to the work dir and can be reproduced or audited.
The held-out validation data is left as it is.
"""

import numpy as np
import tensorflow as tf

from tftransfer.errors import UserError


def labels_of(split, head=None):
    """The split's integer class labels, in order (one pass over the labels only);
    `head`: that head's labels of a multi-task split."""
    labels = np.fromiter(
        split.dataset.map(lambda x, y: y if head is None else y[head],
                          num_parallel_calls=tf.data.AUTOTUNE).as_numpy_iterator(),
        dtype="int64",
    )
    return labels


def choose_ids(labels, k, seed, class_names=None, where="data.train_per_class"):
    """Positions of k examples per class: stratified, seeded, sorted.

    Args:
        labels: int array of class ids, one per example, in split order.
        k: int. Examples per class.
        seed: int. Which examples (the same seed gives the same ids).
        class_names: list of str, to name a class in errors. Defaults to ids.
        where: str. The config key, for errors.

    Raises:
        UserError: a class has fewer than k examples (named, with its count).
    """
    rng = np.random.default_rng(seed)
    num_classes = len(class_names) if class_names else int(labels.max()) + 1
    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < k:
            name = class_names[c] if class_names else str(c)
            raise UserError(
                f"{where}={k}: class {name!r} has only {len(idx)} training example(s); "
                f"lower {where} or add examples of that class."
            )
        chosen.extend(rng.choice(idx, size=k, replace=False).tolist())
    return sorted(int(i) for i in chosen)


def select(split, ids):
    """A `Split` of only the examples at positions `ids` (order kept)."""
    from tftransfer.data.sources import Split

    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(ids, tf.int64), tf.ones(len(ids), tf.int64)),
        default_value=0,
    )
    dataset = (split.dataset.enumerate()
               .filter(lambda i, example: table.lookup(i) > 0)
               .map(lambda i, example: example))
    return Split(dataset, len(ids))


def sample_per_class(split, k, seed, class_names=None, where="data.train_per_class"):
    """Keep k examples per class of `split`; returns `(split, ids)`."""
    labels = labels_of(split)
    if labels.ndim != 1:
        raise UserError(f"{where}: k-shot sampling needs one class label per example (classification heads).")
    ids = choose_ids(labels, k, seed, class_names, where)
    return select(split, ids), ids
