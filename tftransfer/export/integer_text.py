"""Integer-only int8 TFLite for text models: Keras ops rewritten so that every op can be int8.

`python -m tftransfer.export --format=tflite --quantize=int8 --integer_only`
on a BERT-family model traces the serving function inside
`integer_friendly_text_ops()`, which replaces Keras calls by equivalent
formulations (same float function, to ~1e-6; `tests/test_integer_text.py`)
whose every op has an int8 TFLite kernel and a calibrated range that int8
can represent:

- `keras.layers.Softmax` with a mask selects -1e9 at padded positions.
  Calibrated per tensor, that gives the attention logits a range ~1e9 wide
  (scale ~4e6): in int8 every real logit rounds to the zero point and
  attention is uniform. Here a padded logit is the row's minimum minus
  `MASK_MARGIN`: still at most e^-16 of the weight of any real position,
  and the calibrated range is the logits' own plus 16.
- `keras.layers.LayerNormalization` (TensorFlow's `batch_normalization`
  form, `x * inv + (beta - mean * inv)`) has a `NEG` that TFLite's
  quantiser leaves in float. Here: `(x - mean) * rsqrt(var + eps) * gamma
  + beta`, all int8, with the variance as one matrix product per token
  (`mean_square`: int8 products summed in int32; squaring into one int8
  tensor rounded the typical square to zero, 42% error in the embeddings'
  layer-norm variance, 1.3% now).
- `keras.layers.GlobalAveragePooling1D` with a mask (the heads' `mean`
  pooling) casts the boolean mask to float (a float `CAST`) and divides by
  the count of real tokens; TFLite's int8 `DIV` fails at run time whenever
  the divisor's raw int8 value is 0 (it checks the raw value), i.e. for a
  count near half the calibrated maximum. Here the count is a sum over a
  select of constants, and the mean is `(sum * rsqrt(n)) * rsqrt(n)`.
- `keras.layers.MultiHeadAttention` computes every head's attention logits
  in one tensor, so one int8 range serves all heads. Here each head has
  its own matrix products, so its own calibrated ranges.
- keras-hub's post-norm `TransformerEncoder` (BERT, MiniLM) carries
  outlier channels in its residual stream: in fine-tuned MiniLM one
  channel reaches ~200 where the median channel stays below 2.5, so one
  int8 range per tensor leaves the others a step of ~1.5 (135% error in
  the first feed-forward output). With `channel_groups`
  (`residual_channel_groups`, from float ranges on the representative
  data) the output projections, residual sums and layer norms compute per
  group of channels with ranges within `GROUP_RANGE_RATIO` of each other,
  each its own int8 tensor (per-embedding-group quantisation, Bondarenko
  et al. 2021); the layer norm's statistics sum over the groups.

And after calibration, `symmetric_batch_matmul_operands` gives every
`BATCH_MATMUL`'s right operand a zero-centred range: XNNPACK, the default
CPU delegate of `tf.lite.Interpreter`, ignores that operand's zero point
(~80% error on a [0, 1] operand; TFLite's own kernel is right). This bug
was most of what integer-only text int8 lost before (mean |probability
difference| to float 0.131 -> 0.090 with TFLite's own kernels, same model).

Measured (held-out MiniLM LoRA model, `tools/int8_integer_only_ablate.py`,
mean |probability difference| to float, default runtime): Keras' own ops
0.221 (not integer-only; 0.154 before the zero-centred operands),
rewrites + per-head 0.118, + channel groups
(shipped) 0.026, against 0.008 for the default mixed int8; accuracy drop
0.83 points (BENCHMARKS.md, "Full-integer text int8"). Tried and not kept:
the layer norm as TFLite's int8 `L2_NORMALIZATION` (0.131 -> 0.172) and
MSE-optimal clipping of the calibrated ranges (0.131 -> 0.139).

Written here, not taken from a library: Keras and TFLite offer no
quantisation-friendly variants of these layers (TF-MOT's quantisation
schemes do not support Keras 3). What integer-only costs in accuracy is
measured by every export (`tftransfer.export.quantize`).
"""

