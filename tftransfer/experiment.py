"""Config -> library calls, shared by the entrypoints (train, evaluate, distill).

The only place besides the entrypoints that reads an `ExperimentConfig`;
each function hands plain keyword arguments to the library.
"""

import dataclasses

import keras

from tftransfer import data as data_lib
from tftransfer.backbones import load_backbone
from tftransfer.errors import UserError
from tftransfer.heads import HeadSpec


def label_key(cfg, index):
    """The column / key / feature of head `index`'s label: `heads.N.label_key`, else
    `data.label_key` for one head and the head's name for several (multi-task)."""
    head = cfg.heads[index]
    return head.label_key or (cfg.data.label_key if len(cfg.heads) == 1 else head.name)


def load_data(cfg):
    """The config's labelled data, fully checked (raises UserError)."""
    d = cfg.data
    if len(cfg.heads) > 1:
        return _load_multitask(cfg)
    label_type = cfg.heads[0].type
    if d.source != "digits" and label_type != "classification" and d.source not in ("csv", "jsonl"):
        raise UserError(f"heads.0.type {label_type}: source {d.source} provides class labels only; use csv or jsonl.")
    if d.source == "digits":
        loaded = data_lib.load_digits(d.digits.classes, d.train_per_class, seed=cfg.train.seed)
    elif d.source == "image_folder":
        loaded = data_lib.load_image_folder(
            d.train_path, d.validation_path, d.validation_fraction, cfg.train.seed, d.validate_images,
            background=tuple(float(v) for v in d.image_background), skip_bad_images=d.skip_bad_images,
        )
    elif d.source in ("csv", "jsonl"):
        loaded = data_lib.load_text_file(
            d.source, d.train_path, d.validation_path, d.validation_fraction,
            text_key=d.input_key or "text", label_key=label_key(cfg, 0), label_type=label_type,
            seed=cfg.train.seed,
        )
    else:
        loaded = data_lib.load_tfds(
            d.name, d.train_split, d.validation_split, d.data_dir, d.input_key, label_key(cfg, 0)
        )
    if loaded.train.num_examples == 0:
        raise UserError(f"data: the training split of source {d.source} is empty.")
    if d.train_per_class is not None and d.source != "digits":  # digits splits k / rest itself
        if label_type != "classification":
            raise UserError(f"data.train_per_class: k-shot sampling needs a classification head; "
                            f"heads.0.type is {label_type}.")
        from tftransfer.data import kshot

        loaded.train, loaded.train_ids = kshot.sample_per_class(
            loaded.train, d.train_per_class, cfg.train.seed, loaded.class_names)
    if loaded.validation is not None and loaded.validation.num_examples == 0:
        # Never evaluate zero rows (fused kernels can fail on an empty batch).
        raise UserError(
            f"data: the validation split of source {d.source} is empty; point "
            f"data.validation_split/validation_path at examples, or leave it unset."
        )
    return loaded


def _load_multitask(cfg):
    """Several heads: each head's own labels (`heads.N.label_key`) from csv / jsonl / tfds."""
    d = cfg.data
    names = [h.name for h in cfg.heads]
    if d.source not in ("csv", "jsonl", "tfds"):
        raise UserError(f"heads: {names} need a label per head; data.source {d.source} gives one label per "
                        f"example. Use csv, jsonl or tfds (a column / feature per head), or one head.")
    if d.train_per_class is not None:
        raise UserError(f"data.train_per_class with several heads {names}: k-shot sampling stratifies one "
                        f"class label; use one head, or remove data.train_per_class.")
    if d.label_key != "label":  # the default: nothing to say
        raise UserError(f"data.label_key={d.label_key!r} applies to one head; with several heads {names}, "
                        f"set heads.N.label_key for each (default: the head's name).")
    tasks = [(h.name, label_key(cfg, i), h.type) for i, h in enumerate(cfg.heads)]
    keys = [t[1] for t in tasks]
    if len(set(keys)) != len(keys):
        raise UserError(f"heads: label keys {keys} repeat; give each head its own column (heads.N.label_key).")
    if d.source == "tfds":
        loaded = data_lib.load_tfds(d.name, d.train_split, d.validation_split, d.data_dir, d.input_key,
                                    tasks=tasks)
    else:
        loaded = data_lib.load_text_tasks(d.source, d.train_path, d.validation_path, d.validation_fraction,
                                          text_key=d.input_key or "text", tasks=tasks, seed=cfg.train.seed)
    if loaded.validation is not None and loaded.validation.num_examples == 0:
        raise UserError(f"data: the validation split of source {d.source} is empty; point "
                        f"data.validation_split/validation_path at examples, or leave it unset.")
    return loaded


