"""Head builders: pooled backbone features -> a new task's logits.

Each builder takes symbolic backbone outputs and returns a symbolic output
tensor, naming every layer after the head (`<head>_pool`, `<head>_dropout`,
`<head>_hidden`, `<head>`), so several heads can share one backbone
(multi-task) and layers stay addressable by name.

Heads output logits (classification, multi-label) or raw values
(regression) in float32, also under mixed precision; probabilities are
computed by the losses (`from_logits=True`) and by the serving signature.
"""

import dataclasses

import keras

from tftransfer.errors import UserError

HEAD_TYPES = ("classification", "multilabel", "regression")
IMAGE_POOLINGS = ("avg", "max")
TEXT_POOLINGS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """What one head predicts.

    name: str. Output name (and layer-name prefix). Defaults to `"label"`.
    type: str. `classification` (one class of `num_classes`), `multilabel`
        (independent yes/no per class), or `regression` (`num_classes` real
        outputs, MSE). Defaults to `"classification"`.
    num_classes: int. Classes, or regression outputs. Defaults to 2.
    pooling: str. Images: `avg` or `max` (over the feature map, or over
        the tokens of ViT-style backbones); text: `cls` (the pooled [CLS]
        output where the backbone has a pooler — BERT, ALBERT, ELECTRA —
        else the first token's vector) or `mean` (mean of the sequence
        output over real tokens).
        None: `avg` for images, `cls` for text.
    dropout: float. Dropout before the output layer. Defaults to 0.
    hidden_units: int. Optional hidden ReLU layer; 0 for none. Defaults to 0.
    label_smoothing: float. Classification / multi-label only. Defaults to 0.
    loss_weight: float. Weight of this head's loss in a multi-task sum.
        Defaults to 1.
    class_names: tuple of str. Label names for reports and serving.
    normalize: bool. L2-normalise the pooled features (unit length, as
        sentence-transformers' `Normalize` module) before the head's layers.
        Defaults to False.
    l2: float. L2 penalty `l2 * sum(W^2)` on the head's Dense kernels (not
        the biases), added to the mean loss of every batch (Keras'
        `kernel_regularizer=L2(l2)`). scikit-learn's `LogisticRegression(C)`
        on n examples is `l2 = 1 / (2 C n)` (`l2_from_c`). Defaults to 0.
    class_weight: tuple of float, one per class id, or None. Classification
        only: each example's loss is multiplied by its true class's weight
        (`train.class_weight`, see `tftransfer.class_weights`).
        Defaults to None.
    """

    name: str = "label"
    type: str = "classification"
    num_classes: int = 2
    pooling: str = None
    dropout: float = 0.0
    hidden_units: int = 0
    label_smoothing: float = 0.0
    loss_weight: float = 1.0
    class_names: tuple = None
    class_weight: tuple = None
    normalize: bool = False
    l2: float = 0.0

    def __post_init__(self):
        if self.type not in HEAD_TYPES:
            raise UserError(
                f"head {self.name!r}: type must be one of {', '.join(HEAD_TYPES)}. "
                f"Received: type={self.type!r}."
            )
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise UserError(
                f"head {self.name!r}: {len(self.class_names)} class names for "
                f"num_classes={self.num_classes}."
            )
        if self.class_weight is not None:
            object.__setattr__(self, "class_weight", tuple(float(w) for w in self.class_weight))
            if self.type != "classification" or len(self.class_weight) != self.num_classes:
                raise UserError(
                    f"head {self.name!r}: class_weight needs a classification head and one weight per "
                    f"class. Received: type={self.type!r}, {len(self.class_weight)} weights for "
                    f"num_classes={self.num_classes}."
                )

    def loss(self):
        """The Keras loss matching this head's outputs.

        Reduction `mean_with_sample_weight`: a batch's loss is the mean over
        the examples whose sample weight is 1, i.e. that are labelled for
        this head (multi-task data, see `tftransfer.data.make_pipeline`);
        without sample weights, the plain batch mean as before. An
        unlabelled example therefore changes neither the loss nor its
        gradient. With `class_weight`, each example's loss is scaled by its
        class's weight first (`ClassWeightedLoss`).
        """
        reduction = "mean_with_sample_weight"
        if self.type == "classification":
            if self.label_smoothing:
                # Sparse CE has no label smoothing: labels become one-hot
                # in the data pipeline (see `one_hot_labels`).
                loss = keras.losses.CategoricalCrossentropy(
                    from_logits=True, label_smoothing=self.label_smoothing, reduction=reduction
                )
            else:
                loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
            if self.class_weight is not None:
                return ClassWeightedLoss(loss, self.class_weight, reduction=reduction)
            return loss
        if self.type == "multilabel":
            return keras.losses.BinaryCrossentropy(
                from_logits=True, label_smoothing=self.label_smoothing, reduction=reduction
            )
        return keras.losses.MeanSquaredError(reduction=reduction)

    @property
    def one_hot_labels(self):
        return self.type == "classification" and bool(self.label_smoothing)

    def metrics(self):
        """Metrics reported for this head during fit and evaluation."""
        if self.type == "classification":
            if self.one_hot_labels:
                return [keras.metrics.CategoricalAccuracy(name="accuracy")]
            return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        if self.type == "multilabel":
            return [
                keras.metrics.BinaryAccuracy(name="binary_accuracy", threshold=0.0),
                keras.metrics.AUC(name="auc", from_logits=True, multi_label=True,
                                  num_labels=self.num_classes),
            ]
        return [keras.metrics.MeanAbsoluteError(name="mae")]


