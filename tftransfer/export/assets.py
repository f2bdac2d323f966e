"""A work dir's serving assets, and exporting a trained work dir.

`model.keras` holds the trained network (preprocessed input -> `{head name:
logits}`), but not the preprocessing that produced its input nor the class
names. Training saves those beside it with `save_serving_assets`:

    W/preprocessor/    the backbone's preprocessing in keras-hub preset
                       format: `image_converter.json` (image models) or
                       `preprocessor.json` + `tokenizer.json` +
                       `assets/tokenizer/<vocabulary>` (text models)
    W/heads.json       {"format_version": 1, "modality": "image" | "text",
                        "backbone": {... LoadedBackbone.description ...},
                        "heads": [{HeadSpec fields, class_names: [...]}]}

`load_serving_assets(W)` reads them back (with keras-hub's public
deserialisation: nothing needs the original backbone), and `export_workdir`
is what `python -m tftransfer.export` runs: reload `W/model.keras` in safe
mode and write a SavedModel or TFLite version.
"""

import dataclasses
import json
import os
import shutil
import tempfile

from tftransfer.errors import UserError

PREPROCESSOR_DIR = "preprocessor"
HEADS_FILE = "heads.json"
MODEL_FILE = "model.keras"
CONFIG_FILE = "config.yaml"
FORMAT_VERSION = 1
# keras-hub's file names inside a preset directory.
_PREPROCESSOR_JSONS = ("preprocessor.json", "image_converter.json")


@dataclasses.dataclass
class ServingAssets:
    """What serving needs besides the trained model.

    preprocessor: keras-hub layer. Image converter (0-255 RGB -> model
        input) or text preprocessor (strings -> token ids / segment ids /
        padding mask).
    modality: str. `"image"` or `"text"`.
    heads: list of `HeadSpec`, with class names.
    backbone: dict. `LoadedBackbone.description` of the trained backbone.
    """

    preprocessor: object
    modality: str
    heads: list
    backbone: dict


def save_serving_assets(workdir, loaded, heads):
    """Save `W/preprocessor/` and `W/heads.json` (each replaced atomically).

    Args:
        workdir: str. The work dir (created if missing).
        loaded: `tftransfer.LoadedBackbone`. Its `preprocessor`, `modality`
            and `description` are saved.
        heads: list of `HeadSpec`.

    Example:
    ```python
    save_serving_assets("runs/x", loaded, heads)
    assets = load_serving_assets("runs/x")
    assets.heads[0].class_names  # ('cat', 'dog')
    ```
    """
    from tftransfer.export.saved_model import head_to_dict
    from tftransfer.workdir import write_json

    preprocessor = loaded.preprocessor
    if not hasattr(preprocessor, "save_to_preset"):
        raise UserError(
            f"backbone preprocessor {type(preprocessor).__name__} cannot be saved for serving "
            f"(no save_to_preset); use a keras-hub image converter or text preprocessor."
        )
    os.makedirs(workdir, exist_ok=True)
    target = os.path.join(workdir, PREPROCESSOR_DIR)
    tmp = tempfile.mkdtemp(prefix=".tmp-preprocessor-", dir=workdir)
    old = None
    try:
        preprocessor.save_to_preset(tmp)
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=".tmp-old-preprocessor-", dir=workdir)
            os.rename(target, os.path.join(old, "p"))
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old and not os.path.exists(target):
            os.rename(os.path.join(old, "p"), target)
        raise
    finally:
        if old:
            shutil.rmtree(old, ignore_errors=True)
    write_json(os.path.join(workdir, HEADS_FILE), {
        "format_version": FORMAT_VERSION,
        "modality": loaded.modality,
        "backbone": loaded.description,
        "heads": [head_to_dict(h) for h in heads],
    })


