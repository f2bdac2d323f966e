"""Domain-adaptive pretraining: `python -m tftransfer.pretrain`.

    python -m tftransfer.pretrain --config=configs/dapt_minilm.yaml --workdir=runs/dapt
    python -m tftransfer.train --config=configs/x.yaml --config.backbone.preset=runs/dapt/backbone_preset ...

Continues the masked-language-model pretraining of a BERT-family backbone on
unlabelled text from the target domain ("domain-adaptive pretraining",
Gururangan et al., 2020, "Don't Stop Pretraining"), then saves the adapted
backbone with its tokenizer as a keras-hub preset directory,
`W/backbone_preset/`, which `backbone.preset` accepts for fine-tuning.
Built on keras-hub's `BertMaskedLM` (its masked-LM head shares the token
embedding) and `BertMaskedLMPreprocessor` (BERT's 15% selection with
80/10/10 mask/random/keep), with the masks drawn anew each epoch (dynamic
masking, as RoBERTa). Works for keras-hub presets, local keras-hub
directories and Hugging Face BERT checkpoints (through the faithful
`tftransfer.hf_bert` loader).

The config is an ordinary experiment (backbone, train, data.batch_size,
distribute) plus a `pretrain` section (`corpus`, `mask_rate`,
`validation_fraction`); `heads` are not used. `W/metrics.json` holds the
masked-LM loss and accuracy on held-out text before and after, and per
epoch. Exit code 2: user error (one line on stderr).
"""

import math
import os

from absl import flags

from tftransfer import cli

FLAGS = flags.FLAGS
cli.define_run_flags(
    config_help="YAML experiment with a pretrain section (see configs/dapt_minilm.yaml). "
    "Override keys with --config.<dotted.key>=<yaml value>.",
    workdir_help="Work directory: config, backup, logs, backbone_preset/, metrics.json.",
)


def main(argv):
    del argv
    import keras
    import keras_hub
    import numpy as np
    import tensorflow as tf

    from tftransfer import experiment, workdir
    from tftransfer.backbones import save_backbone_preset
    from tftransfer.distill.transfer_set import load_transfer_text
    from tftransfer.errors import UserError

    cfg = cli.load_run_config()
    p = cfg.pretrain
    if p is None or not p.corpus:
        raise UserError("pretrain.corpus: list the unlabelled text files (.txt lines, .csv, .jsonl) to pretrain on.")
    if isinstance(cfg.data.input_key, list):
        raise UserError(f"data.input_key {cfg.data.input_key}: pretraining reads one text column of the corpus; "
                        f"set data.input_key to one column name.")
    run = cli.start_run(cfg)  # strategy first; the work dir claimed
    strategy = run.strategy
    corpus = p.corpus if isinstance(p.corpus, list) else [p.corpus]
    texts = []
    for i, path in enumerate(corpus):  # one reader for unlabelled text (the distillation transfer set's)
        split = load_transfer_text(path, cfg.data.input_key or "text", where=f"pretrain.corpus.{i}")
        texts += [t.decode("utf-8") for t, _ in split.dataset.as_numpy_iterator()]
    rng = np.random.default_rng(cfg.train.seed)
    order = rng.permutation(len(texts))
    n_val = int(round(p.validation_fraction * len(texts)))
    if p.validation_fraction and not 1 <= n_val < len(texts):
        raise UserError(f"pretrain.validation_fraction={p.validation_fraction} leaves no text on one side "
                        f"of {len(texts)} examples; change it or add text.")
    val_texts = [texts[i] for i in order[:n_val]]
    train_texts = [texts[i] for i in order[n_val:]]

    with strategy.scope():
        loaded = experiment.backbone_from_config(cfg)
        if not isinstance(loaded.model, keras_hub.models.BertBackbone):
            raise UserError(
                f"pretrain: masked-LM pretraining supports BERT-family backbones "
                f"(keras-hub BertBackbone, Hugging Face BERT/MiniLM); backbone is "
                f"{type(loaded.model).__name__}."
            )
        length = cfg.backbone.sequence_length
        masker = keras_hub.models.BertMaskedLMPreprocessor(
            tokenizer=loaded.preprocessor.tokenizer, sequence_length=length,
            mask_selection_rate=p.mask_rate,
            mask_selection_length=max(1, math.ceil(length * p.mask_rate * 1.5)),
        )
        mlm = keras_hub.models.BertMaskedLM(backbone=loaded.model, preprocessor=None)
        global_batch = cfg.data.batch_size * strategy.num_replicas_in_sync
        steps = max(1, math.ceil(len(train_texts) / global_batch))
        mlm.compile(optimizer=experiment.optimizer(cfg, steps * cfg.train.epochs),
                    weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                    jit_compile=cfg.distribute.jit_compile)

    def batches(items, training):
        ds = tf.data.Dataset.from_tensor_slices(items)
        if training:
            ds = ds.shuffle(len(items), seed=cfg.train.seed, reshuffle_each_iteration=True)
        # Masks are drawn in the pipeline, so every epoch masks other tokens.
        return ds.batch(global_batch).map(masker, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    val_ds = batches(val_texts, False) if val_texts else None
    run.begin(f"{cfg.name}: masked-LM pretraining on {len(train_texts)} texts ({len(val_texts)} held out), "
              f"global batch {global_batch}")
    before = _evaluate(mlm, val_ds) if val_ds is not None and not run.resuming else None
    # The shared run loop: step backups (mid-epoch resume), divergence stop, TensorBoard, chief-only writes.
    result = run.fit(mlm, lambda: batches(train_texts, True), val_ds, steps, checkpoint=False)
    from tftransfer.callbacks import check_finite_weights

    check_finite_weights(loaded.model, "pretrain")
    save_backbone_preset(loaded, run.path(workdir.BACKBONE_PRESET))
    history = result.history
    seconds = result.seconds
    metrics = {
        "history": [{"epoch": i + 1, **{k: float(v[i]) for k, v in history.items()}}
                    for i in range(len(history.get("loss", [])))],
        "train_seconds": seconds,
        "resumed_at_step": result.resumed_at_step,
        "num_train_texts": len(train_texts),
        "num_validation_texts": len(val_texts),
        "backbone": loaded.description,
        "backbone_preset": os.path.join(run.workdir, workdir.BACKBONE_PRESET),
    }
    if val_ds is not None:
        metrics["validation_before"] = before
        metrics["validation"] = _evaluate(mlm, val_ds)
    run.finish(metrics)
    summary = metrics.get("validation") or metrics["history"][-1]
    print(f"{cfg.name}: masked-LM done in {seconds:.1f}s; " + ", ".join(
        f"{k}={v:.4f}" for k, v in sorted(summary.items()) if k != "epoch")
        + f"; adapted backbone: {metrics['backbone_preset']}")


def _evaluate(model, ds):
    return {k: float(v) for k, v in model.evaluate(ds, return_dict=True, verbose=0).items()}


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
