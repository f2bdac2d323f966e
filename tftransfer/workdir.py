"""The work-dir layout and the rules that keep it consistent.

    W/config.yaml     resolved config (written once inputs validated)
    W/checkpoints/    best.weights.h5 (the best epoch by train.monitor)
    W/history.json    every epoch's logs and the best epoch (resume-safe)
    W/train_ids.json  k-shot runs: positions of the kept training examples
    W/backup/         keras.callbacks.BackupAndRestore (resume after a kill)
    W/logs/           TensorBoard
    W/model.keras     the trained model (safe_mode loadable)
    W/preprocessor/   the backbone's preprocessing (keras-hub preset format)
    W/heads.json      head names, types and class names
    W/export/<N>/     SavedModel versions for TF Serving (text models also
                      W/export_token_ids/<N>/: core-ops-only twin)
    W/tflite/<N>/     TFLite exports (`python -m tftransfer.export --format=tflite`)
    W/report/         `python -m tftransfer.evaluate`: report.md, PNGs, metrics_<split>.json
    W/cache/          computed once, reused on resume: teacher outputs (distill.cache: disk),
                      W/cache/data/<split>-<key>/ preprocessed examples (data.cache: disk,
                      tftransfer.data.cache), W/cache/features/<key>/<split>.npz pooled
                      backbone features (train.cache_features)
    W/lora/           LoRA runs: adapters + heads, base named and hashed (tftransfer.lora)
    W/contrastive/    train.recipe contrastive: the pair-tuned backbone weights and the
                      phase's report (a resumed run loads them; tftransfer.contrastive)
    W/metrics.json    written last: its presence means the run finished

An ensemble dir (`python -m tftransfer.export --workdir=E --ensemble=W1,W2`)
holds E/ensemble.json (the member work dirs), E/config.yaml, E/heads.json and
E/preprocessor/ (the first member's, shared by all), and E/export/<N>/.

Files are written to a temporary name and renamed, so a crash never leaves
a half-written file under its final name.
"""

import json
import os
import tempfile

from tftransfer.errors import UserError

CONFIG = "config.yaml"
METRICS = "metrics.json"
BACKUP = "backup"
CHECKPOINTS = "checkpoints"
LOGS = "logs"
EXPORT = "export"
MODEL = "model.keras"
BACKBONE_PRESET = "backbone_preset"
PREPROCESSOR = "preprocessor"
HEADS = "heads.json"
HISTORY = "history.json"
TRAIN_IDS = "train_ids.json"
BEST_WEIGHTS = os.path.join(CHECKPOINTS, "best.weights.h5")
REPORT = "report"
LORA = "lora"
CONTRASTIVE = "contrastive"
ENSEMBLE = "ensemble.json"
CACHE = "cache"
DATA_CACHE = os.path.join(CACHE, "data")
FEATURE_CACHE = os.path.join(CACHE, "features")
RUN_OUTPUTS = (CONFIG, METRICS, BACKUP, CHECKPOINTS, LOGS, EXPORT, MODEL, BACKBONE_PRESET,
               PREPROCESSOR, HEADS, HISTORY, TRAIN_IDS, "export_token_ids", "tflite", REPORT, CACHE, LORA,
               CONTRASTIVE)


def atomic_write_text(path, text):
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_directory(path, fill):
    """Replace directory `path` atomically: `fill(tmp_dir)` fills a temporary twin first.

    The twin is renamed into place only when `fill` succeeded; on any failure
    the previous directory (if any) is back under its name and no temporary
    directory is left.
    """
    import shutil

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-dir-", dir=parent)
    old = None
    try:
        fill(tmp)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".tmp-old-", dir=parent)
            os.rename(path, os.path.join(old, "d"))
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old and not os.path.exists(path):
            os.rename(os.path.join(old, "d"), path)
        raise
    finally:
        if old:
            shutil.rmtree(old, ignore_errors=True)


def write_json(path, data):
    """`data` as strict JSON (a NaN or infinity becomes null), atomically."""
    text = json.dumps(_finite(data), indent=2, sort_keys=True, default=float, allow_nan=False)
    atomic_write_text(path, text + "\n")


def _finite(value):
    """`value` with every non-finite float replaced by None (strict JSON has no NaN)."""
    import math

    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        try:
            value = value.item()
        except (TypeError, ValueError):
            return value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def import_serializable_classes():
    """Import every module whose Keras-serializable classes tftransfer's
    models may hold; each registers its classes where they are defined."""
    import keras_hub  # noqa: F401  (registers keras-hub classes)

    from tftransfer import hf_bert, losses, schedules  # noqa: F401  (register themselves)


def load_model(path, where="model"):
    """A saved `.keras` model, loaded in safe mode (no Lambda layers), uncompiled.

    The one loader for tftransfer's saved models: it first imports the
    modules whose Keras-serializable classes such models may hold
    (keras-hub's backbones, `HFBertBackbone`, `SlantedTriangular`,
    `DistillationLoss`), which register themselves where they are defined.

    Args:
        path: str. A `.keras` file.
        where: str. What the file is, for the error (a config key or flag).
            Defaults to `"model"`.

    Raises:
        UserError: the file is missing, truncated, or not a Keras model; or
            it holds a Lambda layer (refused by safe mode).
    """
    import keras

    import_serializable_classes()
    if not os.path.isfile(path):
        raise UserError(f"{where} {path!r} is missing; train first or pass a saved .keras model.")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # A corrupt or foreign file raises many types.
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{where} {path!r} could not be loaded as a Keras model: {first[:200]}")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def check_can_start(workdir, config_text, overwrite=False):
    """Refuse to clobber a finished run or resume with a different config.

    Returns True when a previous run's backup will be resumed.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir!r} is a file; pass a directory.")
    check_creatable(workdir)
    if not os.path.isdir(workdir):
        return False
    if os.path.exists(os.path.join(workdir, METRICS)) and not overwrite:
        raise UserError(
            f"--workdir {workdir!r} holds a finished run ({METRICS}); pass a new --workdir or --overwrite."
        )
    backup = os.path.join(workdir, BACKUP)
    resuming = os.path.isdir(backup) and bool(os.listdir(backup)) and not overwrite
    config_path = os.path.join(workdir, CONFIG)
    if resuming and os.path.exists(config_path):
        with open(config_path) as f:
            if f.read() != config_text:
                raise UserError(
                    f"--workdir {workdir!r} holds an unfinished run with a different config; "
                    f"re-run with the same config to resume, or pass --overwrite to start over."
                )
    return resuming


def check_creatable(workdir):
    """UserError unless `workdir` exists writable or could be created, without creating it.

    Called first thing after the config loads, so a bad `--workdir` is found
    before any data is read or model built, and a failed check leaves the
    file system as it was.
    """
    path = os.path.abspath(workdir)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if not os.path.isdir(path):
        raise UserError(f"--workdir {workdir!r} cannot be created: {path!r} is a file; pass another directory.")
    if not os.access(path, os.W_OK | os.X_OK):
        what = "is not writable" if os.path.abspath(workdir) == path else f"cannot be created in {path!r} (not writable)"
        raise UserError(f"--workdir {workdir!r} {what}; pass a writable directory.")


def clear(workdir):
    """Remove what a previous run left (for --overwrite)."""
    import shutil

    for name in RUN_OUTPUTS:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
