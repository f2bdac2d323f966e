"""tf.data pipelines: raw examples -> preprocessed, batched model input.

Preprocessing runs here, on the host, in parallel and ahead of the
accelerator (prefetch), so the train step only sees ready tensors. Images
are decoded/resized/normalised once and cached (in memory or on disk, see
`tftransfer.data.cache`); text is tokenised once per example and cached (or
per batch, in parallel, when `cache=False`); shuffling and batching come
after the cache, so each epoch sees new batches.
"""

import tensorflow as tf

from tftransfer.data import cache as cache_lib

FEATURES = "features"  # the modality of cached-feature splits (tftransfer.feature_cache)

AUTOTUNE = tf.data.AUTOTUNE


def preprocess(preprocessor, x):
    """`preprocessor(x)`; a sentence pair `(first, second)` is passed as `x=`.

    keras-hub preprocessors read a positional 2-tuple as `(x, y)` (features
    and labels), so a pair passed positionally would lose its second text.
    """
    if isinstance(x, tuple):
        return preprocessor(x=x)
    return preprocessor(x)


def augmentation_layers(flip=None, translate=0.0, rotate=0.0, zoom=0.0, seed=0):
    """Keras random-augmentation layers for training batches (possibly none).

    Areas moved in from outside the image are filled with the nearest edge
    pixel, so normalisation never sees an out-of-distribution constant.
    """
    import keras

    layers = []
    if flip:
        layers.append(keras.layers.RandomFlip(flip, seed=seed))
    if translate:
        layers.append(keras.layers.RandomTranslation(translate, translate, fill_mode="nearest", seed=seed))
    if rotate:
        layers.append(keras.layers.RandomRotation(rotate, fill_mode="nearest", seed=seed))
    if zoom:
        layers.append(keras.layers.RandomZoom(zoom, fill_mode="nearest", seed=seed))
    return layers


# With `teacher_outputs`, `x` is `{STUDENT_INPUTS: inputs, TEACHER_OUTPUTS: outputs}`
# (what `tftransfer.distill.Distiller` unpacks).
STUDENT_INPUTS = "student_inputs"
TEACHER_OUTPUTS = "teacher_outputs"


