"""train.recipe contrastive (SetFit): pair sampler counts, the loss goes down, a CLI run, bad combinations."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tftransfer import backbones, builders, config, contrastive
from tftransfer.data import Split
from tftransfer.errors import UserError
from tftransfer.heads import HeadSpec

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
