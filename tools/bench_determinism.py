"""What `train.deterministic` (op determinism) costs, and whether seeded runs repeat without it.

Runs `python -m tftransfer.train --config=configs/quickstart_source.yaml`
(augmented) `--rounds` times with `train.deterministic` false and true,
alternating, each in a fresh process (op determinism is process-wide), and
prints the median fit seconds per setting, their ratio, and whether the
runs of each setting ended with identical metrics.

    python tools/bench_determinism.py --rounds=3

Record the output in BENCHMARKS.md with the machine it ran on.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(workdir, deterministic, config):
    subprocess.run([sys.executable, "-m", "tftransfer.train", f"--config={config}", f"--workdir={workdir}",
                    f"--config.train.deterministic={str(deterministic).lower()}",
                    "--config.export.saved_model=false"],
                   cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return json.load(open(os.path.join(workdir, "metrics.json")))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "quickstart_source.yaml"))
    args = parser.parse_args()
    seconds, results = {False: [], True: []}, {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for deterministic in (False, True):
                m = run(os.path.join(tmp, f"{r}_{deterministic}"), deterministic, args.config)
                seconds[deterministic].append(m["train_seconds"])
                results[deterministic].append((m["validation"]["loss"], m["validation"]["accuracy"]))
    off, on = statistics.median(seconds[False]), statistics.median(seconds[True])
    print(f"config {os.path.relpath(args.config, REPO)}, {args.rounds} rounds, CPU count {os.cpu_count()}")
    print(f"fit seconds, median: deterministic=false {off:.1f}, true {on:.1f}, ratio true/false {on / off:.3f}")
    for setting in (False, True):
        print(f"deterministic={str(setting).lower()}: runs identical: {len(set(results[setting])) == 1} "
              f"(validation loss, accuracy per run: {results[setting]})")


if __name__ == "__main__":
    main()
