"""Benchmark distillation on the offline MiniLM sentiment task (CPU, ~10 min).

    python tools/bench_distill.py --workdir=runs/bench_distill --out=runs/bench_distill/results.json

1. Writes the corpus (tools/sentiment_corpus.py): 240 labelled reviews that
   use 20 sentiment words, 400 held-out reviews and 1,500 unlabelled ones
   that use 50.
2. Teacher: fine-tunes MiniLM-L6 with configs/distill_minilm_sentiment_teacher.yaml
   (`python -m tftransfer.train`), or reuses `--teacher=W`.
3. Students (configs/distill_minilm_sentiment.yaml: 2 layers x 128, 4
   heads, MiniLM vocabulary, random init), for each seed:
   - `alone`: hard labels only, the 240 labelled reviews;
   - `distilled_labelled`: distilled on the same 240 reviews (soft targets
     plus labels), to isolate what the soft targets add;
   - `distilled`: distilled on the 240 + the 1,500 unlabelled reviews
     (the transfer set);
   - with `--init`: `alone_init` / `distilled_init`, the same two started
     from slices of the teacher's layers 0 and 5 (`distill.init_from_teacher`).
   The teacher's outputs are computed once (the cache) and shared by all.
4. Cache speed: a distillation epoch over 480 examples with the teacher run
   every step vs from cached outputs (fastest of epochs 2-4, after tracing),
   for the MiniLM teacher and for a random-init 5-layer copy of the student
   (forward cost ~2x the student's: the goal's boundary), with the
   teacher/student forward cost ratios.

Prints a markdown table; writes every number to `--out` (JSON).
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
TEACHER_CONFIG = os.path.join(REPO, "configs", "distill_minilm_sentiment_teacher.yaml")
STUDENT_CONFIG = os.path.join(REPO, "configs", "distill_minilm_sentiment.yaml")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/bench_distill")
    p.add_argument("--out", default=None, help="JSON results (default: <workdir>/results.json)")
    p.add_argument("--teacher", default=None, help="Reuse a trained teacher work dir.")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--alone_epochs", type=int, default=20)
    p.add_argument("--distill_epochs", type=int, default=4)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--init", action="store_true", help="Also run the init-from-teacher arms.")
    p.add_argument("--speed_examples", type=int, default=480)
    p.add_argument("--speed_epochs", type=int, default=4)
    return p.parse_args()


def main():
    args = parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    W = os.path.abspath(args.workdir)
    out = args.out or os.path.join(W, "results.json")
    data_dir = os.path.join(W, "data")
    started = time.perf_counter()

    from sentiment_corpus import write_corpus

    corpus = write_corpus(data_dir)
    paths = {
        "data.train_path": os.path.join(data_dir, "train.csv"),
        "data.validation_path": os.path.join(data_dir, "validation.csv"),
    }
    results = {"corpus": corpus, "args": vars(args)}

    # -- Teacher -------------------------------------------------------------
    teacher_dir = args.teacher or os.path.join(W, "teacher")
    if not os.path.isfile(os.path.join(teacher_dir, "metrics.json")):
        cmd = [sys.executable, "-m", "tftransfer.train", f"--config={TEACHER_CONFIG}",
               f"--workdir={teacher_dir}", "--overwrite",
               f"--config.backbone.preset={os.path.join(data_dir, 'minilm')}",
               *[f"--config.{k}={v}" for k, v in paths.items()], "--config.train.verbose=0"]
        print("training the teacher:", " ".join(cmd[1:]), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO)
        results["teacher_train_seconds"] = time.perf_counter() - start

    import keras
    import numpy as np

    from tftransfer import config as config_lib
    from tftransfer import experiment
    from tftransfer.builders import build_model, compile_for_heads
    from tftransfer.data import Split, make_pipeline
    from tftransfer.distill import report
    from tftransfer.distill.cache import cached_pipeline, fingerprint, load_or_compute, teacher_outputs
    from tftransfer.distill.transfer_set import concatenate, load_transfer_text
    from tftransfer.distill.distiller import Distiller
    from tftransfer.distill.student_init import init_from_teacher
    from tftransfer.distill.teacher import check_compatible, find_backbone, load_teacher

    overrides = [f"{k}={v}" for k, v in paths.items()] + [
        f"backbone.spec.vocabulary={os.path.join(data_dir, 'minilm', 'vocab.txt')}",
        f"distill.teacher=[{teacher_dir}]",
        f"distill.transfer_path={os.path.join(data_dir, 'transfer.txt')}",
    ]
    cfg = config_lib.load_config(STUDENT_CONFIG, overrides)
    labelled = experiment.load_data(cfg)
    heads = experiment.resolve_heads(cfg, labelled)
    transfer = load_transfer_text(cfg.distill.transfer_path)
    combined = concatenate(labelled.train, transfer)
    batch = cfg.data.batch_size
    teacher = load_teacher(cfg.distill.teacher)
    head = heads[0].name

    def student(seed, init=False):
        keras.utils.set_random_seed(seed)
        loaded = experiment.backbone_from_config(cfg)
        model = build_model(loaded, heads, name="student")
        if init:
            init_from_teacher(loaded.model, find_backbone(teacher.members[0]))
        return loaded, model

    loaded, probe = student(0)
    check_compatible(teacher, probe, loaded.preprocessor, "text")
    pre = loaded.preprocessor
    val_ds = make_pipeline(labelled.validation, pre, "text", heads, 64)
    example = next(iter(val_ds))[0]

    # -- Teacher outputs, once (the cache) --------------------------------------
    probe_distiller = Distiller(teacher.model, probe, heads)
    start = time.perf_counter()
    outputs, info = load_or_compute(probe_distiller, combined, pre, "text", mode="disk",
                                    cache_dir=os.path.join(W, "cache"), batch_size=64,
                                    key=fingerprint([teacher_dir], corpus=corpus,
                                                    backbone=config_lib.to_dict(cfg)["backbone"]))
    results["teacher_outputs"] = {**info, "examples": combined.num_examples,
                                  "seconds": time.perf_counter() - start}
    n_labelled = labelled.train.num_examples
    labelled_outputs = {"final_output": {head: outputs["final_output"][head][:n_labelled]}}

    teacher_desc = report.describe(teacher.model, val_ds, head, teacher.size_bytes, example)
    results["teacher"] = teacher_desc
    print(f"teacher: accuracy {teacher_desc['accuracy']:.4f}, {teacher_desc['parameters']:,} params, "
          f"{teacher_desc['latency_ms_per_example']:.2f} ms/example", flush=True)

    def fit_distilled(model, split, split_outputs, epochs):
        distiller = Distiller(teacher.model, model, heads, alpha=args.alpha,
                              temperature=args.temperature)
        distiller.compile(keras.optimizers.Adam(args.learning_rate),
                          metrics={h.name: h.metrics() for h in heads})
        ds = cached_pipeline(split, split_outputs, pre, "text", heads, batch, training=True,
                             seed=0)
        distiller.fit(ds, epochs=epochs, verbose=0)

    def fit_alone(model, epochs):
        compile_for_heads(model, heads, keras.optimizers.Adam(args.learning_rate))
        ds = make_pipeline(labelled.train, pre, "text", heads, batch, training=True, seed=0)
        model.fit(ds, epochs=epochs, verbose=0)

    arms = {
        "alone": lambda m: fit_alone(m, args.alone_epochs),
        "distilled_labelled": lambda m: fit_distilled(m, labelled.train, labelled_outputs, args.alone_epochs),
        "distilled": lambda m: fit_distilled(m, combined, outputs, args.distill_epochs),
    }
    if args.init:
        arms["alone_init"] = arms["alone"]
        arms["distilled_init"] = arms["distilled"]
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {name: [] for name in arms}
    student_desc = None
    for seed in seeds:
        for name, fit in arms.items():
            _, model = student(seed, init=name.endswith("_init"))
            start = time.perf_counter()
            fit(model)
            seconds = time.perf_counter() - start
            acc = report.accuracy(model, val_ds, head)
            runs[name].append({"seed": seed, "accuracy": acc, "seconds": seconds})
            print(f"seed {seed} {name:20s} accuracy {acc:.4f} ({seconds:.0f}s)", flush=True)
            if student_desc is None:
                path = os.path.join(W, "student.keras")
                model.save(path)
                student_desc = report.describe(model, val_ds, head, os.path.getsize(path), example)
    results["runs"] = runs
    results["student"] = {k: v for k, v in student_desc.items() if k != "accuracy"}
    summary = {}
    for name, rows in runs.items():
        mean, std = report.mean_std([r["accuracy"] for r in rows])
        summary[name] = {
            "accuracy_mean": mean, "accuracy_std": std,
            "errors_mean": (1 - mean) * labelled.validation.num_examples,
            "accuracy_retained_percent": 100 * mean / teacher_desc["accuracy"],
        }
    results["summary"] = summary
    results["compression"] = report.compare(teacher_desc, {**student_desc, "accuracy": None})

    # -- Cache speed ratio ----------------------------------------------------------
    # Two teachers: the real one (MiniLM) and a random-init 5-layer copy of the
    # student's architecture, whose forward pass costs about twice the student's
    # (the goal's boundary: >= 1.5x faster per epoch when the teacher costs >= 2x).
    n = min(args.speed_examples, combined.num_examples)
    subset = Split(combined.dataset.take(n), n)
    keras.utils.set_random_seed(0)
    wide_spec = {**cfg.backbone.spec, "num_layers": 5}
    from tftransfer.backbones import load_backbone

    deeper = build_model(load_backbone(spec=wide_spec, sequence_length=cfg.backbone.sequence_length),
                         heads, name="teacher_5_layers")
    x32 = {k: v[:32] for k, v in example.items()}
    _, reference_student = student(0)
    student_cost = _forward_seconds(reference_student, x32)
    results["cache_speed"] = {"examples": n, "student_forward_seconds_batch32": student_cost}
    for label, teacher_model in (("minilm", teacher.model), ("bert_5x128", deeper)):
        epoch_seconds = {}
        for mode in ("teacher_every_step", "cached"):
            _, model = student(0)
            distiller = Distiller(teacher_model, model, heads, alpha=args.alpha,
                                  temperature=args.temperature)
            distiller.compile(keras.optimizers.Adam(args.learning_rate))
            if mode == "cached":
                start = time.perf_counter()
                subset_outputs = teacher_outputs(distiller, subset, pre, "text", batch_size=64)
                one_off = time.perf_counter() - start
                ds = cached_pipeline(subset, subset_outputs, pre, "text", heads, batch, training=True)
            else:
                ds = make_pipeline(subset, pre, "text", heads, batch, training=True)
            timer = _EpochTimer()
            distiller.fit(ds, epochs=args.speed_epochs, verbose=0, callbacks=[timer])
            # After the first epoch (tracing, filling tf.data caches); the
            # fastest one, as the shared CPU adds noise.
            epoch_seconds[mode] = min(timer.seconds[1:])
        teacher_cost = _forward_seconds(teacher_model, x32)
        results["cache_speed"][label] = {
            "epoch_seconds": epoch_seconds,
            "speedup_per_epoch": epoch_seconds["teacher_every_step"] / epoch_seconds["cached"],
            "one_off_teacher_pass_seconds": one_off,
            "teacher_forward_seconds_batch32": teacher_cost,
            "teacher_to_student_forward_cost": teacher_cost / student_cost,
        }
    results["total_seconds"] = time.perf_counter() - started
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2, default=float)
    print_table(results)


def _EpochTimer():
    """A callback recording each epoch's wall-clock seconds."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer()


