"""Few-shot text classification, SetFit's recipe: contrastive pairs first, then the head.

SetFit (Tunstall et al., 2022, "Efficient Few-Shot Learning Without
Prompts", arXiv:2209.11055) fine-tunes a sentence encoder on pairs of the
few labelled sentences, then fits a classifier on the tuned encoder's
embeddings. With 8-16 labels per class the encoder sees
`2 x num_iterations x n` pairs instead of `n` examples, and learns to put
sentences of one class close together and of different classes apart.

    labels = kshot.labels_of(split)
    first, second, target = sample_pairs(labels, num_iterations=20, seed=0)
    encoder = builders.features_model(model, heads)   # inputs -> mean-pooled embedding
    report = train_encoder(encoder, split, preprocessor, num_iterations=20, loss="cosine")
    ... then train the head on the (now frozen) encoder's features, as any run ...

Phase 1 (this module) trains the backbone of `model` in place through a
siamese `PairTrainer`: one encoder, both sentences of a pair in one batch,
their mean-pooled embeddings compared by the pair loss. Phase 2 is the
ordinary run (`train.unfreeze.schedule: frozen` and `train.cache_features`),
so the saved model, metrics and SavedModel export are those of any run.
Its head is SetFit's by default: SetFit fits scikit-learn's
`LogisticRegression()` (L2 penalty, C = 1) on the sentence-transformer's
embeddings, which all-MiniLM-L6-v2's pipeline ends by L2-normalising
(`Normalize` module). Under this recipe `heads[].normalize` and
`heads[].l2_c` default (auto) to exactly that: unit-length features and
the penalty `||W||^2 / (2 C n)` on the mean loss (`heads.l2_from_c`).
Trained full batch (`data.batch_size` >= the training examples) for 100
Adam steps at 1e-2, the head matches LogisticRegression's probabilities to
about 0.002 (tests/test_contrastive.py); smaller batches weight the examples
unequally from step to step and land near, not on, that optimum.

Pairs: as SetFit's original sampler (the paper's, setfit < 1.0 with
`num_iterations`), every example anchors one positive and one negative pair
per iteration, partners drawn at random; unlike it, a positive partner is
never the example itself (setfit 0.x could draw it; a self-pair has cosine
1 already and teaches nothing). setfit >= 1.0 cycles through a shuffled
list of the distinct same-class (self-pairs included) and different-class
pairs instead, to the same `2 x num_iterations x n` count.
"""

import os
import time

import numpy as np

from tftransfer.errors import UserError

# train.contrastive.loss (see `pair_loss`).
PAIR_LOSSES = ("cosine", "contrastive")
# Pairs (a seeded sample) on which the loss is measured before and after training, in inference mode.
PROBE_PAIRS = 256
# AdamW weight decay of phase 1 (sentence-transformers' default, which SetFit uses).
WEIGHT_DECAY = 0.01
# Files of phase 1 in its work-dir folder (tftransfer.workdir.CONTRASTIVE): a resumed run reloads them.
ENCODER_WEIGHTS = "backbone.weights.h5"
REPORT = "report.json"


def sample_pairs(labels, num_iterations, seed):
    """SetFit's pair sampler: every iteration gives every example one positive and one negative pair.

    For example i of class c, the positive partner is drawn from the other
    examples of class c (i itself only when it is its class's only
    example), the negative partner from the examples of other classes, both
    uniformly with the generator seeded by `seed`.

    Args:
        labels: int array of class ids, one per example.
        num_iterations: int >= 1. SetFit's `num_iterations` (default 20).
        seed: int.

    Returns:
        `(first, second, target)`: int arrays of example positions and a
        float32 array, 1.0 for a same-class pair and 0.0 otherwise;
        `2 x num_iterations x len(labels)` pairs, half of each kind.

    Example:
    ```python
    first, second, target = sample_pairs([0, 0, 1, 1], num_iterations=2, seed=0)
    len(target), int(target.sum())   # (16, 8)
    ```
    """
    labels = np.asarray(labels, dtype="int64")
    if num_iterations < 1:
        raise UserError(f"sample_pairs: num_iterations must be >= 1. Received: num_iterations={num_iterations}.")
    if len(np.unique(labels)) < 2:
        raise UserError(f"train.recipe contrastive needs examples of at least 2 classes for negative pairs; "
                        f"the training data has {len(np.unique(labels))}.")
    rng = np.random.default_rng(seed)
    n = len(labels)
    first = np.tile(np.arange(n), num_iterations)
    positive = np.empty_like(first)
    negative = np.empty_like(first)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        others = np.flatnonzero(labels != c)
        rows = np.flatnonzero(labels[first] == c)
        if len(members) > 1:  # a partner other than itself: offset 1..len-1 within the class
            own = np.searchsorted(members, first[rows])
            offsets = rng.integers(1, len(members), size=len(rows))
            positive[rows] = members[(own + offsets) % len(members)]
        else:
            positive[rows] = members[0]
        negative[rows] = others[rng.integers(0, len(others), size=len(rows))]
    ones, zeros = np.ones(len(first), "float32"), np.zeros(len(first), "float32")
    return (np.concatenate([first, first]), np.concatenate([positive, negative]),
            np.concatenate([ones, zeros]))


