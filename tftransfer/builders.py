"""Functional-model builders: a backbone plus one or more new heads.

The model takes preprocessed input (image tensor, or token ids / segment ids
/ padding mask) and returns a dict of logits keyed by head name, also for a
single head, so training, distillation, evaluation and export treat single-
and multi-task models alike. Preprocessing stays outside the model (it runs
on the host in tf.data) and is put back in front of it for serving.
"""

import keras

from tftransfer.heads import build_head, head_layer_names, pool_features, pool_layer_name


def build_model(backbone, heads, freeze_backbone=False, name="transfer_model"):
    """Attach heads to a loaded backbone.

    Args:
        backbone: `tftransfer.backbones.LoadedBackbone`.
        heads: list of `tftransfer.heads.HeadSpec` (one per task).
        freeze_backbone: bool. Freeze every backbone layer (head-only
            training). Frozen BatchNorm layers run in inference mode, so
            their moving statistics stay those of pretraining.
            Defaults to False.
        name: str. Model name.

    Returns:
        keras.Model mapping model inputs to `{head.name: logits}`.

    Example:
    ```python
    loaded = tftransfer.load_backbone(preset="path/to/preset_dir")
    model = tftransfer.build_model(loaded, [HeadSpec(num_classes=5)])
    ```
    """
    inputs = model_inputs(backbone)
    features = backbone.model(inputs)
    padding_mask = inputs["padding_mask"] if backbone.modality == "text" else None
    outputs = {}
    for spec in heads:
        pooled = pool_features(
            features, backbone.modality, spec.pooling, padding_mask, name=pool_layer_name(spec)
        )
        outputs[spec.name] = build_head(pooled, spec)
    if backbone.modality == "text" and all((spec.pooling or "cls") != "cls" for spec in heads):
        _freeze_unused_pooler(backbone)
    if freeze_backbone:
        backbone.model.trainable = False
    return keras.Model(inputs, outputs, name=name)


def features_key(spec):
    """The key of `spec`'s pooled features in `features_model`'s outputs and `head_model`'s inputs."""
    return f"{spec.name}_features"


def features_model(model, heads, name="features_model"):
    """Model inputs -> each head's pooled backbone features, `{features_key(head): (batch, dim)}`.

    Shares the layers (and weights) of `model`, a `build_model` model.
    Run it in inference mode (`predict`): BatchNorm uses its moving
    statistics and dropout is off, so the features of an example are fixed.
    """
    return keras.Model(model.input, {features_key(h): model.get_layer(pool_layer_name(h)).output for h in heads},
                       name=name)


def head_model(model, heads, name="head_model"):
    """Pooled features `{features_key(head): (batch, dim)}` -> `{head.name: logits}`, as in `model`.

    The head layers are `model`'s own (shared, not copied): training this
    model trains `model`'s heads, so `model` then holds the trained heads
    and saves / exports as usual. Together with `features_model`:
    `model(x) == head_model(features_model(x))` in inference mode.
    """
    inputs, outputs = {}, {}
    for h in heads:
        dim = model.get_layer(pool_layer_name(h)).output.shape[-1]
        x = inputs[features_key(h)] = keras.Input((dim,), name=features_key(h))
        for layer_name in head_layer_names(h):
            x = model.get_layer(layer_name)(x)
        outputs[h.name] = x
    return keras.Model(inputs, outputs, name=name)


def _freeze_unused_pooler(backbone):
    """Take BERT's pooler (`pooled_dense`) out of training when no head reads it.

    Only `cls` pooling uses the pooled output; with `mean` pooling the pooler
    gets no gradient, and Keras warns on every fit ("Gradients do not exist
    for variables ['pooled_dense/kernel', ...]"), which looks like a bug to a
    user. It is frozen and removed from its layer group, so progressive
    unfreezing never makes it trainable again. Its weights stay in the model
    (and the saved backbone preset) unchanged.
    """
    try:
        pooler = backbone.model.get_layer("pooled_dense")
    except ValueError:
        return
    pooler.trainable = False
    setattr(pooler, _UNUSED, True)  # for groups found again from the model (`without_unused_layers`)
    without_unused_layers(backbone.layer_groups)


_UNUSED = "_tftransfer_unused"


def without_unused_layers(groups):
    """`groups` (list of `LayerGroup`) without the layers `build_model` took
    out of training (an unused BERT pooler), changed in place and returned.
    For groups found again from a built model (`tftransfer.fine_tune`), so
    that unfreezing them does not make the pooler trainable again."""
    for group in groups:
        group.layers[:] = [layer for layer in group.layers if not getattr(layer, _UNUSED, False)]
    return groups


def model_inputs(backbone):
    """Symbolic inputs matching the backbone's preprocessed input."""
    if backbone.modality == "image":
        height, width = backbone.image_size
        return keras.Input((height, width, 3), name="image")
    # The backbone's own keys: RoBERTa, XLM-R, DistilBERT and DeBERTaV3 take
    # no segment_ids (a serving signature that sends them is still served).
    accepted = backbone.model.input if isinstance(backbone.model.input, dict) else {}
    return {
        key: keras.Input((None,), dtype="int32", name=key)
        for key in ("token_ids", "segment_ids", "padding_mask")
        if key in accepted or not accepted
    }


def compile_for_heads(model, heads, optimizer, jit_compile=False, steps_per_execution=1):
    """Compile with each head's loss, loss weight and metrics.

    The metrics are `weighted_metrics`: an example whose label for a head is
    missing (sample weight 0, see `tftransfer.data.make_pipeline`) is not
    counted; without sample weights they equal plain metrics (same names).
    """
    model.compile(
        optimizer=optimizer,
        loss={h.name: h.loss() for h in heads},
        loss_weights={h.name: h.loss_weight for h in heads},
        weighted_metrics={h.name: h.metrics() for h in heads},
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    return model
