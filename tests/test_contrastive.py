"""train.recipe contrastive (SetFit): pair sampler counts, the loss goes down, SetFit's head
(normalised embeddings, LogisticRegression's L2 penalty), a CLI run, bad combinations."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tftransfer import backbones, builders, config, contrastive
from tftransfer.data import Split
from tftransfer.errors import UserError
from tftransfer.heads import HeadSpec, build_head, l2_from_c

from conftest import run_cli, tiny_bert_spec

POSITIVE = ["good", "great", "fun", "very good", "very great", "very fun", "good fun", "great fun"]
NEGATIVE = ["bad", "awful", "boring", "very bad", "very awful", "very boring", "bad boring", "awful boring"]


def _rows():
    return [(f"the movie was {t} !", 1) for t in POSITIVE] + [(f"the film is {t}", 0) for t in NEGATIVE]


# --- sampler -----------------------------------------------------------------------------


@pytest.mark.parametrize("k,classes,iterations", [(8, 3, 20), (16, 2, 5), (1, 4, 3)])
def test_sampler_yields_configured_positive_and_negative_pairs(k, classes, iterations):
    labels = np.repeat(np.arange(classes), k)
    first, second, target = contrastive.sample_pairs(labels, iterations, seed=0)
    n = k * classes
    assert len(first) == len(second) == len(target) == 2 * iterations * n
    same = labels[first] == labels[second]
    np.testing.assert_array_equal(same, target == 1.0)
    assert int(target.sum()) == iterations * n  # positives
    assert int((target == 0).sum()) == iterations * n  # negatives
    # Every example is the anchor of exactly one positive and one negative pair per iteration.
    np.testing.assert_array_equal(np.bincount(first[target == 1], minlength=n), np.full(n, iterations))
    np.testing.assert_array_equal(np.bincount(first[target == 0], minlength=n), np.full(n, iterations))
    if k > 1:  # a positive partner is another example of the class
        assert not np.any(first[target == 1] == second[target == 1])


def test_sampler_is_seeded():
    labels = np.repeat(np.arange(3), 8)
    a, b = contrastive.sample_pairs(labels, 20, seed=0), contrastive.sample_pairs(labels, 20, seed=0)
    other = contrastive.sample_pairs(labels, 20, seed=1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[1], other[1])
    with pytest.raises(UserError, match="at least 2 classes"):
        contrastive.sample_pairs(np.zeros(8, "int64"), 20, seed=0)


# --- training ----------------------------------------------------------------------------


def test_pair_training_lowers_the_contrastive_loss():
    keras.utils.set_random_seed(0)
    loaded = backbones.load_backbone(spec=tiny_bert_spec(), sequence_length=8)
    heads = [HeadSpec(num_classes=2, pooling="mean")]
    model = builders.build_model(loaded, heads)
    encoder = builders.features_model(model, heads)
    texts, labels = zip(*_rows())
    split = Split(tf.data.Dataset.from_tensor_slices((list(texts), np.array(labels, "int32"))), len(texts))
    before = [w.numpy().copy() for w in loaded.model.trainable_weights]
    report = contrastive.train_encoder(encoder, split, loaded.preprocessor, num_iterations=4, loss="cosine",
                                       epochs=3, learning_rate=3e-3, batch_size=16, seed=0)
    print(report)
    assert report["pairs"] == 2 * 4 * 16 and report["positive_pairs"] == report["negative_pairs"] == 64
    assert report["loss_after"] < 0.5 * report["loss_before"]
    assert report["epoch_losses"][-1] < report["epoch_losses"][0]
    # The backbone of the classification model itself was trained (shared weights).
    assert any(not np.allclose(b, w.numpy()) for b, w in zip(before, loaded.model.trainable_weights))


def test_contrastive_margin_loss_values():
    u = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], "float32")
    v = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], "float32")  # cos 0, 1, 0
    target = np.array([1.0, 0.0, 0.0], "float32")
    np.testing.assert_allclose(contrastive.pair_loss("cosine")(u, v, target), [1.0, 1.0, 0.0], atol=1e-6)
    # d = 1, 0, 1: positive 0.5*d^2; negatives 0.5*relu(0.5 - d)^2
    np.testing.assert_allclose(contrastive.pair_loss("contrastive", margin=0.5)(u, v, target),
                               [0.5, 0.125, 0.0], atol=1e-6)


# --- the head: SetFit's LogisticRegression on normalised embeddings ------------------------


def _features(n=24, dim=64, classes=3, seed=0):
    """Unit-length features of `classes` noisy clusters (as sentence embeddings), and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n // classes)
    x = 0.3 * rng.normal(size=(classes, dim))[labels] + rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype("float32"), labels