def pair_loss(name, margin=0.5):
    """The similarity loss `fn(u, v, target) -> per-pair loss` of two embedding batches.

    - `cosine`: SetFit's default, sentence-transformers' CosineSimilarityLoss:
      `(cos(u, v) - target)^2`, pulling same-class pairs to cosine 1 and
      others to 0 (orthogonal).
    - `contrastive`: Hadsell et al. (2006) on the cosine distance
      `d = 1 - cos(u, v)`, as sentence-transformers' ContrastiveLoss:
      `0.5 * (target * d^2 + (1 - target) * max(0, margin - d)^2)`. Negative
      pairs stop contributing once they are `margin` apart, so classes that
      are already separated are not pushed further (the cosine loss keeps
      pulling every negative pair to exactly 0).

    Raises:
        UserError: an unknown name.
    """
    from keras import ops

    if name not in PAIR_LOSSES:
        raise UserError(f"train.contrastive.loss must be one of {', '.join(PAIR_LOSSES)}. Received: {name!r}.")

    def cosine(u, v):
        unit_u = u / ops.sqrt(ops.maximum(ops.sum(ops.square(u), axis=-1, keepdims=True), 1e-12))
        unit_v = v / ops.sqrt(ops.maximum(ops.sum(ops.square(v), axis=-1, keepdims=True), 1e-12))
        return ops.sum(unit_u * unit_v, axis=-1)

    if name == "cosine":
        return lambda u, v, target: ops.square(cosine(u, v) - target)

    def contrastive(u, v, target):
        d = 1.0 - cosine(u, v)
        return 0.5 * (target * ops.square(d) + (1.0 - target) * ops.square(ops.relu(margin - d)))

    return contrastive


def _pair_trainer_class():
    import keras
    from keras import ops

    class PairTrainer(keras.Model):
        """Siamese training of `encoder`: inputs `(first, second)`, target 1.0 / 0.0 per pair.

        Both sentences of a batch run through the one encoder together (a
        batch of 2 x pairs), so its weights get the gradient of both sides.
        `fit` / `evaluate` report the mean pair loss as `loss`.

        Args:
            encoder: keras.Model. Preprocessed inputs -> `{name: (batch, dim)}`
                with a single output (`tftransfer.builders.features_model`).
            loss: str. One of `PAIR_LOSSES`. Defaults to `"cosine"`.
            margin: float. The `contrastive` loss's margin. Defaults to 0.5.
        """

        def __init__(self, encoder, loss="cosine", margin=0.5, **kwargs):
            super().__init__(**kwargs)
            self.encoder = encoder
            self.pair_loss = pair_loss(loss, margin)

        def call(self, inputs, training=False):
            first, second = inputs
            both = {k: ops.concatenate([first[k], second[k]], axis=0) for k in first}
            (embeddings,) = self.encoder(both, training=training).values()
            u, v = ops.split(embeddings, 2, axis=0)
            return u, v

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            u, v = y_pred
            return ops.mean(self.pair_loss(u, v, ops.cast(y, u.dtype)))

    return PairTrainer


def PairTrainer(encoder, loss="cosine", margin=0.5, **kwargs):
    """A `keras.Model` that trains `encoder` on sentence pairs (see `_pair_trainer_class`)."""
    return _pair_trainer_class()(encoder, loss=loss, margin=margin, **kwargs)


def _tokenized(split, preprocessor):
    """Every example of `split` preprocessed, `{name: array (n, ...)}`, and its labels, in order."""
    from tftransfer.data.array_cache import preprocessed_inputs

    parts, labels = [], []
    for x, y in preprocessed_inputs(split, preprocessor, 256, with_labels=True).as_numpy_iterator():
        parts.append(x)
        labels.append(y)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, np.concatenate(labels)


