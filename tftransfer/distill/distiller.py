"""`Distiller`: `keras.distillation.Distiller` for tftransfer's models.

What Keras' `Distiller` (3.15) provides and we keep: freezing the teacher,
the teacher/student compatibility checks, the feature extractors that
`keras.distillation.FeatureDistillation` hints use, the loss trackers
(`student_loss`, `distillation_loss`, `total_loss`).

What it lacks, and the minimum added here (each marked `# Why:` below):
- dict outputs: our models return `{head name: logits}`; Keras'
  `LogitsDistillation` needs one loss per dict entry and clips
  probabilities (`KLDivergence`). `HintonDistillation` loops over the heads
  with an exact log-softmax KL.
- a dynamic alpha / temperature: Keras keeps both as Python floats (baked
  into the traced graph; `student_loss_weight > 0` is even a Python `if`).
  Here they are non-trainable `keras.Variable`s read inside the train step,
  so `DistillationSchedule` can move them without a retrace.
- cached teacher outputs: Keras always runs the teacher in `compute_loss`.
  Here a batch may carry the teacher's outputs
  (`{"student_inputs": x, "teacher_outputs": ...}`, see
  `tftransfer.distill.cache`) and the teacher is then skipped.
- unlabelled transfer data (label `-1`): masked out of the hard-label
  loss and of the metrics.
- layerwise hidden-state matching through learned projections
  (`features="layerwise"`, `tftransfer.distill.features`): Keras'
  `FeatureDistillation` matches one pair of top-level layers only.
"""

import keras

from tftransfer import losses as losses_lib
from tftransfer.data.pipeline import STUDENT_INPUTS, TEACHER_OUTPUTS  # noqa: F401 (re-exported)
from tftransfer.errors import UserError

FINAL_OUTPUT = "final_output"  # Keras' key for a model's own outputs.
FEATURE_LOSSES = ("similarity", "mse", "cosine")


def split_inputs(x):
    """`(student inputs, cached teacher outputs or None)` of a batch's `x`."""
    if isinstance(x, dict) and TEACHER_OUTPUTS in x:
        return x[STUDENT_INPUTS], x[TEACHER_OUTPUTS]
    return x, None


class HintonDistillation(keras.distillation.DistillationLoss):
    """Hinton's soft-target loss on every classification head of a dict output.

    `sum over heads of loss_weight * mean(T**2 * KL(softmax(t / T) || softmax(s / T)))`.

    Args:
        temperature: float or `keras.Variable`. A variable is read at every
            step (so a schedule can change it). Defaults to 2.0.
        head_weights: dict `{head name: weight}`. Defaults to None: the
            single output, weight 1.

    Example:
    ```python
    loss = HintonDistillation(temperature=4.0, head_weights={"label": 1.0})
    loss.compute_loss({"label": teacher_logits}, {"label": student_logits})
    ```
    """

    def __init__(self, temperature=2.0, head_weights=None):
        # Why not `LogitsDistillation.__init__`: it rejects a variable
        # temperature (isinstance number check).
        if isinstance(temperature, (int, float)) and temperature <= 0:
            raise UserError(f"temperature must be > 0. Received: temperature={temperature}.")
        self.temperature = temperature
        self.head_weights = dict(head_weights) if head_weights else None

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        if self.head_weights is None:
            return keras.ops.mean(
                losses_lib.soft_target_loss(student_outputs, teacher_outputs, self.temperature)
            )
        total = 0.0
        for name, weight in self.head_weights.items():
            soft = losses_lib.soft_target_loss(
                student_outputs[name], teacher_outputs[name], self.temperature
            )
            total = total + weight * keras.ops.mean(soft)
        return total

    def validate_outputs(self, teacher_outputs, student_outputs):
        if self.head_weights is not None:
            for name in self.head_weights:
                if name not in teacher_outputs or name not in student_outputs:
                    raise UserError(
                        f"distillation: head {name!r} is missing from the teacher "
                        f"({sorted(teacher_outputs)}) or the student ({sorted(student_outputs)})."
                    )

    def get_config(self):
        return {
            "temperature": float(keras.ops.convert_to_numpy(self.temperature)),
            "head_weights": self.head_weights,
        }


