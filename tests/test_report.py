"""tftransfer.report: metrics against hand-computed values; figures and report.md."""

import os

import numpy as np
import pytest
from PIL import Image

from tftransfer.heads import HeadSpec
from tftransfer.report import document, efficiency, history, metrics, plots

# Six examples, three classes. Predicted (argmax): 0, 1, 1, 2, 2, 1.
LABELS = [0, 0, 1, 1, 2, 2]
PROBS = [
    [0.75, 0.15, 0.10],   # right, confidence .75
    [0.30, 0.65, 0.05],   # 0 -> 1, confidence .65
    [0.10, 0.85, 0.05],   # right, .85
    [0.30, 0.05, 0.65],   # 1 -> 2, .65; true class not in the top 2
    [0.025, 0.025, 0.95],  # right, .95
    [0.05, 0.55, 0.40],   # 2 -> 1, .55
]


def test_classification_metrics_match_hand_computed_values():
    m = metrics.classification_metrics(LABELS, PROBS, ["a", "b", "c"], top_k=2)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [0, 1, 1]]
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["top_k"] == 2 and m["top_k_accuracy"] == pytest.approx(5 / 6)
    # a: P 1/1, R 1/2 -> F1 2/3; b: P 1/3, R 1/2 -> F1 0.4; c: P 1/2, R 1/2 -> F1 0.5.
    per = {c["class"]: c for c in m["per_class"]}
    assert per["a"]["precision"] == pytest.approx(1.0) and per["a"]["recall"] == pytest.approx(0.5)
    assert per["b"]["precision"] == pytest.approx(1 / 3) and per["b"]["f1"] == pytest.approx(0.4)
    assert [c["support"] for c in m["per_class"]] == [2, 2, 2]
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.4 + 0.5) / 3)
    assert m["weighted_f1"] == pytest.approx(m["macro_f1"])  # equal support
    # ECE: bins .75 (gap .25), .65 x2 (both wrong: .65), .85 (.15), .95 (.05), .55 (.55).
    assert m["ece"] == pytest.approx((0.25 + 2 * 0.65 + 0.15 + 0.05 + 0.55) / 6)
    counts = [b["count"] for b in m["reliability"]]
    assert counts == [0, 0, 0, 0, 0, 1, 2, 1, 1, 1]
    assert m["most_confused"] == [{"true": "a", "predicted": "b", "count": 1},
                                  {"true": "b", "predicted": "c", "count": 1},
                                  {"true": "c", "predicted": "b", "count": 1}]
    expected_loss = -np.mean(np.log([0.75, 0.30, 0.85, 0.05, 0.95, 0.40]))
    assert m["loss"] == pytest.approx(expected_loss)


def test_summary_numbers_equal_scikit_learns_on_unbalanced_and_missing_classes():
    # F1 averages and accuracy come from one per-class pass (see metrics.py);
    # they must stay exactly scikit-learn's, also with a class absent from the
    # labels or never predicted and with unequal support.
    from sklearn import metrics as skm

    rng = np.random.default_rng(0)
    for num_classes in (2, 3, 7):
        for n in (1, 5, 40):
            probs = rng.random((n, num_classes)) ** 3
            probs /= probs.sum(-1, keepdims=True)
            labels = rng.integers(0, num_classes - 1, n)  # the last class never occurs
            m = metrics.classification_metrics(labels, probs)
            predicted, ids = probs.argmax(-1), list(range(num_classes))
            for average in ("macro", "weighted"):
                expected = skm.f1_score(labels, predicted, labels=ids, average=average, zero_division=0)
                assert m[f"{average}_f1"] == pytest.approx(expected, abs=1e-12)
            assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted), abs=1e-12)


def test_epoch_metrics_equal_classification_metrics_and_scikit_learns():
    # ValidationReport's per-epoch numbers (numpy only, metrics.epoch_metrics)
    # must be the report's: unbalanced, absent and never-predicted classes,
    # tied probabilities (top-k ranks ties as scikit-learn does), one class.
    from sklearn import metrics as skm

    rng = np.random.default_rng(1)
    cases = []
    for num_classes in (2, 3, 7):
        for n in (1, 5, 40):
            probs = rng.random((n, num_classes)) ** 3
            cases.append((rng.integers(0, num_classes - 1, n), probs / probs.sum(-1, keepdims=True)))
    tied = np.round(rng.random((30, 6)), 1) + 0.01  # many ties
    cases.append((rng.integers(0, 6, 30), tied / tied.sum(-1, keepdims=True)))
    cases.append((np.zeros(4, int), np.ones((4, 1))))  # one class
    for labels, probs in cases:
        fast = metrics.epoch_metrics(labels, probs, top_k=3)
        full = metrics.classification_metrics(labels, probs, top_k=3)
        for key in ("macro_f1", "weighted_f1", "top_k_accuracy", "ece"):
            assert fast[key] == pytest.approx(full[key], abs=1e-12), key
        ids = list(range(probs.shape[1]))
        if len(ids) > 2:
            expected = skm.top_k_accuracy_score(labels, probs, k=min(3, len(ids) - 1), labels=ids)
            assert fast["top_k_accuracy"] == pytest.approx(expected, abs=1e-12)
        expected = skm.f1_score(labels, probs.argmax(-1), labels=ids, average="macro", zero_division=0)
        assert fast["macro_f1"] == pytest.approx(expected, abs=1e-12)


