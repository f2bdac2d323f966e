"""Feature extraction, cached: a frozen backbone runs once; the head trains on its features.

When the backbone is frozen for the whole run and the inputs are not
augmented, the pooled features of an example never change, so running the
backbone at every step of every epoch is waste. This is the classic recipe
"pretrained features + a linear classifier" (e.g. BERT features + logistic
regression): compute the features once, train only the head on them.

    features = builders.features_model(model, heads)    # inputs -> {head: pooled}
    head = builders.head_model(model, heads)            # {head: pooled} -> logits, shared layers
    split, info = load_or_compute(features, labelled.train, loaded.preprocessor,
                                  cache_dir=W/cache/features, model_key=model_key(features, heads))
    ... train `head` on make_pipeline(split, identity, FEATURES, heads, ...) ...
    model.save(...)   # the full model holds the trained head layers

The features are computed in inference mode (`predict`: BatchNorm moving
statistics, no dropout). They are kept on disk under
`<cache_dir>/<key>/<split>.npz`, where the key is a hash of the backbone
(architecture and every weight), the pooling, the dtype policy and the
preprocessed inputs in order (so a change of preprocessing or of the data
changes it too): a stale cache is never read, and a resumed run skips the
backbone entirely. Labels are not cached; they come from the split.

A backbone with dropout (the BERT family: 0.1) differs: an uncached run
with a frozen backbone still applies the backbone's dropout at every
training step (Keras runs every layer in training mode inside `fit`,
frozen or not), while cached features are the deterministic ones.
Backbones without dropout (ResNet) give the same head weights either way.
"""

import contextlib
import dataclasses
import hashlib
import os
import time

import keras
import numpy as np
import tensorflow as tf

from tftransfer.data import pipeline
from tftransfer.data.array_cache import digest, preprocessed_inputs, read_arrays, write_arrays
from tftransfer.data.sources import Split
from tftransfer.errors import UserError

# train.cache_features: auto (on exactly when `decide` says it applies) or false.
MODES = ("auto", False)
# The modality of a features split: `make_pipeline` batches it (no
# augmentation, `identity` as its preprocessor) and keeps its validation batches.
FEATURES = pipeline.FEATURES
# Rows per replica in one evaluation batch of a features split. Pooled
# features are at most a few thousand floats per row (4096 x 2048 float32 =
# 32 MiB for ResNet-50), and a linear head over them costs microseconds per
# row, while each batch of Keras' `evaluate` and of the validation report
# costs milliseconds of fixed overhead: with the data's own eval batch (64 on
# the quickstart) a cached epoch spent most of its time there.
EVAL_BATCH = 4096


def check_mode(mode, where="train.cache_features"):
    """UserError unless `mode` is one of `MODES` (exactly: `0` is not false)."""
    if not any(mode is m or (isinstance(m, str) and mode == m) for m in MODES):
        allowed = ", ".join(str(m).lower() for m in MODES)
        raise UserError(f"{where} must be one of {allowed}. Received: {mode!r}.")


def identity(x):
    """The preprocessor of a features split: the features are the model input."""
    return x


def frozen_throughout(schedule, layer_groups, unit="epoch"):
    """True when the unfreeze `schedule` never makes a backbone layer group trainable."""
    from tftransfer.callbacks import resolve_schedule

    points = resolve_schedule(schedule, [g.name for g in layer_groups], unit)
    return not any(groups for _, groups in points)


def trained_outside_groups(backbone_model, layer_groups):
    """Paths of trainable backbone variables no layer group holds (they train on any schedule)."""
    held = {id(v) for g in layer_groups for v in g.variables}
    return [v.path for v in backbone_model.trainable_weights if id(v) not in held]


def decide(mode, *, frozen, augmented, lora, multi_worker, outside_groups=()):
    """Whether to cache features, and why (one line for the log and metrics.json).

    Args:
        mode: `auto` or False (see `MODES`).
        frozen: bool. The backbone is frozen for the whole run (`frozen_throughout`).
        augmented: bool. Training inputs are augmented (new inputs every epoch).
        lora: bool. LoRA adapters train inside the backbone.
        multi_worker: bool. A multi-worker or TPU strategy (not supported here).
        outside_groups: list of str. `trained_outside_groups`.

    Returns:
        `(on, reason)`.
    """
    check_mode(mode)
    if mode is False:
        return False, "train.cache_features is false"
    if lora:
        return False, "train.lora trains adapters inside the backbone"
    if not frozen:
        return False, "train.unfreeze.schedule trains backbone layers"
    if augmented:
        return False, "data.augment changes the inputs every epoch"
    if multi_worker:
        return False, "the feature cache supports one-device and mirrored strategies, not multi_worker / tpu"
    if outside_groups:
        return False, f"backbone weights outside the layer groups train (e.g. {outside_groups[0]})"
    return True, "the backbone is frozen for the whole run and the inputs are not augmented"