def _pair_dataset(inputs, first, second, target, batch_size, shuffle_seed=None):
    import tensorflow as tf

    table = {k: tf.constant(v) for k, v in inputs.items()}
    ds = tf.data.Dataset.from_tensor_slices((first, second, target))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(target), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(
        lambda i, j, t: (({k: tf.gather(v, i) for k, v in table.items()},
                          {k: tf.gather(v, j) for k, v in table.items()}), t),
        num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def train_encoder(encoder, split, preprocessor, *, num_iterations=20, loss="cosine", margin=0.5, epochs=1,
                  learning_rate=2e-5, batch_size=16, seed=0, strategy=None, verbose=0):
    """Phase 1: train `encoder`'s weights in place on SetFit pairs of `split`.

    The optimizer is AdamW (weight decay 0.01) with a linear warm-up from
    `learning_rate / 32` over the first 10% of steps and a linear decay back
    after (`SlantedTriangular`; sentence-transformers' WarmupLinear, which
    SetFit uses, warms up from and decays to 0). The loss is
    measured in inference mode on a seeded sample of `PROBE_PAIRS` pairs
    before and after training.

    Args:
        encoder: keras.Model. Preprocessed inputs -> one pooled embedding.
        split: `tftransfer.data.Split` of `(text, class id)` examples.
        preprocessor: the backbone's text preprocessor.
        num_iterations, loss, margin, epochs, learning_rate, batch_size:
            see `tftransfer.config.ContrastiveConfig`.
        seed: int. Pairs and their order.
        strategy: `tf.distribute.Strategy` to build the trainer in. Defaults to the current one.
        verbose: Keras `fit` verbosity.

    Returns:
        dict for metrics.json: pairs (positive / negative), loss name,
        `loss_before` / `loss_after` (probe pairs), `epoch_losses` (training
        mean per epoch), steps, seconds.
    """
    import contextlib

    import keras

    from tftransfer.schedules import SlantedTriangular

    inputs, labels = _tokenized(split, preprocessor)
    first, second, target = sample_pairs(labels, num_iterations, seed)
    probe = np.random.default_rng(seed).permutation(len(target))[:PROBE_PAIRS]
    probe_ds = _pair_dataset(inputs, first[probe], second[probe], target[probe], batch_size)
    train_ds = _pair_dataset(inputs, first, second, target, batch_size, shuffle_seed=seed)
    steps = epochs * -(-len(target) // batch_size)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        trainer = PairTrainer(encoder, loss=loss, margin=margin, name="pair_trainer")
        optimizer = keras.optimizers.AdamW(SlantedTriangular(learning_rate, total_steps=steps),
                                           weight_decay=WEIGHT_DECAY)
        trainer.compile(optimizer=optimizer)
    start = time.perf_counter()
    before = trainer.evaluate(probe_ds, verbose=0, return_dict=True)["loss"]
    history = trainer.fit(train_ds, epochs=epochs, verbose=verbose, shuffle=False)  # train_ds is shuffled (seeded)
    after = trainer.evaluate(probe_ds, verbose=0, return_dict=True)["loss"]
    return {"pairs": int(len(target)), "positive_pairs": int(target.sum()),
            "negative_pairs": int(len(target) - target.sum()), "num_iterations": num_iterations,
            "loss": loss, "loss_before": float(before), "loss_after": float(after),
            "epoch_losses": [float(v) for v in history.history["loss"]], "steps": int(steps),
            "seconds": round(time.perf_counter() - start, 1)}


def run_phase(encoder, backbone_model, split, preprocessor, out_dir, **kwargs):
    """`train_encoder` once per work dir: the tuned backbone weights and the
    report are kept in `out_dir`, and a resumed run loads them instead of
    training again (phase 2's cached features are keyed by these weights).

    Returns:
        The report of `train_encoder` (with `"resumed": True` when loaded).
    """
    from absl import logging

    from tftransfer import workdir

    weights, report_path = os.path.join(out_dir, ENCODER_WEIGHTS), os.path.join(out_dir, REPORT)
    if os.path.isfile(report_path) and os.path.isfile(weights):
        backbone_model.load_weights(weights)
        report = {**workdir.read_json(report_path), "resumed": True}
        logging.info("contrastive phase: resumed from %s", out_dir)
        return report
    report = train_encoder(encoder, split, preprocessor, **kwargs)
    logging.info("contrastive phase: %d pairs (%d positive, %d negative), %s loss %.4f -> %.4f in %.1fs",
                 report["pairs"], report["positive_pairs"], report["negative_pairs"], report["loss"],
                 report["loss_before"], report["loss_after"], report["seconds"])
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f"tmp-{os.getpid()}.weights.h5")
    backbone_model.save_weights(tmp)
    os.replace(tmp, weights)
    workdir.write_json(report_path, report)  # last: its presence means the phase finished
    return report


def check_applicable(modality, num_workers=1, tpu=False):
    """UserError unless phase 1 can run: a text backbone, one worker, no TPU."""
    if modality != "text":
        raise UserError(f"train.recipe contrastive trains a sentence encoder on text pairs (SetFit); the backbone "
                        f"is an {modality} model. Use a BERT-family text backbone, or train.recipe finetune.")
    if num_workers > 1 or tpu:
        raise UserError("train.recipe contrastive runs on one machine (one_device or mirrored strategy); "
                        "set distribute.strategy to auto / mirrored without TF_CONFIG, or train.recipe finetune.")
