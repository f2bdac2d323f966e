"""Load a pretrained (or randomly initialised) backbone with its preprocessing.

One entry point, `load_backbone`, accepts every way a user names a network:

- a keras-hub preset name (`resnet_50_imagenet`, `bert_base_en_uncased`) or a
  `kaggle://` / `hf://` handle (downloads: needs network);
- a local directory in keras-hub preset format (`Backbone.save_to_preset`);
- a local Hugging Face BERT checkpoint directory (`config.json` with
  `model_type: bert`, `model.safetensors`, `vocab.txt`), converted with the
  checkpoint's own activation and layer-norm settings (`tftransfer.hf_bert`);
- a local Hugging Face directory of another family (`HF_FAMILIES`) or a
  local timm directory (`TIMM_FAMILIES`), through keras-hub's converters;
  `local_checkpoint_format` tells them apart and names what cannot load;
- an architecture spec with random init (`{"architecture": "resnet", ...}`);
- `keras.applications.ResNet50` (ImageNet weights or a local weights file).

It returns a `LoadedBackbone`: the network, the preprocessing that matches it
(images: resize + the backbone's normalisation; text: the keras-hub
tokenizer/preprocessor), and the backbone's ordered layer groups (bottom to
top) that progressive unfreezing and discriminative learning rates work on.
"""

import dataclasses
import json
import os
import re

import keras
import keras_hub

from tftransfer.errors import UserError
from tftransfer.keras_private import sublayers

# ImageNet mean/std in RGB order, on 0-255 pixels: what keras-hub's ResNet
# presets use, and our default for randomly initialised image backbones.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# keras.applications "caffe" mode subtracts these from BGR pixels.
CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)

DEFAULT_RESNET_SPEC = {
    "input_conv_filters": [64],
    "input_conv_kernel_sizes": [7],
    "stackwise_num_filters": [64, 128, 256, 512],
    "stackwise_num_blocks": [3, 4, 6, 3],
    "stackwise_num_strides": [1, 2, 2, 2],
    "block_type": "bottleneck_block",
}
# The smallest keras-hub ResNet of the real architecture (stem filters must
# be 64 for basic blocks): for smoke tests, notebooks and docstring examples.
TINY_RESNET_SPEC = {
    "architecture": "resnet",
    "input_conv_filters": [64],
    "input_conv_kernel_sizes": [3],
    "stackwise_num_filters": [64, 128],
    "stackwise_num_blocks": [1, 1],
    "stackwise_num_strides": [1, 2],
    "block_type": "basic_block",
}
DEFAULT_BERT_SPEC = {
    "num_layers": 12,
    "num_heads": 12,
    "hidden_dim": 768,
    "intermediate_dim": 3072,
    "max_sequence_length": 512,
}
KERAS_APPLICATIONS = ("ResNet50",)


@dataclasses.dataclass
class LayerGroup:
    """A named, contiguous slice of the backbone that (un)freezes as a unit.

    name: str. e.g. `stem`, `stack2`, `embeddings`, `transformer_layer_3`.
    layers: list of `keras.layers.Layer`.
    """

    name: str
    layers: list

    @property
    def variables(self):
        return [v for layer in self.layers for v in layer.weights]


@dataclasses.dataclass
class LoadedBackbone:
    """A backbone ready for a head.

    model: keras.Model. Images: float image batch (after `preprocessor`) ->
        feature map `(batch, h, w, channels)`. Text: dict of `token_ids`,
        `segment_ids` (families that have them), `padding_mask` -> dict
        with `sequence_output` (and `pooled_output` for BERT, ALBERT,
        ELECTRA), or the sequence output tensor itself (RoBERTa, XLM-R,
        DistilBERT, DeBERTaV3). ViT / DeiT / DINOv2: `(batch, tokens, dim)`.
    modality: str. `"image"` or `"text"`.
    preprocessor: callable layer from raw input to `model` input. Images: a
        keras-hub `ImageConverter` on 0-255 RGB pixels (one image or a
        batch). Text: a keras-hub `TextClassifierPreprocessor` on strings.
    layer_groups: list of `LayerGroup`, ordered bottom (input) to top.
    description: dict. JSON-able record of where the backbone came from.
    """

    model: keras.Model
    modality: str
    preprocessor: object
    layer_groups: list
    description: dict

    @property
    def image_size(self):
        if self.modality != "image":
            return None
        return tuple(self.preprocessor.image_size)

    @property
    def sequence_length(self):
        if self.modality != "text":
            return None
        return self.preprocessor.sequence_length


