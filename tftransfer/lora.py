"""Low-rank adaptation (LoRA): train small adapters and the heads, keep the base frozen.

`train.lora: {rank: 8, alpha: 16, targets: default}` in a config (or
`enable_lora` from a notebook) freezes every backbone weight and adds a
rank-`r` update `(alpha / r) * A @ B` to the kernels of the target layers.
Only `A`, `B` and the heads train.

Rank `r` means what it means in Hu et al. 2021 (and PEFT): a rank-`r`
update of the layer's weight matrix, the kernel flattened to
`(fan_in, fan_out)` (the axes the input contracts, the axes it produces).
Keras' own `enable_lora` does exactly that for `Dense`, `Conv2D`,
`Embedding` and an `EinsumDense` whose only output axis is the kernel's last
one (attention output `(heads, head_dim, hidden)`), and we use it there. For
an `EinsumDense` with several output axes it falls short: it factorises
along the last axis only, so an attention query kernel `(hidden, heads,
head_dim)` gets `A: (hidden, heads, r)`, `B: (r, head_dim)`, rank `r` per
head (12x the parameters on MiniLM). Those layers get our own adapter
(`_FlatAdapter`): `A: (hidden, r)`, `B: (r, heads, head_dim)`.

Targets (`targets: default`):
- BERT family (keras-hub presets, local keras-hub dirs, Hugging Face BERT
  checkpoints through `tftransfer.hf_bert.HFBertBackbone`): keras-hub's own
  default, the attention `query` and `value` projections of every layer
  (`Backbone.default_lora_layer_names()`, Hu et al.'s choice).
- Convolutional backbones (ResNet): every `Conv2D` of the backbone, stem and
  shortcut projections included (a 1x1 or kxk kernel `(kh, kw, in, out)` gets
  `A: (kh, kw, in, r)`, `B: (r, out)`); BatchNorm stays frozen in inference
  mode, with the pretrained statistics.
- Or a list of layer names (`targets: [query, value, key]`): every layer of
  the backbone with that name gets an adapter.

Trainable parameters per target: `r * (fan_in + fan_out)` (e.g. BERT query
`(hidden, heads, head_dim)`: `r * (hidden + heads * head_dim)`; a Conv2D
kernel `(kh, kw, in, out)`: `r * (kh * kw * in + out)`).

We call the layers' `enable_lora` ourselves instead of keras-hub's
`Backbone.enable_lora`, because the latter takes no `alpha`, leaves the
target layers' biases trainable and knows no convolutional default.

The work dir keeps `W/lora/` (`adapter.json` + `weights.npz`): the adapters
and the heads only, with the base named by its preset / path and a SHA-256
of its weights. Format 2 (flattened adapters); an artefact of format 1
(per-head attention adapters, before 2026-12-06) is refused with a
one-line error: retrain it. `load_adapter_model(W/lora)` rebuilds the model on the named
base and refuses (UserError) a base whose weights changed;
`python -m tftransfer.export` exports a LoRA work dir from it with the
adapters merged into plain kernels (`merge`): the SavedModel has no LoRA
variables.

Combinations: an `unfreeze` schedule (or `lr_decay`) with LoRA is refused:
LoRA's point is that no base weight moves, while a schedule's point is to
move base weights group by group; unfreezing the adapters by group would be a
third thing nobody asked for. Distillation with LoRA (adapters on a
distilled student) is refused too: `tftransfer.distill` trains the whole
student. Both at config load, exit 2.
"""

import hashlib
import json
import os

import keras
import numpy as np
from absl import logging

from tftransfer.errors import UserError
from tftransfer.keras_private import kernel_variable, sublayers, weights_unlocked

ADAPTER_FILE = "adapter.json"
WEIGHTS_FILE = "weights.npz"
FORMAT_VERSION = 2
DEFAULT_TARGETS = "default"
LORA_WEIGHT_NAMES = ("lora_kernel_a", "lora_kernel_b")
FLAT_ADAPTER = "_tftransfer_lora_adapter"  # attribute of a layer with our own adapter
# Keras layers that implement `enable_lora`.
LORA_LAYER_TYPES = (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding,
                    keras.layers.Conv2D)


