"""Export a trained work dir for serving: `python -m tftransfer.export`.

    python -m tftransfer.export --workdir=W
        -> W/export/<N>/ (SavedModel for TF Serving; N = next integer)
    python -m tftransfer.export --workdir=W --version=3 --overwrite --export_base=/srv/models/flowers
    python -m tftransfer.export --workdir=W --format=tflite --quantize=float16
        -> W/tflite/<N>/model.tflite
    python -m tftransfer.export --workdir=W --format=tflite --quantize=int8 --representative_examples=300
    python -m tftransfer.export --workdir=W --format=tflite --quantize=int8 --integer_only   # text: every op int8
    python -m tftransfer.export --workdir=E --ensemble=W1,W2,W3
        -> E/export/<N>/: one SavedModel serving the mean of the members' probabilities

Quantised exports (float16, dynamic_range, int8; SavedModel int8 for text
models) reload the run's data from `W/config.yaml`: int8 calibrates on
`--representative_examples` training examples, and every quantised export
scores the float and the quantised model on the validation split, prints
both, stores them in the export's `tftransfer.json` and exits 2 (writing
nothing) when the drop exceeds `--max_accuracy_drop`.

Reads `W/model.keras` (safe mode), `W/preprocessor/` and `W/heads.json`
(written by `tftransfer.train`) and `W/config.yaml`. Text SavedModels also
get a core-ops twin, `<export_base>_token_ids/<N>/`, that loads without TF
Text. `--ensemble`: `--workdir` is the ensemble dir to write (see
`tftransfer.export.ensemble`; members must share preprocessing and heads).
See README.md, "Serving" and "Ensembles". Exit code 2: user error (one line on stderr).
"""

from absl import flags

from tftransfer import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Trained work dir (model.keras, preprocessor/, heads.json); with "
                    "--ensemble, the ensemble dir to write.")
flags.DEFINE_list("ensemble", None, "Finished work dirs W1,W2,... to serve as one model (mean of their "
                  "probabilities) under --workdir; they must share preprocessing and heads.")
flags.DEFINE_integer(
    "version", None, "Version to write (a positive integer). Default: 1 + the largest existing version."
)
flags.DEFINE_string(
    "export_base", None,
    "Directory holding the versions (TF Serving's --model_base_path). "
    "Default: W/export for saved_model, W/tflite for tflite.",
)
flags.DEFINE_bool("overwrite", False, "Replace the version if it exists.")
flags.DEFINE_enum("format", "saved_model", ["saved_model", "tflite"], "What to write.")
flags.DEFINE_enum(
    "quantize", "none", ["none", "float16", "dynamic_range", "int8"],
    "TFLite: none (float32), float16 (~1/2 size), dynamic_range (int8 weights, ~1/4 size) or int8 "
    "(int8 weights and activations, calibrated on training examples; full integer for images; text: all "
    "weights int8, feed-forward / value / attention-output projections quantise their input per token, "
    "layer norms, residual adds, GELU, attention softmax / matmuls / transposes and pooling in float). "
    "SavedModel: none or int8 (Keras model.quantize, text models).",
)
flags.DEFINE_float(
    "max_accuracy_drop", 0.01,
    "Refuse a quantised export whose validation accuracy is more than this below the float model's "
    "(a fraction: 0.01 = 1 point; inf = no limit, also allows a run without validation data).",
)
flags.DEFINE_integer(
    "representative_examples", 200, "int8: training examples that calibrate the activation ranges.",
)
flags.DEFINE_bool(
    "integer_only", False,
    "TFLite int8 of a text model: every op int8 (layer norms, residual adds, attention and pooling too), "
    "what int8-only accelerators need; costs accuracy on BERT-family models (measured and held to "
    "--max_accuracy_drop like every quantised export). Image int8 is always integer-only.",
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        from tftransfer.errors import UserError

        raise UserError(f"unexpected arguments {argv[1:]}; every option is a --flag (see --helpfull).")
    # Heavy imports after flag parsing, so --helpfull is instant.
    from tftransfer import experiment
    from tftransfer.export import quantize as quantize_lib
    from tftransfer.export.assets import export_workdir

    if FLAGS.ensemble is not None:
        return _export_ensemble()
    from tftransfer.export.tflite import check_integer_only

    max_drop = quantize_lib.check_max_accuracy_drop(FLAGS.max_accuracy_drop)
    check_integer_only(FLAGS.quantize, FLAGS.integer_only, FLAGS.format)  # before the data load
    representative = validation = None
    if FLAGS.quantize != "none":
        representative, validation = experiment.quantisation_data(
            FLAGS.workdir, FLAGS.quantize, max_drop, FLAGS.representative_examples)
    result = export_workdir(
        FLAGS.workdir, export_base=FLAGS.export_base, version=FLAGS.version,
        overwrite=FLAGS.overwrite, format=FLAGS.format, quantize=FLAGS.quantize,
        representative_data=representative, validation_data=validation, max_accuracy_drop=max_drop,
        integer_only=FLAGS.integer_only,
    )
    if FLAGS.quantize != "none":
        print(quantize_lib.describe(result.get("accuracy")))
    if FLAGS.format == "tflite":
        print(
            f"exported {result['tflite_file']} ({result['size_bytes'] / 1e6:.2f} MB, "
            f"quantize={result['quantize']}, {result['size_ratio']:.2f}x the float32 weights "
            f"of {result['float32_weights_bytes'] / 1e6:.2f} MB)"
        )
        if result.get("integer_only"):
            print("full-integer: every op computes in int8 (tftransfer.json: tflite.integer_only)")
        if result.get("float_ops"):
            print(f"not full-integer: {', '.join(result['float_ops'])} compute in float32 (tftransfer.json: "
                  f"tflite.float_ops)")
        if result.get("dynamic_int8_ops"):
            ops = ", ".join(f"{n} x{k}" for n, k in sorted(result["dynamic_int8_ops"].items()))
            print(f"dynamic int8: {ops} with int8 weights quantise their float input per token at run time "
                  f"(tftransfer.json: tflite.dynamic_int8_ops)")
    else:
        print(f"exported {result['path']}")


def _export_ensemble():
    from tftransfer.errors import UserError
    from tftransfer.export.ensemble import export_ensemble

    if FLAGS.format != "saved_model" or FLAGS.quantize != "none" or FLAGS.integer_only:
        raise UserError(f"--ensemble writes a float SavedModel; drop --format={FLAGS.format} / "
                        f"--quantize={FLAGS.quantize}{' / --integer_only' if FLAGS.integer_only else ''}.")
    result = export_ensemble(FLAGS.ensemble, FLAGS.workdir, export_base=FLAGS.export_base,
                             version=FLAGS.version, overwrite=FLAGS.overwrite)
    print(f"exported {result['path']} (ensemble of {len(result['members'])})")


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