import contextlib

import keras
import numpy as np
from keras import ops

# exp(-16) ~ 1e-7: a padded position's softmax weight relative to the row's
# largest real one is at most this (it is zeroed after the softmax anyway).
MASK_MARGIN = 16.0

# Residual-stream channels whose calibrated ranges differ by more than this
# factor get separate int8 ranges (per-embedding-group quantisation,
# Bondarenko et al. 2021, "Understanding and Overcoming the Challenges of
# Efficient Transformer Quantization"): a channel lands in group
# floor(log_ratio(range / median range)).
GROUP_RANGE_RATIO = 4.0

# Layer-norm variances as matrix products (`mean_square`); False: the mean of
# an int8 tensor of squares (`tools/int8_integer_only_ablate.py` measures both).
MEAN_SQUARE_BY_MATMUL = True


def _softmax_call(original):
    def call(self, inputs, mask=None):
        if mask is None:
            return original(self, inputs)
        axis = self.axis[0] if isinstance(self.axis, (tuple, list)) and len(self.axis) == 1 else self.axis
        if isinstance(axis, (tuple, list)):
            return original(self, inputs, mask=mask)
        return masked_softmax(inputs, mask, axis)

    return call


def masked_softmax(logits, mask, axis=-1):
    """Softmax over `axis` with masked positions at the row minimum - `MASK_MARGIN`, then zeroed."""
    if mask.dtype != "bool":
        mask = ops.greater(mask, 0.5)
    floor = ops.min(logits, axis=axis, keepdims=True) - MASK_MARGIN
    weights = keras.activations.softmax(ops.where(mask, logits, floor), axis=axis)
    return ops.where(mask, weights, 0.0)


def mean_square(x):
    """mean(x * x) over the last axis (kept), as one matrix product per row: int8 products summed in int32.

    `mean(x * x)` quantises every square to one int8 range, set by the
    largest: in an embedding layer norm the typical square is ~1/300 of
    it and rounds to zero (42% error in the variance).
    """
    if MEAN_SQUARE_BY_MATMUL:
        return ops.squeeze(ops.matmul(ops.expand_dims(x, -2), ops.expand_dims(x, -1)), -1) / x.shape[-1]
    return ops.mean(x * x, axis=-1, keepdims=True)


def _layer_norm_call(original):
    def call(self, inputs):
        axis = self.axis if isinstance(self.axis, int) else (self.axis[0] if len(self.axis) == 1 else None)
        if self.rms_scaling or axis not in (-1, len(inputs.shape) - 1):
            return original(self, inputs)
        x = ops.cast(inputs, self.compute_dtype)
        centred = x - ops.mean(x, axis=-1, keepdims=True)
        variance = mean_square(centred)
        out = centred * ops.rsqrt(variance + self.epsilon)
        if self.scale:
            out = out * self.gamma
        if self.center:
            out = out + self.beta
        return out

    return call


def _masked_mean_call(original):
    def call(self, inputs, mask=None):
        if mask is None or self.data_format != "channels_last":
            return original(self, inputs, mask=mask)
        real = ops.expand_dims(ops.cast(mask, "bool"), 2)
        total = ops.sum(ops.where(real, inputs, 0.0), axis=1, keepdims=self.keepdims)
        count = ops.sum(ops.where(real, 1.0, 0.0), axis=1, keepdims=self.keepdims)
        # x / n as (x * n^-1/2) * n^-1/2: TFLite's int8 DIV refuses a divisor whose raw int8
        # value is 0 (any count near half the calibrated maximum), and an int8 1 / n is coarse.
        inverse_root = ops.rsqrt(count)
        return total * inverse_root * inverse_root

    return call


