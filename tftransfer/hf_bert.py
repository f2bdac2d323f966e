"""Load Hugging Face BERT checkpoints with the exact numerics of `transformers`.

`keras_hub.models.BertBackbone.from_preset(hf_dir)` can read a Hugging Face
(`transformers`) BERT directory, but its converter ignores `hidden_act`,
`layer_norm_eps` and `type_vocab_size`: the backbone always uses the tanh
approximation of GELU and `epsilon=1e-12`, and always has 2 segment types.
Checkpoints trained with the exact (erf) GELU, which is what `"gelu"` means in
`transformers` and what almost every BERT uses, therefore give outputs that
drift from the reference PyTorch model (about 1e-3 relative for MiniLM-L6).

This module provides:

- `HFBertBackbone`: a `keras_hub.models.BertBackbone` whose feedforward
  activation and layer norm epsilon are configurable with the Hugging Face
  names, and that serializes them.
- `load_hf_bert()`: builds an `HFBertBackbone` from a Hugging Face
  `config.json` and ports the `model.safetensors` weights with keras-hub's own
  BERT weight converter.
- `load_hf_tokenizer_preprocessor()`: the matching
  `keras_hub.models.BertTextClassifierPreprocessor`, with the lowercasing and
  accent stripping of the Hugging Face `BertTokenizer` (keras-hub's converter
  never strips accents).
"""

import json
import os
import warnings

import keras
import keras_hub
from keras_hub.src.utils.keras_utils import gelu_approximate
from keras_hub.src.utils.transformers import convert_bert
from keras_hub.src.utils.transformers.safetensor_utils import SafetensorLoader

SUPPORTED_MODEL_TYPES = ("bert",)

# Hugging Face `hidden_act` name -> Keras activation. Every value is a
# serializable Keras object: `keras.activations.gelu` (exact erf GELU, its
# `approximate` argument defaults to False), keras-hub's registered
# `gelu_approximate` (tanh approximation), `relu` and `silu`.
_ACTIVATIONS = {
    # Exact GELU, 0.5 * x * (1 + erf(x / sqrt(2))).
    "gelu": keras.activations.gelu,
    "gelu_python": keras.activations.gelu,
    # Tanh approximation of GELU (all three are the same formula in
    # `transformers`).
    "gelu_new": gelu_approximate,
    "gelu_pytorch_tanh": gelu_approximate,
    "gelu_fast": gelu_approximate,
    # keras-hub's own name for the tanh approximation (BertBackbone default).
    "gelu_approximate": gelu_approximate,
    "relu": keras.activations.relu,
    "silu": keras.activations.silu,
    "swish": keras.activations.silu,
}

# `config.json` fields that change the model's outputs and that this loader
# cannot reproduce, with the value it can reproduce. A checkpoint with another
# value still loads, with one warning per field per process.
_UNSUPPORTED_FIELDS = {
    "position_embedding_type": "absolute",
    "is_decoder": False,
    "add_cross_attention": False,
}
_WARNED_FIELDS = set()


def _resolve_activation(hidden_act):
    if not isinstance(hidden_act, str) or hidden_act not in _ACTIVATIONS:
        raise ValueError(
            f"Unsupported `hidden_act`: {hidden_act!r}. Allowed values: "
            f"{', '.join(sorted(_ACTIVATIONS))}."
        )
    return _ACTIVATIONS[hidden_act]


