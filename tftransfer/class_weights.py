"""Class weights for imbalanced classification (`train.class_weight`).

    train: {class_weight: balanced}                  # every classification head
    train: {class_weight: {spam: 4.0}}               # one head: label -> weight (others 1)
    train: {class_weight: {topic: balanced, sentiment: {neg: 2.0}}}   # several heads: per head name

`balanced` is scikit-learn's formula, `w_c = n_samples / (n_classes * count_c)`
over the head's labelled training examples (computed by
`sklearn.utils.class_weight.compute_class_weight`); a class absent from the
training data gets 1. A mapping gives the listed classes their weight and
every other class 1 (Keras' `class_weight` convention).

Each example's loss is multiplied by the weight of its true class inside the
head's loss (`tftransfer.heads.ClassWeightedLoss`): a batch's loss is
`sum_i w_{y_i} * loss_i / n` over its n labelled examples. Keras' own
`fit(class_weight=...)` is not used: it takes one output only, and it turns
the weights into the batch's sample weights, which here carry the
missing-label mask of multi-task data and also weight the metrics (accuracy
would turn into a class-weighted accuracy).

This module is numpy / scikit-learn only (config validation imports it).
"""

import math

import numpy as np

from tftransfer.errors import UserError

BALANCED = "balanced"
MODES = (BALANCED,)


def check_setting(setting, where="train.class_weight", per_head=True):
    """Shape check at config load: `balanced`, or a mapping of positive numbers
    (with `per_head`, values may also be `balanced` / mappings: per-head settings)."""
    if isinstance(setting, str):
        if setting not in MODES:
            raise UserError(f"{where} must be balanced or a mapping {{label: weight}}. Received: {setting!r}.")
        return
    if not isinstance(setting, dict) or not setting:
        raise UserError(f"{where} must be balanced or a non-empty mapping {{label: weight}}. "
                        f"Received: {setting!r}.")
    for key, value in setting.items():
        if per_head and isinstance(value, (str, dict)):
            check_setting(value, f"{where}.{key}", per_head=False)
        else:
            _check_weight(value, f"{where}.{key}")


def _check_weight(value, where):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{where} must be a finite number > 0 (a class's loss weight). Received: {value!r}.")


def balanced(labels, num_classes):
    """scikit-learn's balanced weights `n / (classes_present * count_c)` per class id (1 if absent).

    Args:
        labels: int array of the labelled training examples' class ids.
        num_classes: int. The head's classes.

    Returns:
        list of `num_classes` floats.

    Example:
    ```python
    balanced([0, 0, 0, 1], 2)  # [0.667, 2.0]
    ```
    """
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.asarray(labels).astype(int).reshape(-1)
    present = np.unique(labels)
    weights = compute_class_weight(BALANCED, classes=present, y=labels)
    out = [1.0] * num_classes
    for c, w in zip(present, weights):
        out[int(c)] = float(w)
    return out


def resolve(setting, heads, labels_of, where="train.class_weight"):
    """Per-head class weights from the setting and the training labels.

    Args:
        setting: `train.class_weight` (None, `balanced` or a mapping).
        heads: list of `(name, type, class_names)` of every head, in config order.
        labels_of: callable `name -> int array` of a head's labelled training class ids.
        where: str. The config key, for errors.

    Returns:
        dict `{head name: [weight per class id]}` (heads without weights absent).

    Raises:
        UserError: weights for a regression / multi-label head, an unknown
            head or label, or a non-positive weight (naming the key).
    """
    if setting is None:
        return {}
    names = [h[0] for h in heads]
    if len(heads) == 1:
        per_head = {names[0]: (setting, where)}
    elif isinstance(setting, str):
        per_head = {n: (setting, where) for n, t, _ in heads if t == "classification"}
        if not per_head:
            raise UserError(f"{where}: no head is a classification head (heads: {names}); remove {where}.")
    else:
        per_head = {}
        for key, value in setting.items():
            if str(key) not in names:
                raise UserError(
                    f"{where}.{key}: no head named {key!r} (heads: {names}); with several heads, {where} "
                    f"maps head names to balanced or {{label: weight}}.")
            if not isinstance(value, (str, dict)):
                raise UserError(f"{where}.{key} must be balanced or a mapping {{label: weight}} for head "
                                f"{key!r}. Received: {value!r}.")
            per_head[str(key)] = (value, f"{where}.{key}")
    out = {}
    for name, kind, class_names in heads:
        if name not in per_head:
            continue
        value, key = per_head[name]
        if kind != "classification":
            raise UserError(f"{key}: head {name!r} is {kind}; class weights apply to classification heads "
                            f"only; remove it.")
        if isinstance(value, str):
            check_setting(value, key, per_head=False)
            out[name] = balanced(labels_of(name), len(class_names))
            continue
        weights = [1.0] * len(class_names)
        index = {c: i for i, c in enumerate(class_names)}
        for label, w in value.items():
            if str(label) not in index:
                raise UserError(f"{key}.{label}: label {label!r} is not one of head {name!r}'s classes "
                                f"{list(class_names)[:10]}; fix the label.")
            _check_weight(w, f"{key}.{label}")
            weights[index[str(label)]] = float(w)
        out[name] = weights
    return out