class Distiller(keras.distillation.Distiller):
    """Teacher -> student distillation for `{head: logits}` models.

    `loss = alpha * hard + (1 - alpha) * (soft + feature_weight * feature)`,
    where `hard` is the heads' cross-entropy with the labels (label
    smoothing per head; unlabelled examples, label `-1`, excluded), `soft`
    is `HintonDistillation` and `feature` an optional hint loss between one
    teacher and one student layer (`keras.distillation.FeatureDistillation`).

    Train it like any Keras model; the student is `distiller.student`.
    Batches are `(x, {head: labels})`, `x` alone (no labels: soft targets
    only), or carry cached teacher outputs (`tftransfer.distill.cache`).

    Args:
        teacher: keras.Model. Inputs like the student's, outputs
            `{head: logits}` (an ensemble: `tftransfer.distill.ensemble`).
            Frozen.
        student: keras.Model from `tftransfer.build_model`.
        heads: list of `HeadSpec`. The student's heads (classification).
        alpha: float. Weight of the hard-label loss, in [0, 1]. Defaults
            to 0.1.
        temperature: float. Softmax temperature, > 0. Defaults to 2.0.
        feature_loss_weight: float. Weight of the hint loss; 0 disables it.
            Defaults to 0.
        feature_loss: str. `similarity` (batch similarity maps, Tung & Mori
            2019: widths may differ), `mse` or `cosine` (widths must match).
            Defaults to `"similarity"`.
        teacher_feature_layer: str. Top-level teacher layer for the hint.
            Defaults to None: `<first head>_pool` (the pooled features).
        student_feature_layer: str. Defaults to None: `<first head>_pool`.
        features: `"layerwise"` or list of `[teacher layer, student layer]`
            indices: match transformer hidden states layer by layer
            (`tftransfer.distill.features.LayerwiseFeatures`, weighted by
            `feature_loss_weight`) instead of the single hint. Text
            backbones, one teacher, no cached teacher outputs. Defaults to
            None.
        name: str. Defaults to `"distiller"`.

    Example:
    ```python
    distiller = Distiller(teacher, student, heads, alpha=0.1, temperature=4.0)
    distiller.compile(keras.optimizers.Adam(1e-3),
                      metrics={"label": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]})
    distiller.fit(train_ds, epochs=3)
    distiller.student.save("student.keras")
    ```
    """

    def __init__(self, teacher, student, heads, alpha=0.1, temperature=2.0,
                 feature_loss_weight=0.0, feature_loss="similarity", teacher_feature_layer=None,
                 student_feature_layer=None, features=None, name="distiller", **kwargs):
        heads = list(heads)
        for head in heads:
            if head.type != "classification":
                raise UserError(
                    f"distillation: head {head.name!r} is {head.type}; only classification heads "
                    f"distil (soft targets over classes)."
                )
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"distill.alpha must be in [0, 1]. Received: alpha={alpha}.")
        if not temperature > 0.0:
            raise UserError(f"distill.temperature must be > 0. Received: temperature={temperature}.")
        if feature_loss not in FEATURE_LOSSES:
            raise UserError(
                f"distill.feature_loss must be one of {', '.join(FEATURE_LOSSES)}. "
                f"Received: {feature_loss!r}."
            )
        # Why variables: read (not baked in) by the traced train step.
        alpha_var = keras.Variable(float(alpha), trainable=False, dtype="float32", name="alpha")
        temperature_var = keras.Variable(
            float(temperature), trainable=False, dtype="float32", name="temperature"
        )
        distillation_losses = [HintonDistillation(
            temperature_var, {h.name: h.loss_weight for h in heads}
        )]
        weights = [1.0]
        layerwise = None
        if features is not None:
            from tftransfer.distill.features import LayerwiseFeatures
            from tftransfer.distill.teacher import find_backbone

            if not feature_loss_weight:
                raise UserError("distill.features needs distill.feature_loss_weight > 0 (e.g. 1.0).")
            t_backbone, s_backbone = find_backbone(teacher), find_backbone(student)
            if t_backbone is None or s_backbone is None:
                raise UserError(
                    "distill.features: no keras-hub backbone inside the "
                    f"{'teacher (an ensemble has none; list one teacher)' if t_backbone is None else 'student'}."
                )
            layerwise = LayerwiseFeatures(t_backbone, s_backbone, features)
        elif feature_loss_weight:
            default = f"{heads[0].name}_pool"
            t_layer = teacher_feature_layer or default
            s_layer = student_feature_layer or default
            _check_feature_layers(teacher, student, t_layer, s_layer, feature_loss)
            loss_fn = {
                "similarity": losses_lib.similarity_preserving_loss,
                "mse": "mse",
                "cosine": "cosine_similarity",
            }[feature_loss]
            distillation_losses.append(keras.distillation.FeatureDistillation(
                loss=loss_fn, teacher_layer_name=t_layer, student_layer_name=s_layer,
            ))
            weights.append(float(feature_loss_weight))
        super().__init__(
            teacher=teacher, student=student, distillation_losses=distillation_losses,
            distillation_loss_weights=weights, student_loss_weight=float(alpha), name=name, **kwargs,
        )
        self.heads = heads
        self.alpha = alpha_var
        self.temperature = temperature_var
        self.layerwise = layerwise
        self.layerwise_weight = float(feature_loss_weight)
        # An attribute, so Keras reports it (`layerwise_loss`) with the other trackers.
        self.layerwise_loss_tracker = keras.metrics.Mean(name="layerwise_loss") if layerwise else None

    # -- Keras API ---------------------------------------------------------

    def compile(self, optimizer="adam", metrics=None, **kwargs):
        """Compile; `metrics` may be a dict `{head: [metrics]}` like the student's.

        Why not `Distiller.compile`: it insists on a student `loss` and a
        metrics list; the hard-label loss here is built from the heads. The
        metrics are compiled as *weighted* metrics, the only kind Keras
        feeds sample weights, so unlabelled rows can be masked out.
        """
        kwargs.pop("loss", None)
        keras.Model.compile(self, optimizer=optimizer, loss=None, weighted_metrics=metrics, **kwargs)

    def call(self, inputs, training=None, **kwargs):
        inputs, _ = split_inputs(inputs)
        return self.student(inputs, training=training, **kwargs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        inputs, cached = split_inputs(x)
        if y_pred is None:
            y_pred = self(inputs, training=training)
        y = self._targets(y)

        hard = 0.0
        if y is not None:
            for head in self.heads:
                per_example = losses_lib.hard_label_loss(y[head.name], y_pred[head.name],
                                                         head.label_smoothing)
                hard = hard + head.loss_weight * keras.ops.mean(per_example)

        # Why: cached teacher outputs replace the teacher's forward pass.
        if cached is not None:
            teacher_features = cached
        else:
            teacher_features = self._extract_all_teacher_features(inputs)
        student_features = self._extract_all_student_features(inputs, y_pred)
        soft = 0.0
        for loss, weight in zip(self.distillation_losses, self.distillation_loss_weights):
            layer = getattr(loss, "teacher_layer_name", None)
            if layer is None:
                teacher_out, student_out = teacher_features[FINAL_OUTPUT], y_pred
            else:
                teacher_out = teacher_features[layer]
                student_out = student_features[loss.student_layer_name]
            loss.validate_outputs(teacher_out, student_out)
            soft = soft + weight * loss.compute_loss(teacher_out, student_out)
        if self.layerwise is not None:
            if cached is not None:
                raise UserError("distill.features: layerwise distillation runs the teacher; set distill.cache: none.")
            feature = self.layerwise(inputs, training=training)
            self.layerwise_loss_tracker.update_state(feature)
            soft = soft + self.layerwise_weight * feature

        alpha = keras.ops.convert_to_tensor(self.alpha)
        total = alpha * hard + (1.0 - alpha) * soft
        self.student_loss_tracker.update_state(hard)
        self.distillation_loss_tracker.update_state(soft)
        self.total_loss_tracker.update_state(total)
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        # Why: unlabelled rows (label -1) must not count as misses.
        y = self._targets(y)
        if y is not None and sample_weight is None:
            sample_weight = {
                h.name: losses_lib.labelled_mask(y[h.name], h.num_classes) for h in self.heads
            }
        if y is None:
            return self.get_metrics_result()
        return super().compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    # -- Teacher outputs (for the cache) -----------------------------------

    def teacher_output_model(self):
        """The model whose outputs a cache stores: `{final_output: {head:
        logits}, <hint layer>: features}` (what `compute_loss` reads)."""
        if self._teacher_feature_extractor is not None:
            return self._teacher_feature_extractor
        inputs = self.teacher.input
        return keras.Model(inputs, {FINAL_OUTPUT: self.teacher(inputs)}, name="teacher_outputs")

    def _targets(self, y):
        if y is None or isinstance(y, dict):
            return y
        if len(self.heads) != 1:
            raise UserError(
                f"distillation: labels must be a dict keyed by head name {[h.name for h in self.heads]}."
            )
        return {self.heads[0].name: y}

    def get_config(self):
        config = super().get_config()
        config["alpha"] = float(keras.ops.convert_to_numpy(self.alpha))
        config["temperature"] = float(keras.ops.convert_to_numpy(self.temperature))
        return config


def _check_feature_layers(teacher, student, teacher_layer, student_layer, feature_loss):
    shapes = []
    for who, model, layer_name in (("teacher", teacher, teacher_layer), ("student", student, student_layer)):
        try:
            layer = model.get_layer(layer_name)
        except ValueError:
            names = [l.name for l in model.layers][-8:]
            raise UserError(
                f"distill.{who}_feature_layer {layer_name!r}: no such top-level layer in the {who} "
                f"(its last layers: {names})."
            )
        if not hasattr(layer.output, "shape"):
            raise UserError(
                f"distill.{who}_feature_layer {layer_name!r} outputs a {type(layer.output).__name__}, "
                f"not one tensor; pick a layer with a single output (e.g. <head>_pool)."
            )
        shapes.append(tuple(layer.output.shape))
    if feature_loss != "similarity" and shapes[0][1:] != shapes[1][1:]:
        raise UserError(
            f"distill.feature_loss={feature_loss} needs equal feature shapes; teacher "
            f"{teacher_layer} is {shapes[0]}, student {student_layer} is {shapes[1]}. "
            f"Use feature_loss: similarity (any widths)."
        )
