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

# Defining module -> its public names; imported on first use (see tftransfer.lazy).
_MODULES = {
    "tftransfer.export.assets": ("ServingAssets", "export_workdir", "load_serving_assets",
        "load_trained_model", "save_serving_assets"),
    "tftransfer.export.saved_model": ("build_archive", "export_saved_model", "head_outputs",
        "next_version", "token_ids_base"),
    "tftransfer.export.tflite": ("export_tflite",),
    "tftransfer.export.ensemble": ("export_ensemble",),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _MODULES, globals())