def load_serving_assets(workdir):
    """Read what `save_serving_assets` wrote.

    Args:
        workdir: str. A trained work dir.

    Returns:
        ServingAssets.

    Raises:
        UserError: the work dir lacks `preprocessor/` or `heads.json`, or
            they are unreadable.
    """
    import keras

    import keras_hub  # noqa: F401  (registers the keras-hub classes)
    from tftransfer.heads import HeadSpec

    heads_path = os.path.join(workdir, HEADS_FILE)
    preset = os.path.join(workdir, PREPROCESSOR_DIR)
    for path in (heads_path, preset):
        if not os.path.exists(path):
            raise UserError(
                f"{path!r} is missing: the work dir was not trained by this tftransfer version "
                f"(train saves it with tftransfer.export.save_serving_assets); re-run training."
            )
    try:
        with open(heads_path) as f:
            info = json.load(f)
        heads = [
            HeadSpec(**{**h, "class_names": tuple(h["class_names"]) if h.get("class_names") else None})
            for h in info["heads"]
        ]
        modality = info["modality"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{heads_path!r} is not a valid heads file ({e}); re-run training.")
    config_files = [n for n in _PREPROCESSOR_JSONS if os.path.isfile(os.path.join(preset, n))]
    if not config_files:
        raise UserError(
            f"{preset!r} holds neither of {', '.join(_PREPROCESSOR_JSONS)}; re-run training."
        )
    with open(os.path.join(preset, config_files[0])) as f:
        config = json.load(f)
    try:
        preprocessor = keras.saving.deserialize_keras_object(config)
        if hasattr(preprocessor, "load_preset_assets"):
            preprocessor.load_preset_assets(preset)
    except Exception as e:
        raise UserError(f"preprocessor in {preset!r} could not be loaded ({e}); re-run training.")
    return ServingAssets(preprocessor, modality, heads, info.get("backbone", {}))


def load_trained_model(workdir):
    """`W/model.keras` loaded in safe mode (no Lambda layers), uncompiled."""
    from tftransfer.workdir import load_model

    return load_model(_check_model_file(workdir), "--workdir model")


def _check_model_file(workdir):
    path = os.path.join(workdir, MODEL_FILE)
    if not os.path.isfile(path):
        raise UserError(
            f"{path!r} is missing: train first (python -m tftransfer.train --workdir={workdir} ...)."
        )
    return path


def export_workdir(workdir, export_base=None, version=None, overwrite=False,
                   format="saved_model", quantize="none"):
    """Export a trained work dir: what `python -m tftransfer.export` runs.

    Args:
        workdir: str. A work dir written by `python -m tftransfer.train`
            (`model.keras`, `preprocessor/`, `heads.json`, `config.yaml`).
        export_base: str. Where versions go. Defaults to `W/export` for
            SavedModels and `W/tflite` for TFLite (kept apart so TF Serving,
            polling `W/export`, never meets a version without a SavedModel).
        version: int. Defaults to None: the next integer.
        overwrite: bool. Replace an existing version. Defaults to False.
        format: str. `"saved_model"` or `"tflite"`. Defaults to
            `"saved_model"`.
        quantize: str. TFLite only: `"none"`, `"float16"` or
            `"dynamic_range"`. Defaults to `"none"`.

    Returns:
        dict. `path` (the version directory) and, for TFLite, sizes.
    """
    from tftransfer.export import saved_model, tflite

    if format not in ("saved_model", "tflite"):
        raise UserError(f"--format must be saved_model or tflite. Received: {format!r}.")
    if quantize not in tflite.QUANTIZE_MODES:
        raise UserError(
            f"--quantize must be one of {', '.join(tflite.QUANTIZE_MODES)}. Received: {quantize!r}."
        )
    if format == "saved_model" and quantize != "none":
        raise UserError(f"--quantize={quantize} applies to --format=tflite only; drop it or pass --format=tflite.")
    if not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir!r} is not a directory; pass a trained work dir.")
    _check_model_file(workdir)
    assets = load_serving_assets(workdir)
    if export_base is None:
        export_base = os.path.join(workdir, "export" if format == "saved_model" else "tflite")
    # Fail fast, before the (slow) model load, on what write_versions would refuse.
    bases = [export_base]
    if format == "saved_model" and assets.modality == "text":
        bases.append(saved_model.token_ids_base(export_base))
    for base in bases:
        saved_model.check_export_base(base)
        if version is not None and not overwrite and os.path.exists(os.path.join(base, str(version))):
            raise UserError(
                f"export version {os.path.join(base, str(version))!r} exists; "
                f"pass --overwrite or another --version."
            )
    model = load_trained_model(workdir)
    metadata = {"backbone": assets.backbone, "config": _training_config(workdir)}
    if format == "saved_model":
        path = saved_model.export_saved_model(
            model, assets.preprocessor, assets.modality, assets.heads, export_base,
            version=version, overwrite=overwrite, metadata=metadata,
        )
        return {"path": path}
    return tflite.export_tflite(
        model, assets.preprocessor, assets.modality, assets.heads, export_base,
        version=version, overwrite=overwrite, quantize=quantize, metadata=metadata,
    )


def _training_config(workdir):
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)
