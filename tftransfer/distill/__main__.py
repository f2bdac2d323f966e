"""Distil a trained teacher into a smaller student: `python -m tftransfer.distill`.

    python -m tftransfer.distill --config=configs/distill_minilm_sentiment.yaml --workdir=runs/distilled
    python -m tftransfer.distill --config=c.yaml --workdir=W --config.distill.temperature=4

The config's `distill` section names the teacher (trained work dirs or
`.keras` files; several form an ensemble) and the loss; `backbone` / `heads`
describe the student, `data` the transfer set (labelled, plus optional
unlabelled `distill.transfer_path`). The work dir gets what
`python -m tftransfer.train` writes (`config.yaml`, `model.keras`,
`export/<N>/`, `metrics.json` last) plus `cache/` (teacher outputs, with
`distill.cache: disk`). `metrics.json` compares teacher and student:
accuracy, parameters, size on disk, CPU latency per example, and the
percentage of the teacher's accuracy the student retains. Exit code 2: user
error (one line on stderr).
"""

import dataclasses
import os
import time

from absl import flags, logging

from tftransfer import cli

FLAGS = flags.FLAGS
cli.define_run_flags(
    config_help="YAML experiment file with a `distill` section (see configs/distill_*.yaml). Override "
    "any key with --config.<dotted.key>=<yaml value>, e.g. --config.distill.temperature=4.",
    workdir_help="Work directory for the student: config, logs, cache, metrics, export.",
)

CACHE_DIR = "cache"


