"""What each part of `--integer_only` text int8 buys, measured (BENCHMARKS.md, "int8 TFLite").

    python tools/int8_integer_only_ablate.py --workdir=W --examples=200 \
        --variants=keras,per_head,groups,groups_squares

For the work dir's text model: calibrates each variant on `--examples`
representative examples (the run's own training data, as the export does),
quantises every op to int8 (nothing denylisted) and scores it on the run's
validation split against the float Keras model: accuracy, agreement of the
predicted class with float, mean |probability difference| and the ops left
computing in float, and the latency of one example (batch 1, default
runtime, this CPU). Run it on a model validated on a held-out part of the
training split (`tools/bench_peft.py --steps=holdout`), not on the test split.

Variants:
- `keras`: Keras' own ops (the -1e9 mask, its layer norm and masked mean);
  the quantiser leaves `NEG` and `CAST` float, so it is not integer-only.
- `rewrites`: `tftransfer.export.integer_text` without the per-head split.
- `per_head`: `rewrites` with attention split per head.
- `per_head_mse`: `per_head` with each activation range shrunk to the
  clipping (1, 0.9, ..., 0.3 of the min / max range) that minimises the
  int8 mean squared error on the first 40 calibration examples.
- `groups`: what `--integer_only` ships: `per_head` with the encoders'
  residual stream in channel groups (`integer_text.residual_channel_groups`).
- `groups_squares`: `groups` with layer-norm variances as the mean of an
  int8 tensor of squares instead of matrix products.

Every variant's `BATCH_MATMUL` right operands are made zero-centred
(`integer_text.symmetric_batch_matmul_operands`), as the export does, and
every variant is scored with `tf.lite.Interpreter`'s default runtime
(XNNPACK). `--int8_ops` and `--float` quantise only part of the model: a
diagnosis of where the error comes from, not an integer-only model.
"""

import argparse
import contextlib
import json
import os
import re
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # int8_ablate, its sibling

VARIANTS = ("keras", "rewrites", "per_head", "per_head_mse", "groups", "groups_squares")