def _per_head_attention(original):
    def compute(self, query, key, value, attention_mask=None, training=None, return_attention_scores=False,
                use_causal_mask=False):
        if len(query.shape) != 4 or use_causal_mask or return_attention_scores or self._attention_axes != (1,):
            return original(self, query, key, value, attention_mask=attention_mask, training=training,
                            return_attention_scores=return_attention_scores, use_causal_mask=use_causal_mask)
        query = ops.multiply(query, ops.cast(self._inverse_sqrt_key_dim, query.dtype))
        mask = None if attention_mask is None else ops.cast(attention_mask, "bool")
        outputs = []
        for head in range(query.shape[2]):
            scores = ops.matmul(query[:, :, head, :], ops.transpose(key[:, :, head, :], (0, 2, 1)))
            if mask is None:
                weights = keras.activations.softmax(scores, axis=-1)
            else:
                weights = masked_softmax(scores, mask)
            outputs.append(ops.matmul(weights, value[:, :, head, :]))
        return ops.stack(outputs, axis=2), None

    return compute


def _transformer_encoder_class():
    try:
        from keras_hub.layers import TransformerEncoder
        from keras_hub.src.layers.modeling.transformer_layer_utils import merge_padding_and_attention_mask
    except ImportError:  # keras-hub absent: no encoder to rewrite.
        return None, None
    return TransformerEncoder, merge_padding_and_attention_mask


def _groupable(encoder):
    """Whether `encoder` is a post-norm keras-hub encoder whose projections this module can split."""
    attention = encoder._self_attention_layer
    projection, output = attention._output_dense, encoder._feedforward_output_dense
    width = encoder._feedforward_layer_norm.gamma.shape[0] if encoder._feedforward_layer_norm.scale else None
    return (not encoder.normalize_first and type(attention) is keras.layers.MultiHeadAttention
            and not attention._use_gate and attention._attention_axes == (1,)
            and isinstance(projection, keras.layers.EinsumDense) and projection.bias is not None
            and tuple(projection.bias.shape) == (width,) and projection.kernel.shape[-1] == width
            and projection.activation is keras.activations.linear
            and isinstance(output, keras.layers.Dense) and output.use_bias and output.kernel.shape[-1] == width
            and output.activation is keras.activations.linear
            and projection.quantization_mode is None and output.quantization_mode is None)


def _attention_context(encoder, inputs, padding_mask, attention_mask, merge_masks):
    """The encoder's self-attention up to its output projection (Keras' `MultiHeadAttention.call`)."""
    attention = encoder._self_attention_layer
    mask = attention._compute_attention_mask(inputs, inputs, attention_mask=merge_masks(
        inputs, padding_mask, attention_mask))
    context, _ = attention._compute_attention(
        attention._query_dense(inputs), attention._key_dense(inputs), attention._value_dense(inputs), mask)
    return context


def _encoder_parts(encoder, inputs, padding_mask, attention_mask, merge_masks):
    """The float encoder's residual-stream tensors: {name: tensor} (recorded to choose groups)."""
    context = _attention_context(encoder, inputs, padding_mask, attention_mask, merge_masks)
    first = encoder._self_attention_layer._output_dense(context) + inputs
    hidden = encoder._self_attention_layer_norm(first)
    feedforward = encoder._feedforward_output_dense(encoder._feedforward_intermediate_dense(hidden))
    second = feedforward + hidden
    return {"inputs": inputs, "first_sum": first, "hidden": hidden, "feedforward": feedforward,
            "second_sum": second}, encoder._feedforward_layer_norm(second)