def test_top_k_is_capped_below_the_number_of_classes():
    m = metrics.classification_metrics(LABELS, PROBS, top_k=5)
    assert m["top_k"] == 2  # top-3 of 3 classes would always be 1.0
    binary = metrics.classification_metrics([0, 1, 1], [[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]])
    assert binary["top_k"] == 1 and binary["top_k_accuracy"] == pytest.approx(2 / 3)


def test_top_losses_are_the_most_wrong_examples_first():
    top = metrics.top_losses(LABELS, PROBS, [f"text {i}" for i in range(6)], ["a", "b", "c"], k=2)
    assert [t["index"] for t in top] == [3, 1]
    assert top[0] == {"index": 3, "example": "text 3", "true": "b", "predicted": "c",
                      "p_true": pytest.approx(0.05), "loss": pytest.approx(-np.log(0.05))}


def test_multilabel_and_regression_metrics():
    m = metrics.multilabel_metrics([[1, 0], [0, 1], [1, 1]], [[0.9, 0.5], [0.6, 0.7], [0.8, 0.4]])
    # Predicted at > 0.5: [1,0], [1,1], [1,0]. Class 0: P 2/3 R 1; class 1: P 1 R 1/2.
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["micro_f1"] == pytest.approx(0.75)
    assert m["map"] == pytest.approx((1.0 + (0.5 * 1 + 0.5 * 2 / 3)) / 2)
    r = metrics.regression_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 5.0])
    assert r["mse"] == pytest.approx(4 / 3) and r["mae"] == pytest.approx(2 / 3)
    assert r["r2"] == pytest.approx(-1.0)


def _write_logs(log_dir):
    import tensorflow as tf

    values = {"train": {"loss": [1.0, 0.6, 0.4, 0.3], "accuracy": [0.4, 0.6, 0.8, 0.9],
                        "unfrozen_groups": [0, 0, 3, 3], "alpha": [0.1, 0.2, 0.3, 0.4]},
              "validation": {"loss": [1.1, 0.8, 0.6, 0.55], "accuracy": [0.3, 0.5, 0.7, 0.75]}}
    for split, series in values.items():
        with tf.summary.create_file_writer(os.path.join(log_dir, split)).as_default():
            for name, ys in series.items():
                for epoch, y in enumerate(ys):
                    tf.summary.scalar(f"epoch_{name}", y, step=epoch)
        # A resumed run logs epoch 3 again: the later value wins.
    with tf.summary.create_file_writer(os.path.join(log_dir, "train")).as_default():
        tf.summary.scalar("epoch_loss", 0.25, step=3)
    return values


def test_history_reads_tensorboard_logs_and_stages(tmp_path):
    _write_logs(str(tmp_path / "logs"))
    h = history.read_history(str(tmp_path / "logs"))
    assert [round(v, 4) for _, v in h["train"]["loss"]] == [1.0, 0.6, 0.4, 0.25]
    assert [e for e, _ in h["validation"]["accuracy"]] == [0, 1, 2, 3]
    assert history.stage_changes(h) == [(0, 0.0), (2, 3.0)]
    assert history.read_history(str(tmp_path / "none")) == {"train": {}, "validation": {}}


def _is_png_of(path, kind):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size == plots.SIZES[kind]


