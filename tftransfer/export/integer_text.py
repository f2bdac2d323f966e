"""Integer-only int8 TFLite for text models: Keras ops rewritten so that every op can be int8.

`python -m tftransfer.export --format=tflite --quantize=int8 --integer_only`
on a BERT-family model traces the serving function inside
`integer_friendly_text_ops()`, which replaces four Keras calls by
equivalent formulations (same float function, to ~1e-6) whose every op has
an int8 TFLite kernel and a calibrated range that int8 can represent:

- `keras.layers.Softmax` with a mask selects -1e9 at padded positions.
  Calibrated per tensor, that gives the attention logits a range ~1e9 wide
  (scale ~4e6): in int8 every real logit rounds to the zero point and
  attention is uniform. Here a padded logit is the row's minimum minus
  `MASK_MARGIN`: still at most e^-16 of the weight of any real position,
  and the calibrated range is the logits' own plus 16.
- `keras.layers.LayerNormalization` (TensorFlow's `batch_normalization`
  form, `x * inv + (beta - mean * inv)`) has a `NEG` that TFLite's
  quantiser leaves in float. Here: `(x - mean) * rsqrt(var + eps) * gamma
  + beta`, all int8.
- `keras.layers.GlobalAveragePooling1D` with a mask (the heads' `mean`
  pooling) casts the boolean mask to float (a float `CAST`) and divides by
  the count of real tokens; TFLite's int8 `DIV` fails at run time whenever
  the divisor's raw int8 value is 0 (it checks the raw value), i.e. for a
  count near half the calibrated maximum. Here the count is a sum over a
  select of constants, and the mean is `(sum * rsqrt(n)) * rsqrt(n)`.
- `keras.layers.MultiHeadAttention` computes every head's attention logits
  in one tensor, so one int8 range serves all heads (MiniLM's first layer:
  a step of 0.62 in the logits, ~30% error in a softmax weight). Here each
  head has its own matrix products, so its own calibrated ranges (mean
  |probability difference| to the float model 0.157 -> 0.131 on held-out
  MiniLM data).

Written here, not taken from a library: Keras and TFLite offer no
quantisation-friendly variants of these layers (TF-MOT's quantisation
schemes do not support Keras 3). What integer-only costs in accuracy is
measured by every export (`tftransfer.export.quantize`); BENCHMARKS.md,
"int8 TFLite", has the measurements behind this design
(`tools/int8_integer_only_ablate.py`).

What limits integer-only fidelity (held-out MiniLM, mean relative error of
each int8 tensor against the float one on a calibration example,
`tools/int8_integer_only_ablate.py --tensor_errors=...`): the layer norms'
variance (squared deviations: a few outlier values set the int8 range and
the typical ones round to zero; 42% error in the embeddings' layer norm's
variance, 44% in its output) and the feed-forward output projection, whose
output carries BERT's outlier channel (up to 190 in one dimension, a step
of 1.5 for typical values below 1: 135% error in the first layer). Per-tensor
int8 cannot represent either. Tried and not kept: the layer norm as
TFLite's int8 `L2_NORMALIZATION` (int32 sum of squares inside; a prototype,
not in the tool: mean |probability difference| 0.131 -> 0.172) and
MSE-optimal clipping of the calibrated ranges (the tool's `per_head_mse`:
0.131 -> 0.139). The masked-softmax rewrite makes the
logits' range sane (the tests hold every int8 scale < 1) but by itself
measured no fidelity gain (0.154 with Keras' -1e9, 0.157 rewritten): the
errors above dominate.
"""

import contextlib

import keras
from keras import ops

# exp(-16) ~ 1e-7: a padded position's softmax weight relative to the row's
# largest real one is at most this (it is zeroed after the softmax anyway).
MASK_MARGIN = 16.0


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


def _layer_norm_call(original):
    def call(self, inputs):
        axis = self.axis if isinstance(self.axis, int) else (self.axis[0] if len(self.axis) == 1 else None)
        if self.rms_scaling or axis not in (-1, len(inputs.shape) - 1):
            return original(self, inputs)
        x = ops.cast(inputs, self.compute_dtype)
        centred = x - ops.mean(x, axis=-1, keepdims=True)
        variance = ops.mean(centred * centred, axis=-1, keepdims=True)
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


@contextlib.contextmanager
def integer_friendly_text_ops(per_head_attention=True):
    """While active, Keras' masked Softmax, LayerNormalization and masked mean pooling trace int8-friendly ops.

    Trace (and write out) the serving function inside it; the patched
    methods are restored on exit, also on error.

    Args:
        per_head_attention: bool. Also split the attention products per
            head (`tools/int8_integer_only_ablate.py` measures without).
            Defaults to True.
    """
    patches = [
        (keras.layers.Softmax, _softmax_call, "call"),
        (keras.layers.LayerNormalization, _layer_norm_call, "call"),
        (keras.layers.GlobalAveragePooling1D, _masked_mean_call, "call"),
    ]
    if per_head_attention:
        patches.append((keras.layers.MultiHeadAttention, _per_head_attention, "_compute_attention"))
    originals = [(cls, attr, getattr(cls, attr)) for cls, _, attr in patches]
    try:
        for cls, make, attr in patches:
            setattr(cls, attr, make(getattr(cls, attr)))
        yield
    finally:
        for cls, attr, method in originals:
            setattr(cls, attr, method)
