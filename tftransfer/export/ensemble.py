"""Ensembles at inference: one SavedModel serving the mean of several models' probabilities.

    python -m tftransfer.export --workdir=E --ensemble=W1,W2,W3
        -> E/export/<N>/ (text: also E/export_token_ids/<N>/)
    python -m tftransfer.evaluate --workdir=E            # the members, in Keras
    python -m tftransfer.evaluate --workdir=E/export/1   # the served SavedModel

Each member is a finished work dir of `python -m tftransfer.train` (or
`distill`). The members must read the same input and predict the same
heads: same modality and input kind (single text / sentence pair), the same
preprocessing configuration (keras-hub image converter or text
preprocessor: image size and normalisation, or tokenizer, vocabulary and
sequence length), the same served-image background, and the same heads
(names, types, class counts, class names in order). `check_members` names
the first member and field that differ, in one line.

The served probabilities are the mean of the members' probabilities (softmax
for classification, sigmoid for multi-label; regression values are
averaged). The ensemble model is `tftransfer.distill.ensemble` (the
distillation teacher's) with `MeanProbabilities` combining each head, so
the serving signatures, the token-id twin and the report work unchanged.

`E` is an ensemble dir (layout in `tftransfer.workdir`): `ensemble.json`
lists the members, and `config.yaml`, `heads.json`, `preprocessor/` are the
first member's (the data `evaluate` reads, the shared preprocessing). The
version is written atomically like every export; the files beside it are
written after it, each atomically.
"""

import os
import shutil

import keras

from tftransfer.errors import UserError

# Probabilities are floored here before the log, so an underflowed member
# probability (0.0) never becomes a -inf logit.
_TINY = 1e-30


class MeanProbabilities(keras.layers.Layer):
    """Members' logits of one head -> the logits of their mean probability.

    Classification: `log(mean softmax)`, whose softmax is the mean of the
    members' softmax (it sums to 1). Multi-label: `logit(mean sigmoid)`.
    Regression: the mean value. Why logits out: every consumer of a
    tftransfer model (the serving outputs, the report, TFLite) applies
    softmax / sigmoid to logits, so the ensemble needs no branch of its own.

    Args:
        head_type: str. `classification`, `multilabel` or `regression`.
    """

    def __init__(self, head_type, **kwargs):
        super().__init__(**kwargs)
        if head_type not in ("classification", "multilabel", "regression"):
            raise ValueError(f"head_type must be classification, multilabel or regression. "
                             f"Received: head_type={head_type!r}")
        self.head_type = head_type

    def call(self, members):
        ops = keras.ops
        stacked = ops.stack([ops.cast(m, "float32") for m in members], axis=0)
        if self.head_type == "regression":
            return ops.mean(stacked, axis=0)
        if self.head_type == "classification":
            p = ops.mean(ops.softmax(stacked, axis=-1), axis=0)
            return ops.log(ops.maximum(p, _TINY))
        p = ops.mean(ops.sigmoid(stacked), axis=0)
        return ops.log(ops.maximum(p, _TINY)) - ops.log(ops.maximum(1.0 - p, _TINY))

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "head_type": self.head_type}


def ensemble_model(models, heads, name="ensemble"):
    """One Keras model: preprocessed input -> `{head: logits of the mean probability}`.

    Args:
        models: list of keras.Model (`{head: logits}` outputs, same inputs).
        heads: list of `HeadSpec` (their types pick the averaging).
        name: str. Defaults to `"ensemble"`.
    """
    from tftransfer.distill.teacher import ensemble

    types = {h.name: h.type for h in heads}
    return ensemble(models, name=name,
                    combine=lambda head, outs: MeanProbabilities(types[head], name=head)(outs))


def parse_members(members, where="--ensemble"):
    """The member work dirs as a list: at least two, distinct, each a finished run."""
    from tftransfer import workdir

    if isinstance(members, str):
        members = [m for m in members.split(",")]
    members = [m.strip().rstrip("/") for m in members if m and m.strip()]
    if len(members) < 2:
        raise UserError(f"{where}: an ensemble needs at least two trained work dirs (comma-separated). "
                        f"Received: {members}.")
    seen = {}
    for m in members:
        real = os.path.realpath(m)
        if real in seen:
            raise UserError(f"{where}: member {m!r} is listed twice (as {seen[real]!r}); list each work dir once.")
        seen[real] = m
        if not os.path.isdir(m):
            raise UserError(f"{where}: member {m!r} is not a directory; pass trained work dirs.")
        if not os.path.isfile(os.path.join(m, workdir.METRICS)):
            raise UserError(f"{where}: member {m!r} is not a finished run (no {workdir.METRICS}); "
                            f"train it to the end first (python -m tftransfer.train --workdir={m} ...).")
    return members


def load_members(members, where="--ensemble"):
    """Load and check the members: `(assets, models, configs)`, one entry per member.

    Raises:
        UserError: a member is not a finished work dir, or members differ in
            their inputs, preprocessing or heads (`check_members`).
    """
    from tftransfer.export.assets import _training_config, load_serving_assets, load_workdir_model

    members = parse_members(members, where)
    assets = [load_serving_assets(m) for m in members]
    configs = [_training_config(m) or {} for m in members]
    check_members(members, assets, configs, where)  # before the (slow) model loads
    models = [load_workdir_model(m) for m in members]
    return assets, models, configs


