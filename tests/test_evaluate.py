"""`python -m tftransfer.evaluate`: the report from a work dir and from its exported SavedModel."""

import json
import os

import numpy as np
from PIL import Image

from conftest import run_cli
from tftransfer.report import plots
from tftransfer.report.history import read_history


def test_report_from_workdir_and_saved_model(tiny_digits_workdir):
    W = tiny_digits_workdir  # a finished TINY_DIGITS_YAML run (conftest), with its export/1

    result = run_cli("tftransfer.evaluate", f"--workdir={W}")
    assert result.returncode == 0, result.stderr[-3000:]
    report_dir = os.path.join(W, "report")
    page = open(os.path.join(report_dir, "report.md")).read()
    for name, kind in (("confusion_label.png", "confusion"), ("reliability_label.png", "reliability"),
                       ("learning_curves.png", "learning_curves")):
        assert f"]({name})" in page
        with Image.open(os.path.join(report_dir, name)) as image:
            assert image.format == "PNG" and image.size == plots.SIZES[kind]
    metrics = json.load(open(os.path.join(report_dir, "metrics_validation.json")))
    head = metrics["heads"]["label"]
    # The confusion matrix accounts for every validation example, and agrees with accuracy.
    cm = np.array(head["confusion_matrix"])
    assert cm.sum() == metrics["num_examples"] == json.load(open(os.path.join(W, "metrics.json")))[
        "num_validation_examples"]
    assert abs(np.trace(cm) / cm.sum() - head["accuracy"]) < 1e-9
    assert {"macro_f1", "weighted_f1", "top_k_accuracy", "ece", "most_confused", "top_losses"} <= set(head)
    assert "validation: label: accuracy=" in result.stdout
    # Training logged the report's numbers per epoch as TensorBoard scalars too.
    logged = read_history(os.path.join(W, "logs"))["validation"]
    assert {"macro_f1", "weighted_f1", "top_k_accuracy", "ece", "loss", "accuracy"} <= set(logged)
    assert [e for e, _ in logged["macro_f1"]] == [0, 1]

    # The exported SavedModel (what TF Serving runs) gives the same predictions.
    exported = run_cli("tftransfer.evaluate", f"--workdir={W}/export/1")
    assert exported.returncode == 0, exported.stderr[-3000:]
    served = json.load(open(os.path.join(report_dir, "saved_model_1", "metrics_validation.json")))
    assert served["heads"]["label"]["confusion_matrix"] == head["confusion_matrix"]
    assert os.path.isfile(os.path.join(report_dir, "saved_model_1", "report.md"))

    # Bad input: one line, exit 2, nothing written.
    bad = run_cli("tftransfer.evaluate", f"--workdir={W}", "--split=test")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --split=test")
    assert not os.path.exists(os.path.join(report_dir, "metrics_test.json"))