def load_backbone(
    preset=None,
    *,
    spec=None,
    keras_application=None,
    weights="imagenet",
    load_weights=True,
    image_size=None,
    sequence_length=128,
):
    """Load a backbone, its preprocessing and its layer groups.

    Args:
        preset: str. keras-hub preset name, `kaggle://` / `hf://` handle, or
            local directory (keras-hub preset or Hugging Face BERT format).
        spec: dict. Architecture with random init: `architecture` is
            `resnet` (other keys: `keras_hub.models.ResNetBackbone` args;
            ResNet-50 layout by default) or `bert` (other keys:
            `keras_hub.models.BertBackbone` args plus `vocabulary`, a
            `vocab.txt` path or a list of tokens).
        keras_application: str. `"ResNet50"`: `keras.applications.ResNet50`
            without its top, converted to take RGB input.
        weights: str. For `keras_application`: `"imagenet"`, a local weights
            file, or None. Defaults to `"imagenet"`.
        load_weights: bool. False: the preset's architecture with random
            init (the "from scratch" baseline). Defaults to True.
        image_size: int. Side the image preprocessor resizes to. Defaults to
            the preset's own size, else 224.
        sequence_length: int. Text: tokens per example. Defaults to 128.

    Returns:
        LoadedBackbone.

    Raises:
        UserError: unknown preset, missing directory, no network for a
            download, or a bad spec.

    Example:
    ```python
    loaded = tftransfer.load_backbone(spec=TINY_RESNET_SPEC, image_size=32)
    [g.name for g in loaded.layer_groups]  # ['stem', 'stack0', 'stack1']
    ```
    """
    given = [n for n, v in (("preset", preset), ("spec", spec),
                            ("keras_application", keras_application)) if v]
    if len(given) != 1:
        raise UserError(
            f"load_backbone: pass exactly one of preset, spec, keras_application. "
            f"Received: {given or 'none'}."
        )
    if spec:
        return _from_spec(dict(spec), image_size, sequence_length)
    if keras_application:
        return _from_keras_application(keras_application, weights, image_size)
    return _from_preset(preset, load_weights, image_size, sequence_length)


# ---------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------


def _from_preset(preset, load_weights, image_size, sequence_length):
    description = {"source": "preset", "preset": preset, "pretrained": bool(load_weights)}
    family = None
    if os.path.isdir(preset):
        fmt, family = local_checkpoint_format(preset)
        description["format"], description["family"] = fmt, family
        if fmt == "huggingface" and family == "bert":
            from tftransfer import hf_bert

            model = hf_bert.load_hf_bert(preset, load_weights=load_weights)
            preprocessor = hf_bert.load_hf_tokenizer_preprocessor(preset, sequence_length)
            return _finish(model, preprocessor, description)
    elif "://" not in preset:
        if preset not in keras_hub.models.Backbone.presets:
            looks_like_path = os.sep in preset or preset.startswith(".")
            what = "no such local directory" if looks_like_path else "not a keras-hub preset name"
            raise UserError(
                f"backbone.preset {preset!r}: {what}. Pass an existing preset directory, "
                f"a kaggle:// or hf:// handle, or a name from keras_hub.models.Backbone.presets."
            )
        description["format"] = "keras_hub"
    else:
        description["format"] = "remote"
    try:
        model = keras_hub.models.Backbone.from_preset(preset, load_weights=load_weights)
    except (OSError, ConnectionError) as e:
        raise UserError(_download_message(preset, e))
    except Exception as e:  # keras-hub/kagglehub/huggingface_hub raise many types.
        if _is_network_error(e):
            raise UserError(_download_message(preset, e))
        if family is not None:
            raise UserError(
                f"backbone.preset {preset!r}: the {description['format']} checkpoint ({family}) could "
                f"not be loaded ({_first_line(e)[:200]}). Supported: {_supported_local()}."
            )
        raise UserError(f"backbone.preset {preset!r} could not be loaded: {_first_line(e)}")
    if load_weights and description.get("family") == "roberta":
        _fold_roberta_token_type(model, preset)
    if _is_text(model):
        try:
            preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(
                preset, sequence_length=sequence_length
            )
        except Exception as e:
            raise UserError(
                f"backbone.preset {preset!r}: no tokenizer could be loaded ({_first_line(e)}); "
                f"the directory needs the tokenizer assets (e.g. vocab.txt)."
            )
        return _finish(model, preprocessor, description)
    converter = _image_converter_from_preset(preset, image_size)
    return _finish(model, converter, description)


