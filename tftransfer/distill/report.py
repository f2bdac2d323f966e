"""Teacher vs student: accuracy, parameters, size on disk, CPU latency."""

import statistics
import time

import numpy as np
import tensorflow as tf


def accuracy(model, dataset, head):
    """Fraction of examples whose arg-max logit is the label.

    Args:
        model: keras.Model. Preprocessed input -> `{head: logits}`.
        dataset: tf.data.Dataset of `(x, {head: label})` (ids or one-hot).
        head: str. Head name.

    Returns:
        float, or None for an empty dataset.
    """
    predict = tf.function(lambda x: model(x, training=False)[head], reduce_retracing=True)
    correct = total = 0
    for x, y in dataset:
        logits = predict(x).numpy()
        labels = y[head].numpy()
        if labels.ndim == 2:
            labels = labels.argmax(-1)
        labels = labels.reshape(-1)
        keep = labels >= 0
        correct += int((logits.argmax(-1).reshape(-1)[keep] == labels[keep]).sum())
        total += int(keep.sum())
    return correct / total if total else None


def latency_per_example(model, example, runs=30, warmup=3):
    """Median CPU seconds of one forward pass on a batch of one example.

    Args:
        model: keras.Model.
        example: a preprocessed batch (tensor or dict of tensors); only its
            first example is used.
        runs: int. Timed calls. Defaults to 30.
        warmup: int. Untimed calls first (tracing). Defaults to 3.

    Returns:
        float. Seconds.

    Example:
    ```python
    x, _ = next(iter(val_ds))
    latency_per_example(student, x) * 1000  # ms
    ```
    """
    one = tf.nest.map_structure(lambda t: t[:1], example)
    with tf.device("/CPU:0"):
        call = tf.function(lambda x: model(x, training=False))
        for _ in range(warmup):
            tf.nest.map_structure(lambda t: t.numpy(), call(one))
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy(), call(one))
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def weights_bytes(model):
    """Bytes of the model's variables (what a weights-only file holds)."""
    return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in model.weights))


def describe(model, dataset, head, size_bytes, example=None, runs=30):
    """Accuracy, parameters, size and CPU latency of one model.

    Returns:
        dict. `accuracy`, `parameters`, `size_bytes` / `size_mb` (the
        `.keras` file(s) as saved: they include optimizer state when the
        model was saved compiled), `weights_bytes` / `weights_mb` (the
        variables alone) and `latency_ms_per_example`.
    """
    if example is None:
        example = next(iter(dataset))[0]
    weights = weights_bytes(model)
    return {
        "accuracy": accuracy(model, dataset, head) if dataset is not None else None,
        "parameters": int(model.count_params()),
        "size_bytes": int(size_bytes),
        "size_mb": round(size_bytes / 2**20, 3),
        "weights_bytes": weights,
        "weights_mb": round(weights / 2**20, 3),
        "latency_ms_per_example": 1000.0 * latency_per_example(model, example, runs=runs),
    }


def compare(teacher, student):
    """Ratios of two `describe` dicts (student relative to teacher).

    Returns:
        dict. `accuracy_retained_percent` (student / teacher accuracy x
        100), `parameters_ratio`, `size_ratio` (of the weights; files may
        also hold optimizer state), `file_size_ratio` (student / teacher)
        and `speedup` (teacher / student latency).
    """

    def ratio(a, b):
        return float(a) / float(b) if a is not None and b else None

    retained = ratio(student["accuracy"], teacher["accuracy"])
    return {
        "accuracy_retained_percent": 100.0 * retained if retained is not None else None,
        "parameters_ratio": ratio(student["parameters"], teacher["parameters"]),
        "size_ratio": ratio(student["weights_bytes"], teacher["weights_bytes"]),
        "file_size_ratio": ratio(student["size_bytes"], teacher["size_bytes"]),
        "speedup": ratio(teacher["latency_ms_per_example"], student["latency_ms_per_example"]),
    }


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))
