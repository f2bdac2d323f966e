"""Train a transfer-learning experiment: `python -m tftransfer.train`.

    python -m tftransfer.train --config=configs/quickstart.yaml --workdir=runs/qs
    python -m tftransfer.train --config=configs/x.yaml --workdir=W --config.train.epochs=3

Re-running the same command after a kill resumes from `W/backup/`. The run
is finished when `W/metrics.json` exists. Exit code 2: user error (one line
on stderr). See tftransfer/workdir.py for the work-dir layout.
"""

from absl import flags

from tftransfer import cli

FLAGS = flags.FLAGS
cli.define_run_flags(
    config_help="YAML experiment file (see configs/). Override any key with "
    "--config.<dotted.key>=<yaml value>, e.g. --config.train.epochs=3 or "
    "--config.heads.0.num_classes=5.",
    workdir_help="Work directory for config, checkpoints, logs, metrics, export.",
)


def main(argv):
    del argv
    # Heavy imports after flag parsing, so --helpfull is instant.
    from tftransfer import bn_stats, experiment, workdir

    # 1. Config: load, override, validate (nothing written yet).
    cfg = cli.load_run_config()

    # 2. Strategy first (before anything touches devices); work dir claimed.
    run = cli.start_run(cfg)
    global_batch = cfg.data.batch_size * run.replicas

    # 3-4. Data, fully checked before the work dir is touched; backbone, heads,
    # optimizer, unfreezing inside the strategy scope.
    # No log_dir for the unfreezing callback: its values are in the epoch logs,
    # which the run's TensorBoard callback writes (`epoch_lr_head`, ...).
    built = experiment.build_training(cfg, run.strategy, run.replicas, num_workers=run.cluster.num_workers)
    labelled, heads, steps = built.labelled, built.heads, built.steps
    loaded, model, unfreezing = built.loaded, built.model, built.unfreezing
    cache = experiment.data_cache(cfg, labelled, loaded, run.path(workdir.DATA_CACHE))

    def pipelines(passes=None, validation=True):  # `data`, `source`: the raw data, or cached features (step 6)
        plan = cache if data is labelled else experiment.FEATURES_IN_MEMORY
        return experiment.pipelines(cfg, data, source, heads, global_batch, run.replicas, passes, plan,
                                    validation)

    data, source = labelled, loaded
    val_ds = pipelines()[1]

    # 5. The resolved config marks the work dir as ours (chief); the k-shot draw.
    run.begin(f"{cfg.name}: {labelled.train.num_examples} train / "
              f"{labelled.validation.num_examples if labelled.validation else 0} validation "
              f"examples, global batch {global_batch}, {steps} steps per epoch")
    experiment.write_train_ids(cfg, run, labelled)

    # 5b. train.recipe contrastive (SetFit): the encoder first trains on sentence pairs.
    contrastive = experiment.contrastive_phase(cfg, run, model, loaded, labelled, heads)

    # 6. train.cache_features: a frozen backbone runs once; the head model trains on its features.
    features = experiment.cached_features(cfg, run, model, loaded, labelled, heads, steps * cfg.train.epochs)
    trained = model
    if features.on:
        trained, data, source = features.head_model, features.labelled, features.source
        val_ds = pipelines()[1]

    # 7. Fit (resumes from W/backup/ after a kill).
    statistics_before_fit = bn_stats.snapshot(trained)
    result = run.fit(trained, None, val_ds, steps,
                     experiment.train_callbacks(cfg, unfreezing, val_ds is not None, val_ds, heads),
                     monitor=experiment.monitor(cfg, val_ds is not None),
                     train_stream=lambda first, end: pipelines((first, end), validation=False)[0],
                     batches_per_pass=experiment.steps_per_epoch(
                         cfg, labelled.train.num_examples, global_batch, run.replicas, one_pass=True))

    # 8. The weights that ship: train.keep, BatchNorm statistics that match them.
    shipped = experiment.finish_training(cfg, run, trained, statistics_before_fit, data.train,
                                         source.preprocessor, source.modality, heads, val_ds)

    # 9. Evaluate, save and export the full model; metrics.json last (it marks completion).
    metrics = {**result.summary(), **shipped, **experiment.run_summary(cfg, global_batch),
               "num_train_examples": labelled.train.num_examples, "backbone": loaded.description,
               "data_cache": cache.summary(), "feature_cache": features.report}
    if val_ds is not None:
        metrics["validation"] = {
            k: float(v) for k, v in trained.evaluate(val_ds, return_dict=True, verbose=0).items()}
        metrics["num_validation_examples"] = labelled.validation.num_examples
    metrics["heads"] = experiment.per_head(metrics, heads)
    if contrastive is not None:
        metrics["contrastive"] = contrastive
    adapters = unfreezing if cfg.train.lora is not None else None  # LoRA: its callback holds the adapters
    if adapters is not None:
        adapters.merged_checkpoints()  # model.keras holds merged kernels; backups and best weights were raw
    run.save_model(model)
    export = experiment.export(cfg, run, model, loaded, heads, adapters=adapters)
    if export is not None:
        metrics["export"] = export
    run.finish(metrics)
    summary = metrics.get("validation", metrics["train"])
    print(f"{cfg.name}: done in {result.seconds:.1f}s; " +
          ", ".join(f"{k}={v:.4f}" for k, v in sorted(summary.items())))


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
