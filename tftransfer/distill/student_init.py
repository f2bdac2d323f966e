"""Initialise a (smaller) student from the teacher's layers.

DistilBERT (Sanh et al., 2019) starts its student from every other teacher
layer; when the student is also *narrower*, "weight selection" (Xu et al.,
2023, "Initializing Models with Larger Ones") takes the same leading slice
of every teacher weight (first k inputs, first k heads, ...), which keeps
the selected neurons consistent from layer to layer.

`init_from_teacher` pairs the student's backbone layer groups with the
teacher's (`embeddings` with `embeddings`, student `transformer_layer_i`
with teacher layer `layers[i]`; ResNets: `stem`, `stackN`), then each
group's weights in order: a teacher weight of the same rank and at least the
student's size in every dimension is sliced in; anything else (another
block structure, more heads than the teacher has) keeps its random init and
is reported.
"""

import keras
import numpy as np

from tftransfer.backbones import layer_groups
from tftransfer.errors import UserError


def evenly_spaced(num_teacher, num_student):
    """Teacher layer indices for the student's layers, spread bottom to top.

    Example:
    ```python
    evenly_spaced(6, 2)  # [0, 5]
    evenly_spaced(6, 3)  # [0, 2, 5]
    ```
    """
    if num_student == 1:
        return [num_teacher - 1]
    return [int(round(i * (num_teacher - 1) / (num_student - 1))) for i in range(num_student)]


def init_from_teacher(student_backbone, teacher_backbone, layers=None):
    """Copy (a leading slice of) the teacher's weights into the student.

    Args:
        student_backbone: keras.Model. The student's backbone (keras-hub).
        teacher_backbone: keras.Model. The teacher's backbone, same family.
        layers: list of int. Teacher block index for each student block
            (`transformer_layer_i` / `stack_i`). Defaults to None: evenly
            spaced, first and last included.

    Returns:
        dict. `copied` (weights fully copied), `sliced` (weights sliced
        from larger ones), `skipped` (student weight names left random),
        `teacher_layers` (the mapping used).

    Example:
    ```python
    report = init_from_teacher(student_loaded.model, teacher_backbone)
    report["teacher_layers"]  # e.g. [0, 5] for 2 of 6 layers
    ```
    """
    s_groups = layer_groups(student_backbone)
    t_groups = layer_groups(teacher_backbone)
    s_blocks = [g for g in s_groups if _is_block(g.name)]
    t_blocks = [g for g in t_groups if _is_block(g.name)]
    if not s_blocks or not t_blocks:
        raise UserError(
            f"distill.init_from_teacher: the student ({type(student_backbone).__name__}) or teacher "
            f"({type(teacher_backbone).__name__}) has no transformer layers / ResNet stacks to copy."
        )
    if layers is None:
        layers = evenly_spaced(len(t_blocks), len(s_blocks))
    if len(layers) != len(s_blocks) or any(not 0 <= i < len(t_blocks) for i in layers):
        raise UserError(
            f"distill.teacher_layers must list {len(s_blocks)} teacher block indices in "
            f"0..{len(t_blocks) - 1} (one per student block). Received: {layers}."
        )
    pairs = [(s, t) for s in s_groups for t in t_groups
             if not _is_block(s.name) and s.name == t.name]
    pairs += [(s, t_blocks[i]) for s, i in zip(s_blocks, layers)]
    report = {"copied": 0, "sliced": 0, "skipped": [], "teacher_layers": list(layers)}
    for s_group, t_group in pairs:
        s_vars, t_vars = s_group.variables, t_group.variables
        if len(s_vars) != len(t_vars):
            report["skipped"] += [v.path for v in s_vars]
            continue
        for s_var, t_var in zip(s_vars, t_vars):
            s_shape, t_shape = tuple(s_var.shape), tuple(t_var.shape)
            if len(s_shape) != len(t_shape) or any(s > t for s, t in zip(s_shape, t_shape)):
                report["skipped"].append(s_var.path)
                continue
            value = np.asarray(keras.ops.convert_to_numpy(t_var))[tuple(slice(0, s) for s in s_shape)]
            s_var.assign(value.astype(s_var.dtype))
            report["copied" if s_shape == t_shape else "sliced"] += 1
    return report


def _is_block(name):
    return name.startswith("transformer_layer_") or name.startswith("stack") or name.startswith("conv")
