"""Precise BatchNorm statistics: make the moving statistics match the weights.

A BatchNormalization layer normalises with batch statistics while it trains
and with its moving averages at inference. With Keras' momentum of 0.99 the
moving averages forget their initial values slowly: after 80 steps they
still hold 0.99**80 = 45% of them. A short run that trains BatchNorm layers
(from scratch, a distilled student, fine-tuning with `train_bn: true`) so
evaluates, saves and exports a network whose statistics do not belong to
its weights. The remedy is "precise BN" (Wu & Johnson, "Rethinking 'Batch'
in BatchNorm", 2021; fvcore's `update_bn_stats`): after training, run the
network over training batches with the weights fixed and set each moving
statistic to the cumulative average of the per-batch statistics.

How: each BatchNorm layer to update gets momentum 0 for the pass, so one
forward pass in training mode leaves exactly that batch's mean and variance
in its moving variables; the average over batches is accumulated here and
written back, and the momenta are restored. Layers that are not trainable
(frozen BatchNorm of a pretrained backbone) run in inference mode and are
left as they are. Nothing else changes: training-mode side effects of other
layers (dropout) do not touch variables.

Keras has no such utility (checked: Keras 3.15); this one works for any
Keras model with `keras.layers.BatchNormalization` layers.
"""

import keras
import numpy as np

DEFAULT_BATCHES = 200  # fvcore's default: enough for stable averages, cheap next to training


def batchnorm_layers(model):
    """Every `keras.layers.BatchNormalization` inside `model`, in order."""
    return [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]


def trainable_batchnorm_layers(model):
    """The BatchNorm layers that use batch statistics in `model(x, training=True)`."""
    return [layer for layer in batchnorm_layers(model) if layer.trainable]


def snapshot(model):
    """`{layer path: (moving_mean, moving_variance)}` as numpy copies."""
    return {
        layer.path: (np.array(layer.moving_mean.numpy()), np.array(layer.moving_variance.numpy()))
        for layer in batchnorm_layers(model)
    }


def changed_layers(model, before):
    """The BatchNorm layers whose moving statistics differ from `before` (a `snapshot`)."""
    changed = []
    for layer in batchnorm_layers(model):
        mean, variance = before.get(layer.path, (None, None))
        if mean is None or not (
            np.array_equal(mean, layer.moving_mean.numpy())
            and np.array_equal(variance, layer.moving_variance.numpy())
        ):
            changed.append(layer)
    return changed


def recompute(model, dataset, layers=None, num_batches=DEFAULT_BATCHES):
    """Set BatchNorm moving statistics to their average over training batches.

    Args:
        model: keras.Model.
        dataset: iterable of batches, `x` or `(x, ...)` tuples (a tf.data
            pipeline over the training split). Use the batch size the
            layers trained with: the statistics are per-batch ones.
        layers: list of BatchNormalization layers to update. Defaults to
            every trainable one in `model`.
        num_batches: int. The most batches to average over; fewer when the
            dataset ends first. Defaults to 200.

    Returns:
        int. The number of batches averaged (0: nothing to update).

    Example:
    ```python
    before = tftransfer.bn_stats.snapshot(model)
    model.fit(train_ds, epochs=3)
    layers = tftransfer.bn_stats.changed_layers(model, before)
    tftransfer.bn_stats.recompute(model, train_ds.take(100), layers)
    ```
    """
    import tensorflow as tf

    layers = trainable_batchnorm_layers(model) if layers is None else [l for l in layers if l.trainable]
    if not layers or num_batches < 1:
        return 0
    momenta = [layer.momentum for layer in layers]
    sums = [(np.zeros(l.moving_mean.shape, "float64"), np.zeros(l.moving_variance.shape, "float64"))
            for l in layers]
    count = 0
    try:
        for layer in layers:
            layer.momentum = 0.0  # moving <- this batch's statistics
        forward = tf.function(lambda x: model(x, training=True), reduce_retracing=True)
        for batch in dataset:
            if count >= num_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if int(tf.shape(tf.nest.flatten(x)[0])[0]) == 0:
                continue  # never run the network on zero rows
            forward(x)
            for (mean_sum, var_sum), layer in zip(sums, layers):
                mean_sum += layer.moving_mean.numpy()
                var_sum += layer.moving_variance.numpy()
            count += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    if count == 0:
        raise ValueError("bn_stats.recompute: the dataset gave no batches.")
    for (mean_sum, var_sum), layer in zip(sums, layers):
        layer.moving_mean.assign((mean_sum / count).astype(layer.moving_mean.dtype))
        layer.moving_variance.assign((var_sum / count).astype(layer.moving_variance.dtype))
    return count


def _all_layers(model):
    from tftransfer.keras_private import sublayers

    return sublayers(model)
