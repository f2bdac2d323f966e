"""tftransfer: transfer learning from foundation models with Keras 3 / TensorFlow.

Public API (explicit re-exports; nothing registers itself by import side effect
except the Keras-serializable classes that saved models need: HFBertBackbone,
SlantedTriangular).
"""

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tftransfer.backbones import LayerGroup, LoadedBackbone, load_backbone, save_backbone_preset  # noqa: E402
from tftransfer.builders import build_model, compile_for_heads  # noqa: E402
from tftransfer.callbacks import ProgressiveUnfreezing  # noqa: E402
from tftransfer.config import ExperimentConfig, load_config  # noqa: E402
from tftransfer.errors import UserError  # noqa: E402
from tftransfer.export import export_saved_model  # noqa: E402
from tftransfer.fine_tune import fine_tune  # noqa: E402
from tftransfer.heads import HeadSpec  # noqa: E402
from tftransfer import hf_bert  # noqa: E402,F401  (registers HFBertBackbone: saved text models load after import)
from tftransfer.schedules import SlantedTriangular  # noqa: E402  (saved models using it load after import)

__version__ = "0.1.0"

__all__ = [
    "ExperimentConfig",
    "HeadSpec",
    "LayerGroup",
    "LoadedBackbone",
    "ProgressiveUnfreezing",
    "SlantedTriangular",
    "UserError",
    "build_model",
    "compile_for_heads",
    "export_saved_model",
    "fine_tune",
    "load_backbone",
    "load_config",
    "save_backbone_preset",
]