def _from_spec(spec, image_size, sequence_length):
    architecture = spec.pop("architecture", None)
    description = {"source": "spec", "architecture": architecture, "spec": dict(spec),
                   "pretrained": False}
    _check_spec_keys(architecture, spec)
    try:
        if architecture == "resnet":
            kwargs = {**DEFAULT_RESNET_SPEC, **spec, "image_shape": (None, None, 3)}
            model = keras_hub.models.ResNetBackbone(**kwargs)
            converter = _imagenet_converter(image_size or 224)
            return _finish(model, converter, description)
        if architecture == "bert":
            vocabulary = spec.pop("vocabulary", None)
            if vocabulary is None:
                raise UserError("backbone.spec.vocabulary is required for bert: a vocab.txt path or a token list.")
            if isinstance(vocabulary, str) and not os.path.isfile(vocabulary):
                raise UserError(f"backbone.spec.vocabulary: no such file {vocabulary!r}.")
            tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=spec.pop("lowercase", True))
            kwargs = {**DEFAULT_BERT_SPEC, **spec, "vocabulary_size": tokenizer.vocabulary_size()}
            if kwargs.get("hidden_act") or kwargs.get("layer_norm_epsilon"):
                from tftransfer import hf_bert

                model = hf_bert.HFBertBackbone(**kwargs)
            else:
                model = keras_hub.models.BertBackbone(**kwargs)
            preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
                tokenizer=tokenizer, sequence_length=sequence_length
            )
            return _finish(model, preprocessor, description)
    except TypeError as e:
        raise UserError(f"backbone.spec for {architecture}: {_first_line(e)}")
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"backbone.spec for {architecture}: {_first_line(e)}")
    raise UserError(
        f"backbone.spec.architecture must be one of resnet, bert. Received: {architecture!r}."
    )


# Spec keys that are not constructor arguments of the keras-hub backbone:
# the tokenizer's, and the Hugging Face BERT variant's (`hf_bert.HFBertBackbone`).
_SPEC_EXTRA_KEYS = {"resnet": set(), "bert": {"vocabulary", "lowercase", "hidden_act", "layer_norm_epsilon"}}
# Constructor arguments the spec may not set (tftransfer sets them).
_SPEC_DERIVED_KEYS = {"resnet": {"image_shape"}, "bert": {"vocabulary_size"}}


