"""Losses: knowledge distillation (Hinton et al., 2015) and a feature hint.

    loss = alpha * CE(y, student) + (1 - alpha) * T**2 * KL(softmax(teacher / T) || softmax(student / T))

The `T**2` factor keeps the soft term's gradient magnitude independent of
the temperature (its gradients scale as 1 / T**2), so alpha keeps its
meaning when T changes (Hinton et al., 2015, section 2).

`temperature` and `alpha` may be Python numbers, tensors or variables: the
distiller passes `keras.Variable`s so a schedule can change them during
`fit` without retracing the train step.

Labels are integer class ids (shape `(batch,)` or `(batch, 1)`) or one-hot /
smoothed rows `(batch, classes)`. Unlabelled examples (transfer data) carry
the id `-1` (or an all-zero one-hot row): they contribute the soft term only.
Every function returns the mean over the whole batch.
"""

import keras
from keras import ops

from tftransfer.errors import UserError

UNLABELLED = -1


# ---------------------------------------------------------------------------
# Functions
# ---------------------------------------------------------------------------


def soft_target_loss(student_logits, teacher_logits, temperature=2.0):
    """Per-example `T**2 * KL(softmax(teacher / T) || softmax(student / T))`.

    Computed with log-softmax (no probability clipping, unlike
    `keras.losses.KLDivergence`), so confident teachers stay exact.

    Args:
        student_logits: tensor `(batch, classes)`.
        teacher_logits: tensor `(batch, classes)`.
        temperature: float, tensor or variable. Softmax temperature T > 0.
            Defaults to 2.0.

    Returns:
        tensor `(batch,)`.

    Example:
    ```python
    soft_target_loss([[1.0, 0.0]], [[1.0, 0.0]])  # [0.0]
    ```
    """
    student_logits = ops.convert_to_tensor(student_logits, "float32")
    teacher_logits = ops.convert_to_tensor(teacher_logits, "float32")
    t = ops.cast(temperature, "float32")
    log_p_teacher = ops.log_softmax(teacher_logits / t, axis=-1)
    log_p_student = ops.log_softmax(student_logits / t, axis=-1)
    kl = ops.sum(ops.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    return kl * t * t


def hard_label_loss(y_true, student_logits, label_smoothing=0.0):
    """Per-example cross-entropy with the labels; 0 for unlabelled examples.

    Args:
        y_true: integer class ids `(batch,)` / `(batch, 1)` (`-1`:
            unlabelled) or one-hot rows `(batch, classes)` (all zero:
            unlabelled).
        student_logits: tensor `(batch, classes)`.
        label_smoothing: float. Smooth the one-hot target:
            `(1 - ls) * onehot + ls / classes`. Defaults to 0.

    Returns:
        tensor `(batch,)`.
    """
    student_logits = ops.convert_to_tensor(student_logits, "float32")
    onehot, labelled = _one_hot(y_true, student_logits)
    num_classes = ops.shape(student_logits)[-1]
    if label_smoothing:
        onehot = onehot * (1.0 - label_smoothing) + label_smoothing / ops.cast(num_classes, "float32")
    log_p = ops.log_softmax(student_logits, axis=-1)
    return -ops.sum(onehot * log_p, axis=-1) * labelled


def labelled_mask(y_true, num_classes):
    """1.0 for labelled examples, 0.0 for unlabelled ones, shape `(batch,)`."""
    y_true = ops.convert_to_tensor(y_true)
    if _is_one_hot(y_true, num_classes):
        return ops.cast(ops.sum(ops.cast(y_true, "float32"), axis=-1) > 0, "float32")
    ids = ops.reshape(ops.cast(y_true, "int32"), (-1,))
    return ops.cast(ids >= 0, "float32")


def distillation_loss(y_true, student_logits, teacher_logits, temperature=2.0, alpha=0.1,
                      label_smoothing=0.0):
    """Hinton's distillation loss, averaged over the batch.

    `alpha * CE(y, student) + (1 - alpha) * T**2 * KL(p_teacher^T || p_student^T)`.

    Args:
        y_true: integer class ids `(batch,)` (`-1`: unlabelled), one-hot
            rows `(batch, classes)`, or None (no labels at all: soft term
            only, still weighted by `1 - alpha`).
        student_logits: tensor `(batch, classes)`.
        teacher_logits: tensor `(batch, classes)`.
        temperature: float, tensor or variable. Defaults to 2.0.
        alpha: float, tensor or variable in [0, 1]. Weight of the hard-label
            term. Defaults to 0.1.
        label_smoothing: float. Of the hard-label term. Defaults to 0.

    Returns:
        scalar tensor.

    Example:
    ```python
    y = [0, 1]
    student = [[2.0, 0.0], [0.0, 1.0]]
    teacher = [[3.0, 0.0], [0.0, 3.0]]
    tftransfer.losses.distillation_loss(y, student, teacher, temperature=2.0, alpha=0.1)
    # alpha=1: plain sparse categorical cross-entropy
    tftransfer.losses.distillation_loss(y, student, teacher, alpha=1.0)
    ```
    """
    alpha = ops.cast(alpha, "float32")
    soft = soft_target_loss(student_logits, teacher_logits, temperature)
    if y_true is None:
        return (1.0 - alpha) * ops.mean(soft)
    hard = hard_label_loss(y_true, student_logits, label_smoothing)
    return ops.mean(alpha * hard + (1.0 - alpha) * soft)


def similarity_preserving_loss(teacher_features, student_features):
    """Feature hint that needs no projection: match batch similarity maps.

    Tung & Mori (2019), "Similarity-Preserving Knowledge Distillation": the
    `(batch, batch)` matrix of pairwise similarities of each model's
    features (rows L2-normalised) must agree, so teacher and student widths
    may differ (384 vs 128). Features of rank > 2 are flattened per example.

    Args:
        teacher_features: tensor `(batch, ...)`.
        student_features: tensor `(batch, ...)`.

    Returns:
        scalar tensor: mean squared difference of the two similarity maps.
    """

    def similarity(features):
        features = ops.cast(features, "float32")
        features = ops.reshape(features, (ops.shape(features)[0], -1))
        gram = ops.matmul(features, ops.transpose(features))
        return gram / ops.maximum(ops.norm(gram, axis=-1, keepdims=True), 1e-12)

    return ops.mean(ops.square(similarity(teacher_features) - similarity(student_features)))


# ---------------------------------------------------------------------------
# Loss classes
# ---------------------------------------------------------------------------


def pack_distillation_targets(labels, teacher_logits):
    """`y_true` for `DistillationLoss`: labels and teacher logits in one array.

    Args:
        labels: integer ids `(n,)` (`-1`: unlabelled) or one-hot `(n, c)`.
        teacher_logits: array `(n, c)`.

    Returns:
        float32 array `(n, 1 + c)` (integer ids) or `(n, 2c)` (one-hot).
    """
    labels = ops.cast(ops.convert_to_tensor(labels), "float32")
    teacher_logits = ops.cast(ops.convert_to_tensor(teacher_logits), "float32")
    if len(labels.shape) == 1:
        labels = ops.expand_dims(labels, -1)
    return ops.concatenate([labels, teacher_logits], axis=-1)


@keras.saving.register_keras_serializable(package="tftransfer")
class DistillationLoss(keras.losses.Loss):
    """Hinton's distillation loss as a `keras.losses.Loss`, for cached teachers.

    A plain `model.compile(loss=...)` has no teacher, so the teacher's
    logits travel in `y_true`, packed by `pack_distillation_targets`:
    `[label_id, teacher_logits...]` (width `1 + c`) or `[one_hot...,
    teacher_logits...]` (width `2c`). `tftransfer.distill.Distiller` does
    not need this (it keeps labels and teacher outputs apart); use this
    class to distil from precomputed teacher logits with any Keras model.

    Args:
        temperature: float or variable. Defaults to 2.0.
        alpha: float or variable. Weight of the hard-label term.
            Defaults to 0.1.
        label_smoothing: float. Defaults to 0.
        name: str. Defaults to `"distillation_loss"`.

    Example:
    ```python
    y = tftransfer.losses.pack_distillation_targets(labels, teacher.predict(x)["label"])
    student.compile("adam", loss={"label": tftransfer.losses.DistillationLoss(temperature=4.0)})
    student.fit(x, {"label": y})
    ```
    """

    def __init__(self, temperature=2.0, alpha=0.1, label_smoothing=0.0,
                 name="distillation_loss", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        _check_number("temperature", temperature, low=0.0, low_open=True)
        _check_number("alpha", alpha, low=0.0, high=1.0)
        self.temperature = temperature
        self.alpha = alpha
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        num_classes = y_pred.shape[-1]
        width = y_true.shape[-1]
        if width == 2 * num_classes and num_classes != 1:
            labels, teacher = y_true[:, :num_classes], y_true[:, num_classes:]
        elif width == 1 + num_classes:
            labels, teacher = y_true[:, 0], y_true[:, 1:]
        else:
            raise UserError(
                f"DistillationLoss: y_true must be pack_distillation_targets(labels, teacher_logits), "
                f"width {1 + num_classes} or {2 * num_classes} for {num_classes} classes. "
                f"Received: y_true.shape={y_true.shape}."
            )
        alpha = ops.cast(self.alpha, "float32")
        soft = soft_target_loss(y_pred, teacher, self.temperature)
        hard = hard_label_loss(labels, y_pred, self.label_smoothing)
        return alpha * hard + (1.0 - alpha) * soft

    def get_config(self):
        return {
            **super().get_config(),
            "temperature": float(keras.ops.convert_to_numpy(self.temperature)),
            "alpha": float(keras.ops.convert_to_numpy(self.alpha)),
            "label_smoothing": self.label_smoothing,
        }


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _is_one_hot(y_true, num_classes):
    return (
        len(y_true.shape) == 2
        and y_true.shape[-1] == num_classes
        and num_classes not in (None, 1)
        and "float" in str(y_true.dtype)
    )


def _one_hot(y_true, logits):
    """(one-hot float targets, labelled mask) from ids or one-hot rows."""
    num_classes = logits.shape[-1]
    y_true = ops.convert_to_tensor(y_true)
    if _is_one_hot(y_true, num_classes):
        onehot = ops.cast(y_true, "float32")
        return onehot, ops.cast(ops.sum(onehot, axis=-1) > 0, "float32")
    ids = ops.reshape(ops.cast(y_true, "int32"), (-1,))
    labelled = ops.cast(ids >= 0, "float32")
    onehot = ops.one_hot(ops.maximum(ids, 0), num_classes) * ops.expand_dims(labelled, -1)
    return onehot, labelled


def _check_number(name, value, low=None, high=None, low_open=False):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return  # a tensor or variable: checked by whoever sets it
    if low is not None and (value < low or (low_open and value == low)):
        raise UserError(f"{name} must be {'>' if low_open else '>='} {low}. Received: {name}={value}.")
    if high is not None and value > high:
        raise UserError(f"{name} must be <= {high}. Received: {name}={value}.")
