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

from absl import flags

from tftransfer import cli, workdir

FLAGS = flags.FLAGS
cli.define_run_flags(
    config_help="YAML experiment file with a `distill` section (see configs/distill_*.yaml). Override "
    "any key with --config.<dotted.key>=<yaml value>, e.g. --config.distill.temperature=4.",
    workdir_help="Work directory for the student: config, logs, cache, metrics, export.",
)

CACHE_DIR = workdir.CACHE


def main(argv):
    del argv
    # Heavy imports after flag parsing, so --helpfull is instant.
    from tftransfer import bn_stats, experiment
    from tftransfer import config as config_lib
    from tftransfer.builders import build_model
    from tftransfer.data import make_pipeline
    from tftransfer.distill import report
    from tftransfer.distill.schedule import DistillationSchedule
    from tftransfer.distill.teacher import check_compatible, load_teacher

    # 1. Config: load, override, validate (nothing written yet).
    cfg = cli.load_run_config()
    dcfg = _distill_section(cfg)

    # 2. Strategy first (before anything touches devices); work dir claimed.
    run = cli.start_run(cfg)
    global_batch = cfg.data.batch_size * run.replicas

    # 3. Data, fully checked before the work dir is touched.
    labelled = experiment.load_data(cfg)
    heads = experiment.resolve_heads(cfg, labelled)
    train_split, transfer = _transfer_set(cfg, labelled)

    # 4. Teacher, student, distiller inside the strategy scope.
    steps = experiment.steps_per_epoch(cfg, train_split.num_examples, global_batch, run.replicas)
    with run.strategy.scope():
        teacher = load_teacher(dcfg.teacher)
        loaded = experiment.backbone_from_config(cfg)
        experiment.check_modality(cfg, loaded, labelled)
        student = build_model(loaded, heads, name="student")
        check_compatible(teacher, student, loaded.preprocessor, loaded.modality)
        init_report = _init_student(dcfg, teacher, loaded)
        distiller = _distiller(cfg, teacher, student, heads, steps * cfg.train.epochs)

    # 5. The resolved config marks the work dir as ours (chief).
    run.begin(f"{cfg.name}: distilling {len(teacher.members)} teacher(s) ({teacher.parameters} params) "
              f"into a {student.count_params()}-param student; {train_split.num_examples} train "
              f"({transfer.num_examples if transfer else 0} unlabelled) examples, global batch "
              f"{global_batch}, cache {dcfg.cache}")

    # 6. Pipelines; with a cache the teacher runs once per split, here.
    eval_split = labelled.validation or labelled.train
    eval_batch = experiment.eval_batch_size(cfg, run.replicas, eval_split.num_examples)
    make_train_ds, val_ds, cache_info = _pipelines(
        cfg, run, labelled, train_split, loaded, heads, distiller, global_batch, eval_batch)

    # 7. Fit (resumes from W/backup/ after a kill).
    schedule = DistillationSchedule(
        alpha=dcfg.alpha, temperature=dcfg.temperature, alpha_end=dcfg.alpha_end,
        temperature_end=dcfg.temperature_end, schedule=dcfg.schedule, unit=dcfg.schedule_unit)
    statistics_before_fit = bn_stats.snapshot(student)
    result = run.fit(distiller, make_train_ds, val_ds, steps,
                     experiment.train_callbacks(cfg, schedule, val_ds is not None), checkpoint=False)
    # The student ships its last weights, with BatchNorm statistics that match them.
    bn_report = experiment.recompute_bn_stats(
        cfg, student, train_split, loaded.preprocessor, loaded.modality, heads, None,
        bn_stats.changed_layers(student, statistics_before_fit))

    # 8. Save the student like any trained model; compare with the teacher.
    student_path = run.save_model(student)
    eval_ds = make_pipeline(eval_split, loaded.preprocessor, loaded.modality, heads, eval_batch,
                            cache=False)
    example = next(iter(eval_ds))[0]
    head = heads[0].name
    teacher_report = report.describe(teacher.model, eval_ds, head, teacher.size_bytes, example)
    student_report = report.describe(student, eval_ds, head, os.path.getsize(student_path), example)
    teacher_report.update(paths=list(teacher.paths), members=len(teacher.members))
    metrics = {
        **result.summary(), **experiment.run_summary(cfg, global_batch),
        "teacher": teacher_report, "student": student_report,
        **report.compare(teacher_report, student_report),
        "evaluated_on": "validation" if labelled.validation is not None else "train",
        "num_evaluation_examples": eval_split.num_examples,
        "num_train_examples": train_split.num_examples,
        "num_unlabelled_examples": transfer.num_examples if transfer else 0,
        "cache": cache_info, "distill": config_lib.to_dict(cfg)["distill"],
        "init_from_teacher": _summarise_init(init_report), "backbone": loaded.description,
        "bn_stats": bn_report,
    }
    if val_ds is not None:
        last = {k[len("val_"):]: float(v[-1]) for k, v in result.history.items() if k.startswith("val_")}
        if bn_report["recomputed"]:  # the fit's last validation predates the recomputed statistics
            metrics["validation_before_bn_recompute"] = last
            last = {"accuracy": student_report["accuracy"]}
        metrics["validation"] = last
    export = experiment.export(cfg, run, student, loaded, heads, metadata={
        "modality": loaded.modality, "heads": [h.name for h in heads],
        "distilled_from": list(teacher.paths)})
    if export is not None:
        metrics["export"] = export
    run.finish(metrics)
    print(
        f"{cfg.name}: done in {result.seconds:.1f}s; teacher accuracy={teacher_report['accuracy']}, "
        f"student accuracy={student_report['accuracy']} "
        f"({metrics['accuracy_retained_percent']}% retained) with "
        f"{100 * metrics['parameters_ratio']:.1f}% of the parameters, "
        f"{metrics['speedup']:.2f}x faster per example"
    )