@keras.saving.register_keras_serializable(package="tftransfer")
class HFBertBackbone(keras_hub.models.BertBackbone):
    """A BERT encoder with a configurable activation and layer norm epsilon.

    Identical to `keras_hub.models.BertBackbone` (same layers, same weight
    layout, same inputs and outputs), plus the two settings that Hugging Face
    BERT checkpoints vary and that keras-hub hard-codes: the feedforward
    activation (`hidden_act`) and the layer normalization epsilon
    (`layer_norm_eps`). With the defaults it computes exactly what
    `keras_hub.models.BertBackbone` computes.

    Use `load_hf_bert()` to build one from a Hugging Face checkpoint
    directory.

    Args:
        vocabulary_size: int. The size of the token vocabulary.
        num_layers: int. The number of transformer layers.
        num_heads: int. The number of attention heads for each transformer.
        hidden_dim: int. The size of the transformer encoding and pooler
            layers.
        intermediate_dim: int. The output dimension of the first Dense layer
            in the feedforward network of each transformer.
        hidden_act: string. The feedforward activation, with the Hugging Face
            `hidden_act` names: `"gelu"` (exact erf GELU, also
            `"gelu_python"`), `"gelu_new"`, `"gelu_pytorch_tanh"`,
            `"gelu_fast"` and `"gelu_approximate"` (tanh approximation of
            GELU), `"relu"`, `"silu"` or `"swish"`. Defaults to
            `"gelu_approximate"`, keras-hub's choice.
        layer_norm_epsilon: float. The epsilon of every layer normalization
            (embeddings and transformer layers). Defaults to `1e-12`.
        **kwargs: passed to `keras_hub.models.BertBackbone` (`dropout`,
            `max_sequence_length`, `num_segments`, `dtype`, `name`, ...).

    Example:
    ```python
    backbone = HFBertBackbone(
        vocabulary_size=1000,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        hidden_act="gelu",
        layer_norm_epsilon=1e-12,
    )
    ```
    """

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        num_heads,
        hidden_dim,
        intermediate_dim,
        hidden_act="gelu_approximate",
        layer_norm_epsilon=1e-12,
        **kwargs,
    ):
        activation = _resolve_activation(hidden_act)
        super().__init__(
            vocabulary_size=vocabulary_size,
            num_layers=num_layers,
            num_heads=num_heads,
            hidden_dim=hidden_dim,
            intermediate_dim=intermediate_dim,
            **kwargs,
        )
        # The functional graph re-runs each layer's `call()` at every forward
        # pass, so attributes changed after construction take effect.
        layer_norm_epsilon = float(layer_norm_epsilon)
        self.embeddings_layer_norm.epsilon = layer_norm_epsilon
        for block in self.transformer_layers:
            block.activation = activation
            block._feedforward_intermediate_dense.activation = activation
            block.layer_norm_epsilon = layer_norm_epsilon
            block._self_attention_layer_norm.epsilon = layer_norm_epsilon
            block._feedforward_layer_norm.epsilon = layer_norm_epsilon

        # === Config ===
        self.hidden_act = hidden_act
        self.layer_norm_epsilon = layer_norm_epsilon

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_act": self.hidden_act,
                "layer_norm_epsilon": self.layer_norm_epsilon,
            }
        )
        return config


def _read_hf_config(path):
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"No Hugging Face config.json in {path!r}: expected a directory "
            "holding config.json and model.safetensors."
        )
    with open(config_path, encoding="utf-8") as f:
        return json.load(f)


def _warn_unsupported_fields(hf_config, path):
    for field, supported in _UNSUPPORTED_FIELDS.items():
        value = hf_config.get(field, supported)
        if value == supported or field in _WARNED_FIELDS:
            continue
        _WARNED_FIELDS.add(field)
        warnings.warn(
            f"{path}: config.json sets {field}={value!r}, which "
            f"tftransfer.hf_bert cannot reproduce (it computes {field}="
            f"{supported!r}); outputs will differ from the reference model.",
            stacklevel=3,
        )


def hf_config_to_backbone_kwargs(hf_config):
    """Map a Hugging Face BERT `config.json` dict to `HFBertBackbone` args.

    Args:
        hf_config: dict. The parsed `config.json` of a `transformers` BERT
            checkpoint.

    Returns:
        A dict of `HFBertBackbone` constructor arguments.
    """
    return {
        "vocabulary_size": hf_config["vocab_size"],
        "num_layers": hf_config["num_hidden_layers"],
        "num_heads": hf_config["num_attention_heads"],
        "hidden_dim": hf_config["hidden_size"],
        "intermediate_dim": hf_config["intermediate_size"],
        "max_sequence_length": hf_config.get("max_position_embeddings", 512),
        "num_segments": hf_config.get("type_vocab_size", 2),
        "hidden_act": hf_config.get("hidden_act", "gelu"),
        "layer_norm_epsilon": hf_config.get("layer_norm_eps", 1e-12),
        "dropout": hf_config.get("hidden_dropout_prob", 0.1),
    }


