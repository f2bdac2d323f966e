"""What quantisation costs: validation accuracy of a quantised export against the float model.

Every quantised export (TFLite `float16` / `dynamic_range` / `int8`, and the
SavedModel's Keras `int8`) runs the validation split through the float Keras
model and through the quantised model, records both accuracies in the
export's metadata (`accuracy` in `tftransfer.json`) and refuses the export
(`UserError`, exit 2, nothing written) when the drop exceeds
`max_accuracy_drop`.

Accuracy is top-1 agreement with the labels of every classification head
(multi-label and regression heads are reported as not measured). The drop
is the largest over the heads, as a fraction (0.01 = 1 point).

`DEFAULT_MAX_ACCURACY_DROP = 0.01` (one point): TensorFlow's post-training
quantisation guide reports int8 / float16 / dynamic-range costs well under
one point of top-1 for standard vision models, and one point is the bar this
project's benchmarks hold int8 to (BENCHMARKS.md). A larger drop means
calibration went wrong (too few or unrepresentative examples, outlier
activations) and should be seen before the model ships, not after; pass a
larger value to accept it, `inf` to export without validation data.
"""

import math

import numpy as np

from tftransfer.errors import UserError

DEFAULT_MAX_ACCURACY_DROP = 0.01
# Examples drawn from the training split to calibrate int8 activation ranges.
# TFLite's guide suggests a few hundred; more adds conversion time, not accuracy.
DEFAULT_REPRESENTATIVE_EXAMPLES = 200


def classification_heads(heads):
    return [h for h in heads if h.type == "classification"]


def accuracy(predict, dataset, heads):
    """Top-1 accuracy per classification head.

    Args:
        predict: callable(batch inputs) -> dict `{output name: array}` with
            the serving outputs (`probabilities`, or `<head>_probabilities`
            with several heads).
        dataset: iterable of `(inputs, {head name: labels})` batches (one-hot
            labels are argmax-ed).
        heads: list of `HeadSpec`.

    Returns:
        dict head name -> accuracy (float in [0, 1]), and `"examples"`.
    """
    scored = classification_heads(heads)
    correct = {h.name: 0 for h in scored}
    counted = {h.name: 0 for h in scored}
    total = 0
    for batch in dataset:  # multi-task batches carry sample weights: 0 = no label for that head
        inputs, labels, weights = batch[0], batch[1], (batch[2] if len(batch) > 2 else None)
        outputs = predict(inputs)
        for h in scored:
            key = "probabilities" if len(heads) == 1 else f"{h.name}_probabilities"
            predicted = np.argmax(np.asarray(outputs[key]), axis=-1)
            y = np.asarray(labels[h.name])
            if y.ndim > 1:
                y = np.argmax(y, axis=-1)
            keep = np.ones(len(y), bool) if weights is None else np.asarray(weights[h.name]) > 0
            correct[h.name] += int(np.sum((predicted == y)[keep]))
            counted[h.name] += int(keep.sum())
        total += len(np.asarray(labels[scored[0].name])) if scored else 0
    result = {name: (c / counted[name] if counted[name] else float("nan")) for name, c in correct.items()}
    result["examples"] = total
    return result


def keras_predict(model, heads):
    """`predict` for `accuracy` from the float Keras model (serving output names)."""
    from tftransfer.export.saved_model import head_outputs

    def predict(inputs):
        return head_outputs(heads, model(inputs, training=False), include_strings=False)

    return predict


def compare(float_accuracy, quantized_accuracy, heads, quantize, max_accuracy_drop=DEFAULT_MAX_ACCURACY_DROP,
            integer_only=False):
    """The metadata record; raises UserError when the drop is over budget.

    Args:
        float_accuracy, quantized_accuracy: dicts from `accuracy`.
        heads: list of `HeadSpec`.
        quantize: str. The mode, for the message.
        max_accuracy_drop: float. Largest accepted drop (fraction).
        integer_only: bool. The export was `--integer_only` (named in the
            message, with dropping it as the first remedy). Defaults to False.

    Returns:
        dict. `float`, `quantized` (per head), `drop` (largest), `examples`,
        `max_accuracy_drop`.
    """
    names = [h.name for h in classification_heads(heads)]
    drops = {n: float_accuracy[n] - quantized_accuracy[n] for n in names}
    drop = max(drops.values()) if drops else float("nan")
    record = {
        "quantize": quantize,
        "examples": float_accuracy["examples"],
        "float": {n: float_accuracy[n] for n in names},
        "quantized": {n: quantized_accuracy[n] for n in names},
        "drop": drop,
        "max_accuracy_drop": max_accuracy_drop,
    }
    if drops and drop > max_accuracy_drop:
        worst = max(drops, key=drops.get)
        mode, milder = f"--quantize={quantize}", "a milder --quantize"
        if integer_only:
            mode, milder = f"--quantize={quantize} --integer_only", "int8 without --integer_only"
        raise UserError(
            f"{mode} costs {100 * drop:.2f} points of validation accuracy on head {worst!r} "
            f"({float_accuracy[worst]:.4f} -> {quantized_accuracy[worst]:.4f}, "
            f"{float_accuracy['examples']} examples), over --max_accuracy_drop={max_accuracy_drop}; "
            f"nothing was exported. Use {milder}, more --representative_examples, "
            f"or raise --max_accuracy_drop."
        )
    return record


def describe(record):
    """One line for the user: float vs quantised accuracy."""
    if not record or not record.get("float"):
        return "validation accuracy not measured (no classification head or no validation data)"
    parts = [
        f"{name} {record['float'][name]:.4f} float -> {record['quantized'][name]:.4f} {record['quantize']}"
        for name in record["float"]
    ]
    return (f"validation accuracy ({record['examples']} examples): " + ", ".join(parts)
            + f" (drop {100 * record['drop']:.2f} points, budget {_points(record['max_accuracy_drop'])})")


def _points(fraction):
    return "none" if math.isinf(fraction) else f"{100 * fraction:.2f}"


def check_max_accuracy_drop(value):
    if value is None or not value >= 0:  # also rejects NaN
        raise UserError(
            f"--max_accuracy_drop must be >= 0 (a fraction: 0.01 = 1 point; inf: no limit). Received: {value}."
        )
    return float(value)


# Keras 3.15's `Model.quantize("int8")` implements `quantize` for Dense,
# EinsumDense and Embedding only: a Conv2D network keeps float32 kernels
# (only its Dense head is quantised), so the SavedModel would not shrink.
KERAS_INT8_MODALITIES = ("text",)


def keras_int8(model, modality):
    """Quantise `model` in place with Keras' own `model.quantize("int8")`.

    int8 weights (per output channel) for Dense / EinsumDense / Embedding,
    activations quantised per call; the result exports as a SavedModel and
    serves with plain TensorFlow. Image (Conv2D) models are refused: see
    `KERAS_INT8_MODALITIES`.
    """
    import warnings

    check_keras_int8(modality)
    with warnings.catch_warnings():
        # One "does not have a `quantize` method" warning per layer without weights.
        warnings.simplefilter("ignore")
        model.quantize("int8")
    return model


def check_keras_int8(modality):
    """UserError unless Keras' int8 quantisation shrinks this modality's models."""
    if modality not in KERAS_INT8_MODALITIES:
        raise UserError(
            "--format=saved_model --quantize=int8 uses Keras' model.quantize('int8'), which leaves Conv2D "
            "layers in float32 (Keras 3.15 quantises Dense/EinsumDense/Embedding only), so an image "
            "SavedModel would not shrink; use --format=tflite --quantize=int8 for image models."
        )