def main(argv):
    del argv
    # Heavy imports after flag parsing, so --helpfull is instant.
    import keras

    from tftransfer import config as config_lib
    from tftransfer import experiment, workdir
    from tftransfer.builders import build_model
    from tftransfer.data import make_pipeline
    from tftransfer.distill import cache as cache_lib
    from tftransfer.distill import data as distill_data
    from tftransfer.distill import report
    from tftransfer.distill.distiller import Distiller
    from tftransfer.distill.init import init_from_teacher
    from tftransfer.distill.schedule import DistillationSchedule
    from tftransfer.distill.teacher import check_compatible, find_backbone, load_teacher
    from tftransfer.errors import UserError

    # 1. Config: load, override, validate (nothing written yet).
    cfg = cli.load_run_config()
    if cfg.distill is None:
        raise UserError(
            f"--config {FLAGS.config or '(none)'} has no distill section; add distill: {{teacher: "
            f"[path/to/trained/workdir]}} (see configs/distill_minilm_sentiment.yaml)."
        )
    dcfg = cfg.distill
    W = FLAGS.workdir

    # 2. Work dir claimed; runtime: seed, precision, strategy.
    config_text, resuming, strategy = cli.start_run(cfg)
    global_batch = cfg.data.batch_size * strategy.num_replicas_in_sync

    # 3. Data, fully checked before the work dir is touched.
    labelled = experiment.load_data(cfg)
    heads = experiment.resolve_heads(cfg, labelled)
    transfer = None
    if dcfg.transfer_path:
        if labelled.modality != "text":
            raise UserError("distill.transfer_path: unlabelled transfer data is supported for text only.")
        transfer = distill_data.load_transfer_text(dcfg.transfer_path, cfg.data.input_key or "text")
    train_split = distill_data.concatenate(labelled.train, transfer)
    if dcfg.cache != "none" and cfg.data.augment.enabled:
        raise UserError(
            f"distill.cache={dcfg.cache} with data.augment: cached teacher outputs would not match "
            f"the augmented images; set distill.cache: none or disable data.augment."
        )

    # 4. Teacher, student, distiller inside the strategy scope.
    steps = experiment.steps_per_epoch(cfg, train_split.num_examples, global_batch)
    with strategy.scope():
        teacher = load_teacher(dcfg.teacher)
        loaded = experiment.backbone_from_config(cfg)
        if loaded.modality != labelled.modality:
            raise UserError(
                f"backbone is a {loaded.modality} model but data source {cfg.data.source} "
                f"gives {labelled.modality}; pick a matching backbone or data."
            )
        student = build_model(loaded, heads, name="student")
        check_compatible(teacher, student, loaded.preprocessor, loaded.modality)
        init_report = None
        if dcfg.init_from_teacher:
            teacher_backbone = find_backbone(teacher.members[0])
            if teacher_backbone is None:
                raise UserError(
                    f"distill.init_from_teacher: no keras-hub backbone inside {teacher.paths[0]!r}; "
                    f"set init_from_teacher: false."
                )
            init_report = init_from_teacher(loaded.model, teacher_backbone, dcfg.teacher_layers)
        if dcfg.feature_loss_weight and len(teacher.members) > 1:
            raise UserError(
                "distill.feature_loss_weight needs a single teacher (an ensemble has no one layer "
                "to match); set it to 0 or list one teacher."
            )
        distiller = Distiller(
            teacher.model, student, heads, alpha=dcfg.alpha, temperature=dcfg.temperature,
            feature_loss_weight=dcfg.feature_loss_weight, feature_loss=dcfg.feature_loss,
            teacher_feature_layer=dcfg.teacher_feature_layer,
            student_feature_layer=dcfg.student_feature_layer, features=dcfg.features,
        )
        distiller.compile(
            experiment.optimizer(cfg, steps * cfg.train.epochs),
            metrics={h.name: h.metrics() for h in heads},
            jit_compile=cfg.distribute.jit_compile,
        )

    # 5. The resolved config marks the work dir as ours.
    os.makedirs(W, exist_ok=True)
    workdir.atomic_write_text(os.path.join(W, workdir.CONFIG), config_text)
    logging.info("%s: distilling %d teacher(s) (%d params) into a %d-param student; %d train "
                 "(%d unlabelled) examples, global batch %d, cache %s%s",
                 cfg.name, len(teacher.members), teacher.parameters, student.count_params(),
                 train_split.num_examples, transfer.num_examples if transfer else 0, global_batch,
                 dcfg.cache, " (resuming)" if resuming else "")

    # 6. Pipelines; with a cache the teacher runs once per split, here.
    pipeline_args = dict(
        preprocessor=loaded.preprocessor, modality=loaded.modality, heads=heads,
        cache=cfg.data.cache, drop_remainder=cfg.distribute.strategy == "tpu",
    )
    eval_batch = experiment.eval_batch_size(cfg, strategy.num_replicas_in_sync)
    cache_info = {"mode": dcfg.cache}
    if dcfg.cache == "none":
        # The teacher runs on every (possibly augmented) training batch.
        train_ds, val_ds = experiment.pipelines(
            cfg, dataclasses.replace(labelled, train=train_split), loaded, heads, global_batch,
            strategy.num_replicas_in_sync,
        )
    else:
        key = cache_lib.fingerprint(
            dcfg.teacher, data=config_lib.to_dict(cfg)["data"], transfer=dcfg.transfer_path,
            backbone=config_lib.to_dict(cfg)["backbone"], hints=[dcfg.feature_loss_weight > 0,
                                                                  dcfg.teacher_feature_layer],
        )
        splits = {"train": train_split, "validation": labelled.validation}
        cached = {}
        for name, split in splits.items():
            if split is None:
                continue
            outputs, info = cache_lib.load_or_compute(
                distiller, split, loaded.preprocessor, loaded.modality, mode=dcfg.cache,
                cache_dir=os.path.join(W, CACHE_DIR), key=key, name=name, batch_size=eval_batch,
            )
            cache_info[name] = info
            cached[name] = cache_lib.cached_pipeline(
                split, outputs, training=name == "train", shuffle_buffer=cfg.data.shuffle_buffer,
                seed=cfg.train.seed, global_batch_size=global_batch if name == "train" else eval_batch,
                **pipeline_args,
            )
        train_ds, val_ds = cached["train"], cached.get("validation")

    # 7. Fit.
    callbacks = [
        DistillationSchedule(
            alpha=dcfg.alpha, temperature=dcfg.temperature, alpha_end=dcfg.alpha_end,
            temperature_end=dcfg.temperature_end, schedule=dcfg.schedule, unit=dcfg.schedule_unit,
        ),
        keras.callbacks.BackupAndRestore(os.path.join(W, workdir.BACKUP)),
        keras.callbacks.TensorBoard(os.path.join(W, workdir.LOGS)),
    ]
    if cfg.train.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_loss" if val_ds is not None else "loss",
            patience=cfg.train.early_stopping_patience, restore_best_weights=True,
        ))
    start = time.perf_counter()
    history = distiller.fit(
        train_ds, validation_data=val_ds, epochs=cfg.train.epochs,
        steps_per_epoch=cfg.train.steps_per_epoch, callbacks=callbacks,
        verbose=cfg.train.verbose, shuffle=False,  # tf.data shuffles
    )
    train_seconds = time.perf_counter() - start

    # 8. Save the student like any trained model; compare with the teacher.
    student_path = os.path.join(W, workdir.MODEL)
    student.save(student_path)
    from tftransfer.export import save_serving_assets

    save_serving_assets(W, loaded, heads)
    eval_split = labelled.validation or labelled.train
    eval_ds = make_pipeline(eval_split, global_batch_size=eval_batch, **{**pipeline_args, "cache": False})
    example = next(iter(eval_ds))[0]
    head = heads[0].name
    teacher_report = report.describe(teacher.model, eval_ds, head, teacher.size_bytes, example)
    student_report = report.describe(student, eval_ds, head, os.path.getsize(student_path), example)
    teacher_report["paths"] = list(teacher.paths)
    teacher_report["members"] = len(teacher.members)
    epochs_run = len(history.history.get("loss", []))
    metrics = {
        "teacher": teacher_report,
        "student": student_report,
        **report.compare(teacher_report, student_report),
        "evaluated_on": "validation" if labelled.validation is not None else "train",
        "num_evaluation_examples": eval_split.num_examples,
        "train": {k: float(v[-1]) for k, v in history.history.items() if not k.startswith("val_")},
        "epochs": epochs_run,
        "train_seconds": train_seconds,
        "seconds_per_epoch": train_seconds / max(epochs_run, 1),
        "num_train_examples": train_split.num_examples,
        "num_unlabelled_examples": transfer.num_examples if transfer else 0,
        "global_batch_size": global_batch,
        "cache": cache_info,
        "distill": config_lib.to_dict(cfg)["distill"],
        "init_from_teacher": _summarise_init(init_report),
        "backbone": loaded.description,
    }
    if val_ds is not None:
        metrics["validation"] = {k[len("val_"):]: float(v[-1]) for k, v in history.history.items()
                                 if k.startswith("val_")}
    if cfg.export.saved_model:
        from tftransfer.export import export_saved_model

        metadata = {"backbone": loaded.description, "modality": loaded.modality,
                    "heads": [h.name for h in heads], "config": config_lib.to_dict(cfg),
                    "distilled_from": list(teacher.paths)}
        metrics["export"] = export_saved_model(
            student, loaded.preprocessor, loaded.modality, heads,
            os.path.join(W, workdir.EXPORT), metadata=metadata,
        )
    workdir.write_json(os.path.join(W, workdir.METRICS), metrics)
    print(
        f"{cfg.name}: done in {train_seconds:.1f}s; teacher accuracy={teacher_report['accuracy']}, "
        f"student accuracy={student_report['accuracy']} "
        f"({metrics['accuracy_retained_percent']}% retained) with "
        f"{100 * metrics['parameters_ratio']:.1f}% of the parameters, "
        f"{metrics['speedup']:.2f}x faster per example"
    )


def _summarise_init(init_report):
    if init_report is None:
        return None
    return {**init_report, "skipped": len(init_report["skipped"])}


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
