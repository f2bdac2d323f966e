"""Evaluate a trained model and write a report: `python -m tftransfer.evaluate`.

    python -m tftransfer.evaluate --workdir=W                       # W/report/report.md
    python -m tftransfer.evaluate --workdir=W --split=train
    python -m tftransfer.evaluate --workdir=W/export/1              # the exported SavedModel
    python -m tftransfer.evaluate --workdir=W --config.data.validation_path=test.csv
    python -m tftransfer.evaluate --workdir=E          # an ensemble dir (tftransfer.export --ensemble)

`--workdir` is a trained work dir (`model.keras`, run in safe mode), an
ensemble dir written by `python -m tftransfer.export --workdir=E
--ensemble=W1,W2` (its members, re-checked, probabilities averaged; the data
of the first member's config), or an exported SavedModel directory (its `serve_preprocessed` signature, or for
text `serving_default`, exactly what TF Serving runs). The data come from the
run's resolved config (`W/config.yaml`, or the config recorded in the
SavedModel's `assets/tftransfer.json`), with `--config.*` overrides applied.

Writes to the report dir (`W/report/`; for `W/export/<N>` it is
`W/report/saved_model_<N>/`): `report.md` with per-head metrics (accuracy,
top-k accuracy, per-class precision/recall/F1/support, macro and weighted
F1, confusion matrix, most-confused pairs, top losses, ECE; multi-label
micro/macro F1 and mAP; regression MSE/MAE/R²), the PNG figures it shows
(confusion matrix, reliability diagram, learning curves from the run's
TensorBoard logs), and `metrics_<split>.json` with every number.
"""

import json
import os

from absl import flags

from tftransfer import cli

FLAGS = flags.FLAGS
SPLITS = ["validation", "train", "test"]
flags.DEFINE_string("workdir", None, "A finished tftransfer.train work dir, or an exported SavedModel "
                    "directory (W/export/<N>).")
flags.DEFINE_string("config", None, "Config to read data settings from. Defaults to the run's own "
                    "(W/config.yaml or the SavedModel's). Override keys with --config.<dotted.key>=<value>.")
flags.DEFINE_enum("split", "validation", SPLITS, "Which split to evaluate. test: the TFDS split named "
                  "test (other sources: point data.validation_path at the test data).")