def _check_spec_keys(architecture, spec):
    """Refuse a `backbone.spec` key the architecture does not take.

    keras-hub backbones accept and silently drop unknown keyword arguments
    (they pass `**kwargs` on), so a misspelled key would train a different
    model than the config says. Allowed: the backbone constructor's named
    arguments, plus the tokenizer's for BERT.
    """
    import difflib
    import inspect

    classes = {"resnet": keras_hub.models.ResNetBackbone, "bert": keras_hub.models.BertBackbone}
    if architecture not in classes:
        return  # Named by the caller's error.
    parameters = inspect.signature(classes[architecture].__init__).parameters
    allowed = ({n for n, p in parameters.items() if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}
               | _SPEC_EXTRA_KEYS[architecture]) - _SPEC_DERIVED_KEYS[architecture]
    for key in spec:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            derived = " (tftransfer sets it)" if key in _SPEC_DERIVED_KEYS[architecture] else ""
            raise UserError(
                f"Unknown key backbone.spec.{key}{derived} for architecture {architecture!r}.{hint} "
                f"Allowed: {', '.join(sorted(allowed))}."
            )


def _from_keras_application(name, weights, image_size):
    if name not in KERAS_APPLICATIONS:
        raise UserError(
            f"backbone.keras_application must be one of {', '.join(KERAS_APPLICATIONS)}. "
            f"Received: {name!r}."
        )
    if weights not in (None, "imagenet") and not os.path.isfile(weights):
        raise UserError(
            f"backbone.weights {weights!r}: no such file. Pass 'imagenet', null, or a local "
            f".h5/.weights.h5 file for {name} without its top."
        )
    size = image_size or 224
    try:
        model = keras.applications.ResNet50(
            include_top=False, weights=weights, input_shape=(size, size, 3)
        )
    except Exception as e:
        if _is_network_error(e):
            raise UserError(
                f"backbone {name} weights='imagenet' need a download and there is no network "
                f"({_first_line(e)}). Pass backbone.weights=/path/to/"
                f"resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5."
            )
        raise UserError(f"backbone {name} weights={weights!r} could not be loaded: {_first_line(e)}")
    # keras.applications ResNet50 expects BGR pixels minus the caffe mean.
    # Reversing the first convolution's input channels makes it take RGB
    # (exactly equivalent), so every image backbone shares one RGB
    # preprocessing path and the serving graph needs no channel swap.
    conv = model.get_layer("conv1_conv")
    conv.kernel.assign(conv.kernel[:, :, ::-1, :])
    converter = keras_hub.layers.ResNetImageConverter(
        image_size=(size, size), scale=1.0, offset=[-m for m in CAFFE_MEAN_RGB]
    )
    description = {"source": "keras_application", "name": name, "weights": weights,
                   "pretrained": weights is not None}
    return _finish(model, converter, description)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _finish(model, preprocessor, description):
    modality = "text" if _is_text(model) else "image"
    description = {**description, "class_name": type(model).__name__, "modality": modality}
    return LoadedBackbone(
        model=model,
        modality=modality,
        preprocessor=preprocessor,
        layer_groups=layer_groups(model),
        description=description,
    )


def _is_text(model):
    inputs = model.input if isinstance(model.input, dict) else {}
    return "token_ids" in inputs


def _imagenet_converter(size):
    return keras_hub.layers.ResNetImageConverter(
        image_size=(size, size),
        scale=[1.0 / (255.0 * s) for s in IMAGENET_STD],
        offset=[-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)],
    )


def _image_converter_from_preset(preset, image_size):
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(preset)
    except Exception:
        converter = None
    if converter is None:
        return _imagenet_converter(image_size or 224)
    if image_size:
        converter = type(converter)(**{**converter.get_config(), "image_size": (image_size, image_size)})
    elif converter.image_size is None:
        converter = type(converter)(**{**converter.get_config(), "image_size": (224, 224)})
    return converter


# Local checkpoint directories keras-hub 0.32 converts and tftransfer
# fine-tunes (backbone classes with layer groups; LLM families are left out).
HF_FAMILIES = ("bert", "distilbert", "roberta", "xlm-roberta", "albert", "vit", "deit", "dinov2", "swin")
TIMM_FAMILIES = ("resnet", "efficientnet", "mobilenet", "densenet")


