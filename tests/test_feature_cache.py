"""Feature extraction, cached (`train.cache_features`, tftransfer/feature_cache.py).

Three `python -m tftransfer.train` runs of the tiny digits config start at
once (module fixture, ~25 s on a loaded 2-core machine): frozen backbone
with the cache (auto), the same run with `cache_features: false`, and an
augmented run (no cache). The rest is in-process and fast.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, TINY_DIGITS_YAML

# Frozen backbone, a head with a hidden layer and dropout (both train in the head model).
FROZEN = TINY_DIGITS_YAML.replace(
    "train: {epochs: 2, optimizer: adam, verbose: 0}",
    "heads: [{name: label, hidden_units: 8, dropout: 0.2}]\n"
    "train: {epochs: 3, optimizer: adam, verbose: 0, unfreeze: {schedule: frozen}}")
AUGMENTED = FROZEN.replace("batch_size: 20", "batch_size: 20\n  augment: {flip: horizontal}")
# Cached and uncached runs see the same batches in the same order (CPU, fixed
# seed): measured bitwise equal; the tolerance allows a different summation order.
WEIGHTS_ATOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`{name: (workdir, CompletedProcess-like)}` of the three runs, started together."""
    root = tmp_path_factory.mktemp("feature_cache")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    specs = {"cached": (FROZEN, []), "uncached": (FROZEN, ["--config.train.cache_features=false"]),
             "augmented": (AUGMENTED, [])}
    procs = {}
    for name, (text, extra) in specs.items():
        config = root / f"{name}.yaml"
        config.write_text(text)
        W = str(root / name)
        procs[name] = (W, subprocess.Popen(
            [sys.executable, "-m", "tftransfer.train", f"--config={config}", f"--workdir={W}", *extra],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = {}
    for name, (W, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {stderr[-3000:]}"
        out[name] = (W, stderr, json.load(open(os.path.join(W, "metrics.json"))))
    return out


def _weights(W):
    from tftransfer import workdir

    model = workdir.load_model(os.path.join(W, "model.keras"))
    return {v.path: np.asarray(v) for v in model.weights}


def test_cached_and_uncached_runs_train_the_same_head(runs):
    (Wc, log_c, cached), (Wu, log_u, uncached) = runs["cached"], runs["uncached"]
    assert cached["feature_cache"]["cached"] is True
    assert uncached["feature_cache"] == {"cached": False, "reason": "train.cache_features is false"}
    assert "feature cache on: the backbone is frozen for the whole run" in log_c
    a, b = _weights(Wc), _weights(Wu)
    assert a.keys() == b.keys()  # the same full model: backbone + pooling + head
    for path in a:
        np.testing.assert_allclose(a[path], b[path], atol=WEIGHTS_ATOL, err_msg=path)
    assert np.abs(a["label/kernel"] - b["label/kernel"]).max() <= WEIGHTS_ATOL
    for key in ("loss", "accuracy"):
        assert cached["validation"][key] == pytest.approx(uncached["validation"][key], abs=1e-5)
    assert [e["epoch"] for e in cached["history"]] == [1, 2, 3]
    # The shipped epoch's checkpoint is the head model's; the history has the usual keys.
    assert set(cached["history"][-1]) == set(uncached["history"][-1])


def test_cached_run_records_the_cache_and_exports_a_serving_model(runs):
    (Wc, _, cached), (Wu, _, _) = runs["cached"], runs["uncached"]
    splits = cached["feature_cache"]["splits"]
    assert set(splits) == {"train", "validation"} and all(s["source"] == "computed" for s in splits.values())
    for name, info in splits.items():
        assert os.path.isfile(os.path.join(Wc, "cache", "features", info["key"], f"{name}.npz"))
    from sklearn.datasets import load_digits

    images = np.repeat((load_digits().images[:4] * (255 / 16)).astype("uint8")[..., None], 3, axis=-1)
    contents = tf.constant([tf.io.encode_png(im).numpy() for im in images])
    served = {}
    for name, W in (("cached", Wc), ("uncached", Wu)):
        signature = tf.saved_model.load(os.path.join(W, "export", "1")).signatures["serving_default"]
        served[name] = signature(image_bytes=contents)["probabilities"].numpy()
    assert served["cached"].shape == (4, 3)
    np.testing.assert_allclose(served["cached"].sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(served["cached"], served["uncached"], atol=1e-5)


def test_augmented_run_does_not_cache_and_logs_why(runs):
    W, log, metrics = runs["augmented"]
    assert metrics["feature_cache"] == {"cached": False, "reason": "data.augment changes the inputs every epoch"}
    assert "feature cache off: data.augment changes the inputs every epoch" in log
    assert not os.path.exists(os.path.join(W, "cache", "features"))


# --- in-process ------------------------------------------------------------------


def _experiment(tmp_path, text):
    from tftransfer import config as config_lib
    from tftransfer import distribute, experiment, run_loop

    path = tmp_path / "c.yaml"
    path.write_text(text)
    cfg = config_lib.load_config(str(path))
    labelled = experiment.load_data(cfg)
    heads = experiment.resolve_heads(cfg, labelled)
    loaded = experiment.backbone_from_config(cfg)
    model, _ = experiment.transfer_model(cfg, loaded, heads, 10)
    run = run_loop.Run(workdir=str(tmp_path), out=str(tmp_path), strategy=tf.distribute.get_strategy(),
                       cluster=distribute.Cluster(), config_text="")
    return cfg, run, model, loaded, labelled, heads


def test_an_unfreezing_schedule_does_not_cache_and_logs_why(tmp_path, caplog):
    from tftransfer import experiment

    text = FROZEN.replace("schedule: frozen", "schedule: [{at_epoch: 0, groups: head}, {at_epoch: 2, groups: all}]")
    cfg, run, model, loaded, labelled, heads = _experiment(tmp_path, text)
    with caplog.at_level("INFO", logger="absl"):
        features = experiment.cached_features(cfg, run, model, loaded, labelled, heads, 10)
    assert not features.on and features.head_model is None
    assert features.report == {"cached": False, "reason": "train.unfreeze.schedule trains backbone layers"}
    assert "feature cache off: train.unfreeze.schedule trains backbone layers" in caplog.text


def test_head_model_on_features_equals_the_full_model(tmp_path):
    from tftransfer import builders, experiment

    cfg, run, model, loaded, labelled, heads = _experiment(tmp_path, FROZEN)
    features = experiment.cached_features(cfg, run, model, loaded, labelled, heads, 10)
    assert features.on
    x = next(iter(experiment.pipelines(cfg, labelled, loaded, heads, 8)[1]))[0]
    full = model(x, training=False)["label"]
    split = builders.head_model(model, heads)(builders.features_model(model, heads)(x, training=False))
    np.testing.assert_allclose(split["label"], full, atol=1e-5)
    # The cached validation rows are those features, in order.
    first = next(iter(features.labelled.validation.dataset.batch(8)))[0]
    np.testing.assert_allclose(features.head_model(first)["label"], full[: len(first["label_features"])],
                               atol=1e-5)
    assert features.head_model.get_layer("label") is model.get_layer("label")  # shared, not copied


def test_a_changed_backbone_preprocessing_or_data_invalidates_the_disk_cache(tmp_path):
    from tftransfer import builders, feature_cache
    from tftransfer.backbones import TINY_RESNET_SPEC, load_backbone
    from tftransfer.data import Split
    from tftransfer.heads import HeadSpec

    heads = [HeadSpec(num_classes=3)]
    loaded = load_backbone(spec=dict(TINY_RESNET_SPEC), image_size=16)
    model = builders.build_model(loaded, heads)
    features_model = builders.features_model(model, heads)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (6, 16, 16, 3)).astype("float32")

    def split(x):
        return Split(tf.data.Dataset.from_tensor_slices((x, np.arange(6) % 3)), 6)

    def features(x=images, preprocessor=loaded.preprocessor):
        key = feature_cache.model_key(features_model, heads)
        got, info = feature_cache.load_or_compute(features_model, split(x), preprocessor, str(tmp_path), key,
                                                  batch_size=4)
        rows = np.concatenate([f["label_features"] for f, _ in got.dataset.batch(6).as_numpy_iterator()])
        return rows, info

    first, info = features()
    again, info_again = features()
    assert info["source"] == "computed" and info_again["source"] == "disk" and info_again["key"] == info["key"]
    np.testing.assert_array_equal(again, first)

    changed = images.copy()
    changed[0] += 1.0  # data
    rows, data_info = features(x=changed)
    assert data_info["source"] == "computed" and data_info["key"] != info["key"]
    assert not np.allclose(rows[0], first[0]) and np.allclose(rows[1:], first[1:], atol=1e-6)

    rows, pre_info = features(preprocessor=lambda x: loaded.preprocessor(x) * 0.5)  # preprocessing
    assert pre_info["source"] == "computed" and pre_info["key"] not in (info["key"], data_info["key"])
    assert not np.allclose(rows, first)

    kernel = next(v for v in loaded.model.weights if v.path.endswith("kernel"))
    kernel.assign(kernel * 1.5)  # backbone weights
    rows, weights_info = features()
    assert weights_info["source"] == "computed" and weights_info["key"] != info["key"]
    assert not np.allclose(rows, first)
    assert len(os.listdir(tmp_path)) == 4  # one directory per key, none overwritten


def test_decide_names_the_reason():
    from tftransfer.errors import UserError
    from tftransfer.feature_cache import decide

    ok = dict(frozen=True, augmented=False, lora=False, multi_worker=False)
    assert decide("auto", **ok)[0] is True
    assert decide(False, **ok) == (False, "train.cache_features is false")
    assert "lora" in decide("auto", **{**ok, "lora": True})[1]
    assert "multi_worker" in decide("auto", **{**ok, "multi_worker": True})[1]
    assert "stem/kernel" in decide("auto", **ok, outside_groups=["stem/kernel"])[1]
    for bad in (True, 0, "yes"):
        with pytest.raises(UserError, match="cache_features must be one of auto, false"):
            decide(bad, **ok)


def test_features_are_evaluated_in_large_batches_and_raw_inputs_in_the_datas_own():
    # A linear head over in-memory feature rows: the fixed cost of each
    # evaluation batch dominated a cached epoch with the data's own batch.
    from tftransfer import config as config_lib
    from tftransfer import experiment
    from tftransfer.feature_cache import EVAL_BATCH, FEATURES

    cfg = config_lib.load_config(text=FROZEN)
    raw = experiment.eval_batch_size(cfg, 1, 900, "image")
    assert raw == max(4 * cfg.data.batch_size, 64)
    assert experiment.eval_batch_size(cfg, 1, 900, FEATURES) == EVAL_BATCH >= 900  # one batch
    # Replicas: every replica still gets rows in the final batch.
    assert experiment.eval_batch_size(cfg, 2, 9, FEATURES) == 2 * EVAL_BATCH