def test_report_images_exist_have_the_expected_size_and_are_referenced(tmp_path):
    _write_logs(str(tmp_path / "logs"))
    head = HeadSpec(name="label", num_classes=3, class_names=("a", "b", "c"))
    results = {"label": document.head_metrics(head, np.array(LABELS), np.array(PROBS),
                                              [f"img{i}.png" for i in range(6)])}
    out = document.write_report(str(tmp_path / "report"), results, "demo", "W", "validation",
                                history.read_history(str(tmp_path / "logs")))
    text = open(out["report"]).read()
    kinds = {"confusion_label.png": "confusion", "reliability_label.png": "reliability",
             "learning_curves.png": "learning_curves"}
    assert sorted(os.path.basename(f) for f in out["figures"]) == sorted(kinds)
    for name, kind in kinds.items():
        assert f"]({name})" in text
        assert _is_png_of(str(tmp_path / "report" / name), kind)
    assert "| b | c | 1 |" in text  # most-confused pair b -> c
    assert "img3.png" in text  # top loss names its example


def test_compare_summary_headline_and_plot(tmp_path):
    cells = []
    for budget, (t, s) in {2: (0.7, 0.5), 8: (0.9, 0.8), "all": (0.95, 0.92)}.items():
        for seed in (0, 1):
            for arm, acc in (("transfer", t), ("scratch", s)):
                cells.append({"arm": arm, "budget": budget, "seed": seed, "accuracy": acc + 0.01 * seed,
                              "labels_per_class": 100 if budget == "all" else budget, "train_seconds": 1.0,
                              "wall_seconds": 2.0, "workdir": "w"})
    rows = efficiency.summarize(cells, [2, 8, "all"])
    assert [(r["budget"], r["arm"]) for r in rows] == [(b, a) for b in (2, 8, "all") for a in efficiency.ARMS]
    lines = efficiency.headline(rows)
    assert lines[0].startswith("Transfer never matches scratch with all labels")  # 0.905 < 0.925 at k=8
    assert "k=2: +20.0 points" in lines[1] and "k=all: +3.0 points" in lines[1]
    for c in cells:
        if c["budget"] == 8 and c["arm"] == "transfer":
            c["accuracy"] += 0.05
    lines = efficiency.headline(efficiency.summarize(cells, [2, 8, "all"]))
    assert lines[0].startswith("Transfer with 8 labels per class matches scratch with all labels: 0.955 vs 0.925")
    page, _ = efficiency.write_page(str(tmp_path), cells, [2, 8, "all"], "demo", "cmd")
    assert _is_png_of(str(tmp_path / efficiency.PLOT_FILE), "data_efficiency")
    assert f"]({efficiency.PLOT_FILE})" in open(page).read()


def test_report_page_for_multilabel_and_regression_heads(tmp_path):
    tags = HeadSpec(name="tags", type="multilabel", num_classes=2, class_names=("x", "y"))
    score = HeadSpec(name="score", type="regression", num_classes=1)
    results = {
        "tags": document.head_metrics(tags, np.array([[1, 0], [0, 1], [1, 1]]),
                                      np.array([[0.9, 0.5], [0.6, 0.7], [0.8, 0.4]])),
        "score": document.head_metrics(score, np.array([1.0, 2.0, 3.0]), np.array([[1.0], [2.0], [5.0]])),
    }
    out = document.write_report(str(tmp_path), results, "multi", "W", "validation", history=None)
    text = open(out["report"]).read()
    assert "| mAP | 0.9167 |" in text and "| R² | -1.0000 |" in text
    assert "No per-epoch history" in text and out["figures"] == []
    assert document.summary(results) == ["tags: micro_f1=0.7500, macro_f1=0.7333, map=0.9167",
                                          "score: mse=1.3333, mae=0.6667, r2=-1.0000"]


def test_collect_leaves_out_examples_without_a_label_for_a_head():
    import tensorflow as tf

    from tftransfer.report import predictions

    heads = [HeadSpec(name="a", num_classes=2), HeadSpec(name="b", type="regression", num_classes=1)]
    x = np.arange(5, dtype="float32")[:, None]
    batch = (x, {"a": np.array([1, 0, 0, 1, 0]), "b": np.array([5.0, 0.0, 3.0, 0.0, 1.0], "float32")},
             {"a": np.array([1, 1, 0, 1, 1], "float32"), "b": np.array([1, 0, 1, 0, 1], "float32")})
    ds = tf.data.Dataset.from_tensor_slices(batch).batch(3)  # two batches: positions run across them

    def predict(inputs):
        v = np.asarray(inputs)
        return {"a": np.concatenate([v, 1 - v], axis=1), "b": v * 10}

    got, positions = predictions.collect(predict, ds, heads, verbose=0, with_positions=True)
    np.testing.assert_array_equal(positions["a"], [0, 1, 3, 4])
    np.testing.assert_array_equal(positions["b"], [0, 2, 4])
    np.testing.assert_array_equal(got["a"][0], [1, 0, 1, 0])
    np.testing.assert_array_equal(got["b"][1].ravel(), [0, 20, 40])