def _supported_local():
    return (f"keras-hub preset dirs (Backbone.save_to_preset) of {', '.join(supported_families())}; "
            f"Hugging Face transformers dirs (config.json + model.safetensors) with model_type "
            f"{', '.join(HF_FAMILIES)}; timm dirs (config.json + model.safetensors) of "
            f"{', '.join(TIMM_FAMILIES)} (e.g. tools/convert_efficientnet_lite0.py)")


def local_checkpoint_format(path):
    """`(format, family)` of a local checkpoint dir, or a one-line UserError.

    format: `keras_hub` (family: the backbone class), `huggingface` (its
    `model_type`) or `timm` (its `architecture`), told apart by `config.json`
    as keras-hub does.
    """
    where = f"backbone.preset {path!r}"
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"{where}: no config.json, so not a checkpoint dir. Supported: {_supported_local()}.")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: config.json is not valid JSON ({_first_line(e)}).")
    if not isinstance(config, dict):
        raise UserError(f"{where}: config.json is not a JSON object.")
    has_weights = any(os.path.isfile(os.path.join(path, n))
                      for n in ("model.safetensors", "model.safetensors.index.json"))
    if "registered_name" in config:
        family = str(config.get("class_name") or config["registered_name"])
        return "keras_hub", family
    if "model_type" in config:
        family = str(config["model_type"])
        if family not in HF_FAMILIES:
            raise UserError(
                f"{where}: Hugging Face model_type {family!r} is not supported for transfer "
                f"(supported model_type: {', '.join(HF_FAMILIES)})."
            )
        if not has_weights:
            raise UserError(
                f"{where}: the Hugging Face {family} checkpoint has no model.safetensors "
                f"(pytorch_model.bin is not read); save it with save_pretrained(..., safe_serialization=True)."
            )
        _check_safetensors(path, where)
        return "huggingface", family
    if "architecture" in config:
        family = str(config["architecture"])
        if not family.startswith(TIMM_FAMILIES):
            raise UserError(
                f"{where}: timm architecture {family!r} is not supported "
                f"(supported timm families: {', '.join(TIMM_FAMILIES)})."
            )
        if not has_weights:
            raise UserError(f"{where}: the timm {family} checkpoint has no model.safetensors.")
        _check_safetensors(path, where)
        return "timm", family
    raise UserError(
        f"{where}: config.json has none of registered_name (keras-hub), model_type (Hugging Face), "
        f"architecture (timm). Supported: {_supported_local()}."
    )


def _check_safetensors(path, where):
    """Refuse an unreadable `model.safetensors` (truncated download, wrong file).

    Opening reads only the header, which also checks that the file covers
    every tensor it declares, so a truncated file fails here in
    milliseconds instead of as a traceback inside the weight converter.
    """
    from safetensors import safe_open

    file = os.path.join(path, "model.safetensors")
    if not os.path.isfile(file):  # Sharded: each shard is checked as it loads.
        return
    try:
        with safe_open(file, framework="np"):
            pass
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError).
        raise UserError(f"{where}: model.safetensors is not a complete safetensors file ({_first_line(e)}); "
                        f"download or save the checkpoint again.")


def _fold_roberta_token_type(model, path):
    """Add `token_type_embeddings[0]` to RoBERTa's position embeddings.

    Hugging Face RoBERTa adds the type-0 embedding to every token; keras-hub's
    RoBERTa has no segment embedding and its converter drops it (its XLM-R
    converter folds it in, as here). Original fairseq checkpoints store
    zeros, so they were unaffected; RoBERTa-architecture models trained with
    `transformers` were not (tools/check_hf_families.py, BENCHMARKS.md).
    """
    from safetensors import safe_open

    file = os.path.join(path, "model.safetensors")
    if not os.path.isfile(file):  # Sharded checkpoints: left as keras-hub loads them.
        return
    with safe_open(file, framework="np") as f:
        keys = [k for k in f.keys() if k.endswith("embeddings.token_type_embeddings.weight")]
        if not keys:
            return
        type0 = f.get_tensor(keys[0])[0]
    positions = model.embeddings.position_embedding.position_embeddings
    positions.assign(keras.ops.convert_to_numpy(positions) + type0[None, :])


