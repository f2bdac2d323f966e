"""Serving-signature latency vs calling the Keras model directly, in one run.

    python tools/bench_serving.py                       # tiny image + text models, batch 1 and 32
    python tools/bench_serving.py --size=small --modality=image --iters=30
    python tools/bench_serving.py --json=/tmp/bench.json

Builds a randomly initialised model (`--size`: `tiny` = the test models;
`small` = ResNet-18 layout at 128x128 / 4-layer BERT, 256 wide, 128 tokens),
exports it with `tftransfer.export.export_saved_model`, loads the export with
`tf.saved_model.load` (as a server does) and times, interleaved round-robin
so machine noise hits every method alike (median and p90 over `--iters`
rounds after `--warmup` rounds; each call ends when its result is on the
host as numpy):

Same preprocessed input (float image batch / token ids), in process:
- `keras_call`: `model(x, training=False)` (eager Keras call; logits only).
- `keras_predict_on_batch`: `model.predict_on_batch(x)` (Keras' compiled
  predict function; logits only).
- `keras_tf_function`: `tf.function(model(x, training=False))` (the same
  graph a SavedModel holds, no loading; logits only).
- `serve_preprocessed`: the loaded SavedModel's preprocessed signature
  (the graph + softmax, argmax, top-k and class-name lookups).

Raw client input (encoded JPEGs of 160x120 pixels / sentences):
- `host_preprocess+keras_call`: decode + resize + normalise (or tokenise)
  eagerly on the host, then `model(x, training=False)`.
- `serving_default`: the loaded SavedModel's raw-input signature (all of it
  inside the graph).

Ratios: `serve_preprocessed / keras_call` (the headline: what serving costs
over using the model in Python on the same tensor; goal <= 1.3 at batch 1),
`serve_preprocessed / keras_tf_function` (the export's own overhead: loading
+ post-processing, same graph mode), `serving_default /
host_preprocess+keras_call`. Only TensorFlow's own threads run: no server,
no network, no request (de)serialisation.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = {
    "tiny": {
        "image": {"spec": {"architecture": "resnet", "input_conv_filters": [64],
                           "input_conv_kernel_sizes": [3], "stackwise_num_filters": [64, 128],
                           "stackwise_num_blocks": [1, 1], "stackwise_num_strides": [1, 2],
                           "block_type": "basic_block"}, "image_size": 32},
        "text": {"spec": {"architecture": "bert", "num_layers": 2, "num_heads": 2, "hidden_dim": 16,
                          "intermediate_dim": 32, "max_sequence_length": 32},
                 "sequence_length": 16, "vocabulary_size": 200},
    },
    "small": {
        "image": {"spec": {"architecture": "resnet", "input_conv_filters": [64],
                           "input_conv_kernel_sizes": [7], "stackwise_num_filters": [64, 128, 256, 512],
                           "stackwise_num_blocks": [2, 2, 2, 2], "stackwise_num_strides": [1, 2, 2, 2],
                           "block_type": "basic_block"}, "image_size": 128},
        "text": {"spec": {"architecture": "bert", "num_layers": 4, "num_heads": 4, "hidden_dim": 256,
                          "intermediate_dim": 1024, "max_sequence_length": 128},
                 "sequence_length": 128, "vocabulary_size": 5000},
    },
}
NUM_CLASSES = 10


def build(modality, size):
    import tftransfer
    from tftransfer.heads import HeadSpec

    cfg = SIZES[size][modality]
    heads = [HeadSpec(num_classes=NUM_CLASSES, class_names=tuple(f"class_{i}" for i in range(NUM_CLASSES)))]
    if modality == "image":
        loaded = tftransfer.load_backbone(spec=cfg["spec"], image_size=cfg["image_size"])
    else:
        vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [
            f"w{i}" for i in range(cfg["vocabulary_size"] - 5)
        ]
        loaded = tftransfer.load_backbone(
            spec={**cfg["spec"], "vocabulary": vocabulary}, sequence_length=cfg["sequence_length"]
        )
    return loaded, heads, tftransfer.build_model(loaded, heads)


def raw_inputs(modality, batch, size, seed=0):
    import numpy as np
    import tensorflow as tf

    rng = np.random.RandomState(seed)
    if modality == "image":
        return [
            tf.io.encode_jpeg(rng.randint(0, 256, (120, 160, 3)).astype("uint8")).numpy()
            for _ in range(batch)
        ]
    words = SIZES[size]["text"]["vocabulary_size"] - 5
    length = SIZES[size]["text"]["sequence_length"]
    return [" ".join(f"w{rng.randint(words)}" for _ in range(max(4, length // 2))) for _ in range(batch)]


def methods(modality, loaded, model, serving, raw):
    """name -> zero-argument callable returning host (numpy) results."""
    import tensorflow as tf

    preprocessor = loaded.preprocessor
    raw_tensor = tf.constant(raw)
    if modality == "image":
        x = preprocessor(tf.stack([tf.cast(tf.io.decode_image(b, channels=3), tf.float32) for b in raw]))
        x = tf.identity(x)
        kwargs = {"image": x}
        raw_kwargs = {"image_bytes": raw_tensor}

        def host_preprocess():
            images = [preprocessor(tf.cast(tf.io.decode_image(b, channels=3), tf.float32)) for b in raw]
            return tf.stack(images)
    else:
        x = {k: tf.cast(v, tf.int32) for k, v in preprocessor(raw_tensor).items()}
        kwargs = x
        raw_kwargs = {"text": raw_tensor}

        def host_preprocess():
            return preprocessor(raw_tensor)

    graph_call = tf.function(lambda inputs: model(inputs, training=False))
    preprocessed = serving.signatures["serve_preprocessed"]
    default = serving.signatures["serving_default"]

    def numpy(outputs):
        return {k: v.numpy() for k, v in outputs.items()}

    return {
        "keras_call": lambda: numpy(model(x, training=False)),
        "keras_predict_on_batch": lambda: model.predict_on_batch(x),
        "keras_tf_function": lambda: numpy(graph_call(x)),
        "serve_preprocessed": lambda: numpy(preprocessed(**kwargs)),
        "host_preprocess+keras_call": lambda: numpy(model(host_preprocess(), training=False)),
        "serving_default": lambda: numpy(default(**raw_kwargs)),
    }


def time_interleaved(fns, iters, warmup):
    times = {name: [] for name in fns}
    for i in range(warmup + iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed * 1e3)
    result = {}
    for name, values in times.items():
        values.sort()
        result[name] = {"median_ms": statistics.median(values),
                        "p90_ms": values[min(len(values) - 1, int(0.9 * len(values)))]}
    return result


def check_parity(fns):
    """The serving outputs must match the Keras logits (same input)."""
    import numpy as np

    logits = fns["keras_call"]()["label"]
    e = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities = e / e.sum(-1, keepdims=True)
    served = fns["serve_preprocessed"]()["probabilities"]
    return float(np.abs(served - probabilities).max())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", choices=["image", "text", "both"], default="both")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--batch_sizes", default="1,32")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from tftransfer.export import export_saved_model

    keras.utils.set_random_seed(0)
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "cpus": os.cpu_count(), "tensorflow": tf.__version__, "keras": keras.__version__},
               "size": args.size, "iters": args.iters, "runs": []}
    modalities = ["image", "text"] if args.modality == "both" else [args.modality]
    rows = []
    for modality in modalities:
        loaded, heads, model = build(modality, args.size)
        with tempfile.TemporaryDirectory() as tmp:
            path = export_saved_model(model, loaded.preprocessor, modality, heads, tmp)
            serving = tf.saved_model.load(path)
            for batch in [int(b) for b in args.batch_sizes.split(",")]:
                fns = methods(modality, loaded, model, serving, raw_inputs(modality, batch, args.size))
                diff = check_parity(fns)
                timing = time_interleaved(fns, args.iters, args.warmup)
                med = {k: v["median_ms"] for k, v in timing.items()}
                ratios = {
                    "serve_preprocessed/keras_call": med["serve_preprocessed"] / med["keras_call"],
                    "serve_preprocessed/keras_predict_on_batch":
                        med["serve_preprocessed"] / med["keras_predict_on_batch"],
                    "serve_preprocessed/keras_tf_function": med["serve_preprocessed"] / med["keras_tf_function"],
                    "serving_default/host_preprocess+keras_call":
                        med["serving_default"] / med["host_preprocess+keras_call"],
                }
                results["runs"].append({"modality": modality, "batch": batch, "timing": timing,
                                        "ratios": ratios, "max_abs_diff": diff})
                rows.append((modality, batch, timing, ratios, diff))
    names = list(rows[0][2])
    print(f"# bench_serving: size={args.size}, {args.iters} interleaved rounds, median ms (p90)")
    print(f"# {results['machine']}")
    print("| modality | batch | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for modality, batch, timing, _, _ in rows:
        cells = [f"{timing[n]['median_ms']:.2f} ({timing[n]['p90_ms']:.2f})" for n in names]
        print(f"| {modality} | {batch} | " + " | ".join(cells) + " |")
    print()
    ratio_names = list(rows[0][3])
    print("| modality | batch | " + " | ".join(ratio_names) + " | max abs diff |")
    print("|---|---|" + "---|" * (len(ratio_names) + 1))
    for modality, batch, _, ratios, diff in rows:
        print(f"| {modality} | {batch} | " + " | ".join(f"{ratios[n]:.2f}x" for n in ratio_names)
              + f" | {diff:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
