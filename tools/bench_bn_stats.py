"""Precise BatchNorm statistics on short from-scratch runs: validation accuracy before vs after.

Each run is `python -m tftransfer.train` on `configs/quickstart_source.yaml`
(a small keras-hub ResNet from random init, digits 0-4) with a label budget
and seed; the run's own `metrics.json` holds the validation metrics with the
moving statistics as training left them (`bn_stats.validation_before`) and
after recomputing them (`validation`), so both numbers come from the same
weights in the same run.

    python tools/bench_bn_stats.py --workdir=runs/bench_bn_stats

Prints a Markdown table (the one in BENCHMARKS.md).
"""

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/bench_bn_stats")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--per_class", default="10,40", help="training images per class, comma-separated")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    rows = []
    for per_class in [int(k) for k in args.per_class.split(",")]:
        for seed in range(args.seeds):
            W = os.path.join(args.workdir, f"k{per_class}_seed{seed}")
            if not os.path.exists(os.path.join(W, "metrics.json")):
                cmd = [sys.executable, "-m", "tftransfer.train", "--config=configs/quickstart_source.yaml",
                       f"--workdir={W}", "--overwrite", f"--config.data.train_per_class={per_class}",
                       f"--config.data.batch_size=32", f"--config.train.epochs={args.epochs}",
                       f"--config.train.seed={seed}", "--config.train.keep=last",
                       "--config.train.verbose=0", "--config.export.backbone_preset=false"]
                subprocess.run(cmd, cwd=REPO, check=True)
            m = json.load(open(os.path.join(W, "metrics.json")))
            steps = m["epochs"] * -(-m["num_train_examples"] // m["global_batch_size"])
            rows.append((per_class, seed, steps, m["bn_stats"]["validation_before"]["accuracy"],
                         m["validation"]["accuracy"]))
    print("| train images per class | seed | steps | val. accuracy, stale BN | after recompute |")
    print("|---|---|---|---|---|")
    for per_class, seed, steps, before, after in rows:
        print(f"| {per_class} | {seed} | {steps} | {before:.3f} | {after:.3f} |")
    for per_class in sorted({r[0] for r in rows}):
        sel = [r for r in rows if r[0] == per_class]
        before = sum(r[3] for r in sel) / len(sel)
        after = sum(r[4] for r in sel) / len(sel)
        print(f"| {per_class} | mean | | {before:.3f} | {after:.3f} |")


if __name__ == "__main__":
    main()