flags.DEFINE_string("report_dir", None, "Where to write the report. Defaults to W/report "
                    "(W/report/saved_model_<N> for W/export/<N>).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    from tftransfer import config as config_lib
    from tftransfer import experiment, workdir
    from tftransfer.data import make_pipeline
    from tftransfer.errors import UserError
    from tftransfer.report import document, predictions
    from tftransfer.report.history import read_history

    # 1. What is evaluated: a work dir or a SavedModel; the run dir it came from.
    target = FLAGS.workdir.rstrip("/")
    model = _open(target)
    overrides = cli.config_overrides()
    if FLAGS.split == "test":
        overrides.append("data.validation_split=test")
    if not FLAGS.config and not model["config_text"]:
        raise UserError(f"--workdir {target!r} records no training config; pass --config.")
    cfg = config_lib.load_config(FLAGS.config, overrides, text=None if FLAGS.config else model["config_text"])
    if FLAGS.split == "test" and cfg.data.source != "tfds":
        raise UserError(f"--split=test: data.source {cfg.data.source} has no named test split; point "
                        f"--config.data.validation_path at the test data and use --split=validation.")
    report_dir = FLAGS.report_dir or model["report_dir"]
    if report_dir is None:
        raise UserError(f"--workdir {target!r} is a SavedModel outside a work dir; pass --report_dir.")

    # 2. Data, checked (nothing written before this passes).
    labelled = experiment.load_data(cfg)
    experiment.resolve_heads(cfg, labelled, class_weights=False)  # the data still match the heads
    heads = model["heads"]
    split = labelled.train if FLAGS.split == "train" else labelled.validation
    if split is None:
        raise UserError("--split=validation: the config's data has no validation split; "
                        "set data.validation_split/validation_path/validation_fraction or use --split=train.")
    if split.num_examples == 0:
        raise UserError(f"--split={FLAGS.split}: the split is empty; nothing to evaluate.")

    # 3. Predict every example (the network never sees an empty batch).
    batch = experiment.eval_batch_size(cfg, 1)
    ds = make_pipeline(split, model["preprocessor"], model["modality"], heads, batch, cache=False)
    try:
        collected, positions = predictions.collect(
            model["predict"], ds, heads, num_batches=-(-split.num_examples // batch),
            verbose=cfg.train.verbose, with_positions=True)
    except ValueError as e:  # multi-task: a head without one labelled example in this split
        raise UserError(f"--split={FLAGS.split}: {e}")
    descriptions = predictions.describe_examples(split, model["modality"])

    # 4. Metrics (multi-task: each head over the examples labelled for it), figures, report.
    results = {h.name: document.head_metrics(h, *collected[h.name],
                                             descriptions=[descriptions[i] for i in positions[h.name]])
               for h in heads}
    history = read_history(os.path.join(model["run_dir"], workdir.LOGS)) if model["run_dir"] else None
    written = document.write_report(report_dir, results, cfg.name, target, FLAGS.split, history)
    workdir.write_json(os.path.join(report_dir, f"metrics_{FLAGS.split}.json"), {
        "split": FLAGS.split, "num_examples": split.num_examples, "source": target,
        "metrics": _flat(results), "heads": results,
    })
    for line in document.summary(results):
        print(f"{FLAGS.split}: {line}")
    print(f"report: {written['report']}")


def _open(target):
    """The model behind `target`: predict function, heads, preprocessing, config and dirs."""
    from tftransfer import workdir
    from tftransfer.errors import UserError
    from tftransfer.report import predictions

    if os.path.isfile(os.path.join(target, "saved_model.pb")):
        return _open_saved_model(target)
    from tftransfer.export import ensemble

    if ensemble.is_ensemble_dir(target):
        model, assets = ensemble.load_ensemble_dir(target)
        with open(os.path.join(target, workdir.CONFIG)) as f:
            config_text = f.read()
        return {"predict": predictions.keras_predictor(model, assets.heads), "heads": assets.heads,
                "preprocessor": assets.preprocessor, "modality": assets.modality, "config_text": config_text,
                "run_dir": None, "report_dir": os.path.join(target, workdir.REPORT)}
    if not os.path.exists(os.path.join(target, workdir.MODEL)):
        raise UserError(f"--workdir {target!r} has no {workdir.MODEL} and no saved_model.pb; "
                        f"pass a trained work dir (run tftransfer.train there first) or W/export/<N>.")
    from tftransfer.export import load_serving_assets
    from tftransfer.export.assets import load_trained_model

    assets = load_serving_assets(target)  # the exact preprocessing of training
    model = load_trained_model(target)
    config_path = os.path.join(target, workdir.CONFIG)
    if not os.path.isfile(config_path):
        raise UserError(f"--workdir {target!r} has no {workdir.CONFIG}; pass --config.")
    with open(config_path) as f:
        config_text = f.read()
    return {"predict": predictions.keras_predictor(model, assets.heads), "heads": assets.heads,
            "preprocessor": assets.preprocessor, "modality": assets.modality, "config_text": config_text,
            "run_dir": target, "report_dir": os.path.join(target, workdir.REPORT)}


def _open_saved_model(path):
    import keras
    import tensorflow as tf
    import yaml

    from tftransfer import workdir
    from tftransfer.errors import UserError
    from tftransfer.export import saved_model
    from tftransfer.heads import HeadSpec
    from tftransfer.report import predictions

    from tftransfer.export.saved_model import METADATA_FILE

    try:
        with open(os.path.join(path, "assets", METADATA_FILE)) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--workdir {path!r}: no readable assets/{METADATA_FILE} ({e}); it was not "
                        f"exported by tftransfer.")
    heads = [HeadSpec(**{**h, "class_names": tuple(h["class_names"]) if h.get("class_names") else None})
             for h in info["heads"]]
    modality = info["modality"]
    if modality == "text":
        import tensorflow_text  # noqa: F401  (the tokenizer's ops inside the SavedModel)
    loaded = tf.saved_model.load(path)
    if modality == "image":
        # serve_preprocessed takes the image after the backbone's converter, which the
        # SavedModel records; the pipeline applies it exactly as training did.
        import keras_hub  # noqa: F401

        preprocessor = keras.saving.deserialize_keras_object(info["preprocessing"])
        predict = predictions.saved_model_predictor(loaded.signatures["serve_preprocessed"], heads, "image")
    else:
        preprocessor = lambda x: x  # noqa: E731  (serving_default tokenises inside)
        names = tuple(n for n in saved_model.PAIR_INPUTS if n in info["signatures"][saved_model.RAW_SIGNATURE])
        predict = predictions.saved_model_predictor(loaded.signatures["serving_default"], heads,
                                                    names if len(names) == 2 else "text")
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    in_run = os.path.isfile(os.path.join(run_dir, workdir.CONFIG))
    return {"predict": predict, "heads": heads, "preprocessor": preprocessor, "modality": modality,
            "config_text": yaml.safe_dump(info["config"]) if info.get("config") else None,
            "run_dir": run_dir if in_run else None,
            "report_dir": os.path.join(run_dir, workdir.REPORT, f"saved_model_{os.path.basename(path)}")
            if in_run else None}


def _flat(results):
    """Scalar metrics, Keras-style names (`accuracy`; `<head>_accuracy` with several heads)."""
    single = len(results) == 1
    return {(k if single else f"{name}_{k}"): v for name, r in results.items() for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
