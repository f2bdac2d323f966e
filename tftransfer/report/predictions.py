"""Run a model over a labelled pipeline and keep every prediction.

Works with a Keras model (`model(x)` -> `{head: logits}`) and with an
exported SavedModel's `serve_preprocessed` signature (`-> {probabilities,
...}`), so the same report comes from a work dir or from what TF Serving
would load. The network never sees an empty batch: with oneDNN on, a
Conv + BatchNorm graph crashes on one (see DESIGN.md), so empty batches are
skipped and an empty split is refused by the caller.
"""

import numpy as np


def probabilities_from_logits(head, logits):
    """softmax (classification), sigmoid (multi-label) or identity (regression)."""
    logits = np.asarray(logits, dtype="float64")
    if head.type == "classification":
        z = logits - logits.max(-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(-1, keepdims=True)
    if head.type == "multilabel":
        return 1.0 / (1.0 + np.exp(-logits))
    return logits


def collect(predict, dataset, heads, num_batches=None, verbose="auto", with_positions=False):
    """Predictions and labels for every example of `dataset`, in order.

    Args:
        predict: callable. A preprocessed batch -> `{head name: probabilities
            (classification, multi-label) or values (regression)}` as numpy.
        dataset: tf.data.Dataset of `(x, {head name: label})`, or
            `(x, labels, {head name: sample weight})` (multi-task: an
            example with weight 0 has no label for that head and is left out
            of that head's arrays).
        heads: list of `HeadSpec`.
        num_batches: int. For the progress bar. Defaults to None (unknown).
        verbose: `"auto"`, 0, 1 or 2 (see `tftransfer.progress`).
        with_positions: bool. Also return `{head name: positions}` of the
            kept examples in the dataset. Defaults to False.

    Returns:
        dict `{head name: (labels, predictions)}` of numpy arrays; one-hot
        classification labels are turned back into class ids. With
        `with_positions`, `(that dict, positions)`.
    """
    import keras

    from tftransfer.progress import keras_verbose

    bar = keras.utils.Progbar(num_batches, verbose=keras_verbose(verbose), unit_name="batch")
    labels = {h.name: [] for h in heads}
    outputs = {h.name: [] for h in heads}
    positions = {h.name: [] for h in heads}
    seen = 0
    for step, batch in enumerate(dataset):
        x, y = batch[0], batch[1]
        weights = batch[2] if len(batch) > 2 else None
        first = next(iter(x.values())) if isinstance(x, dict) else x[0] if isinstance(x, tuple) else x
        rows = int(first.shape[0])
        if rows == 0:
            continue  # Never run the network on an empty batch.
        predicted = predict(x)
        for h in heads:
            keep = np.ones(rows, bool) if weights is None else np.asarray(weights[h.name]) > 0
            outputs[h.name].append(np.asarray(predicted[h.name])[keep])
            target = np.asarray(y[h.name])
            if h.type == "classification" and target.ndim == 2:
                target = target.argmax(-1)
            labels[h.name].append(target[keep])
            positions[h.name].append(seen + np.flatnonzero(keep))
        seen += rows
        bar.update(step + 1)
    result = {}
    for h in heads:
        if not sum(len(o) for o in outputs[h.name]):
            raise ValueError(f"the dataset yielded no labelled examples for head {h.name!r}.")
        result[h.name] = (np.concatenate(labels[h.name]), np.concatenate(outputs[h.name]))
    if with_positions:
        return result, {h.name: np.concatenate(positions[h.name]) for h in heads}
    return result


def keras_predictor(model, heads):
    """`predict` for `collect` from a Keras model that outputs logits per head."""
    import tensorflow as tf

    call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def predict(x):
        out = call(x)
        if not isinstance(out, dict):
            out = {heads[0].name: out}
        return {h.name: probabilities_from_logits(h, out[h.name].numpy()) for h in heads}

    return predict


def saved_model_predictor(signature, heads, input_name="image"):
    """`predict` for `collect` from a SavedModel signature (named outputs per head).

    Args:
        signature: a concrete function from `loaded.signatures`.
        heads: list of `HeadSpec`.
        input_name: str. The signature's input when a batch is one tensor
            (`image`, `text`), or a tuple of names for a tuple batch
            (sentence pairs: `("text", "text_pair")`); dict batches (token
            ids) pass by name.
    """

    def predict(x):
        if isinstance(x, dict):
            inputs = x
        elif isinstance(x, tuple):
            inputs = dict(zip(input_name, x))
        else:
            inputs = {input_name: x}
        out = signature(**inputs)
        single = len(heads) == 1
        result = {}
        for h in heads:
            prefix = "" if single else f"{h.name}_"
            key = f"{prefix}values" if h.type == "regression" else f"{prefix}probabilities"
            result[h.name] = out[key].numpy()
        return result

    return predict


def describe_examples(split, modality, limit=None):
    """One short description per example of a split, in order.

    Text: the text itself (shortened). Images: the file name when the
    split knows it (`Split.names`, image folders: `<class>/<file>`), else
    `"image <i>"` (the i-th image of the split).
    """
    import os

    names = getattr(split, "names", None)
    if names:  # <class folder>/<file name>: enough to find the file, short enough for a table
        return [os.path.join(os.path.basename(os.path.dirname(str(n))), os.path.basename(str(n))) for n in names]
    if modality == "text":
        out = []
        for x, _ in split.dataset.take(limit) if limit else split.dataset:
            parts = x if isinstance(x, tuple) else (x,)  # a sentence pair: "first [SEP] second"
            text = " [SEP] ".join(p.numpy().decode("utf-8", "replace") for p in parts)
            out.append(text if len(text) <= 120 else text[:117] + "...")
        return out
    return [f"image {i}" for i in range(split.num_examples)]
