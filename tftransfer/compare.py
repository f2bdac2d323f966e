"""Transfer vs training from scratch, over label budgets: `python -m tftransfer.compare`.

    python -m tftransfer.compare --config=configs/quickstart.yaml --workdir=runs/cmp \\
        --labels_per_class=2,8,32,all --seeds=3

For every label budget k (labelled training examples per class; `all`: the
source's full training split) and seed, trains the configured pretrained
recipe ("transfer") and the same architecture with random init
(`backbone.load_weights=false`, "scratch"), each through the normal training
path: one `python -m tftransfer.train` process per cell, in
`OUT/cells/<arm>_k<k>_seed<s>/` (log beside it, `<cell>.log`). Seed i sets
`train.seed` to the config's seed + i, which draws different labelled
examples and a different initialisation.

Writes `OUT/compare.json` (every cell, updated as each finishes),
`OUT/compare.md` (headline, summary and per-cell tables of accuracy and
time) and `OUT/data_efficiency.png`. Killed, the same command resumes: done
cells are kept, an interrupted cell resumes from its own backup.

Label budgets are `data.train_per_class` (k-shot, stratified and seeded,
on every classification source: TFDS, image folders, CSV/JSONL, digits).
"""

import concurrent.futures
import os
import subprocess
import sys
import threading
import time

from absl import flags

from tftransfer import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "YAML experiment with a pretrained backbone (preset or keras_application).")
flags.DEFINE_string("workdir", None, "Output directory: cells/, compare.json, compare.md, data_efficiency.png.")
flags.DEFINE_list("labels_per_class", ["2", "8", "32", "all"], "Label budgets: integers and/or `all`.")
flags.DEFINE_integer("seeds", 3, "Seeds (draws of the labelled examples) per budget and arm.")
flags.DEFINE_integer("parallel", 1, "Cells trained at the same time (a tiny model's process leaves cores idle).")
flags.mark_flags_as_required(["config", "workdir"])

PLAN_FILE = "compare.json"
CELLS_DIR = "cells"


