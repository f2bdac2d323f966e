"""Transfer vs scratch over label budgets: summary table, headline, plot, page.

Pure functions over compare's cell records (one per arm x budget x seed:
`{arm, budget, seed, accuracy, labels_per_class, train_seconds,
wall_seconds}`), so they are tested without training anything.
"""

import os

import numpy as np

ARMS = ("transfer", "scratch")
ARM_LABELS = {"transfer": "transfer (pretrained backbone)", "scratch": "from scratch (same architecture)"}
ALL = "all"
REPORT_FILE = "compare.md"
PLOT_FILE = "data_efficiency.png"


def budget_sort_key(budget):
    return float("inf") if budget == ALL else int(budget)


def summarize(cells, budgets):
    """Mean / std / min / max accuracy and mean times per (budget, arm).

    Returns:
        list of dicts `{budget, arm, seeds, accuracy_mean, accuracy_std,
        accuracy_min, accuracy_max, labels_per_class, train_seconds,
        wall_seconds}`, budgets in the given order, transfer first.
    """
    rows = []
    for budget in budgets:
        for arm in ARMS:
            mine = [c for c in cells if c["budget"] == budget and c["arm"] == arm]
            if not mine:
                continue
            acc = np.array([c["accuracy"] for c in mine], dtype="float64")
            walls = [c["wall_seconds"] for c in mine if c.get("wall_seconds") is not None]
            rows.append({
                "budget": budget, "arm": arm, "seeds": len(mine),
                "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std()),
                "accuracy_min": float(acc.min()), "accuracy_max": float(acc.max()),
                "labels_per_class": float(np.mean([c["labels_per_class"] for c in mine])),
                "train_seconds": float(np.mean([c["train_seconds"] for c in mine])),
                "wall_seconds": float(np.mean(walls)) if walls else None,
            })
    return rows


def headline(rows):
    """The two sentences the study is for.

    1. The smallest budget below the largest at which transfer's mean
       accuracy is at least scratch's mean at the largest budget (`all`
       when given) — how many labels transfer saves — or that it never is.
    2. Transfer's gain over scratch, in accuracy points, at every budget.

    Returns:
        list of str.
    """
    by = {(r["budget"], r["arm"]): r for r in rows}
    budgets = sorted({r["budget"] for r in rows}, key=budget_sort_key)
    largest = budgets[-1]
    if (largest, "scratch") not in by:
        return ["No scratch runs finished yet."]
    if len(budgets) == 1:  # nothing to match against; the gain is the result
        first = (f"One label budget (k={largest}); add more (e.g. --labels_per_class=2,8,32,all) to see "
                 f"how many labels transfer saves.")
        return [first, _gain_line(by, budgets)]
    reference = by[(largest, "scratch")]["accuracy_mean"]
    what = "all labels" if largest == ALL else f"{largest} labels per class"
    smaller = budgets[:-1]
    matches = [b for b in smaller if (b, "transfer") in by and by[(b, "transfer")]["accuracy_mean"] >= reference]
    if matches:
        k = matches[0]
        first = (f"Transfer with {k} labels per class matches scratch with {what}: "
                 f"{by[(k, 'transfer')]['accuracy_mean']:.3f} vs {reference:.3f} mean validation accuracy.")
    else:
        tried = ", ".join(str(b) for b in smaller) or "none"
        first = (f"Transfer never matches scratch with {what} ({reference:.3f} mean validation accuracy) "
                 f"with fewer labels (tried k={tried}).")
    return [first, _gain_line(by, budgets)]


def _gain_line(by, budgets):
    gains = []
    for b in budgets:
        if (b, "transfer") in by and (b, "scratch") in by:
            gain = 100.0 * (by[(b, "transfer")]["accuracy_mean"] - by[(b, "scratch")]["accuracy_mean"])
            gains.append(f"k={b}: {gain:+.1f} points")
    return "Transfer gain at " + ", ".join(gains) + "."


def curves(cells):
    """`{arm label: [(labels per class, [accuracy per seed]), ...]}` for the plot."""
    out = {}
    for arm in ARMS:
        points = {}
        for c in cells:
            if c["arm"] == arm:
                points.setdefault(c["budget"], []).append(c)
        if points:
            out[ARM_LABELS[arm]] = [
                (float(np.mean([c["labels_per_class"] for c in cs])), [c["accuracy"] for c in cs])
                for _, cs in sorted(points.items(), key=lambda kv: budget_sort_key(kv[0]))
            ]
    return out


def write_page(out_dir, cells, budgets, title, command):
    """`compare.md` + `data_efficiency.png`; returns `(page path, headline lines)`."""
    from tftransfer.report import plots
    from tftransfer.workdir import atomic_write_text

    rows = summarize(cells, budgets)
    lines = headline(rows)
    ticks = {r["labels_per_class"]: f"all (~{r['labels_per_class']:.0f})" for r in rows if r["budget"] == ALL}
    plot = plots.data_efficiency_png(
        curves(cells), os.path.join(out_dir, PLOT_FILE), tick_labels=ticks,
        title=f"{title}: transfer vs from scratch (validation accuracy)",
    )
    md = [f"# Data efficiency: {title}", "", f"Command: `{command}`", ""]
    md += [f"**{line}**" for line in lines] + ["", f"![Data efficiency]({os.path.basename(plot)})", ""]
    md += ["## Summary (mean over seeds)", "",
           "| labels per class | run | seeds | accuracy mean | std | min | max | train s | wall s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        wall = f"{r['wall_seconds']:.1f}" if r["wall_seconds"] is not None else "—"
        md.append(f"| {_budget_cell(r)} | {ARM_LABELS[r['arm']]} | {r['seeds']} | {r['accuracy_mean']:.3f} | "
                  f"{r['accuracy_std']:.3f} | {r['accuracy_min']:.3f} | {r['accuracy_max']:.3f} | "
                  f"{r['train_seconds']:.1f} | {wall} |")
    md += ["", "## Every cell", "",
           "| labels per class | run | seed | accuracy | train s | wall s | work dir |", "|---|---|---|---|---|---|---|"]
    for c in sorted(cells, key=lambda c: (budget_sort_key(c["budget"]), ARMS.index(c["arm"]), c["seed"])):
        wall = f"{c['wall_seconds']:.1f}" if c.get("wall_seconds") is not None else "—"
        md.append(f"| {c['budget']} | {c['arm']} | {c['seed']} | {c['accuracy']:.3f} | "
                  f"{c['train_seconds']:.1f} | {wall} | `{c['workdir']}` |")
    md += ["", "Accuracy is on each cell's own validation split (for digits: every image not drawn for "
           "training). Train s: `model.fit` time; wall s: the whole `python -m tftransfer.train` process."]
    path = os.path.join(out_dir, REPORT_FILE)
    atomic_write_text(path, "\n".join(md) + "\n")
    return path, lines


def _budget_cell(row):
    if row["budget"] == ALL:
        return f"all (~{row['labels_per_class']:.0f})"
    return str(row["budget"])