def make_pipeline(split, preprocessor, modality, heads, global_batch_size,
                  training=False, shuffle_buffer=2048, cache=True, seed=0,
                  drop_remainder=False, augment=(), passes=None, cache_dir=None, cache_role="train",
                  teacher_outputs=None):
    """Batched `(model_input, {head_name: label})` for `model.fit`; multi-task
    splits (labels keyed by head name) give `(model_input, labels, sample_weights)`
    with weight 0 where a head's label is missing (see `unmask`).

    Args:
        split: `tftransfer.data.sources.Split`.
        preprocessor: the backbone's preprocessor (see `LoadedBackbone`).
        modality: str. `"image"` or `"text"`.
        heads: list of `HeadSpec`; every head receives the split's label,
            or its own with multi-task labels (one-hot when the head uses
            label smoothing).
        global_batch_size: int. Per-replica batch x replicas in sync.
        training: bool. Shuffle (reshuffled every epoch) when True.
        shuffle_buffer: int. Shuffle buffer size.
        cache: bool or str. `tftransfer.data.cache.CACHE_MODES`: memory
            (True), disk (under `cache_dir`), false (False), or auto
            (memory when the estimated size fits the default budget, else
            disk when `cache_dir` is given, else none).
        seed: int. Shuffle seed.
        drop_remainder: bool. Static batch shape (TPU).
        augment: list of Keras random layers applied to each training image
            batch after the cache (see `augmentation_layers`), so every epoch
            sees new variants. Images only.
        cache_dir: str or None. Disk caches' directory (`W/cache/data`).
        cache_role: str. The split's name in the disk cache's path.
        passes: `(first, end)` or None. Training only: the passes
            `first..end-1` over the data back to back, pass `p` shuffled with
            its own seed (derived from `seed` and `p`), so a run resumed at
            pass `p` replays exactly the order an uninterrupted run saw
            (a reshuffling `shuffle` draws each pass's order from the number
            of iterators made so far, which Keras' `fit` varies). None: one
            pass, reshuffled at each iteration.
        teacher_outputs: nested dict of arrays with one row per example of
            `split`, in order (`tftransfer.distill.teacher_outputs`), or
            None. Given: each example carries its row through the same
            cache, shuffle and batching, and `x` becomes
            `{STUDENT_INPUTS: x, TEACHER_OUTPUTS: row}` (distillation from
            cached teacher outputs).
    """
    ds = split.dataset
    if teacher_outputs is not None:  # The rows ride with the labels: y = (label, row).
        rows = tf.data.Dataset.from_tensor_slices(teacher_outputs)
        ds = tf.data.Dataset.zip((ds, rows)).map(lambda xy, row: (xy[0], (xy[1], row)))
    buffer = min(shuffle_buffer, max(split.num_examples, 1))

    def shuffle_and_batch(ds):
        if not training:
            return ds.batch(global_batch_size, drop_remainder=drop_remainder)
        if passes is None:
            ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
            return augmented(ds.batch(global_batch_size, drop_remainder=drop_remainder), seed, True)
        return _concatenate([
            augmented(ds.shuffle(buffer, seed=seed * 1000003 + p, reshuffle_each_iteration=False)
                      .batch(global_batch_size, drop_remainder=drop_remainder),
                      seed * 1000003 + p, False)
            for p in range(*passes)
        ])

    def augmented(batches, pass_seed, rerandomize):
        if modality != "image" or not augment:
            return batches
        return augment_batches(batches, augment, pass_seed, rerandomize)

    def to_targets(x, y):
        if teacher_outputs is not None:
            y, row = y
            x = {STUDENT_INPUTS: x, TEACHER_OUTPUTS: row}
        if not isinstance(y, dict):  # one label: every head receives it
            return x, {h.name: tf.one_hot(y, h.num_classes) if h.one_hot_labels else y for h in heads}
        targets, weights = {}, {}
        for h in heads:
            label, weights[h.name] = unmask(y[h.name], h.type)
            targets[h.name] = tf.one_hot(label, h.num_classes) if h.one_hot_labels else label
        return x, targets, weights

    if modality == FEATURES and not training:
        # Cached backbone features (`tftransfer.feature_cache`): the rows are
        # in memory already, so keep the finished batches instead of the
        # rows: re-batching a few hundred rows one element at a time cost
        # ~8 ms per epoch, most of Keras' validation of a head on cached
        # features. (The same memory as a row cache; filled now, see
        # `cache.cached`.)
        batches = cache_lib.filled(shuffle_and_batch(ds).map(to_targets, num_parallel_calls=AUTOTUNE).cache())
        return batches.prefetch(AUTOTUNE)
    mode = cache_lib.setting(cache)
    if mode == "auto":
        mode = cache_lib.plan(mode, cache_lib.estimate_bytes(split, preprocessor, modality),
                              directory=cache_dir).mode
    if modality == "image" or mode != "false":
        # Preprocess each example once, then cache (text: tokenising costs as
        # much as a small BERT's forward pass on CPU): later epochs only
        # shuffle and batch ready inputs.
        ds = shuffle_and_batch(cache_lib.cached(ds, preprocessor, modality, mode, cache_dir, cache_role,
                                                split, fill=not training))
    else:
        # No cache (data larger than memory): tokenise whole batches, in parallel.
        ds = shuffle_and_batch(ds)
        ds = ds.map(lambda x, y: (preprocess(preprocessor, x), y), num_parallel_calls=AUTOTUNE)
    return ds.map(to_targets, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def unmask(label, head_type):
    """A batch of one head's multi-task labels -> (labels, sample weights).

    Missing labels (class id -1, a multi-hot row of -1, regression NaN; see
    `tftransfer.data.sources.MISSING_CLASS`) get sample weight 0 and a valid
    placeholder label (0), so the loss and the weighted metrics of that head
    skip them (`HeadSpec.loss`: mean over sample-weighted examples).
    """
    if head_type == "regression":
        labelled = tf.math.is_finite(label)
    elif head_type == "multilabel":
        labelled = tf.reduce_all(label >= 0, axis=-1)
    else:
        labelled = label >= 0
    mask = labelled if label.shape.rank == labelled.shape.rank else labelled[..., None]
    return tf.where(mask, label, tf.zeros_like(label)), tf.cast(labelled, tf.float32)


def augment_batches(batches, layers, seed, rerandomize=False):
    """`(images, y)` batches with Keras random `layers` applied, seeded per batch.

    Each batch draws its transformations from its own stateless seed, the
    next element of `tf.data.Dataset.random(seed)`, so the result depends
    only on `seed` and the batch's position: the same on every run, in any
    parallel map order, and after a resume (which rebuilds the pass with
    the same seed). Keras' layers on their own draw from a variable that
    parallel map threads advance in no fixed order, so two seeded runs
    augmented differently.

    Args:
        batches: dataset of `(images, y)` batches.
        layers: Keras image preprocessing layers (`augmentation_layers`).
        seed: int. The pass's seed.
        rerandomize: bool. New draws on every iteration of the dataset
            (for a dataset reused across epochs); False: the same each time.
    """
    from tftransfer.keras_private import StatelessSeed

    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=rerandomize).batch(2)

    def apply(batch, batch_seed):
        x, y = batch
        draws = StatelessSeed(batch_seed)
        for layer in layers:
            transformation = layer.get_random_transformation(x, training=True, seed=draws)
            x = layer.transform_images(x, transformation, training=True)
        return x, y

    return tf.data.Dataset.zip((batches, seeds)).map(apply, num_parallel_calls=AUTOTUNE)


