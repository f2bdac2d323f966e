"""The work-dir layout and the rules that keep it consistent.

    W/config.yaml     resolved config (written once inputs validated)
    W/checkpoints/    last.weights.h5, best.weights.h5
    W/backup/         keras.callbacks.BackupAndRestore (resume after a kill)
    W/logs/           TensorBoard
    W/model.keras     the trained model (safe_mode loadable)
    W/preprocessor/   the backbone's preprocessing (keras-hub preset format)
    W/heads.json      head names, types and class names
    W/export/<N>/     SavedModel versions for TF Serving (text models also
                      W/export_token_ids/<N>/: core-ops-only twin)
    W/tflite/<N>/     TFLite exports (`python -m tftransfer.export --format=tflite`)
    W/lora/           LoRA runs: adapters + heads, base named and hashed (tftransfer.lora)
    W/metrics.json    written last: its presence means the run finished

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
LORA = "lora"
RUN_OUTPUTS = (CONFIG, METRICS, BACKUP, CHECKPOINTS, LOGS, EXPORT, MODEL, BACKBONE_PRESET,
               PREPROCESSOR, HEADS, "export_token_ids", "tflite", "report", "cache", LORA)


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


def write_directory(path, writers):
    """Replace directory `path` atomically: each `writers[name](file path)` fills a temporary twin first."""
    import shutil

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-dir-", dir=parent)
    old = None
    try:
        for name, write in writers.items():
            write(os.path.join(tmp, name))
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
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def check_can_start(workdir, config_text, overwrite=False):
    """Refuse to clobber a finished run or resume with a different config.

    Returns True when a previous run's backup will be resumed.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir!r} is a file; pass a directory.")
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


def clear(workdir):
    """Remove what a previous run left (for --overwrite)."""
    import shutil

    for name in RUN_OUTPUTS:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
