"""Feature extraction, cached: seconds per epoch after the first, cached vs uncached.

For each config, two `python -m tftransfer.train` runs back to back with a
frozen backbone and the same overrides: `train.cache_features: auto` (the
backbone runs once, the head trains on its pooled features) and `false`
(the backbone runs at every step and every validation pass). An epoch's
time is the wall time between two consecutive epoch ends, read from the
run's own TensorBoard log (`W/logs/train`, `epoch_loss` events), so it
includes everything an epoch costs (training steps, validation, the
validation report, backups, checkpoints, TensorBoard); the first epoch
(tracing) is left out, the median of the others is reported. The one-off
cost of the cached run (one inference pass per split, `metrics.json`
`feature_cache`) is listed separately.

    python tools/sentiment_corpus.py --out=runs/sentiment          # MiniLM data
    python -m tftransfer.train --config=configs/quickstart_source.yaml --workdir=runs/quickstart/source
    python tools/bench_feature_cache.py --workdir=runs/bench_feature_cache

Prints a Markdown table (the one in BENCHMARKS.md).
"""

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {
    # The quickstart target task; its own schedule unfreezes at epoch 2, so frozen here.
    "quickstart": ("configs/quickstart.yaml", ["--config.train.unfreeze.schedule=frozen"]),
    "minilm": ("configs/minilm_features_logreg.yaml", []),
}


def epoch_seconds(workdir):
    """Wall seconds of epochs 2.. from the TensorBoard `epoch_loss` events."""
    import tensorflow as tf

    ends = {}
    for path in glob.glob(os.path.join(workdir, "logs", "train", "events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            if any(v.tag == "epoch_loss" for v in event.summary.value):
                ends[event.step] = event.wall_time
    times = [ends[k] for k in sorted(ends)]
    return [b - a for a, b in zip(times, times[1:])]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/bench_feature_cache")
    parser.add_argument("--configs", default="quickstart,minilm", help=f"comma-separated: {', '.join(CONFIGS)}")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    rows = []
    for name in args.configs.split(","):
        config, overrides = CONFIGS[name]
        result = {}
        for mode in ("false", "auto"):
            W = os.path.join(args.workdir, f"{name}_{'cached' if mode == 'auto' else 'uncached'}")
            cmd = [sys.executable, "-m", "tftransfer.train", f"--config={config}", f"--workdir={W}",
                   "--overwrite", f"--config.train.epochs={args.epochs}", f"--config.train.cache_features={mode}",
                   "--config.train.verbose=0", *overrides]
            print("$", " ".join(cmd[1:]), file=sys.stderr, flush=True)
            subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            metrics = json.load(open(os.path.join(W, "metrics.json")))
            assert metrics["feature_cache"]["cached"] == (mode == "auto"), metrics["feature_cache"]
            one_off = sum(s["seconds"] for s in metrics["feature_cache"].get("splits", {}).values())
            result[mode] = (statistics.median(epoch_seconds(W)), one_off, metrics["validation"]["accuracy"])
        (slow, _, acc_slow), (fast, one_off, acc_fast) = result["false"], result["auto"]
        rows.append((name, slow, fast, slow / fast, one_off, acc_slow, acc_fast))
    print(f"| config | s/epoch uncached | s/epoch cached | speed-up | one-off feature pass (s) "
          f"| val. accuracy uncached | cached |  ({args.epochs} epochs, median of epochs 2..{args.epochs})")
    print("|---|---|---|---|---|---|---|")
    for name, slow, fast, ratio, one_off, acc_slow, acc_fast in rows:
        print(f"| {name} | {slow:.3f} | {fast:.4f} | {ratio:.1f}x | {one_off:.1f} | {acc_slow:.4f} | {acc_fast:.4f} |")


if __name__ == "__main__":
    main()