def _concatenate(datasets):
    """Datasets back to back, as a balanced tree (depth log2 n, not n)."""
    while len(datasets) > 1:
        pairs = [a.concatenate(b) for a, b in zip(datasets[::2], datasets[1::2])]
        datasets = pairs + ([datasets[-1]] if len(datasets) % 2 else [])
    return datasets[0]


def drop_final_batch(num_examples, global_batch_size, replicas=1, static_shapes=False):
    """Whether a training pass drops its final partial batch.

    TensorFlow splits a partial global batch evenly over the replicas
    (`[3, 2]` for 5 rows on 2), so a final batch with fewer rows than
    replicas leaves a replica an empty batch, which some kernels (oneDNN
    Conv2D + BatchNorm) cannot run. Such a batch (fewer than `replicas`
    examples, reshuffled each pass) is dropped; `static_shapes` (TPU, XLA)
    always drops it.
    """
    remainder = num_examples % global_batch_size
    return static_shapes or 0 < remainder < replicas


def batches_per_pass(num_examples, global_batch_size, drop_remainder):
    """Batches in one pass over `num_examples` (at least 1)."""
    full, remainder = divmod(num_examples, global_batch_size)
    return max(1, full + (1 if remainder and not drop_remainder else 0))


def eval_batch_size(num_examples, global_batch_size, replicas=1):
    """The largest global evaluation batch <= `global_batch_size` whose final
    batch gives every replica at least one row (see `drop_final_batch`), so
    evaluation sees every example on any number of replicas.

    Raises:
        ValueError: fewer examples than replicas.
    """
    if replicas == 1 or num_examples % global_batch_size == 0:
        return global_batch_size
    if num_examples < replicas:
        raise ValueError(f"{num_examples} example(s) cannot be spread over {replicas} replicas")
    for batch in range(global_batch_size - global_batch_size % replicas, 0, -replicas):
        if num_examples % batch == 0 or num_examples % batch >= replicas:
            return batch
    return replicas


def raw_inputs(split, limit=None):
    """The split's raw inputs (no labels), e.g. for export parity checks."""
    ds = split.dataset.map(lambda x, y: x)
    return ds.take(limit) if limit else ds