def main(argv):
    del argv
    from tftransfer import config as config_lib
    from tftransfer import workdir
    from tftransfer.errors import UserError
    from tftransfer.progress import Progress
    from tftransfer.report import efficiency

    # 1. Plan, validated before anything is written.
    cfg = config_lib.load_config(FLAGS.config, cli.config_overrides())
    key = k_shot_key(cfg)
    budgets = parse_budgets(FLAGS.labels_per_class)
    if FLAGS.seeds < 1 or FLAGS.parallel < 1:
        raise UserError(f"--seeds and --parallel must be >= 1. Received: --seeds={FLAGS.seeds}, "
                        f"--parallel={FLAGS.parallel}.")
    config_text = config_lib.dump_yaml(cfg)
    out = FLAGS.workdir
    plan_path = os.path.join(out, PLAN_FILE)
    plan = {"config": config_text, "k_shot_key": key}
    record = workdir.read_json(plan_path) if os.path.isfile(plan_path) else {"plan": plan, "cells": {}}
    if record["plan"] != plan:
        raise UserError(f"--workdir {out!r} holds a comparison of a different config; use a new --workdir "
                        f"(or delete it) to start over.")
    os.makedirs(os.path.join(out, CELLS_DIR), exist_ok=True)
    config_path = os.path.join(out, workdir.CONFIG)
    workdir.atomic_write_text(config_path, config_text)

    # 2. Cells: arm x budget x seed; finished ones (compare.json) are kept.
    cells = [(arm, b, cfg.train.seed + i) for b in budgets for i in range(FLAGS.seeds)
             for arm in efficiency.ARMS]
    todo = [c for c in cells if cell_name(*c) not in record["cells"]]
    print(f"compare: {len(cells)} cells ({len(cells) - len(todo)} done, {len(todo)} to train) in {out}",
          flush=True)
    progress = Progress(len(todo), what="cells", verbose=cfg.train.verbose)
    lock = threading.Lock()

    def one(cell):
        result = train_cell(out, config_path, key, *cell)
        with lock:
            record["cells"][cell_name(*cell)] = result
            workdir.write_json(plan_path, record)
            progress.update(message=f"{cell_name(*cell)}: accuracy {result['accuracy']:.3f}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=FLAGS.parallel) as pool:
        for future in [pool.submit(one, c) for c in todo]:
            future.result()

    # 3. Table, plot, headline.
    done = [record["cells"][cell_name(*c)] for c in cells]
    command = " ".join(["python -m tftransfer.compare"] + sys.argv[1:])
    page, lines = efficiency.write_page(out, done, budgets, cfg.name, command)
    for line in lines:
        print(line)
    print(f"report: {page}")


def k_shot_key(cfg):
    """The dotted config key that sets labelled examples per class, or UserError."""
    from tftransfer.errors import UserError

    if cfg.backbone.spec is not None:
        raise UserError("backbone.spec is a random-init architecture: there is nothing pretrained to compare; "
                        "set backbone.preset (or keras_application) to the pretrained backbone.")
    if not cfg.backbone.load_weights:
        raise UserError("backbone.load_weights is false; compare trains the scratch baseline itself, "
                        "so give it the pretrained recipe (load_weights: true).")
    if cfg.heads[0].type != "classification" or len(cfg.heads) != 1:
        raise UserError("compare measures accuracy of one classification head; heads must be one "
                        "classification head.")
    return "data.train_per_class"  # k-shot on every classification source (tftransfer.data.kshot)


def parse_budgets(values):
    from tftransfer.errors import UserError

    budgets = []
    for v in values:
        v = v.strip().lower()
        if v == "all" or (v.isdigit() and int(v) >= 1):
            budgets.append(v if v == "all" else int(v))
        else:
            raise UserError(f"--labels_per_class: {v!r} is neither a positive integer nor all "
                            f"(e.g. --labels_per_class=2,8,32,all).")
    if len(set(budgets)) != len(budgets):
        raise UserError(f"--labels_per_class lists a budget twice: {values}.")
    return sorted(budgets, key=lambda b: float("inf") if b == "all" else b)


def cell_name(arm, budget, seed):
    return f"{arm}_k{budget}_seed{seed}"


def train_cell(out, config_path, key, arm, budget, seed):
    """One `python -m tftransfer.train` (resuming it when a previous attempt was killed)."""
    from tftransfer import workdir
    from tftransfer.errors import UserError

    name = cell_name(arm, budget, seed)
    cell = os.path.join(out, CELLS_DIR, name)
    start = time.perf_counter()
    trained_here = not os.path.isfile(os.path.join(cell, workdir.METRICS))
    if trained_here:
        cmd = [sys.executable, "-m", "tftransfer.train", f"--config={config_path}", f"--workdir={cell}",
               f"--config.{key}={'null' if budget == 'all' else budget}", f"--config.train.seed={seed}",
               "--config.export.saved_model=false"]
        if arm == "scratch":
            cmd.append("--config.backbone.load_weights=false")
        with open(cell + ".log", "a") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}).returncode
        if code != 0:
            with open(cell + ".log") as log:
                errors = [line.strip() for line in log if line.startswith("error: ")]
            why = errors[-1] if errors else f"exit code {code}"
            raise UserError(f"cell {name} failed ({why}); log: {cell}.log")
    metrics = workdir.read_json(os.path.join(cell, workdir.METRICS))
    if "validation" not in metrics:
        raise UserError(f"cell {name}: the data has no validation split to measure accuracy on; set "
                        f"data.validation_split / validation_path / validation_fraction.")
    heads = workdir.read_json(os.path.join(cell, workdir.HEADS))
    return {
        "arm": arm, "budget": budget, "seed": seed, "workdir": cell,
        "accuracy": metrics["validation"]["accuracy"],
        "labels_per_class": metrics["num_train_examples"] / heads["heads"][0]["num_classes"],
        "num_validation_examples": metrics.get("num_validation_examples"),
        "train_seconds": metrics["train_seconds"],
        # A cell finished before a kill but not yet recorded: its process time is unknown.
        "wall_seconds": time.perf_counter() - start if trained_here else None,
    }


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
