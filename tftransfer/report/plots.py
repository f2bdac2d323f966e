"""The report's figures as PNG files (matplotlib, headless Agg backend).

Each function takes plain data (the dicts of `tftransfer.report.metrics`,
`read_history`, or compare's cells), writes one PNG of a fixed pixel size
(`SIZES`, so tests and HTML can rely on it) and returns its path. Every
figure carries a title, axis labels and a legend, so it reads on its own.
"""

import os

DPI = 100
# (width, height) in pixels of each figure.
SIZES = {
    "confusion": (700, 600),
    "reliability": (600, 650),
    "learning_curves": (1200, 450),
    "data_efficiency": (800, 500),
}
MAX_ANNOTATED_CLASSES = 20
MAX_TICK_CLASSES = 40


def _figure(kind, **kwargs):
    import matplotlib

    matplotlib.use("Agg")  # No display: plots go to files.
    from matplotlib import pyplot as plt

    w, h = SIZES[kind]
    return plt.subplots(figsize=(w / DPI, h / DPI), dpi=DPI, **kwargs)


def _save(fig, path):
    from matplotlib import pyplot as plt

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=DPI)  # No bbox_inches="tight": keep the fixed size.
    plt.close(fig)
    return path


def confusion_matrix_png(confusion, class_names, path, title="Confusion matrix"):
    """Counts per (true, predicted) class pair; the diagonal is correct."""
    import numpy as np

    cm = np.asarray(confusion)
    fig, ax = _figure("confusion")
    image = ax.imshow(cm, cmap="Blues", interpolation="nearest")
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("examples")
    n = len(class_names)
    if n <= MAX_TICK_CLASSES:
        ax.set_xticks(range(n), class_names, rotation=45 if n > 8 else 0, ha="right" if n > 8 else "center")
        ax.set_yticks(range(n), class_names)
    if n <= MAX_ANNOTATED_CLASSES:
        threshold = cm.max() / 2 if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=9,
                        color="white" if cm[i, j] > threshold else "black")
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(f"{title}\n(rows: true class, columns: predicted; diagonal = correct)", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def reliability_png(reliability, ece, path, title="Reliability diagram"):
    """Accuracy vs confidence per bin, against the diagonal of perfect calibration."""
    fig, (ax, hist) = _figure("reliability", nrows=2, sharex=True,
                              gridspec_kw={"height_ratios": [3, 1]})
    centers = [(b["low"] + b["high"]) / 2 for b in reliability]
    width = reliability[0]["high"] - reliability[0]["low"]
    filled = [b for b in reliability if b["count"]]
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.bar([(b["low"] + b["high"]) / 2 for b in filled], [b["accuracy"] for b in filled], width=width * 0.9,
           color="tab:blue", alpha=0.8, edgecolor="black", label="accuracy in bin")
    ax.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], "o", color="tab:red",
            label="(mean confidence, accuracy)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.03)
    ax.set_ylabel("Accuracy")
    ax.set_title(f"{title}\nECE = {ece:.3f} (0 = confidence matches accuracy)", fontsize=11)
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(centers, [b["count"] for b in reliability], width=width * 0.9, color="gray")
    hist.set_xlabel("Confidence (top predicted probability)")
    hist.set_ylabel("Examples")
    fig.tight_layout()
    return _save(fig, path)


def learning_curves_png(history, path, metric="accuracy", title="Learning curves"):
    """Loss and `metric` per epoch, train and validation, with stages marked.

    Vertical dotted lines mark the epochs where progressive unfreezing
    changed the number of trainable backbone groups. When the run logged a
    distillation schedule (`alpha`, `temperature`), a third panel shows it.

    Returns:
        str (the path), or None when the history holds no loss.
    """
    from matplotlib.ticker import MaxNLocator

    from tftransfer.report.history import stage_changes

    train, val = history.get("train", {}), history.get("validation", {})
    if "loss" not in train:
        return None
    distill = [k for k in ("alpha", "temperature") if k in train]
    panels = 3 if distill else 2
    fig, axes = _figure("learning_curves", ncols=panels)
    stages = stage_changes(history)
    for ax, key, label in ((axes[0], "loss", "Loss"), (axes[1], metric, metric.replace("_", " ").capitalize())):
        for split, series, style in (("train", train, "-o"), ("validation", val, "-s")):
            if key in series:
                epochs, values = zip(*series[key])
                ax.plot([e + 1 for e in epochs], values, style, markersize=3, label=split)
        _mark_stages(ax, stages)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("Epoch")
        ax.set_ylabel(label)
        ax.set_title(f"{label} per epoch")
        ax.legend(fontsize=8)
    if distill:
        ax = axes[2]
        for key in distill:
            epochs, values = zip(*train[key])
            ax.plot([e + 1 for e in epochs], values, "-o", markersize=3, label=key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("Epoch")
        ax.set_ylabel("Value")
        ax.set_title("Distillation schedule")
        ax.legend(fontsize=8)
    fig.suptitle(title + ("\ndotted lines: progressive unfreezing changes which backbone groups train"
                          if len(stages) > 1 else ""), fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def _mark_stages(ax, stages):
    for i, (epoch, groups) in enumerate(stages):
        if i == 0 and epoch == 0 and len(stages) == 1:
            continue  # One stage for the whole run: nothing to mark.
        ax.axvline(epoch + 0.5, color="gray", linestyle=":", linewidth=1)
        text = "head only" if groups == 0 else f"{int(groups)} backbone groups train"
        ax.text(epoch + 0.55, 0.98, text, transform=ax.get_xaxis_transform(),
                fontsize=7, color="gray", va="top", rotation=90)


def data_efficiency_png(curves, path, title="Data efficiency: transfer vs from scratch", tick_labels=None):
    """Accuracy vs labels per class (log x), mean and min-max spread over seeds.

    Args:
        curves: dict `{arm label: [(labels_per_class, [accuracy per seed]), ...]}`.
        tick_labels: dict `{labels_per_class: text}` for special ticks
            (e.g. `"all (144)"`). Defaults to None (the numbers).
    """
    import numpy as np

    fig, ax = _figure("data_efficiency")
    for i, ((label, points), color) in enumerate(zip(curves.items(), ("tab:blue", "tab:orange", "tab:green"))):
        points = sorted(points)
        xs = [x for x, _ in points]
        accs = [np.asarray(a, dtype="float64") for _, a in points]
        means = [a.mean() for a in accs]
        if len(xs) > 1:
            ax.fill_between(xs, [a.min() for a in accs], [a.max() for a in accs], color=color, alpha=0.15)
        # Each arm's bars a little to the side (log axis), so they never hide each other.
        shifted = [x * (1.0 + 0.04 * (i - 0.5)) for x in xs]
        ax.errorbar(shifted, means, yerr=[[m - a.min() for m, a in zip(means, accs)],
                                          [a.max() - m for m, a in zip(means, accs)]],
                    fmt="-o", color=color, capsize=4, label=f"{label}: mean; bars and band: min-max over seeds")
    ax.set_xscale("log")
    ticks = sorted({x for points in curves.values() for x, _ in points})
    ax.set_xlim(ticks[0] / 1.6, ticks[-1] * 1.6)  # room around the end points (and a lone budget)
    labels = tick_labels or {}
    ax.set_xticks(ticks, [labels.get(t, f"{t:g}") for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("Labelled training examples per class (log scale)")
    ax.set_ylabel("Validation accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + 0.3 * (high - low))  # headroom: the legend never covers a point
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _save(fig, path)