def _distill_section(cfg):
    from tftransfer.errors import UserError

    if cfg.distill is None:
        raise UserError(
            f"--config {FLAGS.config or '(none)'} has no distill section; add distill: {{teacher: "
            f"[path/to/trained/workdir]}} (see configs/distill_minilm_sentiment.yaml)."
        )
    if len(cfg.heads) > 1 or cfg.train.class_weight is not None:
        raise UserError(
            f"distill: the student trains one head on the teacher's outputs without class weights; "
            f"{'use one head' if len(cfg.heads) > 1 else 'remove train.class_weight'} (multi-task and "
            f"class weights: python -m tftransfer.train)."
        )
    if cfg.distill.cache != "none" and cfg.data.augment.enabled:
        raise UserError(
            f"distill.cache={cfg.distill.cache} with data.augment: cached teacher outputs would not "
            f"match the augmented images; set distill.cache: none or disable data.augment."
        )
    return cfg.distill


def _transfer_set(cfg, labelled):
    """Labelled training split plus the optional unlabelled transfer text."""
    from tftransfer.distill import transfer_set
    from tftransfer.errors import UserError

    transfer = None
    if cfg.distill.transfer_path:
        if labelled.modality != "text":
            raise UserError("distill.transfer_path: unlabelled transfer data is supported for text only.")
        if labelled.pair:
            raise UserError("distill.transfer_path: unlabelled transfer text is one sentence per example; "
                            "a sentence-pair student (two data.input_key) distils on its labelled pairs only.")
        transfer = transfer_set.load_transfer_text(cfg.distill.transfer_path, cfg.data.input_key or "text")
    return transfer_set.concatenate(labelled.train, transfer), transfer