def describe_member(assets, config):
    """`{field: value}` that every ensemble member must share (compared by `check_members`)."""
    from tftransfer.export.saved_model import class_names_of

    fields = {"modality": assets.modality, "input": "text pair" if assets.pair else "single"}
    fields.update(_flatten(keras.saving.serialize_keras_object(assets.preprocessor), "preprocessing"))
    if assets.modality == "text":
        fields["preprocessing.vocabulary"] = list(assets.preprocessor.tokenizer.get_vocabulary())
    else:
        fields["data.image_background"] = ((config or {}).get("data") or {}).get("image_background")
    fields["heads"] = [h.name for h in assets.heads]
    for h in assets.heads:
        fields[f"heads.{h.name}.type"] = h.type
        fields[f"heads.{h.name}.num_classes"] = h.num_classes
        if h.type != "regression":
            fields[f"heads.{h.name}.class_names"] = class_names_of(h)
    return fields


def check_members(paths, assets, configs, where="--ensemble"):
    """UserError naming the first member and field that differ from the first member's."""
    first = describe_member(assets[0], configs[0])
    for path, a, c in zip(paths[1:], assets[1:], configs[1:]):
        other = describe_member(a, c)
        for field in list(first) + [k for k in other if k not in first]:
            if first.get(field) != other.get(field):
                raise UserError(
                    f"{where}: member {path!r} differs from {paths[0]!r} in {field} "
                    f"({_short(other.get(field))} vs {_short(first.get(field))}); ensemble members must "
                    f"share preprocessing (backbone preprocessing, sequence length / image size) and heads.")


def export_ensemble(members, out, export_base=None, version=None, overwrite=False):
    """Write the members' ensemble as one SavedModel version, and the ensemble dir.

    Args:
        members: list of str, or one comma-separated str. Finished work dirs.
        out: str. The ensemble dir (created if missing; not a training work dir).
        export_base: str. Where versions go. Defaults to `<out>/export`.
        version: int. Defaults to None: the next integer.
        overwrite: bool. Replace an existing version. Defaults to False.

    Returns:
        dict. `path` (the version directory) and `members`.

    Example:
    ```python
    export_ensemble(["runs/seed0", "runs/seed1"], "runs/ensemble")
    ```
    """
    from tftransfer import workdir
    from tftransfer.export import saved_model

    members = parse_members(members)
    _check_out(out, members)
    assets, models, configs = load_members(members)
    first = assets[0]
    heads = first.heads
    model = ensemble_model(models, heads)
    base = export_base or os.path.join(out, workdir.EXPORT)
    absolute = [os.path.abspath(m) for m in members]
    metadata = {"backbone": first.backbone, "config": configs[0] or None,
                "ensemble": {"members": absolute, "average": "probabilities"}}
    background = ((configs[0] or {}).get("data") or {}).get("image_background")
    bases = [base] + ([saved_model.token_ids_base(base)] if first.modality == "text" else [])
    created = [d for d in [out] + bases if not os.path.exists(d)]
    try:
        path = saved_model.export_saved_model(
            model, first.preprocessor, first.modality, heads, base, version=version, overwrite=overwrite,
            metadata=metadata, image_background=background, pair=first.pair)
    except BaseException:
        for d in reversed(created):  # a refused export leaves nothing behind, not even its dirs
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
        raise
    # The ensemble dir's own files, after the version (each written atomically).
    with open(os.path.join(members[0], workdir.CONFIG)) as f:
        workdir.atomic_write_text(os.path.join(out, workdir.CONFIG), f.read())
    workdir.write_directory(os.path.join(out, workdir.PREPROCESSOR), lambda tmp: shutil.copytree(
        os.path.join(members[0], workdir.PREPROCESSOR), tmp, dirs_exist_ok=True))
    workdir.write_json(os.path.join(out, workdir.HEADS), workdir.read_json(os.path.join(members[0], workdir.HEADS)))
    workdir.write_json(os.path.join(out, workdir.ENSEMBLE), {
        "format_version": 1, "members": absolute, "average": "probabilities",
        "export": os.path.abspath(path)})
    return {"path": path, "members": absolute}


def is_ensemble_dir(path):
    from tftransfer import workdir

    return os.path.isfile(os.path.join(path, workdir.ENSEMBLE))


def load_ensemble_dir(path):
    """`(ensemble model, first member's ServingAssets)` of an ensemble dir, members re-checked."""
    from tftransfer import workdir

    try:
        info = workdir.read_json(os.path.join(path, workdir.ENSEMBLE))
        members = info["members"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{os.path.join(path, workdir.ENSEMBLE)!r} is not a valid ensemble file ({e}); "
                        f"re-run python -m tftransfer.export --workdir={path} --ensemble=...")
    assets, models, _ = load_members(members, where=os.path.join(path, workdir.ENSEMBLE))
    return ensemble_model(models, assets[0].heads), assets[0]


def _check_out(out, members):
    from tftransfer import workdir

    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--workdir {out!r} is a file; pass a directory for the ensemble.")
    if os.path.realpath(out) in {os.path.realpath(m) for m in members}:
        raise UserError(f"--workdir {out!r} is one of the --ensemble members; pass a new directory for the ensemble.")
    if os.path.isfile(os.path.join(out, workdir.MODEL)) or os.path.isfile(os.path.join(out, workdir.METRICS)):
        raise UserError(f"--workdir {out!r} holds a training run; pass a new directory for the ensemble.")
    workdir.check_creatable(out)


def _flatten(value, prefix):
    """Nested config -> `{dotted key: leaf}`, without layer names (they differ harmlessly)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in ("name", "registered_name", "module"):
                continue
            key = f"{prefix}.{k}" if k not in ("config",) else prefix
            out.update(_flatten(v, key))
        return out
    if isinstance(value, (list, tuple)) and any(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}


def _short(value):
    text = repr(value)
    if isinstance(value, list) and len(value) > 8:
        text = f"[{len(value)} items: {', '.join(repr(v) for v in value[:3])}, ...]"
    return text if len(text) <= 80 else text[:77] + "..."