def _head_l2(h, labelled):
    """heads[].l2_c (scikit-learn's C) -> the penalty on the mean loss over the training examples."""
    from tftransfer.heads import l2_from_c

    if h.l2_c in (None, "auto"):  # auto: config validation resolves it; a config built by hand may not have
        return 0.0
    return l2_from_c(h.l2_c, labelled.train.num_examples)


def resolve_heads(cfg, labelled, class_weights=True):
    """HeadSpecs with `num_classes` and class names checked against the data
    (multi-task: each head against its own labels), and, with `class_weights`,
    `train.class_weight` (one pass over the training labels)."""
    specs = []
    for i, h in enumerate(cfg.heads):
        labels = labelled.tasks[h.name] if labelled.tasks else labelled  # this head's labels
        num = h.num_classes
        integer_ids = labels.integer_ids
        if labels.num_classes is not None:
            if num is None:
                num = labels.num_classes
            elif integer_ids and num < labels.num_classes:
                raise UserError(
                    f"data: label {labels.num_classes - 1} is outside heads.{i}.num_classes={num} "
                    f"(class ids must be 0..{num - 1}); fix the labels or raise num_classes."
                )
            elif integer_ids and num > labels.num_classes:
                # Integer ids: classes absent from this data are legitimate.
                labels.class_names = [str(k) for k in range(num)]
            elif num != labels.num_classes:
                raise UserError(
                    f"heads.{i}.num_classes={num} disagrees with the data, which has "
                    f"{labels.num_classes} classes {labels.class_names[:10]}; "
                    f"fix num_classes or leave it null to take it from the data."
                )
        elif num is None:
            num = 1 if h.type == "regression" else None
            if num is None:
                raise UserError(f"heads.{i}.num_classes: the data does not say; set it.")
        if h.type == "classification" and num < 2:
            raise UserError(
                f"heads.{i}: classification needs at least two classes; the data has "
                f"{labels.class_names or num}. Add examples of other classes, or use type regression."
            )
        specs.append(HeadSpec(
            name=h.name, type=h.type, num_classes=num, pooling=h.pooling, dropout=h.dropout,
            hidden_units=h.hidden_units, label_smoothing=h.label_smoothing,
            loss_weight=h.loss_weight,
            class_names=tuple(labels.class_names) if labels.class_names else None,
            normalize=h.normalize is True, l2=_head_l2(h, labelled),
        ))
    return _with_class_weights(cfg, labelled, specs) if class_weights else specs


def _with_class_weights(cfg, labelled, specs):
    """`train.class_weight` resolved per head from the training labels, logged."""
    from absl import logging

    from tftransfer import class_weights
    from tftransfer.data import kshot

    def labels_of(name):
        labels = kshot.labels_of(labelled.train, name if labelled.tasks else None)
        return labels[labels >= 0]  # multi-task: only the examples labelled for this head

    weights = class_weights.resolve(cfg.train.class_weight, [(s.name, s.type, s.class_names) for s in specs],
                                    labels_of)
    for name, w in weights.items():
        spec = next(s for s in specs if s.name == name)
        logging.info("train.class_weight: head %s: %s", name,
                     ", ".join(f"{c}={v:.4g}" for c, v in zip(spec.class_names, w)))
    return [dataclasses.replace(s, class_weight=weights[s.name]) if s.name in weights else s for s in specs]