def _fit_head(x, labels, spec, epochs=100):
    """The head alone, trained as phase 2 trains it on cached features: Adam 1e-2, full batch."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((x.shape[1],))
    model = keras.Model(inputs, build_head(inputs, spec))
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, labels, batch_size=len(x), epochs=epochs, verbose=0)
    return model


def test_l2_from_c_is_logistic_regressions_penalty_on_the_mean_loss():
    assert l2_from_c(1.0, 24) == pytest.approx(1 / 48)
    assert l2_from_c(0.5, 10) == pytest.approx(1 / 10)
    assert l2_from_c(None, 24) == 0.0
    with pytest.raises(UserError, match="C must be > 0"):
        l2_from_c(0.0, 24)


def test_penalised_head_matches_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    x, labels = _features()
    reference = LogisticRegression(C=1.0).fit(x, labels)  # SetFit's default head
    expected = reference.predict_proba(x)
    spec = HeadSpec(num_classes=3, l2=l2_from_c(1.0, len(x)))
    model = _fit_head(x, labels, spec)
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(model(x)))
    np.testing.assert_allclose(probs, expected, atol=0.01)
    kernel = model.get_layer("label").kernel.numpy()
    assert np.linalg.norm(kernel) == pytest.approx(np.linalg.norm(reference.coef_), rel=0.02)
    # Without the penalty the same training goes far past that optimum (separable data).
    plain = _fit_head(x, labels, HeadSpec(num_classes=3))
    assert np.linalg.norm(plain.get_layer("label").kernel.numpy()) > 2 * np.linalg.norm(kernel)
    assert np.abs(keras.ops.convert_to_numpy(keras.ops.softmax(plain(x))) - expected).max() > 0.1


def test_normalize_makes_the_head_read_directions_only():
    x, _ = _features()
    inputs = keras.Input((x.shape[1],))
    model = keras.Model(inputs, build_head(inputs, HeadSpec(num_classes=3, normalize=True)))
    assert [layer.name for layer in model.layers[1:]] == ["label_normalize", "label"]
    np.testing.assert_allclose(model(3.0 * x), model(x), atol=1e-5)
    unnormalised = keras.Model(inputs, build_head(inputs, HeadSpec(num_classes=3, name="other")))
    assert not np.allclose(unnormalised(3.0 * x), unnormalised(x), atol=1e-3)


def test_head_defaults_are_setfits_under_the_contrastive_recipe_only(tmp_path):
    cfg = config.load_config(_config(tmp_path))
    assert cfg.heads[0].normalize is True and cfg.heads[0].l2_c == 1.0
    plain = config.load_config(_config(tmp_path), overrides=["train.recipe=finetune", "train.contrastive=null"])
    assert plain.heads[0].normalize is False and plain.heads[0].l2_c is None  # other recipes: unchanged
    explicit = config.load_config(_config(tmp_path, extra_heads="pooling: mean, normalize: false, l2_c: null"))
    assert explicit.heads[0].normalize is False and explicit.heads[0].l2_c is None
    chosen = config.load_config(_config(tmp_path), overrides=["train.recipe=finetune", "train.contrastive=null",
                                                              "heads.0.normalize=true", "heads.0.l2_c=4"])
    assert chosen.heads[0].normalize is True and chosen.heads[0].l2_c == 4.0


@pytest.mark.parametrize("override,message", [
    ("heads.0.l2_c=0", "l2_c must be a finite number > 0"),
    ("heads.0.l2_c=-1", "l2_c must be a finite number > 0"),
    ("heads.0.l2_c=strong", "l2_c must be a finite number > 0"),
    ("heads.0.l2_c=.inf", "l2_c must be a finite number > 0"),
    ("heads.0.normalize=yes please", "normalize must be true, false or auto"),
])
def test_bad_head_options_are_refused(tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        config.load_config(_config(tmp_path), overrides=[override])


# --- the CLI -----------------------------------------------------------------------------


def _config(tmp_path, extra_heads="pooling: mean", extra_train=""):
    csv = tmp_path / "train.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{'pos' if y else 'neg'}\n" for t, y in _rows()))
    spec = json.dumps({**tiny_bert_spec(), "num_layers": 1})
    path = tmp_path / "setfit.yaml"
    path.write_text(f"""name: tiny_setfit
