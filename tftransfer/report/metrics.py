"""Evaluation metrics from predictions (numpy in, plain dicts out).

Everything here is a pure function of labels and predicted probabilities, so
it is tested on tiny hand-computed examples and reused by `tftransfer.evaluate`,
notebooks and `tftransfer.compare`. scikit-learn computes the standard metrics;
what scikit-learn lacks (expected calibration error, most-confused pairs, top
losses) is written here in a few lines each.
"""

import numpy as np

ECE_BINS = 10
TOP_K = 5


def classification_metrics(labels, probabilities, class_names=None, top_k=TOP_K,
                           num_pairs=10, num_bins=ECE_BINS):
    """Single-label classification metrics.

    Args:
        labels: int array `(n,)`. True class ids.
        probabilities: float array `(n, classes)`. Predicted class probabilities.
        class_names: list of str. Defaults to None (`"0"`, `"1"`, ...).
        top_k: int. The k of top-k accuracy, capped at classes - 1 (top-k
            with k >= classes is always 1; top-1 is accuracy). Defaults to 5.
        num_pairs: int. How many most-confused pairs to list. Defaults to 10.
        num_bins: int. Equal-width confidence bins of the calibration
            measures. Defaults to 10.

    Returns:
        dict. `num_examples`, `loss` (mean cross-entropy), `accuracy`,
        `top_k` and `top_k_accuracy`, `macro_f1`, `weighted_f1`,
        `per_class` (list of `{class, precision, recall, f1, support}`),
        `confusion_matrix` (rows: true class, columns: predicted),
        `most_confused` (list of `{true, predicted, count}`), `ece` and
        `reliability` (see `calibration`).

    Example:
    ```python
    m = classification_metrics([0, 1, 1], [[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]])
    m["accuracy"], m["confusion_matrix"]   # 0.667, [[1, 0], [1, 1]]
    ```
    """
    from sklearn import metrics as skm

    labels = np.asarray(labels).astype(int).reshape(-1)
    probabilities = np.asarray(probabilities, dtype="float64")
    n, num_classes = probabilities.shape
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} predictions.")
    if n == 0:
        raise ValueError("no examples to evaluate.")
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    ids = list(range(num_classes))
    predicted = probabilities.argmax(-1)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predicted, labels=ids, zero_division=0
    )
    # Top-k with k >= classes is always 1: cap k at classes - 1 so it says something.
    k = max(1, min(top_k, num_classes - 1))
    cm = skm.confusion_matrix(labels, predicted, labels=ids)
    accuracy = float(np.trace(cm) / n)  # = accuracy_score: a label outside `ids` is never predicted
    result = {
        "num_examples": int(n),
        "loss": float(np.mean(example_losses(labels, probabilities))),
        "accuracy": accuracy,
        "top_k": int(k),
        "top_k_accuracy": float(skm.top_k_accuracy_score(labels, probabilities, k=k, labels=ids))
        if k > 1 else accuracy,
        # scikit-learn's `f1_score(average="macro" | "weighted")` with these
        # `labels` and `zero_division=0` is exactly this mean of the per-class
        # F1 above; each further scikit-learn call re-validates its inputs
        # (~1 ms), which the per-epoch ValidationReport pays every epoch.
        "macro_f1": float(np.mean(f1)),
        "weighted_f1": float(np.average(f1, weights=support)) if support.sum() else 0.0,
        "per_class": [
            {"class": names[i], "precision": float(precision[i]), "recall": float(recall[i]),
             "f1": float(f1[i]), "support": int(support[i])}
            for i in ids
        ],
        "class_names": names,
        "confusion_matrix": cm.tolist(),
        "most_confused": most_confused(cm, names, num_pairs),
    }
    result.update(calibration(labels, probabilities, num_bins))
    return result