def backbone_from_config(cfg):
    b = cfg.backbone
    loaded = load_backbone(**b.load_kwargs())
    limit = getattr(loaded.model, "max_sequence_length", None)
    if loaded.modality == "text" and limit and b.sequence_length > limit:
        # Found now, not at the first step (an embedding lookup out of range).
        raise UserError(
            f"backbone.sequence_length={b.sequence_length} exceeds the backbone's {limit} position "
            f"embeddings; set backbone.sequence_length <= {limit}."
        )
    return loaded


def drop_remainder(cfg, num_examples, global_batch, replicas=1):
    """Training passes drop the final batch for TPU (static shapes) or when
    it would leave a replica empty (`tftransfer.data.drop_final_batch`)."""
    static = cfg.distribute.strategy == "tpu"
    return data_lib.drop_final_batch(num_examples, global_batch, replicas, static)


def steps_per_epoch(cfg, num_examples, global_batch, replicas=1, one_pass=False):
    """train.steps_per_epoch, else (or with `one_pass`) the batches in one pass over the data."""
    drop = drop_remainder(cfg, num_examples, global_batch, replicas)
    batches = data_lib.batches_per_pass(num_examples, global_batch, drop)
    return batches if one_pass else (cfg.train.steps_per_epoch or batches)


def learning_rate(cfg, total_steps):
    t = cfg.train
    if t.lr_schedule == "constant":
        return t.learning_rate
    if t.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(t.learning_rate, decay_steps=total_steps)
    from tftransfer.schedules import SlantedTriangular

    return SlantedTriangular(t.learning_rate, total_steps=total_steps)


def optimizer(cfg, total_steps):
    """`train.optimizer` over `learning_rate(cfg, total_steps)`.

    `adamw` with `train.weight_decay: 0` (the default) is Keras' `Adam`: the
    same update, without AdamW's decay of every variable by `lr * 0` each
    step (a read, two multiplies and a write per variable, ~10% of a MiniLM
    step on CPU; see BENCHMARKS.md, training throughput).
    """
    t = cfg.train
    lr = learning_rate(cfg, total_steps)
    if t.optimizer == "adamw" and t.weight_decay:
        return keras.optimizers.AdamW(lr, weight_decay=t.weight_decay)
    if t.optimizer in ("adam", "adamw"):
        return keras.optimizers.Adam(lr)
    return keras.optimizers.SGD(lr, momentum=0.9, weight_decay=t.weight_decay or None)


def eval_batch_size(cfg, replicas, num_examples=None, modality=None):
    """Global evaluation batch: data.eval_batch_size, else max(4 x batch, 64), x replicas;
    with `num_examples`, lowered so no replica gets an empty final batch.

    Cached features (`modality` `feature_cache.FEATURES`) are evaluated in
    batches of `feature_cache.EVAL_BATCH` rows per replica: a linear head over
    in-memory feature rows costs next to nothing per row, so the per-batch
    overhead of Keras' `evaluate` and of the validation report would dominate
    an epoch (see `feature_cache.EVAL_BATCH`)."""
    from tftransfer import feature_cache

    d = cfg.data
    per_replica = d.eval_batch_size or max(4 * d.batch_size, 64)
    if modality == feature_cache.FEATURES:
        per_replica = max(per_replica, feature_cache.EVAL_BATCH)
    batch = per_replica * replicas
    if num_examples is None:
        return batch
    try:
        return data_lib.eval_batch_size(num_examples, batch, replicas)
    except ValueError as e:
        raise UserError(f"data: the evaluation split: {e}; use fewer replicas or more data.")


def data_cache(cfg, labelled, loaded, cache_dir=None):
    """`data.cache` decided for the training and validation splits together
    (`tftransfer.data.cache.CachePlan`), logged in one line.

    cache_dir: str. This process's `W/cache/data` (`run.path(workdir.DATA_CACHE)`),
    or None (no disk cache: auto chooses memory or none).
    """
    from absl import logging

    from tftransfer.data import cache as cache_lib

    d = cfg.data
    estimate = 0
    if cache_lib.setting(d.cache) == "auto":
        estimate = sum(cache_lib.estimate_bytes(s, loaded.preprocessor, loaded.modality)
                       for s in (labelled.train, labelled.validation) if s is not None)
    try:
        plan = cache_lib.plan(d.cache, estimate, d.cache_memory_budget_mb, cache_dir)
    except ValueError as e:
        raise UserError(str(e))
    logging.info("data.cache=%s: %s (%s)", cache_lib.setting(d.cache), plan.mode, plan.reason)
    return plan