# ---------------------------------------------------------------------------
# Adapters on a backbone
# ---------------------------------------------------------------------------


def _layers(backbone):
    return sublayers(backbone)


def is_lora_weight(variable):
    return variable.path.rsplit("/", 1)[-1] in LORA_WEIGHT_NAMES


def default_targets(backbone):
    """Layer names that get adapters by default (see the module docstring)."""
    layers = _layers(backbone)
    names = {l.name for l in layers}
    if hasattr(backbone, "default_lora_layer_names"):
        chosen = [n for n in backbone.default_lora_layer_names() if n in names]
        if chosen:
            return chosen
    convs = sorted({l.name for l in layers if isinstance(l, keras.layers.Conv2D)})
    if convs:
        return convs
    raise UserError(
        f"train.lora.targets: default: backbone {backbone.name!r} has neither attention query/value "
        f"layers nor Conv2D layers; list the layer names to adapt (train.lora.targets: [...])."
    )


def resolve_targets(backbone, targets=DEFAULT_TARGETS):
    """The backbone layers named by `targets` (`"default"` or a list of names)."""
    names = default_targets(backbone) if targets == DEFAULT_TARGETS else list(targets)
    layers = _layers(backbone)
    chosen = []
    for name in names:
        found = [l for l in layers if l.name == name]
        if not found:
            import difflib

            known = sorted({l.name for l in layers if isinstance(l, LORA_LAYER_TYPES)})
            close = difflib.get_close_matches(name, known, n=3)
            raise UserError(
                f"train.lora.targets: no layer named {name!r} in backbone {backbone.name!r}"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + f"; layers that take adapters: {', '.join(known[:12])}{'...' if len(known) > 12 else ''}."
            )
        for layer in found:
            if not isinstance(layer, LORA_LAYER_TYPES):
                raise UserError(
                    f"train.lora.targets: layer {name!r} is a {type(layer).__name__}; LoRA adapts Dense, "
                    f"EinsumDense, Embedding and Conv2D layers only."
                )
            chosen.append(layer)
    return chosen


def enable_lora(backbone, rank, alpha=None, targets=DEFAULT_TARGETS):
    """Freeze `backbone` and add rank-`rank` adapters to the target layers.

    Args:
        backbone: keras.Model. The (built) backbone, e.g. `LoadedBackbone.model`.
        rank: int. Rank of the update `A @ B`.
        alpha: float. The update is scaled by `alpha / rank`. Defaults to
            None: `rank` (scale 1, Keras' default).
        targets: `"default"` or list of layer names. Defaults to `"default"`.

    Returns:
        list of the adapted layers.

    Example:
    ```python
    loaded = tftransfer.load_backbone(preset="path/to/bert_preset")
    model = tftransfer.build_model(loaded, heads)
    tftransfer.lora.enable_lora(loaded.model, rank=8, alpha=16)
    ```
    """
    layers = resolve_targets(backbone, targets)
    backbone.trainable = True
    for layer in _layers(backbone):
        layer.trainable = False
    for layer in layers:
        layer.trainable = True
        _add_adapter(layer, rank, alpha)
        bias = getattr(layer, "bias", None)
        if bias is not None:
            bias.trainable = False  # keras-hub leaves it trainable; LoRA trains A and B only
    return layers


