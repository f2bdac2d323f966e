"""tftransfer: transfer learning from foundation models with Keras 3 / TensorFlow.

Public API, re-exported lazily (PEP 562): `import tftransfer` loads neither
TensorFlow nor Keras and changes nothing in the process, so an entrypoint
can set up logging before TensorFlow starts; `tftransfer.load_backbone`
(or any name below, or a submodule such as `tftransfer.distill`) imports
what it needs on first use. Keras-serializable classes register themselves
where they are defined; `tftransfer.workdir.load_model` imports them before
loading a saved model.
"""

from tftransfer.lazy import lazy_exports

__version__ = "0.1.0"

# Public name -> the module that defines it. (`fine_tune` is reached as the
# module `tftransfer.fine_tune`, whose function is `tftransfer.fine_tune.fine_tune`:
# a lazy name equal to a submodule's would be replaced by the module once
# anything imports it.)
_EXPORTS = {
    "ExperimentConfig": "tftransfer.config",
    "HeadSpec": "tftransfer.heads",
    "LayerGroup": "tftransfer.backbones",
    "LoadedBackbone": "tftransfer.backbones",
    "ProgressiveUnfreezing": "tftransfer.callbacks",
    "SlantedTriangular": "tftransfer.schedules",
    "UserError": "tftransfer.errors",
    "build_model": "tftransfer.builders",
    "compile_for_heads": "tftransfer.builders",
    "export_saved_model": "tftransfer.export",
    "load_backbone": "tftransfer.backbones",
    "load_config": "tftransfer.config",
    "save_backbone_preset": "tftransfer.backbones",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