def epoch_metrics(labels, probabilities, top_k=TOP_K, num_bins=ECE_BINS):
    """`macro_f1`, `weighted_f1`, `top_k_accuracy` and `ece`, as `classification_metrics` gives them.

    The numbers `ValidationReport` logs at every epoch end, in numpy only:
    scikit-learn's `precision_recall_fscore_support`, `confusion_matrix` and
    `top_k_accuracy_score` validate their inputs on every call (~3-5 ms in
    all for a few hundred examples, ~8 ms with the rest of
    `classification_metrics`), a quarter of an epoch when the head trains on
    cached features; this is ~0.3 ms. `tests/test_report.py` holds both to
    scikit-learn's values.
    """
    labels = np.asarray(labels).astype(int).reshape(-1)
    probabilities = np.asarray(probabilities, dtype="float64")
    n, num_classes = probabilities.shape
    predicted = probabilities.argmax(-1)
    known = (labels >= 0) & (labels < num_classes)  # confusion_matrix(labels=ids) drops the others
    cm = np.bincount(labels[known] * num_classes + predicted[known],
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    tp, support, predicted_count = np.diag(cm), cm.sum(1), cm.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):  # zero_division=0
        precision = np.where(predicted_count > 0, tp / predicted_count, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    k = max(1, min(top_k, num_classes - 1))
    if k > 1:  # top_k_accuracy_score's ranking: a stable sort, reversed
        ranked = np.argsort(probabilities, axis=1, kind="mergesort")[:, ::-1][:, :k]
        top_k_accuracy = float((ranked == labels[:, None]).any(axis=1).mean())
    else:
        top_k_accuracy = float(np.trace(cm) / n)
    return {"macro_f1": float(np.mean(f1)),
            "weighted_f1": float(np.average(f1, weights=support)) if support.sum() else 0.0,
            "top_k_accuracy": top_k_accuracy,
            "ece": calibration(labels, probabilities, num_bins)["ece"]}


def example_losses(labels, probabilities, eps=1e-12):
    """Per-example cross-entropy `-log p(true class)`."""
    probabilities = np.asarray(probabilities, dtype="float64")
    labels = np.asarray(labels).astype(int).reshape(-1)
    return -np.log(np.clip(probabilities[np.arange(len(labels)), labels], eps, 1.0))


def most_confused(confusion, class_names, num_pairs=10):
    """Off-diagonal cells of a confusion matrix, largest first (fastai's `most_confused`).

    Returns:
        list of `{true, predicted, count}` with count > 0, at most `num_pairs`.
    """
    cm = np.asarray(confusion)
    pairs = [(int(cm[i, j]), i, j) for i in range(cm.shape[0]) for j in range(cm.shape[1])
             if i != j and cm[i, j] > 0]
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    return [{"true": class_names[i], "predicted": class_names[j], "count": c}
            for c, i, j in pairs[:num_pairs]]


def calibration(labels, probabilities, num_bins=ECE_BINS):
    """Expected calibration error and the reliability diagram's bins.

    Confidence is the top predicted probability; examples fall into
    `num_bins` equal-width confidence bins over [0, 1] (a confidence of
    exactly 1 goes in the last bin). ECE (Guo et al., 2017) is the
    support-weighted mean gap between accuracy and mean confidence per bin:
    `sum_b |B_b| / n * |acc(B_b) - conf(B_b)|`. scikit-learn's
    `calibration_curve` is for binary problems only, hence this function.

    Returns:
        dict. `ece` (float) and `reliability`: list of
        `{low, high, count, accuracy, confidence}` per bin (accuracy and
        confidence None for an empty bin).
    """
    labels = np.asarray(labels).astype(int).reshape(-1)
    probabilities = np.asarray(probabilities, dtype="float64")
    confidence = probabilities.max(-1)
    correct = (probabilities.argmax(-1) == labels).astype("float64")
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, num_bins - 1)
    bins, ece = [], 0.0
    for b in range(num_bins):
        mask = which == b
        count = int(mask.sum())
        acc = float(correct[mask].mean()) if count else None
        conf = float(confidence[mask].mean()) if count else None
        if count:
            ece += count / len(labels) * abs(acc - conf)
        bins.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": count,
                     "accuracy": acc, "confidence": conf})
    return {"ece": float(ece), "reliability": bins}