class _FlatAdapter:
    """Our LoRA on an `EinsumDense` whose kernel has several output axes (see the module docstring).

    Keras' `EinsumDense.enable_lora` (3.15) factorises along the kernel's
    last axis only; here `A` spans the kernel axes the input contracts and
    `B` the output axes, so `A @ B` is a rank-`r` update of the flattened
    `(fan_in, fan_out)` matrix. Forward: `einsum(x, W) + (alpha / r) *
    einsum(einsum(x, A), B)`, then bias and activation, as Keras'
    `EinsumDense.call` (unquantised layers only). The layer keeps its class
    and config (no `lora_rank`): `model.save` stores the merged kernel and
    the bias, which reload as a plain `EinsumDense`.
    """

    def __init__(self, layer, rank, alpha):
        if layer.quantization_mode is not None or layer.kernel_constraint is not None:
            raise UserError(f"train.lora: layer {layer.name!r} is quantised or has a kernel constraint; "
                            f"LoRA adapts plain float kernels only.")
        x, rest = layer.equation.split(",")
        kernel, y = rest.split("->")
        k_in = "".join(a for a in kernel if a in x)
        k_out = "".join(a for a in kernel if a not in x)
        r = next(c for c in "zyxwvutsrqponmlkjihgfedcba" if c not in layer.equation)
        keep = "".join(a for a in y if a not in k_out)  # batch / sequence axes ("..." included)
        self.down, self.up = f"{x},{k_in}{r}->{keep}{r}", f"{keep}{r},{r}{k_out}->{y}"
        self.delta = f"{k_in}{r},{r}{k_out}->{kernel}"
        shape = dict(zip(kernel, kernel_variable(layer).shape))
        self.layer, self.scale = layer, (alpha if alpha is not None else rank) / rank
        self.rank, self.alpha = rank, alpha
        with weights_unlocked(layer):
            layer.lora_kernel_a = layer.add_weight(
                name="lora_kernel_a", shape=tuple(shape[a] for a in k_in) + (rank,), initializer="he_uniform",
                dtype="float32", regularizer=layer.kernel_regularizer)
            layer.lora_kernel_b = layer.add_weight(
                name="lora_kernel_b", shape=(rank,) + tuple(shape[a] for a in k_out), initializer="zeros",
                dtype="float32", regularizer=layer.kernel_regularizer)
            kernel_variable(layer).trainable = False
        object.__setattr__(layer, FLAT_ADAPTER, self)
        object.__setattr__(layer, "call", self.call)
        self.install_io()

    @staticmethod
    def needed(layer):
        """Whether Keras' own factorisation is not the flattened one (several output axes, or not last)."""
        if not isinstance(layer, keras.layers.EinsumDense):
            return False
        x, rest = layer.equation.split(",")
        kernel = rest.split("->")[0]
        return [a for a in kernel if a not in x] != [kernel[-1]]

    def merged_kernel(self):
        """`W + (alpha / r) * A @ B`, in the kernel's shape."""
        layer = self.layer
        update = keras.ops.einsum(self.delta, layer.lora_kernel_a, layer.lora_kernel_b)
        kernel = kernel_variable(layer)
        return keras.ops.add(kernel, keras.ops.cast(self.scale * update, kernel.dtype))

    def call(self, inputs, training=None):
        layer = self.layer
        x = keras.ops.einsum(layer.equation, inputs, kernel_variable(layer))
        lora_x = keras.ops.einsum(self.up, keras.ops.einsum(self.down, inputs, layer.lora_kernel_a),
                                  layer.lora_kernel_b)
        x = keras.ops.add(x, self.scale * lora_x)
        if layer.bias is not None:
            x = keras.ops.add(x, layer.bias)
        if layer.activation is not None:
            x = layer.activation(x)
        return x

    def install_io(self):
        """`save_own_variables` / `load_own_variables` of a plain `EinsumDense` with the merged kernel."""
        layer = self.layer

        def save_own_variables(store):
            store["0"] = keras.ops.convert_to_numpy(self.merged_kernel())
            if layer.bias is not None:
                store["1"] = keras.ops.convert_to_numpy(layer.bias)

        def load_own_variables(store):  # a merged kernel; fresh (zero) adapters, like Keras'
            kernel_variable(layer).assign(store["0"])
            if layer.bias is not None:
                layer.bias.assign(store["1"])
            layer.lora_kernel_a.assign(keras.ops.zeros(layer.lora_kernel_a.shape))
            layer.lora_kernel_b.assign(keras.ops.zeros(layer.lora_kernel_b.shape))

        object.__setattr__(layer, "save_own_variables", save_own_variables)
        object.__setattr__(layer, "load_own_variables", load_own_variables)