def _features_in_memory():
    from tftransfer.data import cache as cache_lib

    return cache_lib.CachePlan("memory", reason="pooled backbone features (train.cache_features)")


# The pipelines' cache plan when the head trains on cached features (small, in RAM already).
FEATURES_IN_MEMORY = _features_in_memory()


def pipelines(cfg, labelled, loaded, heads, global_batch, replicas=1, passes=None, cache=None,
              validation=True):
    """(train, validation) datasets; `passes`: see `tftransfer.data.make_pipeline`;
    `cache`: a `data_cache` plan (None: `data.cache` without a disk directory).
    `validation=False`: the training dataset only (validation None), for callers
    that rebuild the training stream (a validation pipeline fills its cache
    when built: one pass over the split)."""
    d = cfg.data
    cache = cache or data_cache(cfg, labelled, loaded)
    augment = []
    if d.augment.enabled:
        if loaded.modality != "image":
            raise UserError("data.augment applies to images only; remove it for a text backbone.")
        a = d.augment
        augment = data_lib.augmentation_layers(a.flip, a.translate, a.rotate, a.zoom, seed=cfg.train.seed)
    tpu = cfg.distribute.strategy == "tpu"
    train = data_lib.make_pipeline(
        labelled.train, loaded.preprocessor, loaded.modality, heads, global_batch,
        training=True, shuffle_buffer=d.shuffle_buffer, cache=cache.mode, seed=cfg.train.seed,
        drop_remainder=drop_remainder(cfg, labelled.train.num_examples, global_batch, replicas),
        augment=augment, passes=passes, cache_dir=cache.directory, cache_role="train",
    )
    val = None
    if validation and labelled.validation is not None:
        n = labelled.validation.num_examples
        val = data_lib.make_pipeline(
            labelled.validation, loaded.preprocessor, loaded.modality, heads,
            eval_batch_size(cfg, replicas, n, loaded.modality), training=False, cache=cache.mode,
            drop_remainder=tpu,
            cache_dir=cache.directory, cache_role="validation",
        )
    return train, val


def recompute_bn_stats(cfg, model, train_split, preprocessor, modality, heads, val_ds, changed_layers):
    """`train.recompute_bn_stats` after fit: precise BatchNorm statistics (see tftransfer.bn_stats).

    auto: on exactly when BatchNorm statistics changed in training
    (`changed_layers` non-empty). The batches are the training split in a
    fixed order, unaugmented, at the per-replica training batch size (the
    size the statistics were computed at), so every worker of a
    multi-worker run computes the same values.

    Returns:
        dict for metrics.json: whether it ran, batches, layers, and the
        validation metrics before (after: the run's final evaluation).
    """
    from absl import logging

    from tftransfer import bn_stats

    setting = cfg.train.recompute_bn_stats
    layers = bn_stats.trainable_batchnorm_layers(model) if setting is True else changed_layers
    if setting is False or not layers:
        return {"recomputed": False, "reason": "off" if setting is False else "no BatchNorm statistics changed"}
    before = model.evaluate(val_ds, return_dict=True, verbose=0) if val_ds is not None else None
    batches = data_lib.make_pipeline(
        train_split, preprocessor, modality, heads, cfg.data.batch_size, training=False, cache=False,
    )
    used = bn_stats.recompute(model, batches, layers, num_batches=cfg.train.bn_stats_batches)
    report = {"recomputed": True, "batches": used, "layers": len(layers)}
    if before is not None:
        after = model.evaluate(val_ds, return_dict=True, verbose=0)
        report["validation_before"] = {k: float(v) for k, v in before.items()}
        key = next((k for k in ("accuracy", "loss") if k in after), sorted(after)[0])
        logging.info("recomputed BatchNorm statistics of %d layers over %d batches: validation %s %.4f -> %.4f",
                     len(layers), used, key, float(before[key]), float(after[key]))
    else:
        logging.info("recomputed BatchNorm statistics of %d layers over %d batches", len(layers), used)
    return report