@keras.saving.register_keras_serializable(package="tftransfer")
class ClassWeightedLoss(keras.losses.Loss):
    """A classification loss with each example scaled by its true class's weight.

    Keras' `fit(class_weight=...)` would do the same through sample weights,
    but only for one output, and sample weights here carry the missing-label
    mask (and weight the metrics); see `tftransfer.class_weights`.

    Args:
        loss: keras sparse or one-hot categorical cross-entropy.
        class_weight: list of float, one per class id.
        reduction: str. Defaults to `"mean_with_sample_weight"`.

    Example:
    ```python
    loss = ClassWeightedLoss(keras.losses.SparseCategoricalCrossentropy(from_logits=True), [1.0, 3.0])
    loss([1, 0], [[0.0, 1.0], [1.0, 0.0]])  # (3 * ce_0 + 1 * ce_1) / 2
    ```
    """

    def __init__(self, loss, class_weight, reduction="mean_with_sample_weight", name=None, dtype=None):
        super().__init__(name=name or f"class_weighted_{loss.name}", reduction=reduction, dtype=dtype)
        if isinstance(loss, dict):
            loss = keras.losses.deserialize(loss)
        self.inner = loss
        self.class_weight = [float(w) for w in class_weight]

    def call(self, y_true, y_pred):
        ops = keras.ops
        per_example = self.inner.call(y_true, y_pred)  # (batch,), no reduction
        if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == y_pred.shape[-1]:
            ids = ops.argmax(y_true, axis=-1)  # one-hot (label smoothing)
        else:
            ids = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        weights = ops.take(ops.convert_to_tensor(self.class_weight, per_example.dtype), ids)
        return per_example * weights

    def get_config(self):
        return {**super().get_config(), "loss": keras.losses.serialize(self.inner),
                "class_weight": self.class_weight}


