"""Teachers: load trained work dirs / `.keras` files, ensemble them, check them.

A teacher is one or more trained tftransfer models (`{head: logits}`
outputs). Several make an ensemble whose logits are averaged (Hinton et al.,
2015, distil an ensemble into one model). Every teacher must read the same
preprocessed input as the student (same tokenizer vocabulary / same image
size and normalisation) and predict the same heads with the same number of
classes; `check_compatible` says which and how to fix it, in one line.
"""

import dataclasses
import os

import keras

from tftransfer import workdir as workdir_lib
from tftransfer.errors import UserError



@dataclasses.dataclass
class Teacher:
    """A loaded teacher.

    model: keras.Model. Preprocessed input -> `{head: logits}` (the average
        over members for an ensemble). Frozen.
    members: list of keras.Model. The individual teachers.
    paths: list of str. Where each member came from.
    preprocessors: list. Each member's preprocessing (None when unknown:
        a bare `.keras` file).
    modality: str. `"image"` or `"text"`.
    size_bytes: int. Size of the members' `.keras` files on disk.
    """

    model: keras.Model
    members: list
    paths: list
    preprocessors: list
    modality: str
    size_bytes: int

    @property
    def parameters(self):
        return int(sum(m.count_params() for m in self.members))

    @property
    def head_classes(self):
        """`{head name: num classes}` of the teacher's outputs."""
        return output_classes(self.model)


def load_teacher(paths):
    """Load one teacher, or an ensemble of several (logits averaged).

    Args:
        paths: str or list of str. Each is a trained work dir (`W/model.keras`
            and `W/config.yaml`, as `python -m tftransfer.train` writes) or a
            `.keras` file.

    Returns:
        Teacher.

    Raises:
        UserError: a path is missing, is not a work dir / `.keras` file, or
            the members disagree on their inputs or heads.

    Example:
    ```python
    teacher = load_teacher(["runs/teacher_a", "runs/teacher_b"])
    teacher.model(inputs)["label"]  # the two teachers' mean logits
    ```
    """
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise UserError("distill.teacher is empty; list at least one trained work dir or .keras file.")
    members, preprocessors, size = [], [], 0
    for i, path in enumerate(paths):
        model_path, workdir = _model_path(path, f"distill.teacher.{i}")
        members.append(_load_model(model_path, f"distill.teacher.{i}"))
        preprocessors.append(_workdir_preprocessor(workdir) if workdir else None)
        size += os.path.getsize(model_path)
    modality = model_modality(members[0])
    for i, member in enumerate(members[1:], 1):
        _check_same_interface(members[0], member, paths[0], paths[i])
    model = members[0] if len(members) == 1 else ensemble(members)
    for member in members:
        member.trainable = False
    return Teacher(model, members, list(paths), preprocessors, modality, size)


def ensemble(models, name="teacher_ensemble", combine=None):
    """One model whose outputs are the members' logits averaged per head.

    Args:
        models: list of keras.Model with the same inputs and output heads.
            Members whose names clash are renamed `member_<i>_<name>`.
        name: str. Defaults to `"teacher_ensemble"`.
        combine: callable `(head name, [member outputs]) -> output`.
            Defaults to None: the mean of the logits (`keras.layers.Average`).
            The served ensemble (`tftransfer.export.ensemble`) averages
            probabilities instead.

    Returns:
        keras.Model: input -> `{head: mean of the members' logits}` (or
        what `combine` makes of them).

    Example:
    ```python
    teacher = ensemble([model_a, model_b])
    ```
    """
    first = models[0]
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        # Why: a functional model needs unique layer names, and every work
        # dir's model is called `transfer_model`: rename the (loaded) members.
        for i, model in enumerate(models):
            model.name = f"member_{i}_{model.name}"
    inputs = keras.tree.map_structure(
        lambda t: keras.Input(shape=t.shape[1:], dtype=t.dtype, name=t.name.split(":")[0]),
        first.input,
    )
    outputs = [m(inputs, training=False) for m in models]
    heads = sorted(outputs[0]) if isinstance(outputs[0], dict) else None
    if heads is None:
        return keras.Model(inputs, keras.layers.Average(name="mean_logits")(outputs), name=name)
    if combine is None:
        combine = lambda h, members: keras.layers.Average(name=h)(members)  # noqa: E731
    averaged = {h: combine(h, [o[h] for o in outputs]) for h in heads}
    return keras.Model(inputs, averaged, name=name)


def check_compatible(teacher, student, student_preprocessor, modality):
    """Raise `UserError` unless teacher and student share input and heads.

    Args:
        teacher: Teacher.
        student: keras.Model from `tftransfer.build_model`.
        student_preprocessor: the student's preprocessing
            (`LoadedBackbone.preprocessor`).
        modality: str. The student's modality.
    """
    where = f"distill.teacher {teacher.paths[0]!r}"
    if teacher.modality != modality:
        raise UserError(
            f"{where} is a {teacher.modality} model but the student is a {modality} model; "
            f"distil between models of the same input kind."
        )
    t_heads, s_heads = teacher.head_classes, output_classes(student)
    for name, classes in s_heads.items():
        if name not in t_heads:
            raise UserError(
                f"{where} has no head {name!r} (its heads: {sorted(t_heads)}); name the student's "
                f"heads like the teacher's (heads.0.name)."
            )
        if t_heads[name] != classes:
            raise UserError(
                f"{where}: head {name!r} has {t_heads[name]} classes but the student's has {classes}; "
                f"teacher and student must predict the same classes (heads.0.num_classes)."
            )
    if modality == "image":
        t_shape = tuple(teacher.model.input.shape[1:])
        s_shape = tuple(student.input.shape[1:])
        if t_shape != s_shape:
            raise UserError(
                f"{where} takes {t_shape} images but the student takes {s_shape}; set "
                f"backbone.image_size={t_shape[0]} so both read the same input."
            )
    for path, preprocessor in zip(teacher.paths, teacher.preprocessors):
        if preprocessor is not None:
            _check_same_preprocessing(path, preprocessor, student_preprocessor, modality)
    if modality == "text":
        student_vocab = student_preprocessor.tokenizer.vocabulary_size()
        for path, member in zip(teacher.paths, teacher.members):
            size = _embedding_vocabulary_size(member)
            if size is not None and size != student_vocab:
                raise UserError(
                    f"distill.teacher {path!r} embeds {size} token ids but the student's tokenizer has "
                    f"{student_vocab}; give the student the teacher's vocabulary (backbone.spec.vocabulary)."
                )