def check_modality(cfg, loaded, labelled):
    if labelled.pair and loaded.modality != "text":
        raise UserError(
            f"data.input_key {cfg.data.input_key}: sentence pairs need a text backbone (BERT family), "
            f"but the backbone is an {loaded.modality} model; pick a text backbone or one input_key."
        )
    if loaded.modality != labelled.modality:
        raise UserError(
            f"backbone is a {loaded.modality} model but data source {cfg.data.source} "
            f"gives {labelled.modality}; pick a matching backbone or data."
        )


def check_recipe(cfg, loaded, strategy, num_workers=1):
    """`train.recipe` against the loaded backbone and the strategy (before the work dir is written)."""
    if cfg.train.recipe == "contrastive":
        import tensorflow as tf

        from tftransfer import contrastive

        contrastive.check_applicable(loaded.modality, num_workers,
                                     tpu=isinstance(strategy, tf.distribute.TPUStrategy))


def contrastive_phase(cfg, run, model, loaded, labelled, heads):
    """`train.recipe: contrastive`: the backbone of `model` first trains on SetFit sentence
    pairs of the training split (`tftransfer.contrastive`), in place; the run then goes on
    as configured. Returns metrics.json's `contrastive` entry, or None for `finetune`."""
    if cfg.train.recipe != "contrastive":
        return None
    from tftransfer import builders, contrastive, workdir
    from tftransfer.progress import keras_verbose

    c = cfg.train.contrastive
    with run.strategy.scope():
        encoder = builders.features_model(model, heads, name="sentence_encoder")
    return contrastive.run_phase(
        encoder, loaded.model, labelled.train, loaded.preprocessor, run.path(workdir.CONTRASTIVE),
        num_iterations=c.num_iterations, loss=c.loss, margin=c.margin, epochs=c.epochs,
        learning_rate=c.learning_rate, batch_size=c.batch_size, seed=cfg.train.seed, strategy=run.strategy,
        verbose=keras_verbose(cfg.train.verbose))


def transfer_model(cfg, loaded, heads, total_steps, log_dir=None):
    """The compiled transfer model and its `ProgressiveUnfreezing` callback
    (call inside the strategy scope)."""
    from tftransfer.builders import build_model, compile_for_heads
    from tftransfer.callbacks import ProgressiveUnfreezing

    from tftransfer import lora

    model = build_model(loaded, heads)
    # train.lora: frozen base + adapters, trained by the adapters' own callback.
    adapters = lora.apply_from_config(cfg, loaded, model)
    unfreeze = cfg.train.unfreeze
    train_bn = unfreeze.train_bn
    if train_bn is None:  # Frozen statistics only make sense when pretrained.
        train_bn = not loaded.description.get("pretrained", True)
    unfreezing = adapters or ProgressiveUnfreezing(
        loaded.layer_groups, schedule=unfreeze.schedule, unit=unfreeze.unit,
        train_bn=train_bn, lr_decay=unfreeze.lr_decay,  # None: one learning rate
        log_dir=log_dir, every=unfreeze.every,
    )
    compile_for_heads(model, heads, optimizer(cfg, total_steps), jit_compile=cfg.distribute.jit_compile)
    return model, unfreezing


@dataclasses.dataclass
class Training:
    """What `build_training` returns: the run's checked data and its compiled transfer model.

    labelled: the loaded data. heads: list of `HeadSpec`. steps: int, steps
    per epoch. loaded: `LoadedBackbone`. model: the compiled keras.Model.
    unfreezing: its schedule callback (`ProgressiveUnfreezing`, or LoRA's).
    """

    labelled: object
    heads: list
    steps: int
    loaded: object
    model: object
    unfreezing: object