def _adapter(layer):
    return layer.__dict__.get(FLAT_ADAPTER)


def is_adapted(layer):
    return getattr(layer, "lora_enabled", False) or _adapter(layer) is not None


def _add_adapter(layer, rank, alpha):
    if _FlatAdapter.needed(layer):
        _FlatAdapter(layer, rank, alpha)
    else:
        layer.enable_lora(rank, lora_alpha=alpha)


def merged_kernel(layer):
    """The adapted layer's kernel (or embeddings) with its adapter merged in."""
    adapter = _adapter(layer)
    if adapter is not None:
        return adapter.merged_kernel()
    return layer.kernel if hasattr(layer, "_kernel") else layer.embeddings


def count_params(variables):
    return int(sum(np.prod(v.shape) for v in variables))


def base_hash(backbone):
    """SHA-256 over the backbone's base weights (adapters excluded), in order."""
    digest = hashlib.sha256()
    for v in backbone.weights:
        if is_lora_weight(v):
            continue
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(v))
        digest.update(f"{v.path}:{value.dtype}:{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _head_and_adapter_weights(model, backbone):
    """What the artefact stores: every weight outside the backbone, and the adapters."""
    inside = {id(v) for v in backbone.weights}
    return [v for v in model.weights if id(v) not in inside or is_lora_weight(v)]


# ---------------------------------------------------------------------------
# Training integration
# ---------------------------------------------------------------------------


class LoRATraining(keras.callbacks.Callback):
    """A LoRA run's state: stands in for `ProgressiveUnfreezing` in `fit`.

    At train begin it logs the trainable parameter count and its fraction of
    the model and of the backbone, and checks that nothing but adapters and
    heads trains. `save(W, heads)` writes `W/lora/`.
    """

    def __init__(self, model, backbone, layers, rank, alpha, targets, base, base_sha256):
        super().__init__()
        self.lora_model = model
        self.backbone = backbone
        self.layers = layers
        self.rank, self.alpha, self.targets = rank, alpha, targets
        self.base, self.base_sha256 = base, base_sha256
        raw_checkpoints(layers, True)

    def merged_checkpoints(self):
        """Checkpoint the adapted layers Keras' way again (merged kernels), for `model.save`.

        Not at `on_train_end`: after `fit` the run still loads the best
        epoch's weights (`train.keep: best`), written raw during training,
        and a resumed run calls `fit` twice (the interrupted epoch, then the
        rest), whose backups must all be raw. Call it once the shipped
        weights are in place, before saving the model.
        """
        raw_checkpoints(self.layers, False)

    def counts(self):
        model, backbone = self.lora_model, self.backbone
        trainable = count_params(model.trainable_weights)
        base = count_params([v for v in backbone.weights if not is_lora_weight(v)])
        adapters = count_params([v for v in backbone.weights if is_lora_weight(v)])
        total = count_params([v for v in model.weights if not is_lora_weight(v)])
        return {"trainable": trainable, "adapters": adapters, "backbone": base, "model": total,
                "trainable_fraction": trainable / max(total, 1),
                "adapter_fraction_of_backbone": adapters / max(base, 1)}

    def on_train_begin(self, logs=None):
        raw_checkpoints(self.layers, True)  # backups and best weights: every weight as it is
        backbone_trainable = [v for v in self.backbone.trainable_weights if not is_lora_weight(v)]
        if backbone_trainable:  # something unfroze the base after enable_lora
            raise UserError(f"train.lora: base weight {backbone_trainable[0].path} is trainable; "
                            f"LoRA keeps the backbone frozen (remove train.unfreeze).")
        c = self.counts()
        logging.info(
            "LoRA rank %d (alpha %s) on %d layers: %d trainable parameters = %.3f%% of the model's %d "
            "(adapters %d = %.3f%% of the backbone's %d)",
            self.rank, self.alpha if self.alpha is not None else self.rank, len(self.layers), c["trainable"],
            100 * c["trainable_fraction"], c["model"], c["adapters"], 100 * c["adapter_fraction_of_backbone"],
            c["backbone"],
        )

    def save(self, workdir, heads):
        """Write `W/lora/` (adapter.json + weights.npz) atomically; returns its path."""
        from tftransfer import workdir as workdir_lib
        from tftransfer.heads import head_to_dict

        if base_hash(self.backbone) != self.base_sha256:  # a bug, not a user error
            raise RuntimeError("LoRA: the frozen base weights changed during training.")
        variables = _head_and_adapter_weights(self.lora_model, self.backbone)
        target = os.path.join(workdir, workdir_lib.LORA)
        info = {
            "format_version": FORMAT_VERSION,
            "rank": self.rank, "alpha": self.alpha, "targets": self.targets,
            "adapted_layers": [l.path for l in self.layers],
            "base": self.base, "base_sha256": self.base_sha256,
            "heads": [head_to_dict(h) for h in heads],
            "variables": [{"path": v.path, "shape": list(v.shape)} for v in variables],
            "params": self.counts(),
        }
        arrays = {f"v{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(variables)}
        def fill(directory):
            workdir_lib.write_json(os.path.join(directory, ADAPTER_FILE), info)
            np.savez(os.path.join(directory, WEIGHTS_FILE), **arrays)

        workdir_lib.write_directory(target, fill)
        return target


def raw_checkpoints(layers, on):
    """Checkpoint the adapted layers' weights as they are (base kernel, bias, A, B), or Keras' way again.

    Keras 3.15's `save_own_variables` stores an adapted kernel with the
    adapter merged in, and `load_own_variables` loads it into the kernel and
    zeroes the adapters (so does `_FlatAdapter`). Right for `model.save` (a plain, merged model), wrong
    for `BackupAndRestore`: a resumed run would bake the adapters into the
    frozen base and restart them from zero. While training, the adapted layers
    use the base `Layer` methods instead: every weight saved and loaded as is.
    """
    for layer in layers:
        if on:
            object.__setattr__(layer, "save_own_variables",
                               keras.layers.Layer.save_own_variables.__get__(layer))
            object.__setattr__(layer, "load_own_variables",
                               keras.layers.Layer.load_own_variables.__get__(layer))
        else:
            for name in ("save_own_variables", "load_own_variables"):
                layer.__dict__.pop(name, None)
            if _adapter(layer) is not None:
                _adapter(layer).install_io()


def base_spec(backbone_config):
    """The `load_backbone` arguments that name the base, from `cfg.backbone`; UserError for a random init."""
    b = backbone_config
    if b.spec is not None or not b.load_weights:
        raise UserError(
            "train.lora needs a pretrained base that can be named again (backbone.preset or "
            "backbone.keras_application with weights); a randomly initialised backbone cannot be."
        )
    base = {"image_size": b.image_size, "sequence_length": b.sequence_length}
    if b.preset:
        preset = b.preset
        if os.path.exists(preset):
            preset = os.path.abspath(preset)
        base["preset"] = preset
    else:
        base.update(keras_application=b.keras_application, weights=b.weights)
    return base


def apply_from_config(cfg, loaded, model):
    """`train.lora` of a config applied to a built model; None when unset.

    Args:
        cfg: ExperimentConfig.
        loaded: `LoadedBackbone` inside `model`.
        model: keras.Model from `build_model` (not yet compiled).

    Returns:
        `LoRATraining` (a callback to use instead of `ProgressiveUnfreezing`)
        or None.
    """
    lora = cfg.train.lora
    if lora is None:
        return None
    base = base_spec(cfg.backbone)
    sha = base_hash(loaded.model)
    layers = enable_lora(loaded.model, lora.rank, lora.alpha, lora.targets)
    return LoRATraining(model, loaded.model, layers, lora.rank, lora.alpha, lora.targets, base, sha)


# ---------------------------------------------------------------------------
# Reloading and merging
# ---------------------------------------------------------------------------


def is_artefact(directory):
    return os.path.isfile(os.path.join(directory, ADAPTER_FILE))


def read_artefact(directory):
    path = os.path.join(directory, ADAPTER_FILE)
    try:
        with open(path) as f:
            info = json.load(f)
        with np.load(os.path.join(directory, WEIGHTS_FILE)) as data:
            arrays = [data[f"v{i}"] for i in range(len(info["variables"]))]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"LoRA artefact {directory!r} is unreadable ({e}); re-run training.")
    if info.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"LoRA artefact {directory!r} has format_version {info.get('format_version')!r}; this tftransfer reads "
            f"{FORMAT_VERSION} (rank-r adapters of the flattened attention projections, not per head); retrain it.")
    return info, arrays