def output_classes(model):
    """`{head name: classes}` of a model with dict outputs."""
    output = model.output
    if not isinstance(output, dict):
        return {"output": int(output.shape[-1])}
    return {name: int(t.shape[-1]) for name, t in output.items()}


def model_modality(model):
    inputs = model.input
    return "text" if isinstance(inputs, dict) and "token_ids" in inputs else "image"


def find_backbone(model):
    """The keras-hub backbone inside a built model, or None."""
    import keras_hub

    for layer in model.layers:
        if isinstance(layer, keras_hub.models.Backbone):
            return layer
    return None


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _model_path(path, where):
    if os.path.isdir(path):
        model_path = os.path.join(path, workdir_lib.MODEL)
        if not os.path.isfile(model_path):
            raise UserError(
                f"{where} {path!r} has no {workdir_lib.MODEL}; train the teacher first "
                f"(python -m tftransfer.train --workdir={path} ...) or pass a .keras file."
            )
        return model_path, path
    if path.endswith(".keras") and os.path.isfile(path):
        return path, None
    raise UserError(
        f"{where} {path!r}: no such work dir or .keras file; pass a trained tftransfer work dir "
        f"or a saved .keras model."
    )


def _load_model(path, where):
    from tftransfer.workdir import load_model

    return load_model(path, where)


def _workdir_preprocessor(workdir):
    """The preprocessing a teacher work dir was trained with, or None."""
    from tftransfer.export import load_serving_assets

    if os.path.isdir(os.path.join(workdir, workdir_lib.PREPROCESSOR)):
        try:
            return load_serving_assets(workdir).preprocessor
        except UserError:
            pass
    config_path = os.path.join(workdir, workdir_lib.CONFIG)
    if not os.path.isfile(config_path):
        return None
    from tftransfer import config as config_lib
    from tftransfer.backbones import load_backbone

    try:
        cfg = config_lib.load_config(config_path)
        cfg.backbone.load_weights = False  # Only the preprocessing is needed.
        return load_backbone(**cfg.backbone.load_kwargs()).preprocessor
    except UserError:
        return None  # e.g. a remote preset, offline: fall back to model checks.


def _check_same_interface(first, other, first_path, other_path):
    if model_modality(first) != model_modality(other) or output_classes(first) != output_classes(other):
        raise UserError(
            f"distill.teacher ensemble: {other_path!r} ({model_modality(other)}, heads "
            f"{output_classes(other)}) differs from {first_path!r} ({model_modality(first)}, heads "
            f"{output_classes(first)}); ensemble members must share inputs and heads."
        )
    if model_modality(first) == "image" and tuple(first.input.shape) != tuple(other.input.shape):
        raise UserError(
            f"distill.teacher ensemble: {other_path!r} takes {tuple(other.input.shape[1:])} images, "
            f"{first_path!r} takes {tuple(first.input.shape[1:])}; ensemble members must share inputs."
        )


def _check_same_preprocessing(path, teacher_pre, student_pre, modality):
    where = f"distill.teacher {path!r}"
    if modality == "text":
        t_tok, s_tok = teacher_pre.tokenizer, student_pre.tokenizer
        if type(t_tok).__name__ != type(s_tok).__name__ or t_tok.get_vocabulary() != s_tok.get_vocabulary():
            raise UserError(
                f"{where} uses a different tokenizer ({type(t_tok).__name__}, "
                f"{t_tok.vocabulary_size()} tokens) than the student ({type(s_tok).__name__}, "
                f"{s_tok.vocabulary_size()} tokens); give the student the teacher's vocabulary "
                f"(backbone.spec.vocabulary: the teacher's vocab.txt)."
            )
        if getattr(t_tok, "lowercase", None) != getattr(s_tok, "lowercase", None):
            raise UserError(
                f"{where} tokenizer lowercase={t_tok.lowercase} but the student's is "
                f"lowercase={s_tok.lowercase}; set backbone.spec.lowercase to match."
            )
        return
    t_cfg, s_cfg = teacher_pre.get_config(), student_pre.get_config()
    for key in ("image_size", "scale", "offset"):
        if _normalise(t_cfg.get(key)) != _normalise(s_cfg.get(key)):
            raise UserError(
                f"{where} preprocesses images with {key}={t_cfg.get(key)} but the student with "
                f"{key}={s_cfg.get(key)}; teacher and student must read the same image input "
                f"(backbone.image_size / the same normalisation)."
            )


def _normalise(value):
    if isinstance(value, (list, tuple)):
        return tuple(round(float(v), 6) for v in value)
    if isinstance(value, float):
        return round(value, 6)
    return value


def _embedding_vocabulary_size(model):
    backbone = find_backbone(model)
    return getattr(backbone, "vocabulary_size", None) if backbone is not None else None
