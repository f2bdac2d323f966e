"""Serving export: SavedModel versions for TF Serving, and TFLite.

`python -m tftransfer.export --workdir=W` runs `tftransfer/export/__main__.py`
(which calls `export_workdir`). Library use:

- `export_saved_model(model, preprocessor, modality, heads, export_base)`:
  `<export_base>/<N>/` with `serving_default` (raw input) and
  `serve_preprocessed` signatures (text: plus the core-ops twin
  `<export_base>_token_ids/<N>/`).
- `export_tflite(...)`: `<export_base>/<N>/model.tflite` (preprocessed input).
- `save_serving_assets(W, loaded, heads)` / `load_serving_assets(W)`: the
  preprocessor and heads that `model.keras` lacks.

See README.md, "Serving".
"""

from tftransfer.export.assets import (
    ServingAssets,
    export_workdir,
    load_serving_assets,
    load_trained_model,
    save_serving_assets,
)
from tftransfer.export.saved_model import (
    build_archive,
    export_saved_model,
    head_outputs,
    next_version,
    token_ids_base,
)
from tftransfer.export.tflite import export_tflite

__all__ = [
    "ServingAssets",
    "build_archive",
    "export_saved_model",
    "export_tflite",
    "export_workdir",
    "head_outputs",
    "load_serving_assets",
    "load_trained_model",
    "next_version",
    "save_serving_assets",
    "token_ids_base",
]