def model_key(features_model, heads):
    """A short key of what turns inputs into features: architecture, every weight, pooling, dtype policy."""
    from tftransfer.heads import pool_layer_name
    from tftransfer.run_loop import weights_digest

    return digest(
        weights=weights_digest(features_model.weights),
        variables=[(v.path, list(v.shape), str(v.dtype)) for v in features_model.weights],
        pooling={h.name: features_model.get_layer(pool_layer_name(h)).get_config() for h in heads},
        outputs={k: list(t.shape) for k, t in features_model.output.items()},
        dtype_policy=keras.config.dtype_policy().name,
    )


def scan(split, preprocessor, batch_size):
    """One pass over `split`: `(digest of its preprocessed inputs in order, labels)`.

    The digest covers every preprocessed value, shape and dtype, so a change
    of the data, of its order or of the preprocessing changes it. Labels:
    the split's labels stacked (a dict of arrays for multi-task labels).
    """
    h = hashlib.sha256()
    labels = []
    for x, y in preprocessed_inputs(split, preprocessor, batch_size, with_labels=True).as_numpy_iterator():
        for leaf in tf.nest.flatten(x):  # dicts in sorted key order
            leaf = np.ascontiguousarray(leaf)
            h.update(f"{leaf.dtype}{leaf.shape[1:]}".encode())  # per example: any batch size
            h.update(leaf.tobytes())
        labels.append(y)
    labels = tf.nest.map_structure(lambda *parts: np.concatenate(parts), *labels)
    return h.hexdigest()[:16], labels


def compute(features_model, split, preprocessor, batch_size, strategy=None, verbose=0):
    """`{head: float32 (num_examples, dim)}`: `features_model` over `split` in inference mode, in order."""
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        outputs = features_model.predict(preprocessed_inputs(split, preprocessor, batch_size), verbose=verbose)
    outputs = {k: np.asarray(v, np.float32) for k, v in outputs.items()}
    for array in outputs.values():
        if len(array) != split.num_examples:
            raise UserError(f"feature cache: {len(array)} feature rows for {split.num_examples} examples; "
                            f"the data changed while caching.")
    return outputs


def load_or_compute(features_model, split, preprocessor, cache_dir, model_key, name="train",
                    batch_size=64, strategy=None, verbose=0):
    """A features split of `split`: from `<cache_dir>/<key>/<name>.npz` when present, else computed (and saved).

    Args:
        features_model: `tftransfer.builders.features_model`.
        split: `tftransfer.data.Split` of raw `(input, label)` examples.
        preprocessor: the backbone's preprocessor.
        cache_dir: str, or None (compute, keep in memory only).
        model_key: str. `model_key(features_model, heads)`.
        name: str. The split's name (file name). Defaults to `"train"`.
        batch_size: int. Inference batch (global). Defaults to 64.
        strategy: `tf.distribute.Strategy` to predict under, or None.
        verbose: int. `predict` verbosity.

    Returns:
        `(features_split, info)`: a `Split` of `({head: features}, label)`
        in `split`'s order, and `{"key", "source": "disk" | "computed", "seconds", "path"}`.
    """
    start = time.perf_counter()
    inputs_key, labels = scan(split, preprocessor, batch_size)
    key = digest(model=model_key, inputs=inputs_key, examples=split.num_examples)
    path = os.path.join(cache_dir, key, f"{name}.npz") if cache_dir else None
    features, source = None, "computed"
    if path and os.path.isfile(path):
        features = read_arrays(path)
        if set(features) != set(features_model.output) or any(
                len(a) != split.num_examples for a in features.values()):
            features = None  # not what this key promises (a foreign file): recompute
        else:
            source = "disk"
    if features is None:
        features = compute(features_model, split, preprocessor, batch_size, strategy, verbose)
        if path:
            write_arrays(path, features)
    dataset = tf.data.Dataset.from_tensor_slices((features, labels))
    info = {"key": key, "source": source, "seconds": time.perf_counter() - start, "path": path}
    return Split(dataset, split.num_examples, split.names), info


@dataclasses.dataclass
class CachedFeatures:
    """The pieces a run trains its head with when features are cached.

    on: bool. reason: str (why on / off).
    head_model: compiled `builders.head_model` (None when off).
    labelled: the run's `LabelledData` with feature splits (None when off).
    source: the run's `LoadedBackbone` with `identity` preprocessing and
        modality `FEATURES`, for `make_pipeline` (None when off).
    splits: `{split name: info}` from `load_or_compute`.
    """

    on: bool
    reason: str
    head_model: object = None
    labelled: object = None
    source: object = None
    splits: dict = dataclasses.field(default_factory=dict)

    @property
    def report(self):
        """metrics.json `feature_cache`."""
        out = {"cached": self.on, "reason": self.reason}
        if self.splits:
            out["splits"] = {name: {k: v for k, v in info.items() if k != "path"}
                             for name, info in self.splits.items()}
        return out