def _is_network_error(e):
    text = f"{type(e).__name__} {e}".lower()
    return any(
        s in text
        for s in ("connection", "resolve", "network", "timed out", "urlopen", "offline", "http")
    )


def _download_message(preset, e):
    return (
        f"backbone.preset {preset!r} must be downloaded and the download failed "
        f"({_first_line(e)[:160]}). Offline, pass a local preset directory "
        f"(Backbone.save_to_preset) or Hugging Face checkpoint directory instead."
    )


def _first_line(e):
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ---------------------------------------------------------------------------
# Layer groups
# ---------------------------------------------------------------------------

# Per keras-hub family: (container holding the blocks or None for top level,
# block-name pattern whose first group is the block index, name of the group
# below the first block, group-name prefix). Layers before the first block
# form the bottom group; layers after a block (transitions, final norms,
# poolers) join the block before them, so groups run bottom to top and
# every backbone weight belongs to exactly one group.
_TRANSFORMER = (None, r"^transformer_layer_(\d+)$", "embeddings", "transformer_layer_")
FAMILY_GROUPS = {
    "ResNetBackbone": (None, r"^stack(\d+)_", "stem", "stack"),
    "EfficientNetBackbone": (None, r"^block(\d+)[a-z]+_", "stem", "block"),
    "MobileNetBackbone": (None, r"^block_(\d+)_\d+$", "stem", "block"),
    "DenseNetBackbone": (None, r"^stack(\d+)_", "stem", "stack"),
    # ViT / DeiT / DINOv2 nest their blocks inside an encoder layer.
    "ViTBackbone": ("vit_encoder", r"^transformer_block_(\d+)$", "embeddings", "transformer_block_"),
    "DeiTBackbone": ("deit_encoder", r"^transformer_block_(\d+)$", "embeddings", "transformer_block_"),
    "DINOV2Backbone": ("encoder", r"^layers_(\d+)$", "embeddings", "layer_"),
    "SwinTransformerBackbone": (None, r"^stage_(\d+)$", "embeddings", "stage_"),
    "BertBackbone": _TRANSFORMER,
    "HFBertBackbone": _TRANSFORMER,
    "DistilBertBackbone": _TRANSFORMER,
    "RobertaBackbone": _TRANSFORMER,
    "XLMRobertaBackbone": _TRANSFORMER,
    "ElectraBackbone": _TRANSFORMER,
    "DebertaV3Backbone": (None, r"^disentangled_attention_encoder_layer_(\d+)$", "embeddings", "transformer_layer_"),
    # ALBERT shares weights: `group_<g>_inner_layer_<i>` is one set of
    # weights that num_layers / num_groups consecutive layers reuse, so a
    # group here is a weight group (released checkpoints: num_groups=1, one
    # encoder group), not one layer of depth.
    "AlbertBackbone": (None, r"^group_(\d+)_inner_layer_\d+$", "embeddings", "group_"),
}
# keras.applications ResNet50 (a plain Functional model).
_RESNET_APP = (None, r"^conv([2-9])_", "stem", "conv")
# Unknown families: blocks are layers named `<word>[_]<index>...`.
_INDEXED = re.compile(r"^([A-Za-z]+(?:_[A-Za-z]+)*?)_?(\d+)(?![\d])")


def supported_families():
    """keras-hub backbone classes with known layer groups (README, --helpfull)."""
    return sorted(FAMILY_GROUPS)


