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

# Defining module -> its public names. (`fine_tune` is reached as the
# module `tftransfer.fine_tune`, whose function is `tftransfer.fine_tune.fine_tune`:
# a lazy name equal to a submodule's would be replaced by the module once
# anything imports it.)
_MODULES = {
    "tftransfer.config": ("ExperimentConfig", "load_config"),
    "tftransfer.heads": ("HeadSpec",),
    "tftransfer.backbones": ("LayerGroup", "LoadedBackbone", "load_backbone", "save_backbone_preset"),
    "tftransfer.callbacks": ("ProgressiveUnfreezing",),
    "tftransfer.schedules": ("SlantedTriangular",),
    "tftransfer.errors": ("UserError",),
    "tftransfer.builders": ("build_model", "compile_for_heads"),
    "tftransfer.export": ("export_saved_model",),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _MODULES, globals())
