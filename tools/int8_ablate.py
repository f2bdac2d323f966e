"""Which ops should text int8 keep float, or give per-token (dynamic) int8 inputs? Measured, not guessed.

    python tools/int8_ablate.py --workdir=W --examples=200 \
        --configs="ops=TRANSPOSE;ops=TRANSPOSE,GELU&dynamic=feedforward_output_dense"

For the work dir's model: calibrates once on `--examples` representative
examples (the run's own training data, as `python -m tftransfer.export`
does; cached as `W/calibrated_<examples>.tflite`), then re-quantises it per
configuration and scores each on the run's validation split against the
float Keras model: accuracy, agreement of the predicted class with float,
mean |probability difference| (a finer fidelity measure than accuracy on a
small split) and size. Run it on a model validated on a held-out part of
the training split (`tools/bench_peft.py --steps=holdout`), never on the
test split, to choose.

A configuration is `&`-separated, each part optional, always on top of what
the export keeps float on text (`tflite.FLOAT_OPS_TEXT_INT8` minus what
`--base_ops` drops, and `tflite.float_scopes`):
- `ops=A,B`: more TFLite op types kept float.
- `float=REGEX`: ops whose tensor names match kept float (weights float too).
- `dynamic=REGEX`: `FULLY_CONNECTED` ops whose names match get int8 weights
  and per-token int8 inputs (`tflite.dynamic_int8_fully_connected`).
An empty configuration is the export's text int8 without its dynamic layers.
"""

import argparse
import json
import os
import re
import sys
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def float_reference(workdir, examples, tool):
    """The work dir's one-head text model scored in float on its validation split (shared with
    `tools/int8_integer_only_ablate.py`).

    Returns a namespace: `model`, `heads`, `assets`, `representative` (calibration batches),
    `labels`, `probabilities(predict)` (over the validation split) and `float_probabilities`.
    """
    import types

    from tftransfer import experiment
    from tftransfer.export import quantize as quantize_lib
    from tftransfer.export.assets import load_serving_assets, load_workdir_model

    assets = load_serving_assets(workdir)
    if assets.modality != "text" or len(assets.heads) != 1:
        raise SystemExit(f"tools/{tool}: text models with one head only")
    model, heads = load_workdir_model(workdir), assets.heads
    representative, validation = experiment.quantisation_data(workdir, "int8", float("inf"), examples)
    validation = list(validation)
    labels = np.concatenate([np.asarray(y[heads[0].name]) for _, y, *_ in validation])
    labels = labels.argmax(-1) if labels.ndim > 1 else labels

    def probabilities(predict):
        return np.concatenate([np.asarray(predict(x)["probabilities"]) for x, *_ in validation])

    float_p = probabilities(quantize_lib.keras_predict(model, heads))
    print(f"float accuracy {float((float_p.argmax(-1) == labels).mean()):.4f} on {len(labels)} validation "
          f"examples", flush=True)
    return types.SimpleNamespace(model=model, heads=heads, assets=assets, representative=representative,
                                 labels=labels, probabilities=probabilities, float_probabilities=float_p)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--examples", type=int, default=200, help="representative (calibration) examples")
    p.add_argument("--configs", required=True, help="';'-separated configurations (see above)")
    p.add_argument("--base_ops", default="SELECT_V2,SOFTMAX,BATCH_MATMUL,ADD",
                   help="op types always kept float (the 2026-12-06 export's; the export now adds TRANSPOSE, GELU)")
    args = p.parse_args()
    configs = []
    for config in args.configs.split(";"):
        parts = {}
        for part in (x for x in config.split("&") if x):
            key, sep, value = part.partition("=")
            if not sep or key not in ("ops", "float", "dynamic"):
                p.exit(2, f"int8_ablate.py: error: --configs part {part!r} is not ops=A,B / float=REGEX / "
                          f"dynamic=REGEX\n")
            if key != "ops":
                try:
                    re.compile(value)
                except re.error as e:
                    p.exit(2, f"int8_ablate.py: error: --configs {key}={value!r} is not a regex ({e})\n")
            parts[key] = value
        configs.append((config, parts))
    if not os.path.isfile(os.path.join(args.workdir, "model.keras")):
        p.exit(2, f"int8_ablate.py: error: --workdir {args.workdir!r} holds no model.keras; pass a trained work dir\n")

    import tensorflow as tf
    from tensorflow.lite.python import convert

    from tftransfer.export import tflite as tflite_lib

    ref = float_reference(args.workdir, args.examples, "int8_ablate.py")
    model, heads, assets, representative = ref.model, ref.heads, ref.assets, ref.representative
    labels, probabilities, float_p = ref.labels, ref.probabilities, ref.float_probabilities
    float_acc = float((float_p.argmax(-1) == labels).mean())

    def dataset():
        for batch in representative:
            yield {k: np.asarray(v).astype("int32") for k, v in batch.items()}

    cache = os.path.join(args.workdir, f"calibrated_{args.examples}.tflite")
    if os.path.exists(cache):
        with open(cache, "rb") as f:
            calibrated = f.read()
    else:
        with tflite_lib.saved_model_converter(model, assets.preprocessor, "text", heads) as converter:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = dataset
            calibrated = tf.lite.experimental.QuantizationDebugger(
                converter=converter, debug_dataset=dataset).calibrated_model
        with open(cache, "wb") as f:
            f.write(calibrated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = [d["name"] for d in tf.lite.Interpreter(model_content=calibrated).get_tensor_details()]
    scopes = tflite_lib.float_scopes(model, heads)
    base = [o for o in args.base_ops.split(",") if o]
    for config, parts in configs:
        ops = base + [o for o in parts.get("ops", "").split(",") if o]
        keep, dynamic = parts.get("float"), parts.get("dynamic")
        nodes = [n for n in names if scopes.search(n) or any(r and re.search(r, n) for r in (keep, dynamic))]
        flatbuffer = convert.mlir_quantize(calibrated, disable_per_channel=False, fully_quantize=False,
                                           denylisted_ops=ops, denylisted_nodes=nodes)
        changed = 0
        if dynamic:
            flatbuffer, changed = tflite_lib.dynamic_int8_fully_connected(flatbuffer, re.compile(dynamic))
        flatbuffer = bytes(flatbuffer)
        q = probabilities(tflite_lib.interpreter_predict(flatbuffer))
        acc = float((q.argmax(-1) == labels).mean())
        print(json.dumps({
            "config": config, "accuracy": round(acc, 4), "drop_points": round(100 * (float_acc - acc), 2),
            "agreement": round(float((q.argmax(-1) == float_p.argmax(-1)).mean()), 4),
            "mean_abs_probability_difference": round(float(np.abs(q - float_p).mean()), 4),
            "MB": round(len(flatbuffer) / 1e6, 2), "dynamic_int8_ops": changed,
            "float_ops": tflite_lib.float_ops(flatbuffer)}), flush=True)


if __name__ == "__main__":
    main()