def pool_features(features, modality, pooling, padding_mask=None, name="pool"):
    """Backbone outputs -> one vector per example.

    Args:
        features: image feature map `(b, h, w, c)`, or the text backbone's
            output dict (`sequence_output`, optional `pooled_output`).
        modality: str. `"image"` or `"text"`.
        pooling: str. See `HeadSpec.pooling`.
        padding_mask: symbolic `(b, seq)` mask of real tokens (text `mean`).
        name: str. Layer name.
    """
    if modality == "image":
        pooling = pooling or "avg"
        if pooling not in IMAGE_POOLINGS:
            raise UserError(
                f"pooling for an image backbone must be one of {', '.join(IMAGE_POOLINGS)}. "
                f"Received: pooling={pooling!r}."
            )
        if len(features.shape) == 3:  # ViT / DeiT / DINOv2: a token sequence, pooled over tokens.
            layer = keras.layers.GlobalAveragePooling1D if pooling == "avg" else keras.layers.GlobalMaxPooling1D
        else:
            layer = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
        return layer(name=name)(features)
    if not isinstance(features, dict):  # RoBERTa, XLM-R, DistilBERT, DeBERTaV3: the sequence only.
        features = {"sequence_output": features}
    pooling = pooling or "cls"
    if pooling not in TEXT_POOLINGS:
        raise UserError(
            f"pooling for a text backbone must be one of {', '.join(TEXT_POOLINGS)}. "
            f"Received: pooling={pooling!r}."
        )
    if pooling == "mean":
        # Keras' own pooling honours the mask: padding never dilutes the mean.
        return keras.layers.GlobalAveragePooling1D(name=name)(
            features["sequence_output"], mask=padding_mask
        )
    if "pooled_output" not in features:
        # DistilBERT / RoBERTa / DeBERTaV3 have no pooler: the first token's
        # vector ([CLS] / <s>), as their Hugging Face classification heads use.
        return keras.layers.Identity(name=name)(features["sequence_output"][:, 0])
    return keras.layers.Identity(name=name)(features["pooled_output"])


def build_head(pooled, spec):
    """Pooled features -> this head's output (logits / values, float32).

    The layers are named as `head_layer_names(spec)` lists them, in order.
    """
    x = pooled
    penalty = keras.regularizers.L2(spec.l2) if spec.l2 else None
    if spec.normalize:
        x = keras.layers.UnitNormalization(axis=-1, name=f"{spec.name}_normalize")(x)
    if spec.hidden_units:
        x = keras.layers.Dense(spec.hidden_units, activation="relu", kernel_regularizer=penalty,
                               name=f"{spec.name}_hidden")(x)
    if spec.dropout:
        x = keras.layers.Dropout(spec.dropout, name=f"{spec.name}_dropout")(x)
    return keras.layers.Dense(spec.num_classes, dtype="float32", kernel_regularizer=penalty, name=spec.name)(x)


def l2_from_c(c, num_examples):
    """`HeadSpec.l2` equal to scikit-learn `LogisticRegression(C=c)`'s penalty on `num_examples` examples.

    LogisticRegression minimises `sum_i loss_i + ||W||^2 / (2 C)`; divided
    by n, that is the mean loss (what Keras minimises) + `||W||^2 / (2 C n)`.
    `c` None: no penalty (0.0).

    Example:
    ```python
    l2_from_c(1.0, 24)   # 1 / 48
    ```
    """
    if c is None:
        return 0.0
    if not c > 0 or num_examples < 1:
        raise UserError(f"l2_from_c: C must be > 0 and num_examples >= 1. Received: c={c}, "
                        f"num_examples={num_examples}.")
    return 1.0 / (2.0 * c * num_examples)


def pool_layer_name(spec):
    """The name of the layer whose output is `spec`'s pooled features (see `build_model`)."""
    return f"{spec.name}_pool"


def head_layer_names(spec):
    """The layers `build_head` makes for `spec`, from the pooled features to the output."""
    names = [f"{spec.name}_normalize"] if spec.normalize else []
    names += [f"{spec.name}_hidden"] if spec.hidden_units else []
    names += [f"{spec.name}_dropout"] if spec.dropout else []
    return names + [spec.name]


def head_to_dict(head):
    """A `HeadSpec` as a JSON-able dict (class names as a list)."""
    d = dataclasses.asdict(head)
    if d.get("class_names") is not None:
        d["class_names"] = list(d["class_names"])
    return d