def residual_channel_groups(model, batches, ratio=GROUP_RANGE_RATIO):
    """Channel groups of each post-norm keras-hub encoder's residual stream, from float ranges on `batches`.

    Runs the float model on `batches` (dicts of model inputs: the
    representative data), records every channel's largest |value| in the
    encoder's residual-stream tensors (its input, both residual sums, the
    attention layer norm's output and the feed-forward output) and groups
    channels whose ranges are within `ratio` of each other.

    Returns:
        dict: `id(encoder layer)` -> list of int arrays (a partition of
        the channels; one group where the ranges are all alike).
    """
    encoder_class, merge_masks = _transformer_encoder_class()
    if encoder_class is None:
        return {}
    encoders = {id(layer) for layer in model._flatten_layers() if isinstance(layer, encoder_class)
                and _groupable(layer)}
    ranges = {}
    original = encoder_class.call

    def record(self, inputs, padding_mask=None, attention_mask=None, training=None, **kwargs):
        if id(self) not in encoders:
            return original(self, inputs, padding_mask=padding_mask, attention_mask=attention_mask,
                            training=training, **kwargs)
        parts, outputs = _encoder_parts(self, inputs, padding_mask, attention_mask, merge_masks)
        width = inputs.shape[-1]
        peak = np.max([np.abs(ops.convert_to_numpy(t)).reshape(-1, width).max(0) for t in parts.values()], 0)
        ranges[id(self)] = np.maximum(ranges.get(id(self), 0.0), peak)
        return outputs

    encoder_class.call = record
    try:
        for batch in batches:
            model({k: np.asarray(v) for k, v in batch.items()}, training=False)
    finally:
        encoder_class.call = original
    groups = {}
    for key, peak in ranges.items():
        level = np.floor(np.log(np.maximum(peak, 1e-12) / max(float(np.median(peak)), 1e-12)) / np.log(ratio))
        level = np.maximum(level, 0).astype(int)
        groups[key] = [np.flatnonzero(level == k).astype("int32") for k in np.unique(level)]
    return groups


def _grouped_layer_norm(parts, layer, groups, width):
    """A post-norm layer norm of a residual stream held as channel groups (each its own int8 range)."""
    fractions = [len(g) / width for g in groups]
    mean = sum(ops.mean(x, axis=-1, keepdims=True) * f for x, f in zip(parts, fractions))
    centred = [x - mean for x in parts]
    variance = sum(mean_square(c) * f for c, f in zip(centred, fractions))
    inverse = ops.rsqrt(variance + layer.epsilon)
    out = []
    for c, g in zip(centred, groups):
        y = c * inverse
        if layer.scale:
            y = y * ops.take(layer.gamma, g)
        if layer.center:
            y = y + ops.take(layer.beta, g)
        out.append(y)
    return out


def _split_projection(layer, inputs, groups):
    """`layer(inputs)` (a linear Dense / EinsumDense with a bias over the last axis) as one output per group."""
    # `layer.kernel`, not its variable: a LoRA layer's kernel has the adapter merged in. The
    # converter folds these gathers of constants into one kernel per group.
    kernel, bias = layer.kernel, layer.bias
    if isinstance(layer, keras.layers.EinsumDense):
        return [ops.einsum(layer.equation, inputs, ops.take(kernel, g, axis=-1)) + ops.take(bias, g)
                for g in groups]
    return [ops.matmul(inputs, ops.take(kernel, g, axis=-1)) + ops.take(bias, g) for g in groups]


def _ungroup(parts, groups):
    """The channel groups back in the channels' own order (one concatenation, one gather)."""
    order = np.argsort(np.concatenate(groups)).astype("int32")
    return ops.take(ops.concatenate(parts, axis=-1), order, axis=-1)


def _grouped_encoder_call(original, groups_of):
    """`TransformerEncoder.call` computing the residual stream of the encoders in `groups_of` per channel group.

    Inference only (the serving trace): no dropout. Encoders not in
    `groups_of`, or with one group, run Keras' own call.
    """
    _, merge_masks = _transformer_encoder_class()

    def call(self, inputs, padding_mask=None, attention_mask=None, training=None, return_attention_scores=False):
        groups = groups_of.get(id(self))
        if groups is None or len(groups) < 2 or return_attention_scores:
            return original(self, inputs, padding_mask=padding_mask, attention_mask=attention_mask,
                            training=training, return_attention_scores=return_attention_scores)
        width = inputs.shape[-1]
        context = _attention_context(self, inputs, padding_mask, attention_mask, merge_masks)
        first = [p + ops.take(inputs, g, axis=-1)
                 for p, g in zip(_split_projection(self._self_attention_layer._output_dense, context, groups), groups)]
        hidden = _grouped_layer_norm(first, self._self_attention_layer_norm, groups, width)
        intermediate = self._feedforward_intermediate_dense(_ungroup(hidden, groups))
        second = [p + h for p, h in zip(_split_projection(self._feedforward_output_dense, intermediate, groups),
                                        hidden)]
        return _ungroup(_grouped_layer_norm(second, self._feedforward_layer_norm, groups, width), groups)

    return call


