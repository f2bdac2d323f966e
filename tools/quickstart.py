"""The offline quickstart: transfer learning vs training from scratch, on CPU.

    python tools/quickstart.py --workdir=runs/quickstart     (what `make quickstart` runs)

1. Source pretraining: a small keras-hub ResNet on digits 0-4
   (configs/quickstart_source.yaml), saved as a keras-hub preset directory.
2. Transfer: digits 5-9 with 2 labels per class, loading that preset; head
   first with the backbone frozen, then full fine-tuning (configs/quickstart.yaml).
3. Scratch: the same config and architecture with random init
   (--config.backbone.load_weights=false).

Steps 2 and 3 run on 5 different draws of the few labelled images
(`--config.train.seed`): with 10 labels, one draw alone is too noisy to
compare two methods honestly.

Each step is the public entrypoint, `python -m tftransfer.train`. Ends with a
table of target accuracy and training time, and exits 1 if transfer did not win.
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1, 2, 3, 4)
PARALLEL = 2


def train(config, workdir, *overrides):
    cmd = [sys.executable, "-m", "tftransfer.train", f"--config={config}", f"--workdir={workdir}",
           "--config.train.verbose=0", *overrides]
    print("$ python", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(result.returncode)
    print(f"  {os.path.basename(workdir)}: {result.stdout.strip().splitlines()[-1]}", flush=True)
    with open(os.path.join(workdir, "metrics.json")) as f:
        metrics = json.load(f)
    metrics["wall_seconds"] = time.perf_counter() - start
    return metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/quickstart")
    args = parser.parse_args()
    root = os.path.abspath(args.workdir)
    if os.path.isdir(root):
        shutil.rmtree(root)  # The quickstart always starts from nothing.
    source = os.path.join(root, "source")
    preset = os.path.join(source, "backbone_preset")
    start = time.perf_counter()
    src = train("configs/quickstart_source.yaml", source)
    print(f"  source (digits 0-4) validation accuracy: {src['validation']['accuracy']:.3f}\n")
    jobs = []
    for seed in SEEDS:
        common = [f"--config.backbone.preset={preset}", f"--config.train.seed={seed}"]
        if seed != SEEDS[0]:  # One exported SavedModel is enough to show the export.
            common.append("--config.export.saved_model=false")
        jobs.append(("transfer", os.path.join(root, f"transfer_seed{seed}"), common))
        jobs.append(("scratch", os.path.join(root, f"scratch_seed{seed}"),
                     common + ["--config.backbone.load_weights=false"]))
    # Two trainings at a time: a tiny model's process leaves a core idle.
    with concurrent.futures.ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        futures = [pool.submit(train, "configs/quickstart.yaml", w, *o) for _, w, o in jobs]
        results = [f.result() for f in futures]
    runs = {"transfer": [], "scratch": []}
    for (name, _, _), metrics in zip(jobs, results):
        runs[name].append(metrics)
    total = time.perf_counter() - start

    first = runs["transfer"][0]
    print(f"\nTarget task: digits 5-9, {first['num_train_examples']} labelled training images "
          f"(a different draw per seed), {first['num_validation_examples']} validation images\n")
    labels = {"transfer": "transfer (pretrained on digits 0-4)", "scratch": "from scratch (same architecture)"}
    seeds = " | ".join(f"seed {s:>2}" for s in SEEDS)
    print(f"| {'run':<35} | {seeds} | {'mean acc':>8} | {'train s':>7} |")
    print(f"|{'-' * 37}|" + "|".join("-" * 9 for _ in SEEDS) + f"|{'-' * 10}|{'-' * 9}|")
    mean = {}
    for name, ms in runs.items():
        accs = [m["validation"]["accuracy"] for m in ms]
        mean[name] = sum(accs) / len(accs)
        seconds = sum(m["train_seconds"] for m in ms) / len(ms)
        cells = " | ".join(f"{a:>7.3f}" for a in accs)
        print(f"| {labels[name]:<35} | {cells} | {mean[name]:>8.3f} | {seconds:>7.1f} |")
    gain = mean["transfer"] - mean["scratch"]
    print(f"\nTransfer gain: {gain:+.3f} mean validation accuracy. Whole quickstart: {total:.0f} s. "
          f"Work dirs under {args.workdir}/ (TensorBoard: tensorboard --logdir {args.workdir}).")
    if gain <= 0:
        print("Transfer did not beat scratch: this is a regression, please report it.", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