def layer_groups(model):
    """The backbone's layers as ordered groups, bottom (input) to top.

    Known families (`FAMILY_GROUPS`): CNNs by stage (`stem`, `stack0`.. for
    ResNet, `block1`.. for EfficientNet / MobileNet, `stack1`.. for DenseNet
    with each transition joining the stage below it), transformers by block
    (`embeddings`, `transformer_layer_0`.. for BERT / DistilBERT / RoBERTa /
    XLM-RoBERTa / ELECTRA / DeBERTaV3, `transformer_block_1`.. inside ViT's
    and DeiT's encoder, `layer_0`.. for DINOv2, `stage_0`.. for Swin,
    `group_0`.. for ALBERT's shared-weight groups). keras.applications
    ResNet50: `stem`, `conv2`..`conv5`. Any other model: groups from its own
    indexed block names (`<name>_<i>`, at the top level or inside its
    largest container layer) when it has them; otherwise one group
    `backbone` and a warning naming the family, because progressive
    unfreezing and discriminative learning rates cannot work on it.
    """
    family = type(model).__name__
    rule = FAMILY_GROUPS.get(family)
    if rule is None:
        top = _top_layers(model)
        if any(re.match(_RESNET_APP[1], l.name) for l in top):
            rule = _RESNET_APP
        else:
            rule = _discover(model)
    if rule is not None:
        groups = _group_by_rule(model, *rule)
        if groups is not None and len(groups) > 1:
            return groups
    import warnings

    warnings.warn(
        f"tftransfer: no block structure known for backbone family {family}; it is one "
        f"layer group 'backbone' (gradual unfreezing and lr_decay need several). Families "
        f"with layer groups: {', '.join(supported_families())}.",
        stacklevel=2,
    )
    return [LayerGroup("backbone", _top_layers(model))]


def _top_layers(model):
    return [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]


def _sublayers(layer):
    return sublayers(layer, recursive=False)


def _group_by_rule(model, container, pattern, bottom, prefix):
    pattern = re.compile(pattern)
    layers = []
    for layer in _top_layers(model):
        if container is not None and layer.name == container:
            if layer.weights and not _sublayers(layer):
                return None
            layers.extend(_sublayers(layer))
        else:
            layers.append(layer)
    first, blocks = [], {}
    for layer in layers:
        match = pattern.match(layer.name)
        if match:
            key = match.group(1)
            blocks.setdefault(key, []).append(layer)
            last = key
        elif not blocks:
            first.append(layer)
        else:  # Transitions, final norms, poolers: join the block below.
            blocks[last].append(layer)
    if not blocks:
        return None
    groups = [LayerGroup(bottom, first)] if first else []  # e.g. VGG: no layer below block 1
    return groups + [LayerGroup(f"{prefix}{k}", v) for k, v in blocks.items()]


def _discover(model):
    """A rule from the model's own indexed layer names, or None."""
    text = _is_text(model)
    bottom = "embeddings" if text else "stem"
    candidates = [(None, _top_layers(model))]
    containers = [l for l in _top_layers(model) if len(_sublayers(l)) > 2]
    if containers:
        biggest = max(containers, key=lambda l: len(_sublayers(l)))
        candidates.append((biggest.name, _sublayers(biggest)))
    best = None
    for container, layers in candidates:
        indices = {}
        for layer in layers:
            match = _INDEXED.match(layer.name)
            if match:
                indices.setdefault(match.group(1), set()).add(match.group(2))
        for word, seen in indices.items():
            if len(seen) >= 2 and (best is None or len(seen) > best[0]):
                best = (len(seen), container, word)
    if best is None:
        return None
    _, container, word = best
    return (container, rf"^{re.escape(word)}_?(\d+)(?![\d])", bottom, f"{word}_")


def save_backbone_preset(loaded, preset_dir):
    """Save the backbone and its preprocessing as a keras-hub preset dir.

    `load_backbone(preset=preset_dir)` (or keras-hub's own `from_preset`)
    loads it back offline, with the same normalisation / tokenizer.
    """
    os.makedirs(preset_dir, exist_ok=True)
    loaded.model.save_to_preset(preset_dir)
    if hasattr(loaded.preprocessor, "save_to_preset"):
        loaded.preprocessor.save_to_preset(preset_dir)
