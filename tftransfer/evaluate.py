"""Evaluate a trained work dir: `python -m tftransfer.evaluate --workdir=W`.

Loads `W/model.keras` (safe mode) and the resolved `W/config.yaml`, rebuilds
the same data pipeline, and writes `W/report/metrics_<split>.json`.
"""

import os

from absl import flags

from tftransfer import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A finished tftransfer.train work dir.")
flags.DEFINE_string("config", None, "Config to read data settings from. Defaults to W/config.yaml. "
                    "Override keys with --config.<dotted.key>=<value>.")
flags.DEFINE_enum("split", "validation", ["validation", "train"], "Which split to evaluate.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    import keras

    from tftransfer import config as config_lib
    from tftransfer import experiment, workdir
    from tftransfer.errors import UserError

    W = FLAGS.workdir
    model_path = os.path.join(W, workdir.MODEL)
    if not os.path.exists(model_path):
        raise UserError(f"--workdir {W!r} has no {workdir.MODEL}; run tftransfer.train there first.")
    cfg = config_lib.load_config(FLAGS.config or os.path.join(W, workdir.CONFIG), cli.config_overrides())
    labelled = experiment.load_data(cfg)
    heads = experiment.resolve_heads(cfg, labelled)
    split = labelled.validation if FLAGS.split == "validation" else labelled.train
    if split is None:
        raise UserError("--split=validation: the config's data has no validation split; "
                        "set data.validation_split/validation_path/validation_fraction or use --split=train.")
    # The exact preprocessing the model was trained with (W/preprocessor/).
    from tftransfer.export import load_serving_assets

    assets = load_serving_assets(W)
    model = workdir.load_model(model_path, "--workdir model")
    from tftransfer.builders import compile_for_heads
    from tftransfer.data import make_pipeline

    compile_for_heads(model, heads, "adam")
    ds = make_pipeline(split, assets.preprocessor, assets.modality, heads,
                       experiment.eval_batch_size(cfg, 1), cache=False)
    metrics = {k: float(v) for k, v in model.evaluate(ds, return_dict=True, verbose=0).items()}
    result = {"split": FLAGS.split, "num_examples": split.num_examples, "metrics": metrics}
    workdir.write_json(os.path.join(W, "report", f"metrics_{FLAGS.split}.json"), result)
    print(f"{FLAGS.split}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