def mse_ranges(calibrated, batches, examples=40, alphas=(0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)):
    """The calibrated model with each single-range activation clipped to its int8-MSE-optimal fraction."""
    import tensorflow as tf
    from tensorflow.lite.tools import flatbuffer_utils

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        it = tf.lite.Interpreter(model_content=calibrated, experimental_preserve_all_tensors=True)
    runner = it.get_signature_runner()
    values = {}
    for batch in batches[:examples]:
        runner(**batch)
        for d in it.get_tensor_details():
            if d["dtype"] != np.float32:
                continue
            try:
                v = it.get_tensor(d["index"])
            except ValueError:
                continue
            if v.size > 1:
                values.setdefault(d["index"], []).append(v.ravel()[:: max(1, v.size // 20000)])

    def error(x, low, high):
        low, high = min(low, 0.0), max(high, 0.0)
        step = (high - low) / 255.0
        if step <= 0:
            return 0.0
        return float(np.mean((x - (np.clip(np.round((x - low) / step), 0, 255) * step + low)) ** 2))

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(calibrated))
    clipped = 0
    for index, tensor in enumerate(model.subgraphs[0].tensors):
        q = tensor.quantization
        if q is None or q.min is None or len(q.min) != 1 or index not in values:
            continue
        x, low, high = np.concatenate(values[index]), float(q.min[0]), float(q.max[0])
        best = min([(error(x, low, high), 1.0)] + [(error(x, a * low, a * high), a) for a in alphas])
        if best[1] != 1.0:
            q.min, q.max = [best[1] * low], [best[1] * high]
            clipped += 1
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), clipped


def tensor_errors(calibrated, quantized, batch, pattern):
    """Print mean |int8 - float| / mean |float| per tensor whose name matches `pattern` (same-named tensors)."""
    import tensorflow as tf

    def values(flatbuffer):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            it = tf.lite.Interpreter(
                model_content=flatbuffer, experimental_preserve_all_tensors=True,
                experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        it.get_signature_runner()(**batch)
        out = {}
        for d in it.get_tensor_details():
            try:
                v = it.get_tensor(d["index"])
            except ValueError:
                continue
            scale, zero = d["quantization"]
            if d["dtype"] == np.int8 and scale > 0:
                v = (v.astype(np.float32) - zero) * scale
            elif d["dtype"] != np.float32:
                continue
            out.setdefault(d["name"], v)
        return out

    reference, int8 = values(calibrated), values(quantized)
    for name, v in reference.items():
        if pattern.search(name) and name in int8 and int8[name].shape == v.shape and "ReadVariableOp" not in name:
            error = np.abs(v - int8[name]).mean() / (np.abs(v).mean() + 1e-9)
            print(f"  {error:7.3f} relative error, max |float| {np.abs(v).max():9.3f}  {name[-100:]}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--examples", type=int, default=200, help="representative (calibration) examples")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--group_ratio", type=float, default=None,
                   help="`groups`: channel-group range ratio (default integer_text.GROUP_RANGE_RATIO)")
    p.add_argument("--float", default=None, dest="keep_float",
                   help="regex: diagnosis only, ops whose tensor names match stay float (what making them exact "
                        "would buy; the result is not integer-only)")
    p.add_argument("--int8_ops", default=None,
                   help="diagnosis only: A,B: only these TFLite op types are quantised, the rest stay float")
    p.add_argument("--tensor_errors", default=None,
                   help="regex: also print, per variant, the mean relative error of each matching int8 tensor "
                        "against the float (calibrated) model on the 4th calibration example")
    args = p.parse_args()
    variants = args.variants.split(",")
    if not set(variants) <= set(VARIANTS):
        p.exit(2, f"int8_integer_only_ablate.py: error: --variants must be from {','.join(VARIANTS)}\n")
    if not os.path.isfile(os.path.join(args.workdir, "model.keras")):
        p.exit(2, f"int8_integer_only_ablate.py: error: --workdir {args.workdir!r} holds no model.keras\n")

    import tensorflow as tf
    from tensorflow.lite.python import convert

    from tftransfer.export import integer_text
    from tftransfer.export import tflite as tflite_lib
    from int8_ablate import float_reference

    ref = float_reference(args.workdir, args.examples, "int8_integer_only_ablate.py")
    model, heads, assets, labels = ref.model, ref.heads, ref.assets, ref.labels
    batches = [{k: np.asarray(v).astype("int32") for k, v in b.items()} for b in ref.representative]
    probabilities, float_p = ref.probabilities, ref.float_probabilities
    for variant in variants:
        groups = None
        integer_text.MEAN_SQUARE_BY_MATMUL = variant != "groups_squares"
        if variant.startswith("groups"):
            groups = integer_text.residual_channel_groups(
                model, ref.representative, ratio=args.group_ratio or integer_text.GROUP_RANGE_RATIO)
            print("channel groups per encoder:", [[len(g) for g in v] for v in groups.values()], flush=True)
        rewrites = (contextlib.nullcontext() if variant == "keras" else
                    integer_text.integer_friendly_text_ops(per_head_attention=variant != "rewrites",
                                                           channel_groups=groups))
        with rewrites, tflite_lib.saved_model_converter(model, assets.preprocessor, "text", heads) as converter:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: iter(batches)
            calibrated = tflite_lib.calibrated_integer_text(converter)
        clipped = None
        if variant.endswith("_mse"):
            calibrated, clipped = mse_ranges(calibrated, batches)
        nodes = []
        if args.keep_float:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                names = [d["name"] for d in tf.lite.Interpreter(model_content=calibrated).get_tensor_details()]
            nodes = [n for n in names if re.search(args.keep_float, n)]
        denied = []
        if args.int8_ops:
            denied = [o for o in tflite_lib.float_ops(calibrated) if o not in args.int8_ops.split(",")]
        flatbuffer = bytes(convert.mlir_quantize(calibrated, disable_per_channel=False, fully_quantize=False,
                                                 denylisted_nodes=nodes, denylisted_ops=denied))
        if args.tensor_errors:
            tensor_errors(calibrated, flatbuffer, batches[3], re.compile(args.tensor_errors))
        q = probabilities(tflite_lib.interpreter_predict(flatbuffer))
        runner = tf.lite.Interpreter(model_content=flatbuffer).get_signature_runner()
        one = {k: v[:1] for k, v in batches[0].items()}
        runner(**one)
        start = time.perf_counter()
        for _ in range(30):
            runner(**one)
        print(json.dumps({
            "variant": variant, "accuracy": round(float((q.argmax(-1) == labels).mean()), 4),
            "agreement": round(float((q.argmax(-1) == float_p.argmax(-1)).mean()), 4),
            "mean_abs_probability_difference": round(float(np.abs(q - float_p).mean()), 4),
            "latency_ms": round(1000 * (time.perf_counter() - start) / 30, 2),
            "float_ops": tflite_lib.float_ops(flatbuffer), "ranges_clipped": clipped}), flush=True)


if __name__ == "__main__":
    main()
