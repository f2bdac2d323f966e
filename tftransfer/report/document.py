"""Per-head metrics -> `report.md` with its PNG figures beside it.

`head_metrics` picks the metrics for a head's type; `write_report` writes
the figures (confusion matrix, reliability diagram, learning curves) and a
Markdown page that references them by relative path, so the report
directory can be copied or opened anywhere (GitHub and Jupyter render it).
"""

import os

from tftransfer.report import metrics as metrics_lib
from tftransfer.report import plots

REPORT_FILE = "report.md"
TOP_LOSSES = 10


def head_metrics(head, labels, predictions, descriptions=None, top_k=metrics_lib.TOP_K):
    """The metrics of one head (see `tftransfer.report.metrics`), by head type.

    Args:
        head: `HeadSpec`.
        labels: numpy array. Class ids, multi-hot vectors or targets.
        predictions: numpy array. Probabilities (classification,
            multi-label) or values (regression).
        descriptions: list of str, one per example (for top losses).

    Returns:
        dict with `type` and the head type's metrics; classification also
        has `top_losses`.
    """
    names = list(head.class_names) if head.class_names else None
    if head.type == "classification":
        result = metrics_lib.classification_metrics(labels, predictions, names, top_k=top_k)
        result["top_losses"] = metrics_lib.top_losses(labels, predictions, descriptions, names, TOP_LOSSES)
    elif head.type == "multilabel":
        result = metrics_lib.multilabel_metrics(labels, predictions, names)
    else:
        result = metrics_lib.regression_metrics(labels, predictions)
    return {"type": head.type, **result}


def summary(results):
    """One line per head, e.g. `label: accuracy=0.912, macro_f1=0.905, ece=0.031`."""
    keys = {"classification": ("accuracy", "top_k_accuracy", "macro_f1", "ece", "loss"),
            "multilabel": ("micro_f1", "macro_f1", "map"), "regression": ("mse", "mae", "r2")}
    lines = []
    for name, r in results.items():
        parts = [f"{k}={r[k]:.4f}" for k in keys[r["type"]] if r.get(k) is not None]
        lines.append(f"{name}: " + ", ".join(parts))
    return lines


def write_report(report_dir, results, title, source, split, history=None, name=REPORT_FILE):
    """Write the figures and `report.md`; returns `{"report": path, "figures": [...]}`.

    Args:
        report_dir: str. Directory for the page and its PNGs.
        results: dict `{head name: head_metrics(...)}`.
        title: str. Page title (the experiment's name).
        source: str. What was evaluated (work dir or SavedModel path).
        split: str. `validation`, `train` or `test`.
        history: the run's `read_history` result, or None.
    """
    os.makedirs(report_dir, exist_ok=True)
    figures = []
    lines = [f"# Evaluation report: {title}", "",
             f"- Model: `{source}`", f"- Split: `{split}`", ""]
    for head_name, r in results.items():
        lines += [f"## Head `{head_name}` ({r['type']}, {r['num_examples']} examples)", ""]
        if r["type"] == "classification":
            lines += _classification_section(head_name, r, report_dir, split, figures)
        elif r["type"] == "multilabel":
            lines += _table(["metric", "value"], [["micro F1", r["micro_f1"]], ["macro F1", r["macro_f1"]],
                                                 ["mAP", r["map"]], ["subset accuracy", r["subset_accuracy"]]])
            lines += ["", "### Per class", ""]
            lines += _table(["class", "precision", "recall", "F1", "support", "AP"],
                            [[c["class"], c["precision"], c["recall"], c["f1"], c["support"],
                              c["average_precision"]] for c in r["per_class"]])
        else:
            lines += _table(["metric", "value"], [["MSE", r["mse"]], ["MAE", r["mae"]], ["R²", r["r2"]]])
        lines.append("")
    lines += ["## Learning curves", ""]
    curves = None
    if history:
        metric = _main_metric(history)
        curves = plots.learning_curves_png(
            history, os.path.join(report_dir, "learning_curves.png"), metric=metric,
            title=f"{title}: loss and {metric} per epoch (from the run's TensorBoard logs)",
        )
    if curves:
        figures.append(curves)
        lines += [f"![Learning curves]({os.path.basename(curves)})", ""]
    else:
        lines += ["No per-epoch history was found (the run's `logs/` TensorBoard directory).", ""]
    path = os.path.join(report_dir, name)
    from tftransfer.workdir import atomic_write_text

    atomic_write_text(path, "\n".join(lines) + "\n")
    return {"report": path, "figures": figures}


def _classification_section(head, r, report_dir, split, figures):
    lines = _table(["metric", "value"], [
        ["accuracy", r["accuracy"]], [f"top-{r['top_k']} accuracy", r["top_k_accuracy"]],
        ["macro F1", r["macro_f1"]], ["weighted F1", r["weighted_f1"]],
        ["expected calibration error (ECE)", r["ece"]], ["mean cross-entropy", r["loss"]],
    ])
    lines += ["", "### Per class", ""]
    lines += _table(["class", "precision", "recall", "F1", "support"],
                    [[c["class"], c["precision"], c["recall"], c["f1"], c["support"]] for c in r["per_class"]])
    cm = plots.confusion_matrix_png(
        r["confusion_matrix"], r["class_names"], os.path.join(report_dir, f"confusion_{head}.png"),
        title=f"Confusion matrix: head {head!r}, {split} split ({r['num_examples']} examples)",
    )
    rel = plots.reliability_png(
        r["reliability"], r["ece"], os.path.join(report_dir, f"reliability_{head}.png"),
        title=f"Calibration: head {head!r}, {split} split",
    )
    figures += [cm, rel]
    lines += ["", "### Confusion matrix", "", f"![Confusion matrix]({os.path.basename(cm)})", ""]
    lines += ["### Most confused pairs", ""]
    if r["most_confused"]:
        lines += _table(["true class", "predicted as", "examples"],
                        [[p["true"], p["predicted"], p["count"]] for p in r["most_confused"]])
    else:
        lines.append("None: every example was classified correctly.")
    lines += ["", "### Top losses (the examples the model is most wrong about)", ""]
    lines += _table(["#", "example", "true", "predicted", "p(true)", "loss"],
                    [[t["index"], t["example"].replace("|", "\\|").replace("\n", " "), t["true"],
                      t["predicted"], t["p_true"], t["loss"]] for t in r["top_losses"]])
    lines += ["", "### Calibration", "", f"![Reliability diagram]({os.path.basename(rel)})", ""]
    return lines


def _main_metric(history):
    train = history.get("train", {})
    for key in ("accuracy", "binary_accuracy", "mae"):
        if key in train:
            return key
    others = [k for k in train if k not in ("loss", "learning_rate") and not k.startswith("lr_")]
    return others[0] if others else "loss"


def _table(header, rows):
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4f}"
        return "—" if v is None else str(v)

    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return out
