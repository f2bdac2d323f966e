"""`python -m tftransfer.train` end to end, epoch selection, divergence, multi-task (kill/resume:
test_train_resume.py; bad inputs: test_bad_inputs.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY_DIGITS_YAML as TINY_DIGITS, run_cli

def _config(tmp_path, text=TINY_DIGITS, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real `python -m tftransfer.train` run (3 epochs from scratch, SavedModel export on),
    shared by the tests of the work dir it leaves: contract, evaluate, best epoch + BN statistics."""
    root = tmp_path_factory.mktemp("trained")
    W = str(root / "w")
    result = run_cli("tftransfer.train", f"--config={_config(root)}", f"--workdir={W}",
                     "--config.backbone.load_weights=false", "--config.train.epochs=3",
                     "--config.train.learning_rate=0.01")
    assert result.returncode == 0, result.stderr[-3000:]
    return W, result, _config(root)


def test_train_end_to_end_writes_the_work_dir_contract(trained):
    W, _, config = trained
    for name in ("config.yaml", "metrics.json", "model.keras", "checkpoints/best.weights.h5",
                 "export/1/saved_model.pb", "export/1/assets/labels.txt"):
        assert os.path.exists(os.path.join(W, name)), name
    assert os.listdir(os.path.join(W, "logs"))
    assert "epochs: 3" in open(os.path.join(W, "config.yaml")).read()  # override recorded
    metrics = json.load(open(os.path.join(W, "metrics.json")))
    assert metrics["epochs"] == 3 and 0.0 <= metrics["validation"]["accuracy"] <= 1.0
    assert metrics["validation"]["accuracy"] > 0.5  # 3 digit classes: chance is 0.33
    assert open(os.path.join(W, "export/1/assets/labels.txt")).read().split() == ["0", "1", "2"]
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    shown = subprocess.run([cli, "show", "--dir", os.path.join(W, "export/1"), "--all"],
                           capture_output=True, text=True, timeout=120)
    assert "signature_def['serving_default']" in shown.stdout
    assert "image_bytes" in shown.stdout and "serve_preprocessed" in shown.stdout
    # A finished work dir is not silently clobbered.
    again = run_cli("tftransfer.train", f"--config={config}", f"--workdir={W}")
    assert again.returncode == 2 and "finished run" in again.stderr


def test_helpfull_lists_flags():
    result = run_cli("tftransfer.train", "--helpfull")
    assert result.returncode == 0
    for flag in ("--config", "--workdir", "--strategy", "--[no]overwrite", "--config.train.epochs"):
        assert flag in result.stdout


def _text_config(tmp_path, rows, extra=""):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("text,label\n" + "".join(f"{t},{l}\n" for t, l in rows))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad"]
    return _config(tmp_path, f"""
backbone:
  spec: {{architecture: bert, vocabulary: {vocab}, num_layers: 1, num_heads: 1,
         hidden_dim: 8, intermediate_dim: 8, max_sequence_length: 16}}
  sequence_length: 8
data: {{source: csv, train_path: {csv_path}, validation_fraction: 0.3}}
train: {{epochs: 1, verbose: 0}}
{extra}""")


def test_empty_validation_split_is_refused(tmp_path, monkeypatch):
    """Any source whose validation split comes out empty (e.g. a TFDS slice) is refused up front."""
    import tensorflow as tf

    from tftransfer import config as config_lib
    from tftransfer import data as data_lib
    from tftransfer import experiment
    from tftransfer.errors import UserError

    def empty(n):
        return data_lib.Split(tf.data.Dataset.from_tensor_slices((["good"] * n, [0] * n)), n)

    monkeypatch.setattr(data_lib, "load_text_file", lambda *a, **k: data_lib.LabelledData(
        "text", empty(4), empty(0), ["a", "b"]))
    cfg = config_lib.load_config(_text_config(tmp_path, [("good", 0), ("bad", 1)]), [])
    with pytest.raises(UserError, match="validation split of source csv is empty"):
        experiment.load_data(cfg)


