"""Layerwise feature distillation: every student transformer layer matches a teacher layer.

`distill.features: layerwise` pairs student layer `i` of `L_s` with teacher
layer `evenly_spaced(L_t, L_s)[i]` (the mapping `init_from_teacher` uses:
first to first, last to last); `distill.features: [[t, s], ...]` lists the
pairs (teacher index, student index). For each pair the student's hidden
states `(batch, seq, d_s)` go through a learned linear projection `W: d_s
-> d_t` (no bias; none when the widths are equal) and are compared with the
teacher's with a mean squared error over the real (unpadded) tokens, as in
TinyBERT (Jiao et al. 2020). The projections train with the student, live
in the `Distiller` only, and are not part of the saved student.

Why our own and not `keras.distillation.FeatureDistillation`: that matches
one pair of *top-level* layers of two models, with no projection. A
student's transformer layers sit inside its backbone, widths differ, and
the loss must skip padding.
"""

import re

import keras

from tftransfer.errors import UserError

LAYERWISE = "layerwise"
_BLOCK = re.compile(r"^transformer_layer_(\d+)$")


def transformer_layers(backbone):
    """The backbone's transformer layers, bottom to top (keras-hub `transformer_layer_<i>`)."""
    found = []
    for layer in backbone.layers:
        m = _BLOCK.match(layer.name)
        if m:
            found.append((int(m.group(1)), layer))
    return [layer for _, layer in sorted(found, key=lambda p: p[0])]


def resolve_pairs(features, num_teacher, num_student):
    """`[(teacher index, student index), ...]` from `layerwise` or an explicit list."""
    from tftransfer.distill.student_init import evenly_spaced

    if features == LAYERWISE:
        return list(zip(evenly_spaced(num_teacher, num_student), range(num_student)))
    pairs = []
    for i, pair in enumerate(features):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(p, int) and not isinstance(p, bool) for p in pair)):
            raise UserError(f"distill.features.{i} must be [teacher layer index, student layer index]. "
                            f"Received: {pair!r}.")
        t, s = pair
        if not 0 <= t < num_teacher or not 0 <= s < num_student:
            raise UserError(
                f"distill.features.{i}: [{t}, {s}] is out of range; the teacher has layers 0..{num_teacher - 1}, "
                f"the student 0..{num_student - 1}."
            )
        pairs.append((t, s))
    return pairs


def _hidden_model(backbone, layers, name):
    return keras.Model(backbone.input, [layer.output for layer in layers], name=name)


class LayerwiseFeatures(keras.layers.Layer):
    """The layerwise hint loss and its projections (a layer, so the `Distiller` trains them).

    Args:
        teacher_backbone: keras-hub text backbone inside the teacher.
        student_backbone: keras-hub text backbone inside the student.
        features: `"layerwise"` or list of `[teacher index, student index]`.

    Call with the student's input dict; returns the mean over pairs of the
    masked MSE between projected student and teacher hidden states.
    """

    def __init__(self, teacher_backbone, student_backbone, features=LAYERWISE, **kwargs):
        super().__init__(name=kwargs.pop("name", "layerwise_features"), **kwargs)
        t_layers = transformer_layers(teacher_backbone)
        s_layers = transformer_layers(student_backbone)
        if not t_layers or not s_layers:
            who = "teacher" if not t_layers else "student"
            raise UserError(
                f"distill.features: the {who} backbone has no transformer layers (transformer_layer_<i>); "
                f"layerwise distillation is for BERT-family text backbones."
            )
        self.pairs = resolve_pairs(features, len(t_layers), len(s_layers))
        t_used = sorted({t for t, _ in self.pairs})
        s_used = sorted({s for _, s in self.pairs})
        self._t_index = {t: i for i, t in enumerate(t_used)}
        self._s_index = {s: i for i, s in enumerate(s_used)}
        self.teacher_hidden = _hidden_model(teacher_backbone, [t_layers[t] for t in t_used], "teacher_hidden")
        self.student_hidden = _hidden_model(student_backbone, [s_layers[s] for s in s_used], "student_hidden")
        self.projections = []
        for t, s in self.pairs:
            d_t = t_layers[t].output.shape[-1]
            d_s = s_layers[s].output.shape[-1]
            if d_t == d_s:
                self.projections.append(None)
                continue
            projection = keras.layers.Dense(d_t, use_bias=False, name=f"layerwise_projection_s{s}_t{t}")
            projection.build((None, None, d_s))
            self.projections.append(projection)
        # Teacher hidden states never train (the Distiller freezes the teacher too).
        self.teacher_hidden.trainable = False

    def call(self, inputs, training=False):
        if not isinstance(inputs, dict) or "padding_mask" not in inputs:
            raise UserError("distill.features: layerwise distillation needs text inputs (token ids + padding mask).")
        teacher = self.teacher_hidden(inputs, training=False)
        student = self.student_hidden(inputs, training=training)
        teacher = teacher if isinstance(teacher, (list, tuple)) else [teacher]
        student = student if isinstance(student, (list, tuple)) else [student]
        mask = keras.ops.expand_dims(keras.ops.cast(inputs["padding_mask"], "float32"), -1)
        tokens = keras.ops.maximum(keras.ops.sum(mask), 1.0)
        total = 0.0
        for (t, s), projection in zip(self.pairs, self.projections):
            h_s = keras.ops.cast(student[self._s_index[s]], "float32")
            h_t = keras.ops.stop_gradient(keras.ops.cast(teacher[self._t_index[t]], "float32"))
            if projection is not None:
                h_s = projection(h_s)
            squared = keras.ops.square(h_s - h_t) * mask
            total = total + keras.ops.sum(squared) / (tokens * h_t.shape[-1])
        return total / len(self.pairs)