backbone: {{spec: {spec}, sequence_length: 8}}
heads: [{{name: label, type: classification, {extra_heads}}}]
data: {{source: csv, train_path: {csv}, validation_path: {csv}, train_per_class: 4, batch_size: 8}}
train: {{recipe: contrastive, contrastive: {{num_iterations: 3, learning_rate: 0.001, batch_size: 8}},
         epochs: 2, learning_rate: 0.01, optimizer: adam, unfreeze: {{schedule: frozen}},
         keep: last, verbose: 0{extra_train}}}
""")
    return str(path)


def test_cli_contrastive_run_writes_metrics_and_export(tmp_path):
    W = str(tmp_path / "W")
    proc = run_cli("tftransfer.train", f"--config={_config(tmp_path)}", f"--workdir={W}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.load(open(os.path.join(W, "metrics.json")))
    c = metrics["contrastive"]
    assert c["pairs"] == 2 * 3 * 8 and c["positive_pairs"] == c["negative_pairs"] == 24  # k=4, 2 classes
    assert c["loss"] == "cosine" and c["loss_after"] < c["loss_before"]
    assert metrics["feature_cache"]["cached"] and "accuracy" in metrics["validation"]
    assert os.path.isfile(os.path.join(W, "model.keras"))
    assert os.path.isfile(os.path.join(W, "contrastive", contrastive.ENCODER_WEIGHTS))
    assert os.listdir(os.path.join(W, "export")) == ["1"]
    assert os.path.isfile(os.path.join(W, "export", "1", "saved_model.pb"))
    # SetFit's head: the resolved config records it; the model normalises and penalises (k=4, 2 classes).
    import yaml

    resolved = yaml.safe_load(open(os.path.join(W, "config.yaml")))["heads"][0]
    assert resolved["normalize"] is True and resolved["l2_c"] == 1.0
    model = keras.saving.load_model(os.path.join(W, "model.keras"), compile=False)
    model.get_layer("label_normalize")
    assert model.get_layer("label").kernel_regularizer.l2 == pytest.approx(1 / (2 * 1.0 * 8))


def test_bad_combination_is_exit_2_with_one_line(tmp_path):
    W = str(tmp_path / "W")
    proc = run_cli("tftransfer.train", f"--config={_config(tmp_path, extra_heads='pooling: cls')}",
                   f"--workdir={W}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "heads.0.pooling: mean" in lines[0]
    assert not os.path.exists(W)


@pytest.mark.parametrize("override,message", [
    ("train.lora={rank: 4}", "LoRA"),
    ("heads.0.type=regression", "type classification"),
    ("data.input_key=[a, b]", "sentence pairs"),
    ("distribute.strategy=multi_worker", "one machine"),
    ("data.source=digits", "needs text"),
    ("train.contrastive.loss=triplet", "cosine, contrastive"),
    ("train.contrastive.num_iterations=0", "num_iterations must be >= 1"),
])
def test_config_refuses_what_contrastive_cannot_do(tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        config.load_config(_config(tmp_path), overrides=[override])


def test_contrastive_block_needs_the_recipe(tmp_path):
    with pytest.raises(UserError, match="recipe: contrastive"):
        config.load_config(_config(tmp_path), overrides=["train.recipe=finetune"])
    cfg = config.load_config(_config(tmp_path), overrides=["train.contrastive=null"])
    assert cfg.train.contrastive.num_iterations == 20  # SetFit's default
    plain = config.load_config(_config(tmp_path), overrides=["train.recipe=finetune", "train.contrastive=null"])
    assert plain.train.contrastive is None and config.TrainConfig().recipe == "finetune"