class _PoolerTolerantLoader(SafetensorLoader):
    """keras-hub's `SafetensorLoader` that tolerates a missing pooler.

    `transformers` saves `BertForMaskedLM`-style checkpoints without the
    pooler (`add_pooling_layer=False`); everything else must be present.
    """

    missing_pooler = False

    def port_weight(self, keras_variable, hf_weight_key, hook_fn=None):
        if hf_weight_key.startswith("pooler."):
            try:
                self.get_tensor(hf_weight_key)
            except Exception:
                self.missing_pooler = True
                return
        super().port_weight(keras_variable, hf_weight_key, hook_fn=hook_fn)


def _read_supported_config(path, caller):
    """`config.json` of a Hugging Face dir whose model_type `caller` supports."""
    hf_config = _read_hf_config(path)
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Unsupported Hugging Face model_type {model_type!r} in {path}: "
            f"{caller} supports only {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return hf_config


def load_hf_bert(path, load_weights=True, dtype=None):
    """Build an `HFBertBackbone` from a Hugging Face BERT checkpoint directory.

    Reads `config.json` and, when `load_weights`, the `model.safetensors`
    weights (or a sharded `model.safetensors.index.json`), converted with
    keras-hub's BERT weight converter. Weights stored under a prefix (for
    example `bert.` in a `BertForSequenceClassification` checkpoint) are
    found; task heads are ignored. A checkpoint saved without the pooler
    loads with a randomly initialized `pooled_dense` and a warning.

    Converted `config.json` fields: `vocab_size`, `num_hidden_layers`,
    `num_attention_heads`, `hidden_size`, `intermediate_size`,
    `max_position_embeddings`, `type_vocab_size`, `hidden_act`,
    `layer_norm_eps` and `hidden_dropout_prob`. Fields that change the outputs
    and that this loader cannot reproduce (`position_embedding_type` other
    than `"absolute"`, `is_decoder`, `add_cross_attention`) give one warning
    per field per process.

    Only `model_type` `"bert"` is supported. RoBERTa / XLM-RoBERTa (position
    ids offset by the padding index), DistilBERT, ALBERT, ELECTRA, DeBERTa and
    every other `model_type` raise a `ValueError`, even where keras-hub has a
    converter for them.

    Args:
        path: string or path-like. A local directory in the `transformers`
            format: `config.json` plus `model.safetensors`.
        load_weights: bool. Whether to load the checkpoint's weights. If
            False, the backbone is randomly initialized. Defaults to `True`.
        dtype: string or `keras.DTypePolicy`. The dtype policy of the
            backbone. Defaults to `None`, Keras's global policy.

    Returns:
        An `HFBertBackbone`.

    Example:
    ```python
    backbone = load_hf_bert("/path/to/all-MiniLM-L6-v2")
    preprocessor = load_hf_tokenizer_preprocessor(
        "/path/to/all-MiniLM-L6-v2", sequence_length=128
    )
    outputs = backbone(preprocessor(["The quick brown fox."]))
    ```
    """
    path = os.fspath(path)
    hf_config = _read_supported_config(path, "load_hf_bert")
    _warn_unsupported_fields(hf_config, path)
    backbone = HFBertBackbone(
        **hf_config_to_backbone_kwargs(hf_config), dtype=dtype
    )
    if load_weights:
        with _PoolerTolerantLoader(path) as loader:
            convert_bert.convert_weights(backbone, loader, hf_config)
        if loader.missing_pooler:
            warnings.warn(
                f"{path}: the checkpoint has no pooler weights; "
                "`pooled_output` is randomly initialized (`sequence_output` "
                "is unaffected).",
                stacklevel=2,
            )
    return backbone