def _init_student(dcfg, teacher, loaded):
    from tftransfer.distill.student_init import init_from_teacher
    from tftransfer.distill.teacher import find_backbone
    from tftransfer.errors import UserError

    if dcfg.feature_loss_weight and len(teacher.members) > 1:
        raise UserError(
            "distill.feature_loss_weight needs a single teacher (an ensemble has no one layer "
            "to match); set it to 0 or list one teacher."
        )
    if not dcfg.init_from_teacher:
        return None
    teacher_backbone = find_backbone(teacher.members[0])
    if teacher_backbone is None:
        raise UserError(
            f"distill.init_from_teacher: no keras-hub backbone inside {teacher.paths[0]!r}; "
            f"set init_from_teacher: false."
        )
    return init_from_teacher(loaded.model, teacher_backbone, dcfg.teacher_layers)


def _distiller(cfg, teacher, student, heads, total_steps):
    from tftransfer import experiment
    from tftransfer.distill.distiller import Distiller

    dcfg = cfg.distill
    distiller = Distiller(
        teacher.model, student, heads, alpha=dcfg.alpha, temperature=dcfg.temperature,
        feature_loss_weight=dcfg.feature_loss_weight, feature_loss=dcfg.feature_loss,
        teacher_feature_layer=dcfg.teacher_feature_layer,
        student_feature_layer=dcfg.student_feature_layer, features=dcfg.features,
    )
    distiller.compile(
        experiment.optimizer(cfg, total_steps), metrics={h.name: h.metrics() for h in heads},
        jit_compile=cfg.distribute.jit_compile,
    )
    return distiller


def _pipelines(cfg, run, labelled, train_split, loaded, heads, distiller, global_batch, eval_batch):
    """(make_train_ds, val_ds, cache_info): teacher outputs cached per `distill.cache`;
    `make_train_ds()` builds a new training dataset (see `Run.fit`)."""
    from tftransfer import config as config_lib
    from tftransfer import experiment
    from tftransfer.distill import cache as cache_lib

    dcfg = cfg.distill
    cache_info = {"mode": dcfg.cache}
    data = dataclasses.replace(labelled, train=train_split)
    plan = experiment.data_cache(cfg, data, loaded, run.path(workdir.DATA_CACHE))
    if dcfg.cache == "none":
        # The teacher runs on every (possibly augmented) training batch.
        def make(validation):
            return experiment.pipelines(cfg, data, loaded, heads, global_batch, run.replicas, cache=plan,
                                        validation=validation)

        return lambda: make(False)[0], make(True)[1], cache_info
    raw = config_lib.to_dict(cfg)
    key = cache_lib.fingerprint(
        dcfg.teacher, data=raw["data"], transfer=dcfg.transfer_path, backbone=raw["backbone"],
        hints=[dcfg.feature_loss_weight > 0, dcfg.teacher_feature_layer],
    )
    cached = {}

    def pipeline(name, split, outputs, batch, drop):
        return cache_lib.cached_pipeline(
            split, outputs, loaded.preprocessor, loaded.modality, heads, batch, training=name == "train",
            shuffle_buffer=cfg.data.shuffle_buffer, cache=plan.mode, cache_dir=plan.directory,
            cache_role=name, seed=cfg.train.seed, drop_remainder=drop,
        )

    for name, split in {"train": train_split, "validation": labelled.validation}.items():
        if split is None:
            continue
        training = name == "train"
        outputs, info = cache_lib.load_or_compute(
            distiller, split, loaded.preprocessor, loaded.modality, mode=dcfg.cache,
            cache_dir=run.path(CACHE_DIR), key=key, name=name, batch_size=eval_batch,
        )
        cache_info[name] = info
        batch = global_batch if training else experiment.eval_batch_size(
            cfg, run.replicas, split.num_examples)
        drop = experiment.drop_remainder(cfg, split.num_examples, global_batch, run.replicas) \
            if training else cfg.distribute.strategy == "tpu"
        cached[name] = (name, split, outputs, batch, drop)
    validation = cached.get("validation")
    return (lambda: pipeline(*cached["train"]), validation and pipeline(*validation), cache_info)


def _summarise_init(init_report):
    if init_report is None:
        return None
    return {**init_report, "skipped": len(init_report["skipped"])}


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
