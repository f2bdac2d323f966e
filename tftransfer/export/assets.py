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
                        "heads": [{HeadSpec fields, class_names: [...]}],
                        "pair": true for sentence-pair text models}

`load_serving_assets(W)` reads them back (with keras-hub's public
deserialisation: nothing needs the original backbone), and `export_workdir`
is what `python -m tftransfer.export` runs: reload `W/model.keras` in safe
mode and write a SavedModel or TFLite version.
"""

import dataclasses
import json
import os

from tftransfer import workdir as workdir_lib
from tftransfer.errors import UserError

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
    pair: bool. Text inputs are sentence pairs (serving takes `text` and
        `text_pair`).
    """

    preprocessor: object
    modality: str
    heads: list
    backbone: dict
    pair: bool = False


def save_serving_assets(workdir, loaded, heads, pair=False):
    """Save `W/preprocessor/` and `W/heads.json` (each replaced atomically).

    Args:
        workdir: str. The work dir (created if missing).
        loaded: `tftransfer.LoadedBackbone`. Its `preprocessor`, `modality`
            and `description` are saved.
        heads: list of `HeadSpec`.
        pair: bool. A sentence-pair text model. Defaults to False.

    Example:
    ```python
    save_serving_assets("runs/x", loaded, heads)
    assets = load_serving_assets("runs/x")
    assets.heads[0].class_names  # ('cat', 'dog')
    ```
    """
    from tftransfer.heads import head_to_dict
    from tftransfer.workdir import write_directory, write_json

    preprocessor = loaded.preprocessor
    if not hasattr(preprocessor, "save_to_preset"):
        raise UserError(
            f"backbone preprocessor {type(preprocessor).__name__} cannot be saved for serving "
            f"(no save_to_preset); use a keras-hub image converter or text preprocessor."
        )
    # The preset directory appears whole or not at all.
    write_directory(os.path.join(workdir, workdir_lib.PREPROCESSOR), preprocessor.save_to_preset)
    write_json(os.path.join(workdir, workdir_lib.HEADS), {
        "format_version": FORMAT_VERSION,
        "modality": loaded.modality,
        "backbone": loaded.description,
        "heads": [head_to_dict(h) for h in heads],
        **({"pair": True} if pair else {}),
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

    heads_path = os.path.join(workdir, workdir_lib.HEADS)
    preset = os.path.join(workdir, workdir_lib.PREPROCESSOR)
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
    return ServingAssets(preprocessor, modality, heads, info.get("backbone", {}), bool(info.get("pair")))


def load_trained_model(workdir):
    """`W/model.keras` loaded in safe mode (no Lambda layers), uncompiled."""
    from tftransfer.workdir import load_model

    return load_model(_check_model_file(workdir), "--workdir model")


def load_workdir_model(workdir):
    """The served network of a trained work dir: `W/model.keras`, or for a LoRA
    run its base (hash-checked) with the adapters merged into plain kernels."""
    from tftransfer import lora
    from tftransfer.workdir import LORA

    if lora.is_artefact(os.path.join(workdir, LORA)):
        return lora.merge(lora.load_adapter_model(os.path.join(workdir, LORA))[0])
    return load_trained_model(workdir)


def _check_model_file(workdir):
    path = os.path.join(workdir, workdir_lib.MODEL)
    if not os.path.isfile(path):
        raise UserError(
            f"{path!r} is missing: train first (python -m tftransfer.train --workdir={workdir} ...)."
        )
    return path


def export_workdir(workdir, export_base=None, version=None, overwrite=False,
                   format="saved_model", quantize="none", representative_data=None,
                   validation_data=None, max_accuracy_drop=None, integer_only=False):
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
        quantize: str. TFLite: `"none"`, `"float16"`, `"dynamic_range"` or
            `"int8"`; SavedModel: `"none"` or `"int8"` (Keras'
            `model.quantize`, text models). Defaults to `"none"`.
        representative_data: int8 TFLite: input batches from the training
            data (see `tflite.convert`). Defaults to None.
        validation_data: `(inputs, {head: labels})` batches: a quantised
            export is scored on them against the float model and refused
            over `max_accuracy_drop` (see `tftransfer.export.quantize`).
            Defaults to None (not measured).
        max_accuracy_drop: float. Defaults to None:
            `quantize.DEFAULT_MAX_ACCURACY_DROP`.
        integer_only: bool. int8 TFLite of a text model: every op int8
            (`tflite.convert`). Defaults to False.

    Returns:
        dict. `path` (the version directory), `accuracy` (quantised exports)
        and, for TFLite, sizes.
    """
    from tftransfer.export import quantize as quantize_lib
    from tftransfer.export import saved_model, tflite

    if max_accuracy_drop is None:
        max_accuracy_drop = quantize_lib.DEFAULT_MAX_ACCURACY_DROP
    max_accuracy_drop = quantize_lib.check_max_accuracy_drop(max_accuracy_drop)

    if format not in ("saved_model", "tflite"):
        raise UserError(f"--format must be saved_model or tflite. Received: {format!r}.")
    if quantize not in tflite.QUANTIZE_MODES:
        raise UserError(
            f"--quantize must be one of {', '.join(tflite.QUANTIZE_MODES)}. Received: {quantize!r}."
        )
    if format == "saved_model" and quantize not in ("none", "int8"):
        raise UserError(
            f"--quantize={quantize} applies to --format=tflite only (SavedModels: none or int8); "
            f"drop it or pass --format=tflite."
        )
    tflite.check_integer_only(quantize, integer_only, format)
    if not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir!r} is not a directory; pass a trained work dir.")
    from tftransfer.export import ensemble

    if ensemble.is_ensemble_dir(workdir) and not os.path.isfile(os.path.join(workdir, workdir_lib.MODEL)):
        raise UserError(f"--workdir {workdir!r} is an ensemble dir; export it again with "
                        f"--ensemble=<the member work dirs> (listed in its ensemble.json).")
    _check_model_file(workdir)
    assets = load_serving_assets(workdir)
    if export_base is None:
        export_base = os.path.join(workdir, "export" if format == "saved_model" else "tflite")
    # Fail fast, before the (slow) model load, on what write_versions would refuse.
    bases = [export_base]
    if format == "saved_model" and assets.modality == "text":
        bases.append(saved_model.token_ids_base(export_base))
    created = [base for base in bases if not os.path.exists(base)]
    try:
        return _export(workdir, assets, bases, export_base, version, overwrite, format, quantize,
                       representative_data, validation_data, max_accuracy_drop, integer_only)
    except BaseException:
        for base in created:  # a refused export leaves nothing behind, not even its base
            if os.path.isdir(base) and not os.listdir(base):
                os.rmdir(base)
        raise


def _export(workdir, assets, bases, export_base, version, overwrite, format, quantize,
            representative_data, validation_data, max_accuracy_drop, integer_only=False):
    from tftransfer.export import quantize as quantize_lib
    from tftransfer.export import saved_model, tflite

    for base in bases:
        saved_model.check_export_base(base)
        if version is not None and not overwrite and os.path.exists(os.path.join(base, str(version))):
            raise UserError(
                f"export version {os.path.join(base, str(version))!r} exists; "
                f"pass --overwrite or another --version."
            )
    if format == "saved_model" and quantize == "int8":
        quantize_lib.check_keras_int8(assets.modality)  # before the slow model load
    model = load_workdir_model(workdir)
    metadata = {"backbone": assets.backbone, "config": _training_config(workdir)}
    # Served images are composited over the training data's background.
    background = ((metadata["config"] or {}).get("data") or {}).get("image_background")
    if format == "saved_model":
        record = None
        if quantize == "int8":
            validation_data = list(validation_data) if validation_data is not None else None
            heads = assets.heads
            float_accuracy = validation_data and quantize_lib.accuracy(
                quantize_lib.keras_predict(model, heads), validation_data, heads)
            quantize_lib.keras_int8(model, assets.modality)
            if validation_data:
                quantized_accuracy = quantize_lib.accuracy(
                    quantize_lib.keras_predict(model, heads), validation_data, heads)
                record = quantize_lib.compare(float_accuracy, quantized_accuracy, heads, "int8", max_accuracy_drop)
            metadata["accuracy"] = record
        path = saved_model.export_saved_model(
            model, assets.preprocessor, assets.modality, assets.heads, export_base,
            version=version, overwrite=overwrite, metadata=metadata, image_background=background,
            pair=assets.pair,
        )
        return {"path": path, "accuracy": record}
    return tflite.export_tflite(
        model, assets.preprocessor, assets.modality, assets.heads, export_base,
        version=version, overwrite=overwrite, quantize=quantize, metadata=metadata,
        representative_data=representative_data, validation_data=validation_data,
        max_accuracy_drop=max_accuracy_drop, integer_only=integer_only,
    )


def _training_config(workdir):
    path = os.path.join(workdir, workdir_lib.CONFIG)
    if not os.path.isfile(path):
        return None
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)
