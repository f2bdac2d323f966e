"""`fine_tune`: fastai-style one-liner for notebooks (ULMFiT recipe by default).

One `model.fit`: the head trains alone for `freeze_epochs`, then the backbone
unfreezes (gradually, top group first, or all at once) with discriminative
learning rates (`lr * lr_decay**depth` per group below the head) under a
slanted triangular learning rate. See `tftransfer.ProgressiveUnfreezing`.
"""

import contextlib

import keras

from tftransfer.callbacks import ALL, GRADUAL, ProgressiveUnfreezing
from tftransfer.errors import UserError
from tftransfer.lr_multipliers import ULMFIT_LR_DECAY

DEFAULT_LR = 1e-3
UNFREEZE_MODES = (GRADUAL, ALL)
LR_SCHEDULES = ("slanted_triangular", "constant")


def fine_tune(
    model,
    train_ds,
    val_ds=None,
    *,
    epochs=3,
    freeze_epochs=1,
    layer_groups=None,
    lr=None,
    lr_decay=ULMFIT_LR_DECAY,
    unfreeze=GRADUAL,
    lr_schedule=None,
    weight_decay=None,
    train_bn=False,
    steps_per_epoch=None,
    heads=None,
    loss=None,
    metrics=None,
    callbacks=None,
    log_dir=None,
    verbose="auto",
):
    """Fine-tune a backbone + head model in one call; returns the History.

    Runs `freeze_epochs + epochs` epochs in a single `model.fit` (fastai's
    `fine_tune` convention: `epochs` counts the epochs after the head-only
    phase). Epochs `0 .. freeze_epochs - 1` train the head only; then
    `unfreeze="gradual"` unfreezes the top backbone group, and one more group
    each epoch (ULMFiT; with fewer epochs than groups, the bottom groups stay
    frozen), while `unfreeze="all"` unfreezes everything at once.

    An uncompiled model is compiled here: Adam (AdamW when `weight_decay`),
    learning rate `lr` under a `SlantedTriangular` schedule over all steps
    (or constant), the loss of `heads` (`tftransfer.HeadSpec`s) or `loss`
    (default: sparse categorical cross-entropy on logits, with accuracy). A
    compiled model keeps its optimizer and loss: then leave `lr`,
    `lr_schedule`, `weight_decay`, `heads`, `loss` and `metrics` unset.

    Args:
        model: keras.Model, e.g. from `tftransfer.build_model`.
        train_ds: batched `tf.data.Dataset` (or `keras.utils.PyDataset`) of
            `(inputs, targets)`.
        val_ds: optional validation data in the same form. Defaults to None.
        epochs: int. Epochs after the head-only phase. Defaults to 3.
        freeze_epochs: int. Head-only epochs first. Defaults to 1.
        layer_groups: list of `tftransfer.LayerGroup`, bottom to top. None:
            the groups of the keras-hub backbone inside `model`.
        lr: float. Peak learning rate of the head. Defaults to 1e-3.
        lr_decay: float in (0, 1]. Each group below the head trains at
            `lr_decay` times the rate of the one above (head at `lr`, top
            group `lr * lr_decay`, ...). 1 disables. Defaults to `1 / 2.6`.
        unfreeze: str. `"gradual"` or `"all"`. Defaults to `"gradual"`.
        lr_schedule: str. `"slanted_triangular"` or `"constant"`. Defaults
            to `"slanted_triangular"`.
        weight_decay: float. AdamW decoupled weight decay. Defaults to None.
        train_bn: bool. Let backbone BatchNorm layers train once unfrozen.
            Defaults to False.
        steps_per_epoch: int. Needed when `train_ds` has no known length.
        heads: list of `tftransfer.HeadSpec` to compile with.
        loss, metrics: passed to `model.compile` instead of `heads`.
        callbacks: list of extra Keras callbacks.
        log_dir: str. TensorBoard dir for per-group learning rates and stage.
        verbose: passed to `model.fit`. Defaults to `"auto"`.

    Returns:
        `keras.callbacks.History`; `history.history` includes
        `unfrozen_groups`, `lr_head` and `lr_<group>` per epoch.

    Example:
    ```python
    import numpy as np, tensorflow as tf, tftransfer
    from tftransfer.fine_tune import fine_tune

    loaded = tftransfer.load_backbone(
        spec=tftransfer.backbones.TINY_RESNET_SPEC, image_size=32)
    model = tftransfer.build_model(loaded, [tftransfer.HeadSpec(num_classes=5)])
    ds = tf.data.Dataset.from_tensor_slices(
        (np.random.rand(16, 32, 32, 3).astype("float32"), {"label": np.arange(16) % 5})).batch(8)
    history = fine_tune(model, ds, epochs=3, lr=2e-3)
    history.history["unfrozen_groups"]  # [0, 1, 2, 3]: head only, then top-down
    ```
    """
    if unfreeze not in UNFREEZE_MODES:
        raise UserError(f"fine_tune: unfreeze must be gradual or all. Received: unfreeze={unfreeze!r}.")
    for name, value, minimum in (("epochs", epochs, 0), ("freeze_epochs", freeze_epochs, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UserError(f"fine_tune: {name} must be an integer >= {minimum}. Received: {name}={value!r}.")
    if freeze_epochs + epochs < 1:
        raise UserError("fine_tune: freeze_epochs + epochs must be >= 1. Received: 0 epochs in total.")
    if lr_schedule is not None and lr_schedule not in LR_SCHEDULES:
        raise UserError(
            f"fine_tune: lr_schedule must be one of {', '.join(LR_SCHEDULES)}. "
            f"Received: lr_schedule={lr_schedule!r}."
        )
    if layer_groups is None:
        layer_groups = find_layer_groups(model)
    names = [g.name for g in layer_groups]
    total_epochs = freeze_epochs + epochs

    if model.compiled:
        given = [n for n, v in (("lr", lr), ("lr_schedule", lr_schedule), ("weight_decay", weight_decay),
                                ("heads", heads), ("loss", loss), ("metrics", metrics)) if v is not None]
        if given:
            raise UserError(
                f"fine_tune: the model is already compiled, so its optimizer and loss are used; "
                f"{', '.join(given)} would be ignored. Leave them unset or pass an uncompiled model."
            )
    else:
        steps = steps_per_epoch or _num_batches(train_ds)
        if steps is None and (lr_schedule or "slanted_triangular") == "slanted_triangular":
            raise UserError(
                "fine_tune: train_ds has no known length, which the slanted triangular schedule "
                "needs; pass steps_per_epoch=<batches per epoch> (or lr_schedule='constant')."
            )
        _compile(model, lr or DEFAULT_LR, lr_schedule or "slanted_triangular",
                 steps * total_epochs if steps else None, weight_decay, heads, loss, metrics)

    if unfreeze == ALL:
        schedule = [{"at_epoch": freeze_epochs, "groups": ALL}]
    else:
        schedule = [
            {"at_epoch": freeze_epochs + k, "groups": [name]}
            for k, name in enumerate(reversed(names))
        ]
    unfreezing = ProgressiveUnfreezing(
        layer_groups,
        schedule=schedule,
        train_bn=train_bn,
        lr_decay=None if lr_decay == 1 else lr_decay,
        log_dir=log_dir,
    )
    return model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=total_epochs,
        steps_per_epoch=steps_per_epoch,
        callbacks=[unfreezing, *(callbacks or [])],
        verbose=verbose,
        shuffle=not _is_tf_dataset(train_ds),  # a tf.data pipeline shuffles itself
    )


def find_layer_groups(model):
    """The layer groups of the backbone inside `model` (a keras-hub Backbone
    or other nested functional model), bottom to top."""
    from tftransfer.backbones import layer_groups
    from tftransfer.builders import without_unused_layers
    from tftransfer.keras_private import sublayers

    nested = [l for l in sublayers(model) if isinstance(l, keras.Model)]
    try:
        import keras_hub

        nested.sort(key=lambda l: not isinstance(l, keras_hub.models.Backbone))
    except ImportError:  # pragma: no cover - keras-hub is a dependency
        pass
    for candidate in nested:
        groups = layer_groups(candidate)
        if len(groups) > 1:
            return without_unused_layers(groups)
    raise UserError(
        "fine_tune: found no backbone with layer groups inside the model; pass "
        "layer_groups=loaded.layer_groups (from tftransfer.load_backbone)."
    )


def _is_tf_dataset(dataset):
    import tensorflow as tf

    return isinstance(dataset, tf.data.Dataset)


def _num_batches(dataset):
    if _is_tf_dataset(dataset):
        n = int(dataset.cardinality())
        return n if n > 0 else None
    try:
        return len(dataset) or None
    except TypeError:
        return None


def _compile(model, lr, lr_schedule, total_steps, weight_decay, heads, loss, metrics):
    from tftransfer.schedules import SlantedTriangular

    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise UserError(f"fine_tune: lr must be a number > 0. Received: lr={lr!r}.")
    strategy = getattr(model, "distribute_strategy", None)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        rate = float(lr) if lr_schedule == "constant" else SlantedTriangular(float(lr), total_steps)
        if weight_decay:
            optimizer = keras.optimizers.AdamW(rate, weight_decay=weight_decay)
        else:
            optimizer = keras.optimizers.Adam(rate)
        if heads is not None:
            from tftransfer.builders import compile_for_heads

            compile_for_heads(model, heads, optimizer)
            return
        if loss is None:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            metrics = metrics or ["accuracy"]
            try:
                outputs = model.output
            except (AttributeError, ValueError):  # subclassed, not yet called
                outputs = None
            if isinstance(outputs, dict):
                loss = {name: keras.losses.SparseCategoricalCrossentropy(from_logits=True)
                        for name in outputs}
                metrics = {name: list(metrics) for name in outputs}
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics)
