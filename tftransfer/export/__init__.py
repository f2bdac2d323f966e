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
- `export_ensemble([W1, W2], E)`: one SavedModel serving the mean of the
  members' probabilities (`tftransfer.export.ensemble`).

See README.md, "Serving".
"""

from tftransfer.lazy import lazy_exports

# Public name -> defining module; imported on first use (see tftransfer.lazy).
_EXPORTS = {
    "ServingAssets": "tftransfer.export.assets",
    "export_workdir": "tftransfer.export.assets",
    "load_serving_assets": "tftransfer.export.assets",
    "load_trained_model": "tftransfer.export.assets",
    "save_serving_assets": "tftransfer.export.assets",
    "build_archive": "tftransfer.export.saved_model",
    "export_saved_model": "tftransfer.export.saved_model",
    "head_outputs": "tftransfer.export.saved_model",
    "next_version": "tftransfer.export.saved_model",
    "token_ids_base": "tftransfer.export.saved_model",
    "export_tflite": "tftransfer.export.tflite",
    "export_ensemble": "tftransfer.export.ensemble",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