def top_losses(labels, probabilities, descriptions=None, class_names=None, k=10):
    """The `k` examples the model is most wrong about (fastai's `top_losses`).

    Args:
        labels: int array `(n,)`.
        probabilities: float array `(n, classes)`.
        descriptions: list of str, one per example (the text, or the image
            file name). Defaults to None (`"example <i>"`).
        class_names: list of str. Defaults to None (class ids).
        k: int. Defaults to 10.

    Returns:
        list of `{index, example, true, predicted, p_true, loss}`, highest
        loss first.
    """
    labels = np.asarray(labels).astype(int).reshape(-1)
    probabilities = np.asarray(probabilities, dtype="float64")
    losses = example_losses(labels, probabilities)
    names = list(class_names) if class_names else [str(i) for i in range(probabilities.shape[1])]
    order = np.argsort(-losses, kind="stable")[:k]
    return [{
        "index": int(i),
        "example": descriptions[i] if descriptions is not None else f"example {i}",
        "true": names[labels[i]],
        "predicted": names[int(probabilities[i].argmax())],
        "p_true": float(probabilities[i, labels[i]]),
        "loss": float(losses[i]),
    } for i in order]


def multilabel_metrics(labels, probabilities, class_names=None, threshold=0.5):
    """Multi-label metrics: micro / macro F1 at `threshold`, mean average precision.

    mAP is the mean over classes that have at least one positive example
    (average precision is undefined without positives).

    Returns:
        dict. `num_examples`, `micro_f1`, `macro_f1`, `map`, `subset_accuracy`,
        `per_class` (list of `{class, precision, recall, f1, support,
        average_precision}`).
    """
    from sklearn import metrics as skm

    labels = np.asarray(labels).astype(int)
    probabilities = np.asarray(probabilities, dtype="float64")
    if len(labels) == 0:
        raise ValueError("no examples to evaluate.")
    predicted = (probabilities > threshold).astype(int)
    names = list(class_names) if class_names else [str(i) for i in range(labels.shape[1])]
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predicted, average=None, zero_division=0
    )
    has_positive = labels.sum(0) > 0
    ap = [float(skm.average_precision_score(labels[:, c], probabilities[:, c])) if has_positive[c] else None
          for c in range(labels.shape[1])]
    present = [a for a in ap if a is not None]
    return {
        "num_examples": int(len(labels)),
        "threshold": float(threshold),
        "micro_f1": float(skm.f1_score(labels, predicted, average="micro", zero_division=0)),
        "macro_f1": float(skm.f1_score(labels, predicted, average="macro", zero_division=0)),
        "map": float(np.mean(present)) if present else None,
        "subset_accuracy": float(skm.accuracy_score(labels, predicted)),
        "per_class": [
            {"class": names[c], "precision": float(precision[c]), "recall": float(recall[c]),
             "f1": float(f1[c]), "support": int(support[c]), "average_precision": ap[c]}
            for c in range(labels.shape[1])
        ],
    }


def regression_metrics(targets, predictions):
    """MSE, MAE and R² (scikit-learn), averaged over outputs."""
    from sklearn import metrics as skm

    targets = np.asarray(targets, dtype="float64").reshape(len(targets), -1)
    predictions = np.asarray(predictions, dtype="float64").reshape(len(predictions), -1)
    if len(targets) == 0:
        raise ValueError("no examples to evaluate.")
    return {
        "num_examples": int(len(targets)),
        "mse": float(skm.mean_squared_error(targets, predictions)),
        "mae": float(skm.mean_absolute_error(targets, predictions)),
        "r2": float(skm.r2_score(targets, predictions)) if len(targets) > 1 else None,
    }