def _forward_seconds(model, x, runs=10):
    import tensorflow as tf

    call = tf.function(lambda x: model(x, training=False))
    call(x)
    start = time.perf_counter()
    for _ in range(runs):
        tf.nest.map_structure(lambda t: t.numpy(), call(x))
    return (time.perf_counter() - start) / runs


def print_table(r):
    t, s = r["teacher"], r["student"]
    print(f"\nTeacher: MiniLM-L6 fine-tuned, {t['parameters']:,} params, {t['weights_mb']:.1f} MB of weights "
          f"({t['size_mb']:.1f} MB file with optimizer state), "
          f"{t['latency_ms_per_example']:.2f} ms/example; accuracy {t['accuracy']:.4f}")
    print(f"Student: {s['parameters']:,} params ({100 * r['compression']['parameters_ratio']:.1f}%), "
          f"{s['weights_mb']:.1f} MB of weights, {s['latency_ms_per_example']:.2f} ms/example "
          f"({r['compression']['speedup']:.1f}x faster)\n")
    print("| student | accuracy (mean ± std, 3 seeds) | errors / 400 | % of teacher |")
    print("|---|---|---|---|")
    for name, row in r["summary"].items():
        print(f"| {name} | {row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f} | "
              f"{row['errors_mean']:.1f} | {row['accuracy_retained_percent']:.1f}% |")
    c = r["cache_speed"]
    for label in ("minilm", "bert_5x128"):
        row = c[label]
        print(f"Cache, teacher {label} (forward {row['teacher_to_student_forward_cost']:.1f}x the student's): "
              f"epoch over {c['examples']} examples {row['epoch_seconds']['teacher_every_step']:.2f}s "
              f"(teacher every step) vs {row['epoch_seconds']['cached']:.2f}s (cached): "
              f"{row['speedup_per_epoch']:.2f}x; one-off teacher pass {row['one_off_teacher_pass_seconds']:.2f}s.")
    print(f"Total {r['total_seconds']:.0f}s.")


if __name__ == "__main__":
    main()
