"""Ensembles at inference (and sentence-pair serving): mean probabilities in a plain-TensorFlow process."""

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tftransfer
from tftransfer import config as config_lib
from tftransfer import experiment
from tftransfer.errors import UserError
from tftransfer.export import save_serving_assets
from tftransfer.export.ensemble import MeanProbabilities, export_ensemble
from tftransfer.heads import HeadSpec

from conftest import TINY_VOCAB, run_cli, tiny_bert_spec

FIRST = ["the movie was good", "a very boring film !", "great fun", "not bad", "the film"]
SECOND = ["the movie was good", "the film is awful", "very fun !", "not bad at all", "a movie was fun"]


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two sentence-pair work dirs (tiny BERT, different random init), as training leaves them."""
    root = tmp_path_factory.mktemp("ensemble")
    data = root / "pairs.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["first", "second", "label"])
        for i, (a, b) in enumerate(zip(FIRST * 4, SECOND * 4)):
            w.writerow([a, b, "same" if i % 2 else "different"])
    spec = {**tiny_bert_spec(), "num_layers": 1}
    text = json.dumps({"name": "pairs", "backbone": {"spec": spec, "sequence_length": 16},
                       "data": {"source": "csv", "train_path": str(data), "input_key": ["first", "second"],
                                "validation_fraction": 0.25}})
    cfg = config_lib.load_config(text=text)
    dirs, models = [], []
    for seed in (0, 1):
        keras.utils.set_random_seed(seed)
        loaded = experiment.backbone_from_config(cfg)
        heads = [HeadSpec(num_classes=2, class_names=("different", "same"))]
        model = tftransfer.build_model(loaded, heads)
        # The head's random init is small; larger weights make the members disagree clearly.
        kernel = model.get_layer("label")
        kernel.kernel.assign(kernel.kernel * 20.0)
        w = root / f"member{seed}"
        w.mkdir()
        model.save(w / "model.keras")
        save_serving_assets(str(w), loaded, heads, pair=True)
        (w / "config.yaml").write_text(config_lib.dump_yaml(cfg))
        (w / "metrics.json").write_text("{}")  # what marks a finished run
        dirs.append(str(w))
        models.append(model)
    return {"root": root, "dirs": dirs, "models": models, "cfg": cfg, "preprocessor": loaded.preprocessor}


FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf

    spec = json.load(open(sys.argv[1]))
    data = np.load(spec["arrays"])
    ids = {k: tf.constant(data[k]) for k in ("token_ids", "segment_ids", "padding_mask")}
    out = {}
    twin = tf.saved_model.load(spec["twin"])  # core ops only: plain TensorFlow
    out["twin"] = twin.signatures["serving_default"](**ids)["probabilities"].numpy()
    import tensorflow_text  # the raw-text signature holds the tokenizer's ops
    raw = tf.saved_model.load(spec["raw"]).signatures["serving_default"]
    names = sorted(raw.structured_input_signature[1])
    out["raw"] = raw(text=tf.constant(spec["first"]), text_pair=tf.constant(spec["second"]))["probabilities"].numpy()
    np.savez(spec["result"], **out)
    print(json.dumps({"inputs": names}))
""")


def test_ensemble_serves_the_mean_of_the_members_probabilities(members, tmp_path):
    dirs = members["dirs"]
    E = str(members["root"] / "E")
    result = export_ensemble(dirs, E)
    assert result["path"] == os.path.join(E, "export", "1")
    assert sorted(os.listdir(E)) == ["config.yaml", "ensemble.json", "export", "export_token_ids",
                                     "heads.json", "preprocessor"]
    info = json.load(open(os.path.join(result["path"], "assets", "tftransfer.json")))
    assert info["ensemble"]["members"] == [os.path.abspath(d) for d in dirs]
    assert set(info["signatures"]["serving_default"]) == {"text", "text_pair", "dtype"}

    pre = members["preprocessor"](x=(tf.constant(FIRST), tf.constant(SECOND)))
    arrays = {k: np.asarray(v).astype("int32") for k, v in pre.items()}
    np.savez(tmp_path / "arrays.npz", **arrays)
    spec = {"arrays": str(tmp_path / "arrays.npz"), "twin": os.path.join(E, "export_token_ids", "1"),
            "raw": result["path"],
            "first": FIRST, "second": SECOND, "result": str(tmp_path / "result.npz")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "fresh.py").write_text(FRESH_PROCESS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(tmp_path / "fresh.py"), str(tmp_path / "spec.json")],
                          capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["inputs"] == ["text", "text_pair"]
    got = np.load(tmp_path / "result.npz")

    # The members' probabilities (float32, as served) and their mean.
    probs = [softmax(np.asarray(m(pre, training=False)["label"], "float64")) for m in members["models"]]
    assert np.abs(probs[0] - probs[1]).max() > 0.05  # the members really disagree
    mean = (probs[0] + probs[1]) / 2
    np.testing.assert_allclose(got["twin"], mean, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got["raw"], mean, atol=1e-6, rtol=0)  # text + text_pair, tokenised inside

    # evaluate --workdir=E: the members' averaged probabilities on the first member's validation split.
    evaluated = run_cli("tftransfer.evaluate", f"--workdir={E}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.load(open(os.path.join(E, "report", "metrics_validation.json")))
    validation = experiment.load_data(members["cfg"]).validation
    (first, second), labels = (tuple(np.array(c) for c in zip(*[(a.numpy(), b.numpy()) for (a, b), _ in validation.dataset])),
                               np.array([int(y) for _, y in validation.dataset]))
    x = members["preprocessor"](x=(tf.constant(first), tf.constant(second)))
    p = np.mean([softmax(np.asarray(m(x, training=False)["label"])) for m in members["models"]], 0)
    assert report["num_examples"] == len(labels) == 5
    assert abs(report["metrics"]["accuracy"] - float((p.argmax(-1) == labels).mean())) < 1e-9
    assert abs(report["metrics"]["loss"] - float(-np.log(p[np.arange(len(labels)), labels]).mean())) < 1e-5


def test_mismatched_member_is_refused_before_anything_is_written(members):
    dirs = members["dirs"]
    other = str(members["root"] / "relabelled")
    shutil.copytree(dirs[1], other)
    heads = json.load(open(os.path.join(other, "heads.json")))
    heads["heads"][0]["class_names"] = ["same", "different"]
    (members["root"] / "relabelled" / "heads.json").write_text(json.dumps(heads))
    E = str(members["root"] / "E_bad")
    with pytest.raises(UserError, match=r"member '.*relabelled' differs from .* in heads.label.class_names"):
        export_ensemble([dirs[0], other], E)
    assert not os.path.exists(E)
    # Refused by the version writer after the members loaded: still nothing left behind.
    with pytest.raises(UserError, match="positive integer"):
        export_ensemble(dirs, E, version=0)
    assert not os.path.exists(E)


def test_mean_probabilities_per_head_type():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 3)) * 5, rng.normal(size=(4, 3)) * 5
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    for head_type, to_probs in (("classification", softmax), ("multilabel", sigmoid),
                                ("regression", lambda z: z)):
        out = np.asarray(MeanProbabilities(head_type)([a.astype("float32"), b.astype("float32")]), "float64")
        np.testing.assert_allclose(to_probs(out), (to_probs(a) + to_probs(b)) / 2, atol=1e-6, rtol=0)
