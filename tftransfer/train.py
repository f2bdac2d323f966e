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
        from tftransfer import lora

        adapters = lora.apply_from_config(cfg, loaded, model)  # train.lora: frozen base + adapters; else None
        from tftransfer.callbacks import ProgressiveUnfreezing

        unfreeze = cfg.train.unfreeze
        train_bn = unfreeze.train_bn
        if train_bn is None:  # Frozen statistics only make sense when pretrained.
            train_bn = not loaded.description.get("pretrained", True)
        unfreezing = adapters or ProgressiveUnfreezing(
            loaded.layer_groups, schedule=unfreeze.schedule, unit=unfreeze.unit,
            train_bn=train_bn, lr_decay=unfreeze.lr_decay,  # None: one learning rate
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
    logging.info("%s: %d train / %s validation examples, %d replica(s), global batch %d%s",
                 cfg.name, labelled.train.num_examples,
                 labelled.validation.num_examples if labelled.validation else 0,
                 replicas, global_batch, " (resuming)" if resuming else "")

    # 6. Fit.
    monitor = "val_loss" if val_ds is not None else "loss"
    callbacks = [
        unfreezing,
        keras.callbacks.BackupAndRestore(os.path.join(W, workdir.BACKUP)),
        # BackupAndRestore holds the latest state for resuming; checkpoints/
        # keeps the best weights by the monitored loss (one write per improvement).
        keras.callbacks.ModelCheckpoint(
            os.path.join(W, workdir.CHECKPOINTS, "best.weights.h5"), save_weights_only=True,
            monitor=monitor, save_best_only=True,
        ),
        keras.callbacks.TensorBoard(os.path.join(W, workdir.LOGS)),
    ]
    if cfg.train.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=monitor, patience=cfg.train.early_stopping_patience, restore_best_weights=True
        ))
    os.makedirs(os.path.join(W, workdir.CHECKPOINTS), exist_ok=True)
    start = time.perf_counter()
    history = model.fit(
        train_ds, validation_data=val_ds, epochs=cfg.train.epochs,
        steps_per_epoch=cfg.train.steps_per_epoch, callbacks=callbacks,
        verbose=cfg.train.verbose, shuffle=False,  # tf.data shuffles

    )
    train_seconds = time.perf_counter() - start

    # 7. Evaluate, save, export; metrics.json last (it marks completion).
    metrics = {
        "train": {k: float(v[-1]) for k, v in history.history.items() if not k.startswith("val_")},
        "epochs": len(history.history.get("loss", [])),
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
    if adapters:
        adapters.save(W, heads)  # W/lora/: adapters + heads, base named and hashed
    if cfg.export.backbone_preset:
        from tftransfer.backbones import save_backbone_preset

        save_backbone_preset(loaded, os.path.join(W, workdir.BACKBONE_PRESET))
    if cfg.export.saved_model:
        from tftransfer.export import export_saved_model

        metadata = {"backbone": loaded.description, "config": config_lib.to_dict(cfg)}
        metrics["export"] = export_saved_model(
            lora.merge(model) if adapters else model,  # LoRA: adapters merged, no LoRA variables
            loaded.preprocessor, loaded.modality, heads,
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