def _read_json_if_exists(path, name):
    file_path = os.path.join(path, name)
    if not os.path.isfile(file_path):
        return None
    with open(file_path, encoding="utf-8") as f:
        return json.load(f)


def _hf_tokenizer_settings(path):
    """The vocabulary, lowercasing and accent stripping of an HF tokenizer.

    Reads `vocab.txt` (or, failing that, the WordPiece vocabulary inside
    `tokenizer.json`, which is all `transformers` 5 saves) and
    `do_lower_case` / `strip_accents` from `tokenizer_config.json` (or the
    `BertNormalizer` of `tokenizer.json`). Like `transformers`, accents are
    stripped when `strip_accents` is true, or when it is unset (`None`) and
    the tokenizer lowercases.
    """
    tok_config = _read_json_if_exists(path, "tokenizer_config.json") or {}
    tok_json = _read_json_if_exists(path, "tokenizer.json") or {}
    normalizer = tok_json.get("normalizer") or {}
    if normalizer.get("type") != "BertNormalizer":
        normalizer = {}
    lowercase = tok_config.get(
        "do_lower_case", normalizer.get("lowercase", True)
    )
    strip_accents = tok_config.get(
        "strip_accents", normalizer.get("strip_accents")
    )
    if strip_accents is None:
        strip_accents = lowercase

    vocab_file = os.path.join(path, "vocab.txt")
    model = tok_json.get("model") or {}
    if os.path.isfile(vocab_file):
        vocabulary = vocab_file
    elif model.get("type") == "WordPiece":
        vocab = model["vocab"]
        vocabulary = sorted(vocab, key=vocab.__getitem__)
    else:
        raise ValueError(
            f"No WordPiece vocabulary in {path}: expected vocab.txt or a "
            "tokenizer.json with a WordPiece model."
        )
    return {
        "vocabulary": vocabulary,
        "lowercase": bool(lowercase),
        "strip_accents": bool(strip_accents),
    }


def load_hf_tokenizer_preprocessor(path, sequence_length):
    """Build the preprocessor matching a Hugging Face BERT checkpoint.

    The tokenizer is a `keras_hub.models.BertTokenizer` over the checkpoint's
    WordPiece vocabulary (`vocab.txt`, or `tokenizer.json` for checkpoints
    saved by `transformers` 5) with the checkpoint's `do_lower_case` and
    `strip_accents`. keras-hub's own Hugging Face converter
    (`keras_hub.models.TextClassifierPreprocessor.from_preset(path)`) is not
    used because it never strips accents, so uncased checkpoints tokenize
    text such as "Café" differently from `transformers`, and it requires
    `vocab.txt`. Inputs are packed as `[CLS] a [SEP]` or
    `[CLS] a [SEP] b [SEP]`, padded with `[PAD]` to `sequence_length`, like
    `BertTokenizerFast(..., padding="max_length", truncation=True)`
    (pairs longer than `sequence_length` are truncated round-robin, which can
    differ from the `transformers` "longest_first" rule).

    Args:
        path: string or path-like. A local `transformers` BERT directory with
            `config.json` and `vocab.txt` or `tokenizer.json`.
        sequence_length: int. The length of the packed inputs.

    Returns:
        A `keras_hub.models.BertTextClassifierPreprocessor` whose outputs are
        the `token_ids`, `segment_ids` and `padding_mask` an `HFBertBackbone`
        takes. Pass sentence pairs as `preprocessor(x=(first, second))`: a
        tuple passed positionally is read as `(x, y)`.
    """
    path = os.fspath(path)
    _read_supported_config(path, "load_hf_tokenizer_preprocessor")
    tokenizer = keras_hub.models.BertTokenizer(**_hf_tokenizer_settings(path))
    return keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer=tokenizer, sequence_length=sequence_length
    )