def build_training(cfg, strategy, replicas=1, log_dir=None, num_workers=1):
    """`python -m tftransfer.train` steps 3-4: the data, fully checked; then,
    inside `strategy`'s scope, the backbone (checked against the data and
    `train.recipe`), heads, optimizer and unfreezing schedule
    (`transfer_model`). Also what the TPU-path test compiles under XLA.

    Returns:
        `Training`.
    """
    labelled = load_data(cfg)
    heads = resolve_heads(cfg, labelled)
    steps = steps_per_epoch(cfg, labelled.train.num_examples, cfg.data.batch_size * replicas, replicas)
    with strategy.scope():
        loaded = backbone_from_config(cfg)
        check_modality(cfg, loaded, labelled)
        check_recipe(cfg, loaded, strategy, num_workers)
        model, unfreezing = transfer_model(cfg, loaded, heads, steps * cfg.train.epochs, log_dir=log_dir)
    return Training(labelled, heads, steps, loaded, model, unfreezing)


def monitor(cfg, has_validation):
    """The value that decides the best epoch and early stopping (`train.monitor`)."""
    return cfg.train.monitor or ("val_loss" if has_validation else "loss")


def train_callbacks(cfg, schedule, has_validation, val_ds=None, heads=None):
    """The entrypoint's schedule callback, the validation report, and early stopping.

    With `val_ds` and classification `heads`, `ValidationReport` adds macro /
    weighted F1, top-k accuracy and ECE to each epoch's logs (so the
    history record and TensorBoard, which run after these callbacks, keep
    them); not on TPU or multi-worker runs, where its extra prediction pass
    would need its own distribution. Early stopping only stops: which
    weights ship is `train.keep`'s decision (`finish_training`), for stopped
    and completed runs alike.
    """
    callbacks = [schedule]
    if (val_ds is not None and heads and cfg.distribute.strategy not in ("tpu", "multi_worker")
            and any(h.type == "classification" for h in heads)):
        from tftransfer.report.callback import ValidationReport

        callbacks.append(ValidationReport(val_ds, heads))
    if cfg.train.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=monitor(cfg, has_validation), patience=cfg.train.early_stopping_patience))
    return callbacks


def finish_training(cfg, run, model, statistics_before_fit, train_split, preprocessor, modality,
                    heads, val_ds):
    """After fit, before evaluate / save / export: the weights that ship.

    1. `train.keep`: the best epoch's weights (by `train.monitor`) or the
       last; without validation data (and no explicit monitor) the last.
    2. `train.recompute_bn_stats`: BatchNorm statistics that match them.
    3. Non-finite weights stop the run (nothing is saved or exported).

    Returns:
        dict of metrics.json fields: `train` (the selected epoch's training
        logs), `epochs` (all epochs of the run, across resumes),
        `selected_epoch`, `keep`, `monitor`, `history`, `bn_stats`.
    """
    from absl import logging

    from tftransfer import bn_stats, epoch_selection, workdir
    from tftransfer.callbacks import check_finite_weights

    has_val = val_ds is not None
    keep = cfg.train.keep if (has_val or cfg.train.monitor) else "last"
    watched = monitor(cfg, has_val)
    selected_epoch, record = epoch_selection.select(
        model, keep, run.path(workdir.HISTORY), run.path(workdir.BEST_WEIGHTS))
    logging.info("%s: shipping epoch %s (train.keep=%s, monitor %s)", cfg.name, selected_epoch, keep, watched)
    bn_report = recompute_bn_stats(cfg, model, train_split, preprocessor, modality, heads, val_ds,
                                   bn_stats.changed_layers(model, statistics_before_fit))
    check_finite_weights(model, f"epoch {selected_epoch}")
    selected = next((e for e in record["epochs"] if e["epoch"] == selected_epoch), {})
    return {
        "train": {k: v for k, v in selected.items() if k != "epoch" and not k.startswith("val_")},
        "epochs": len(record["epochs"]),
        "selected_epoch": selected_epoch,
        "keep": keep,
        "monitor": watched,
        "history": record["epochs"],
        "bn_stats": bn_report,
    }


def write_train_ids(cfg, run, labelled):
    """W/train_ids.json for a k-shot run: the kept training examples, to reproduce or audit the draw."""
    from tftransfer import workdir

    if labelled.train_ids is not None:
        workdir.write_json(run.path(workdir.TRAIN_IDS), {
            "train_per_class": cfg.data.train_per_class, "seed": cfg.train.seed, "ids": labelled.train_ids})


