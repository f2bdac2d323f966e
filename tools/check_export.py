"""Check an exported model with plain TensorFlow: load it, list signatures, predict once.

    python tools/check_export.py W/export/3          # one SavedModel version
    python tools/check_export.py W/export            # the newest version under a base
    python tools/check_export.py W/export --image=cat.jpg --text="a fine film"
    python tools/check_export.py W/tflite/1          # a model.tflite version

It imports nothing of tftransfer, only `tensorflow` (and `tensorflow_text`
when the model's `assets/tftransfer.json` lists TF Text ops, as TF Serving
needs them too), so a pass means a server with the same TF can load it.
For each signature it prints the inputs and outputs, then feeds a smoke
input (a generated PNG / "hello world" / token ids, or the files given) and
prints every output's shape and first row. Exit code 0: all signatures ran.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def resolve(path):
    """A version dir: `path` itself, or its largest integer subdirectory."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")) or os.path.isfile(os.path.join(path, "model.tflite")):
        return path
    versions = [int(d) for d in os.listdir(path) if d.isdigit()] if os.path.isdir(path) else []
    if not versions:
        sys.exit(f"error: {path!r} is neither a SavedModel/TFLite version dir nor a base holding integer versions.")
    return os.path.join(path, str(max(versions)))


def metadata(version_dir):
    for candidate in ("assets/tftransfer.json", "tftransfer.json"):
        path = os.path.join(version_dir, candidate)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    return {}


def smoke_inputs(tf, spec_by_name, args, info):
    """Inputs for one signature, from its TensorSpecs."""
    inputs = {}
    for name, spec in spec_by_name.items():
        shape = [d if d is not None else 2 for d in spec.shape.as_list()]
        if spec.dtype == tf.string and name.endswith("_bytes"):
            if args.image:
                with open(args.image, "rb") as f:
                    contents = [f.read()]
            else:
                pixels = tf.cast(tf.random.stateless_uniform((48, 64, 3), (0, 0), 0, 256, tf.int32), tf.uint8)
                contents = [tf.io.encode_png(pixels).numpy(), tf.io.encode_jpeg(pixels).numpy()]
            inputs[name] = tf.constant(contents)
        elif spec.dtype == tf.string:
            inputs[name] = tf.constant([args.text, "hello world"])
        elif spec.dtype.is_integer:
            if len(shape) == 2 and spec.shape[1] is None:  # (batch, length): the exported length
                exported = info.get("signatures", {}).get("serve_preprocessed", {}).get(name, [None, None])
                shape[1] = exported[1] or 8
            value = tf.ones(shape, spec.dtype) if name != "segment_ids" else tf.zeros(shape, spec.dtype)
            inputs[name] = value
        else:
            inputs[name] = tf.random.stateless_normal(shape, (1, 2), dtype=spec.dtype)
    return inputs


def show(outputs):
    for name in sorted(outputs):
        value = outputs[name].numpy() if hasattr(outputs[name], "numpy") else outputs[name]
        first = value[0] if len(value.shape) and value.shape[0] else value
        print(f"      {name}: {value.dtype} {tuple(value.shape)}  first: {first!r}"[:300])


def check_saved_model(version_dir, args):
    info = metadata(version_dir)
    ops = info.get("custom_ops") or []
    if ops:
        print(f"needs custom ops: {', '.join(ops)}")
        try:
            import tensorflow_text  # noqa: F401  (registers the TF Text ops)
        except ImportError:
            sys.exit("error: this model needs the TF Text ops: pip install tensorflow-text (same version as tensorflow).")
    import tensorflow as tf

    loaded = tf.saved_model.load(version_dir)
    print(f"loaded {version_dir} with tensorflow {tf.__version__}")
    labels = os.path.join(version_dir, "assets", "labels.txt")
    if os.path.isfile(labels):
        with open(labels) as f:
            names = f.read().split("\n")[:-1]
        print(f"labels.txt: {len(names)} classes: {names[:10]}{' ...' if len(names) > 10 else ''}")
    for key in sorted(loaded.signatures, key=lambda k: (k != "serving_default", k)):
        fn = loaded.signatures[key]
        specs = fn.structured_input_signature[1]
        print(f"signature {key!r}")
        for name, spec in sorted(specs.items()):
            print(f"    input  {name}: {spec.dtype.name} {spec.shape}")
        for name, spec in sorted(fn.structured_outputs.items()):
            print(f"    output {name}: {spec.dtype.name} {spec.shape}")
        outputs = fn(**smoke_inputs(tf, specs, args, info))
        print("    smoke prediction OK:")
        show(outputs)


def check_tflite(version_dir, args):
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=os.path.join(version_dir, "model.tflite"))
    info = metadata(version_dir)
    for key, runner_def in interpreter.get_signature_list().items():
        runner = interpreter.get_signature_runner(key)
        print(f"tflite signature {key!r}: inputs {runner_def['inputs']}, outputs {runner_def['outputs']}")
        details = runner.get_input_details()
        specs = {
            name: tf.TensorSpec([None, *d["shape_signature"][1:]], tf.as_dtype(d["dtype"]))
            for name, d in details.items()
        }
        inputs = {k: v.numpy() for k, v in smoke_inputs(tf, specs, args, info).items()}
        print("    smoke prediction OK:")
        show(runner(**inputs))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a version dir (W/export/3) or an export base (W/export)")
    parser.add_argument("--image", help="an image file for image_bytes inputs (default: a generated PNG + JPEG)")
    parser.add_argument("--text", default="a fine film", help="a sentence for text inputs")
    args = parser.parse_args()
    version_dir = resolve(args.path)
    if os.path.isfile(os.path.join(version_dir, "model.tflite")):
        check_tflite(version_dir, args)
    else:
        check_saved_model(version_dir, args)
    print("OK")


if __name__ == "__main__":
    main()