# TFLite ops whose int8 output takes its input's scale and zero point: a
# batch matrix product's right operand keeps the zero point of the tensor
# these were applied to.
_SAME_SCALE_OPS = ("STRIDED_SLICE", "SLICE", "TRANSPOSE", "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "GATHER")


def symmetric_batch_matmul_operands(calibrated):
    """The calibrated TFLite model with every `BATCH_MATMUL`'s right operand given a zero-centred range.

    XNNPACK, the default CPU delegate of `tf.lite.Interpreter` (TF 2.21),
    computes an int8 `BATCH_MATMUL` as if its right operand's zero point
    were 0: with a calibrated range like [0, 1] (zero point -128) the
    product is off by ~80% (TFLite's own kernel is right; measured,
    `tests/test_integer_text.py`). Attention's key and value tensors are
    such operands. This sets each one's range -- and that of the tensors it
    is sliced, transposed or reshaped from, which share its int8 scale --
    to [-m * 128/127, m], m its largest |value|: zero point exactly 0, at
    most one bit of resolution lost, right on every runtime.

    Args:
        calibrated: bytes. A calibrated, not yet quantised, TFLite model
            (min / max recorded per tensor).

    Returns:
        bytes.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(calibrated))
    names = {i: flatbuffer_utils.opcode_to_name(model, i) for i in range(len(model.operatorCodes))}
    for graph in model.subgraphs:
        producer = {out: op for op in graph.operators for out in op.outputs}
        for op in graph.operators:
            if names[op.opcodeIndex] != "BATCH_MATMUL":
                continue
            chain, tensor = [], op.inputs[1]
            while tensor >= 0:
                chain.append(graph.tensors[tensor])
                source = producer.get(tensor)
                tensor = source.inputs[0] if source is not None and names[source.opcodeIndex] in _SAME_SCALE_OPS else -1
            ranged = [t.quantization for t in chain if t.quantization is not None and t.quantization.min is not None
                      and len(t.quantization.min) == 1]
            if not ranged:
                continue
            peak = max(max(abs(float(q.min[0])), abs(float(q.max[0]))) for q in ranged)
            for q in ranged:
                q.min, q.max = [-peak * 128.0 / 127.0], [peak]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


@contextlib.contextmanager
def integer_friendly_text_ops(per_head_attention=True, channel_groups=None):
    """While active, Keras' masked Softmax, LayerNormalization and masked mean pooling trace int8-friendly ops.

    Trace (and write out) the serving function inside it; the patched
    methods are restored on exit, also on error.

    Args:
        per_head_attention: bool. Also split the attention products per
            head (`tools/int8_integer_only_ablate.py` measures without).
            Defaults to True.
        channel_groups: dict from `residual_channel_groups`, or None.
            Post-norm keras-hub encoders it names compute their residual
            stream (output projections, residual sums, layer norms) in
            those channel groups, each with its own int8 range. Defaults
            to None (one range per tensor).
    """
    patches = [
        (keras.layers.Softmax, _softmax_call, "call"),
        (keras.layers.LayerNormalization, _layer_norm_call, "call"),
        (keras.layers.GlobalAveragePooling1D, _masked_mean_call, "call"),
    ]
    if per_head_attention:
        patches.append((keras.layers.MultiHeadAttention, _per_head_attention, "_compute_attention"))
    encoder_class, _ = _transformer_encoder_class()
    if channel_groups and encoder_class is not None:
        patches.append((encoder_class, lambda original: _grouped_encoder_call(original, channel_groups), "call"))
    originals = [(cls, attr, getattr(cls, attr)) for cls, _, attr in patches]
    try:
        for cls, make, attr in patches:
            setattr(cls, attr, make(getattr(cls, attr)))
        yield
    finally:
        for cls, attr, method in originals:
            setattr(cls, attr, method)