def per_head(metrics, heads):
    """metrics.json `heads`: `{head: {"train": {...}, "validation": {...}}}` from the flat
    Keras names (`<head>_loss`, `<head>_accuracy`; one head: every name but the lr/stage
    logs), plus the head's class weights; the flat names stay as they are."""
    out = {}
    for h in heads:
        entry = {}
        for section in ("train", "validation"):
            flat = metrics.get(section) or {}
            if len(heads) == 1:
                picked = {k: v for k, v in flat.items() if not k.startswith(("lr_", "unfrozen"))}
            else:
                picked = {k[len(h.name) + 1:]: v for k, v in flat.items() if k.startswith(h.name + "_")}
            if picked:
                entry[section] = picked
        if h.class_weight is not None:
            entry["class_weight"] = dict(zip(h.class_names, h.class_weight))
        out[h.name] = entry
    return out


def run_summary(cfg, global_batch):
    """metrics.json fields describing how the run ran."""
    d = cfg.distribute
    return {"global_batch_size": global_batch, "strategy": d.strategy, "precision": d.precision,
            "jit_compile": d.jit_compile}


def export(cfg, run, model, loaded, heads, metadata=None, adapters=None):
    """W/preprocessor/ + W/heads.json (what `python -m tftransfer.export` needs),
    the LoRA artefact, the backbone preset and the SavedModel version, as the
    config asks.

    Args:
        adapters: `tftransfer.lora.LoRATraining` of a LoRA run, or None. Its
            adapters and heads go to `W/lora/`, and the SavedModel gets the
            adapters merged into plain kernels.

    Returns the export description for metrics.json, or None.
    """
    from tftransfer import config as config_lib
    from tftransfer import lora, workdir
    from tftransfer.export import export_saved_model, save_serving_assets

    pair = isinstance(cfg.data.input_key, list)  # serving takes `text` and `text_pair`
    save_serving_assets(run.out, loaded, heads, pair=pair)
    if adapters is not None:
        adapters.save(run.out, heads)  # W/lora/: adapters + heads, base named and hashed
        model = lora.merge(model)  # no LoRA variables in the served model
    if cfg.export.backbone_preset:
        from tftransfer.backbones import save_backbone_preset

        save_backbone_preset(loaded, run.path(workdir.BACKBONE_PRESET))
    if not cfg.export.saved_model:
        return None
    metadata = {"backbone": loaded.description, "config": config_lib.to_dict(cfg), **(metadata or {})}
    return export_saved_model(model, loaded.preprocessor, loaded.modality, heads,
                              run.path(workdir.EXPORT), metadata=metadata,
                              image_background=getattr(cfg.data, "image_background", None), pair=pair)


def quantisation_data(workdir, quantize, max_accuracy_drop, representative_examples=None):
    """The run's own data, from `W/config.yaml`: int8 calibration batches and validation batches.

    Args:
        workdir: str. A trained work dir.
        quantize: str. The quantisation mode (`int8` needs calibration data).
        max_accuracy_drop: float. inf: no validation split is needed.
        representative_examples: int. int8 calibration examples (`--representative_examples`).

    Returns:
        (representative, validation): a list of input dicts (int8 only,
        else None) and a `tf.data.Dataset` of `(inputs, {head: labels})`
        (None when the run has no validation split and the budget is inf).
    """
    import math
    import os

    from tftransfer import config as config_lib
    from tftransfer import data as data_lib
    from tftransfer import workdir as workdir_lib
    from tftransfer.export.assets import load_serving_assets

    from tftransfer.export.quantize import DEFAULT_REPRESENTATIVE_EXAMPLES

    if representative_examples is None:
        representative_examples = DEFAULT_REPRESENTATIVE_EXAMPLES
    if representative_examples < 1:
        raise UserError(f"--representative_examples must be >= 1. Received: {representative_examples}.")
    path = os.path.join(workdir, workdir_lib.CONFIG)
    if not os.path.isfile(path):
        raise UserError(f"--quantize={quantize} reads the run's data from {path!r}, which is missing; "
                        f"export a work dir written by tftransfer.train.")
    cfg = config_lib.load_config(path)
    assets = load_serving_assets(workdir)
    labelled = load_data(cfg)
    representative = None
    if quantize == "int8":
        n = min(representative_examples, labelled.train.num_examples)
        # Shuffled (seeded) so the sample covers every class, not the first files.
        train = data_lib.make_pipeline(
            labelled.train, assets.preprocessor, assets.modality, assets.heads, 1, training=True,
            shuffle_buffer=labelled.train.num_examples, cache=False, seed=cfg.train.seed,
        )
        representative = [
            x if isinstance(x, dict) else {"image": x} for x, *_ in train.take(n).as_numpy_iterator()
        ]
    validation = None
    if labelled.validation is not None:
        validation = data_lib.make_pipeline(
            labelled.validation, assets.preprocessor, assets.modality, assets.heads,
            eval_batch_size(cfg, 1), training=False, cache=False,
        ).as_numpy_iterator()
    elif not math.isinf(max_accuracy_drop):
        raise UserError(
            f"--quantize={quantize} measures its accuracy cost on the validation split, and {path!r} has none "
            f"(data.validation_split / validation_path / validation_fraction); retrain with one, "
            f"or pass --max_accuracy_drop=inf to export unmeasured."
        )
    return representative, validation