def load_adapters(model, backbone, directory):
    """Enable LoRA on a fresh `model` (same base and heads) and load the artefact into it.

    Raises:
        UserError: the backbone's weights are not those the adapters were
            trained on (hash mismatch), or the structure differs.
    """
    info, arrays = read_artefact(directory)
    sha = base_hash(backbone)
    if sha != info["base_sha256"]:
        raise UserError(
            f"LoRA adapters in {directory!r} were trained on base {_name(info['base'])} with weights sha256 "
            f"{info['base_sha256'][:12]}..., but that base now has {sha[:12]}...; the base changed. Restore it "
            f"or retrain the adapters."
        )
    enable_lora(backbone, info["rank"], info["alpha"], info["targets"])
    variables = _head_and_adapter_weights(model, backbone)
    shapes = [tuple(v["shape"]) for v in info["variables"]]
    if [tuple(v.shape) for v in variables] != shapes:
        raise UserError(f"LoRA artefact {directory!r} does not fit this model (heads or targets differ).")
    for variable, value in zip(variables, arrays):
        variable.assign(value)
    return info


def _name(base):
    return repr(base.get("preset") or base.get("keras_application"))


def load_adapter_model(directory):
    """Rebuild the LoRA model from an artefact on its named base.

    Returns:
        (model, loaded backbone, heads, info).
    """
    from tftransfer.backbones import load_backbone
    from tftransfer.builders import build_model
    from tftransfer.heads import HeadSpec

    info, _ = read_artefact(directory)
    base = info["base"]
    if base.get("preset") and base["preset"].startswith("/") and not os.path.exists(base["preset"]):
        raise UserError(f"LoRA base {base['preset']!r} (named in {directory!r}) is missing; restore it.")
    loaded = load_backbone(**base)
    heads = [HeadSpec(**{**h, "class_names": tuple(h["class_names"]) if h.get("class_names") else None})
             for h in info["heads"]]
    model = build_model(loaded, heads)
    load_adapters(model, loaded.model, directory)
    return model, loaded, heads, info


def _strip_lora(config):
    if isinstance(config, dict):
        return {k: _strip_lora(v) for k, v in config.items() if k not in ("lora_rank", "lora_alpha")}
    if isinstance(config, list):
        return [_strip_lora(v) for v in config]
    return config


def merge(model):
    """A copy of `model` with every adapter merged into its kernel and no LoRA variables.

    Each adapted kernel becomes `W + (alpha / r) * A @ B` (`merged_kernel`);
    all other weights are copied. Built from the
    model's config with `lora_rank` removed, so nothing re-creates adapters.
    """
    from tftransfer import workdir

    workdir.import_serializable_classes()
    plain = keras.saving.deserialize_keras_object(_strip_lora(keras.saving.serialize_keras_object(model)))
    merged = {}
    for layer in sublayers(model):
        if is_adapted(layer):
            merged[id(kernel_variable(layer))] = merged_kernel(layer)
    source = [v for v in model.weights if not is_lora_weight(v)]
    target = plain.weights
    if [tuple(v.shape) for v in source] != [tuple(v.shape) for v in target]:
        raise RuntimeError("LoRA merge: the plain model's weights do not line up with the LoRA model's.")
    for src, dst in zip(source, target):
        dst.assign(merged.get(id(src), src))
    return plain
