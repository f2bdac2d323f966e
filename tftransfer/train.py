"""Train a transfer-learning experiment: `python -m tftransfer.train`.

    python -m tftransfer.train --config=configs/quickstart.yaml --workdir=runs/qs
    python -m tftransfer.train --config=configs/x.yaml --workdir=W --config.train.epochs=3

Re-running the same command after a kill resumes from `W/backup/`. The run
is finished when `W/metrics.json` exists. Exit code 2: user error (one line
on stderr). See tftransfer/workdir.py for the work-dir layout.
"""

import os
import time

from absl import flags, logging

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
    import keras

    from tftransfer import config as config_lib
    from tftransfer import experiment, workdir
    from tftransfer.errors import UserError

    # 1. Config: load, override, validate (nothing written yet).
    cfg = cli.load_run_config()
    W = FLAGS.workdir

    # 2. Work dir claimed; runtime: seed, precision, strategy.
    config_text, resuming, strategy = cli.start_run(cfg)
    replicas = strategy.num_replicas_in_sync
    global_batch = cfg.data.batch_size * replicas

    # 3. Data, fully checked before the work dir is touched.
    labelled = experiment.load_data(cfg)
    heads = experiment.resolve_heads(cfg, labelled)

    # 4. Backbone, heads, optimizer inside the strategy scope.
    steps = experiment.steps_per_epoch(cfg, labelled.train.num_examples, global_batch)
    with strategy.scope():
        loaded = experiment.backbone_from_config(cfg)
        if loaded.modality != labelled.modality:
            raise UserError(
                f"backbone is a {loaded.modality} model but data source {cfg.data.source} "
                f"gives {labelled.modality}; pick a matching backbone or data."
            )
        from tftransfer.builders import build_model, compile_for_heads

        model = build_model(loaded, heads)
        from tftransfer.callbacks import ProgressiveUnfreezing

        unfreeze = cfg.train.unfreeze
        train_bn = unfreeze.train_bn
        if train_bn is None:  # Frozen statistics only make sense when pretrained.
            train_bn = not loaded.description.get("pretrained", True)
        unfreezing = ProgressiveUnfreezing(
            loaded.layer_groups, schedule=unfreeze.schedule, unit=unfreeze.unit,
            train_bn=train_bn, lr_decay=unfreeze.lr_decay, every=unfreeze.every,  # lr_decay None: one rate
            log_dir=os.path.join(W, workdir.LOGS),
        )
        compile_for_heads(
            model, heads, experiment.optimizer(cfg, steps * cfg.train.epochs),
            jit_compile=cfg.distribute.jit_compile,
        )
    train_ds, val_ds = experiment.pipelines(cfg, labelled, loaded, heads, global_batch, replicas)

    # 5. The resolved config marks the work dir as ours.
    os.makedirs(W, exist_ok=True)
    workdir.atomic_write_text(os.path.join(W, workdir.CONFIG), config_text)
    if labelled.train_ids is not None:  # the k-shot draw, to reproduce or audit it
        workdir.write_json(os.path.join(W, workdir.TRAIN_IDS),
                           {"train_per_class": cfg.data.train_per_class, "seed": cfg.train.seed,
                            "ids": labelled.train_ids})
    logging.info("%s: %d train / %s validation examples, %d replica(s), global batch %d%s",
                 cfg.name, labelled.train.num_examples,
                 labelled.validation.num_examples if labelled.validation else 0,
                 replicas, global_batch, " (resuming)" if resuming else "")

    # 6. Fit.
    from tftransfer import bn_stats, epoch_selection

    monitor = cfg.train.monitor or ("val_loss" if val_ds is not None else "loss")
    record_path, best_path = os.path.join(W, workdir.HISTORY), os.path.join(W, workdir.BEST_WEIGHTS)
    from tftransfer.callbacks import StopOnDivergence, check_finite_weights

    callbacks = [
        StopOnDivergence(),  # first: a diverged step never reaches the backup or the checkpoint
        unfreezing,
        keras.callbacks.BackupAndRestore(os.path.join(W, workdir.BACKUP)),
        # BackupAndRestore holds the latest state for resuming; the record keeps
        # every epoch's logs and the best epoch's weights, across resumes.
        epoch_selection.EpochRecord(record_path, best_path, monitor=monitor),
        keras.callbacks.TensorBoard(os.path.join(W, workdir.LOGS)),
    ]
    if cfg.train.early_stopping_patience:  # the best weights come back through train.keep
        callbacks.append(keras.callbacks.EarlyStopping(monitor=monitor, patience=cfg.train.early_stopping_patience))
    os.makedirs(os.path.join(W, workdir.CHECKPOINTS), exist_ok=True)
    statistics_before_fit = bn_stats.snapshot(model)
    start = time.perf_counter()
    history = model.fit(
        train_ds, validation_data=val_ds, epochs=cfg.train.epochs,
        steps_per_epoch=cfg.train.steps_per_epoch, callbacks=callbacks,
        verbose=cfg.train.verbose, shuffle=False,  # tf.data shuffles

    )
    train_seconds = time.perf_counter() - start

    # 7. The weights that ship: train.keep, then BatchNorm statistics that match them.
    keep = cfg.train.keep if (val_ds is not None or cfg.train.monitor) else "last"
    selected_epoch, record = epoch_selection.select(model, keep, record_path, best_path)
    logging.info("%s: shipping epoch %s (train.keep=%s, monitor %s)", cfg.name, selected_epoch, keep, monitor)
    bn_report = experiment.recompute_bn_stats(
        cfg, model, labelled, loaded, heads, val_ds, bn_stats.changed_layers(model, statistics_before_fit))
    check_finite_weights(model, f"epoch {selected_epoch}")

    # 8. Evaluate, save, export; metrics.json last (it marks completion).
    selected = next((e for e in record["epochs"] if e["epoch"] == selected_epoch), {})
    metrics = {
        "train": {k: v for k, v in selected.items() if k != "epoch" and not k.startswith("val_")},
        "epochs": len(record["epochs"]),
        "selected_epoch": selected_epoch,
        "keep": keep,
        "monitor": monitor,
        "history": record["epochs"],
        "bn_stats": bn_report,
        "train_seconds": train_seconds,
        "num_train_examples": labelled.train.num_examples,
        "replicas": replicas,
        "global_batch_size": global_batch,
        "backbone": loaded.description,
    }
    if val_ds is not None:
        metrics["validation"] = {
            k: float(v) for k, v in model.evaluate(val_ds, return_dict=True, verbose=0).items()
        }
        metrics["num_validation_examples"] = labelled.validation.num_examples
    model.save(os.path.join(W, workdir.MODEL))
    from tftransfer.export import save_serving_assets

    # W/preprocessor/ + W/heads.json: what `python -m tftransfer.export` needs.
    save_serving_assets(W, loaded, heads)
    if cfg.export.backbone_preset:
        from tftransfer.backbones import save_backbone_preset

        save_backbone_preset(loaded, os.path.join(W, workdir.BACKBONE_PRESET))
    if cfg.export.saved_model:
        from tftransfer.export import export_saved_model

        metadata = {"backbone": loaded.description, "config": config_lib.to_dict(cfg)}
        metrics["export"] = export_saved_model(
            model, loaded.preprocessor, loaded.modality, heads,
            os.path.join(W, workdir.EXPORT), metadata=metadata,
        )
    workdir.write_json(os.path.join(W, workdir.METRICS), metrics)
    summary = metrics.get("validation", metrics["train"])
    print(f"{cfg.name}: done in {train_seconds:.1f}s; " +
          ", ".join(f"{k}={v:.4f}" for k, v in sorted(summary.items())))


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