def cached_features(cfg, run, model, loaded, labelled, heads, total_steps):
    """`train.cache_features`: whether the head trains on features computed once (one log line
    saying why or why not), and when it does, those features and the head model.

    On: the pooled features of every split are loaded from, or computed into,
    `W/cache/features/<key>/` (see `tftransfer.feature_cache`), and the head
    model (the shared head layers of `model`, compiled with a new optimizer
    like `model`'s, over `total_steps`) is what trains; `model` then holds
    the trained heads. With one replica the head model lives outside the
    strategy: Keras' distributed input and per-call build under a strategy
    cost ~10 ms per batch, most of an epoch on cached features.

    Returns:
        `tftransfer.feature_cache.CachedFeatures` (`.on` False: train `model` as usual).
    """
    import contextlib

    import tensorflow as tf
    from absl import logging

    from tftransfer import builders, feature_cache, workdir
    from tftransfer.progress import keras_verbose

    t = cfg.train
    on, reason = feature_cache.decide(
        t.cache_features, lora=t.lora is not None, augmented=cfg.data.augment.enabled,
        frozen=feature_cache.frozen_throughout(t.unfreeze.schedule, loaded.layer_groups, t.unfreeze.unit),
        multi_worker=run.cluster.num_workers > 1 or isinstance(
            run.strategy, (tf.distribute.MultiWorkerMirroredStrategy, tf.distribute.TPUStrategy)),
        outside_groups=feature_cache.trained_outside_groups(loaded.model, loaded.layer_groups))
    logging.info("feature cache %s: %s", "on" if on else "off", reason)
    if not on:
        return feature_cache.CachedFeatures(on, reason)
    with run.strategy.scope():
        features = builders.features_model(model, heads)
    with run.strategy.scope() if run.replicas > 1 else contextlib.nullcontext():
        head = builders.head_model(model, heads)
        builders.compile_for_heads(head, heads, optimizer(cfg, total_steps), jit_compile=cfg.distribute.jit_compile)
    key = feature_cache.model_key(features, heads)
    splits, infos = {}, {}
    for name in ("train", "validation"):
        split = getattr(labelled, name)
        if split is None:
            continue
        splits[name], infos[name] = feature_cache.load_or_compute(
            features, split, loaded.preprocessor, run.path(workdir.FEATURE_CACHE), key, name=name,
            batch_size=eval_batch_size(cfg, run.replicas, split.num_examples), strategy=run.strategy,
            verbose=keras_verbose(t.verbose))
        info = infos[name]
        logging.info("feature cache: %s features %s in %.1fs (%s)", name,
                     "read" if info["source"] == "disk" else "computed", info["seconds"], info["path"])
    source = dataclasses.replace(loaded, preprocessor=feature_cache.identity, modality=feature_cache.FEATURES)
    return feature_cache.CachedFeatures(on, reason, head, dataclasses.replace(labelled, **splits), source, infos)