def test_evaluate_entrypoint_reproduces_training_metrics(trained, tmp_path):
    W = trained[0]
    result = run_cli("tftransfer.evaluate", f"--workdir={W}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(os.path.join(W, "report", "metrics_validation.json")))
    trained = json.load(open(os.path.join(W, "metrics.json")))["validation"]
    assert abs(report["metrics"]["accuracy"] - trained["accuracy"]) < 1e-6
    missing = run_cli("tftransfer.evaluate", f"--workdir={tmp_path / 'none'}")
    assert missing.returncode == 2 and "no model.keras" in missing.stderr


def test_short_scratch_run_ships_best_epoch_with_matching_batchnorm_statistics(trained):
    """train.keep=best + precise BN: the numbers in metrics.json describe model.keras and the export."""
    import keras
    import tensorflow as tf

    from tftransfer import bn_stats, experiment, workdir
    from tftransfer import config as config_lib
    from tftransfer.data import make_pipeline
    from tftransfer.export import load_serving_assets

    W, result, _ = trained
    assert "recomputed BatchNorm statistics" in result.stderr
    metrics = json.load(open(os.path.join(W, "metrics.json")))
    record = json.load(open(os.path.join(W, "history.json")))
    assert [e["epoch"] for e in metrics["history"]] == [1, 2, 3] and metrics["epochs"] == 3
    assert metrics["keep"] == "best" and metrics["selected_epoch"] == record["best_epoch"]
    assert metrics["bn_stats"]["recomputed"] and metrics["bn_stats"]["batches"] == 3

    cfg = config_lib.load_config(os.path.join(W, "config.yaml"), [])
    labelled = experiment.load_data(cfg)
    heads = experiment.resolve_heads(cfg, labelled)
    assets = load_serving_assets(W)
    model = workdir.load_model(os.path.join(W, "model.keras"))
    # The shipped weights are the best epoch's (BatchNorm statistics aside, which were recomputed).
    best = keras.models.clone_model(model)
    best.load_weights(os.path.join(W, "checkpoints", "best.weights.h5"))
    stats = {id(v) for l in bn_stats.batchnorm_layers(model) for v in (l.moving_mean, l.moving_variance)}
    for v, b in zip(model.weights, best.weights):
        if id(v) not in stats:
            np.testing.assert_array_equal(v.numpy(), b.numpy(), err_msg=v.path)
    # Saved statistics are the recomputed ones: recomputing again changes nothing.
    saved = bn_stats.snapshot(model)
    train_batches = make_pipeline(labelled.train, assets.preprocessor, "image", heads, cfg.data.batch_size,
                                  training=False, cache=False)
    bn_stats.recompute(model, train_batches)
    for path, (mean, var) in bn_stats.snapshot(model).items():
        np.testing.assert_allclose(mean, saved[path][0], rtol=1e-5, atol=1e-6, err_msg=path)
        np.testing.assert_allclose(var, saved[path][1], rtol=1e-5, atol=1e-6, err_msg=path)
    # The reported validation accuracy is that of model.keras and of the export.
    val = make_pipeline(labelled.validation, assets.preprocessor, "image", heads, 64, training=False, cache=False)
    xs, ys = zip(*[(x.numpy(), y["label"].numpy()) for x, y in val])
    x, y = np.concatenate(xs), np.concatenate(ys)
    y = y.argmax(-1) if y.ndim == 2 else y
    keras_acc = float(np.mean(np.asarray(model(x, training=False)["label"]).argmax(-1) == y))
    serving = tf.saved_model.load(os.path.join(W, "export", "1")).signatures["serve_preprocessed"]
    export_acc = float(np.mean(serving(image=tf.constant(x))["class_id"].numpy() == y))
    assert abs(keras_acc - metrics["validation"]["accuracy"]) < 1e-6
    assert abs(export_acc - metrics["validation"]["accuracy"]) < 1e-6


def test_diverged_training_stops_with_one_line_and_ships_nothing(tmp_path):
    W = str(tmp_path / "w")
    result = run_cli("tftransfer.train", f"--config={_config(tmp_path)}", f"--workdir={W}",
                     "--config.train.optimizer=sgd", "--config.train.learning_rate=1e9")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged: the loss grew to "), last
    assert "at epoch 1, step 2; lower train.learning_rate" in last
    for name in ("metrics.json", "model.keras", "export", os.path.join("checkpoints", "best.weights.h5")):
        assert not os.path.exists(os.path.join(W, name)), name


def test_export_refuses_non_finite_weights(tmp_path):
    import keras

    import tftransfer
    from tftransfer.errors import UserError
    from tftransfer.export import export_saved_model
    from tftransfer.heads import HeadSpec

    from conftest import TINY_RESNET

    loaded = tftransfer.load_backbone(spec=dict(TINY_RESNET), image_size=16)
    heads = [HeadSpec(num_classes=2)]
    model = tftransfer.build_model(loaded, heads)
    kernel = model.get_layer("label").kernel
    kernel.assign(keras.ops.full(kernel.shape, float("nan")))
    with pytest.raises(UserError, match=r"export: weight .*label.* is not finite"):
        export_saved_model(model, loaded.preprocessor, "image", heads, str(tmp_path / "export"))
    assert not os.path.exists(tmp_path / "export")  # refused before anything is written


def _multitask_csv(path, n, seed, drop):
    """Reviews in the tiny vocabulary: sentiment (3 pos : 1 neg), topic, stars; `drop`: empty cells."""
    rng = np.random.default_rng(seed)
    stars = {"good": 4, "great": 5, "bad": 2, "awful": 1}
    lines = ["text,sentiment,topic,stars"]
    for i in range(n):
        adjective = rng.choice(["good", "great", "bad", "awful"], p=[0.375, 0.375, 0.125, 0.125])
        noun = rng.choice(["movie", "film"])
        row = [f"the {noun} was {'very ' if i % 3 else ''}{adjective}",
               "pos" if stars[adjective] > 3 else "neg", noun, str(stars[adjective])]
        if drop and i % 4 == 1:
            row[1] = ""  # no sentiment label: trains topic and stars only
        if drop and i % 4 == 2:
            row[2] = row[3] = ""
        lines.append(",".join(row))
    path.write_text("\n".join(lines) + "\n")


def test_multitask_with_missing_labels_and_class_weights_through_the_cli(tmp_path):
    from conftest import tiny_bert_spec

    _multitask_csv(tmp_path / "train.csv", 64, 0, drop=True)
    _multitask_csv(tmp_path / "val.csv", 24, 1, drop=False)
    W = str(tmp_path / "w")
    config = _config(tmp_path, json.dumps({
        "name": "multitask", "backbone": {"spec": tiny_bert_spec(), "sequence_length": 8},
        "heads": [{"name": "sentiment", "pooling": "mean"}, {"name": "topic", "loss_weight": 0.5, "pooling": "mean"},
                  {"name": "rating", "type": "regression", "label_key": "stars", "pooling": "mean"}],
        "data": {"source": "csv", "train_path": str(tmp_path / "train.csv"),
                 "validation_path": str(tmp_path / "val.csv"), "batch_size": 8},
        "train": {"epochs": 3, "learning_rate": 0.01, "optimizer": "adam", "verbose": 0,
                  "class_weight": {"sentiment": "balanced"}}}), name="mt.yaml")
    result = run_cli("tftransfer.train", f"--config={config}", f"--workdir={W}")
    assert result.returncode == 0, result.stderr[-3000:]
    # The weights used are logged: balanced over the 48 labelled sentiment rows.
    labelled = [l.split(",")[1] for l in open(tmp_path / "train.csv").read().split("\n")[1:] if l]
    labelled = [s for s in labelled if s]
    n, neg = len(labelled), labelled.count("neg")
    assert f"neg={n / (2 * neg):.4g}, pos={n / (2 * (n - neg)):.4g}" in result.stderr
    metrics = json.load(open(os.path.join(W, "metrics.json")))
    heads = metrics["heads"]
    assert set(heads) == {"sentiment", "topic", "rating"}
    for name, metric in (("sentiment", "accuracy"), ("topic", "accuracy"), ("rating", "mae")):
        assert {"loss", metric} <= set(heads[name]["train"]) and {"loss", metric} <= set(heads[name]["validation"])
        assert metrics["validation"][f"{name}_loss"] == heads[name]["validation"]["loss"]
        losses = [e[f"{name}_loss"] for e in metrics["history"]]  # per-head losses every epoch
        assert losses[-1] < losses[0], (name, losses)
    assert heads["sentiment"]["class_weight"] == {"neg": pytest.approx(n / (2 * neg)),
                                                  "pos": pytest.approx(n / (2 * (n - neg)))}
    assert metrics["monitor"] == "val_loss"  # the summed (loss_weight x head loss) validation loss
    v = metrics["validation"]
    assert v["loss"] == pytest.approx(v["sentiment_loss"] + 0.5 * v["topic_loss"] + v["rating_loss"], rel=1e-4)
    from tftransfer.report.history import read_history

    logged = read_history(os.path.join(W, "logs"))  # TensorBoard: a curve per head and metric
    assert {"sentiment_loss", "topic_accuracy", "rating_mae"} <= set(logged["train"])
    assert {"sentiment_loss", "sentiment_macro_f1", "rating_loss"} <= set(logged["validation"])
    # The export serves every head; evaluate scores each one through the SavedModel's signature.
    report = run_cli("tftransfer.evaluate", f"--workdir={W}/export/1")
    assert report.returncode == 0, report.stderr[-3000:]
    for line in ("validation: sentiment: accuracy=", "validation: topic: accuracy=", "validation: rating: mse="):
        assert line in report.stdout
    scored = json.load(open(os.path.join(W, "report", "saved_model_1", "metrics_validation.json")))
    assert {"sentiment_accuracy", "topic_macro_f1", "rating_mae"} <= set(scored["metrics"])
    assert scored["heads"]["sentiment"]["num_examples"] == 24
