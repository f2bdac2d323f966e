"""Mixed precision and XLA through the CLI, and the TPU train step compiled
with XLA on CPU (tftransfer.distribute settings as `train` applies them).

Kept apart from test_distribute.py so that pytest-xdist (`--dist loadfile`)
can run these slow CLI tests beside the rest."""

import json
import os

import pytest

from tftransfer import distribute

from conftest import TINY_DIGITS_YAML


TEXT_YAML = """
name: tiny_text
backbone:
  spec: {architecture: bert, vocabulary: ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"],
         num_layers: 1, num_heads: 2, hidden_dim: 16, intermediate_dim: 16, max_sequence_length: 16}
  sequence_length: 8
data: {source: csv, train_path: TRAIN, batch_size: 8}
train: {epochs: 1, steps_per_epoch: 2, verbose: 0}
"""


# Every distribute.precision x distribute.jit_compile combination trains a tiny
# config through the CLI: float32 without XLA is the default of every other
# CLI test (tiny image: test_train, test_evaluate, ...; tiny text:
# test_train's multi-task run, test_export_main); the other five run here.
# Every mixed combination trains the image model; the text model trains
# under float32 + XLA and under each mixed precision once (with its export).
# (The XLA train step of both is also compiled in-process by the TPU test
# below.) The serving export (float32 probabilities summing to 1, image and
# text) is checked once per mixed precision, and `distill` runs (image) under
# mixed_float16 + XLA: loss scaling, teacher and student in one compiled step.
@pytest.mark.parametrize("precision, jit, extra, modalities", [
    ("float32", True, None, ("text",)),
    ("mixed_float16", False, "export", ("image", "text")), ("mixed_float16", True, "distill", ("image",)),
    ("mixed_bfloat16", False, None, ("image",)), ("mixed_bfloat16", True, "export", ("image", "text"))])
def test_precision_and_xla_train_image_and_text_through_the_cli(tmp_path, precision, jit, extra, modalities):
    import subprocess
    import sys

    import numpy as np

    from conftest import REPO

    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"{'good film' if i % 2 else 'bad film'},{i % 2}\n" for i in range(24)))
    configs = {"image": TINY_DIGITS_YAML.replace("train: {epochs: 2,", "train: {epochs: 1, steps_per_epoch: 2,"),
               "text": TEXT_YAML.replace("TRAIN", str(train))}
    flags = [f"--config.distribute.precision={precision}", f"--config.distribute.jit_compile={str(jit).lower()}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

    def start(module, name, text, export):
        config = tmp_path / f"{name}.yaml"
        config.write_text(text)
        args = [sys.executable, "-m", module, f"--config={config}", f"--workdir={tmp_path / name}", *flags,
                f"--config.export.saved_model={str(export).lower()}"]
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)

    def finished(proc, name):
        err = proc.communicate(timeout=600)[1]
        assert proc.returncode == 0, err[-3000:]
        metrics = json.load(open(tmp_path / name / "metrics.json"))
        assert (metrics["precision"], metrics["jit_compile"]) == (precision, jit)
        assert np.isfinite(metrics["train"]["loss"]), metrics["train"]
        return metrics

    configs = {name: text for name, text in configs.items() if name in modalities}
    procs = {name: start("tftransfer.train", name, text, extra == "export") for name, text in configs.items()}
    for name, proc in procs.items():
        finished(proc, name)
    if extra == "distill":  # the image run is the teacher
        student = configs["image"] + f"distill: {{teacher: [{tmp_path / 'image'}], cache: none}}\n"
        metrics = finished(start("tftransfer.distill", "student", student, False), "student")
        assert np.isfinite(metrics["train"]["distillation_loss"]), metrics["train"]
    if extra == "export":
        import tensorflow as tf

        for name in configs:
            served = tf.saved_model.load(str(tmp_path / name / "export" / "1"))
            fn = served.signatures["serve_preprocessed"]
            # Ones: 8 [UNK] tokens, all real (an all-zero padding mask would mask every token).
            inputs = {k: tf.ones([3, *(d or 8 for d in v.shape[1:])], v.dtype)
                      for k, v in fn.structured_input_signature[1].items()}
            out = fn(**inputs)
            probabilities = out["probabilities"] if "probabilities" in out else out["label_probabilities"]
            assert probabilities.dtype == tf.float32, name
            np.testing.assert_allclose(probabilities.numpy().sum(-1), 1.0, atol=1e-5)


# The TPU path, proven on CPU: the config's `distribute.strategy: tpu` as
# `train` builds it (experiment.build_training + experiment.pipelines), with
# discriminative learning rates (lr_decay: multipliers inside the update step)
# and the unfreezing callback's start-of-fit setup (optimizer built over every
# variable, multipliers set, stage applied).
TPU_OVERRIDES = ["distribute.strategy=tpu", "distribute.jit_compile=true", "train.unfreeze.lr_decay=0.5"]
# Ops that cannot run inside an XLA cluster on a TPU: strings, tokenisers, Python, printing.
HOST_OPS = ("PyFunc", "EagerPyFunc", "PrintV2", "StringFormat", "RegexSplitWithOffsets",
            "WordpieceTokenizeWithOffsets", "FastWordpieceTokenizeWithOffsets", "CaseFoldUTF8",
            "NormalizeUTF8", "StaticRegexReplace")


@pytest.mark.parametrize("modality", ["image", "text"])
def test_tpu_train_step_compiles_with_xla_and_static_host_tokenised_input(tmp_path, modality):
    import keras
    import numpy as np
    import tensorflow as tf

    from tftransfer import config as config_lib
    from tftransfer import experiment

    if modality == "image":
        text = TINY_DIGITS_YAML
    else:
        train = tmp_path / "train.csv"
        train.write_text("text,label\n" + "".join(f"{'good film' if i % 2 else 'bad film'},{i % 2}\n"
                                                  for i in range(21)))  # 21: a partial final batch
        text = TEXT_YAML.replace("TRAIN", str(train))
    cfg = config_lib.load_config(text=text, overrides=TPU_OVERRIDES + ["distribute.precision=mixed_bfloat16"])
    distribute.set_precision(cfg.distribute.precision)
    try:
        built = experiment.build_training(cfg, tf.distribute.get_strategy())
        model = built.model
        train_ds, val_ds = experiment.pipelines(cfg, built.labelled, built.loaded, built.heads,
                                                cfg.data.batch_size, passes=(0, 1))
        # (a) Static shapes: every element of the training (and validation) batches.
        for ds in (train_ds, val_ds):
            for spec in tf.nest.flatten(ds.element_spec) if ds is not None else []:
                assert spec.shape.is_fully_defined() and spec.dtype != tf.string, spec
        # (c) Tokenisation / decoding is in tf.data, on the host.
        ops = {n.op for f in [tf.compat.v1.GraphDef.FromString(train_ds._as_serialized_graph().numpy())]
               for n in list(f.node) + [n for fn in f.library.function for n in fn.node_def]}
        if modality == "text":
            assert {"RegexSplitWithOffsets", "FastWordpieceTokenizeWithOffsets"} <= ops, " ".join(sorted(ops))
        # The unfreezing callback's fit-start setup: optimizer built, multipliers on.
        cb = built.unfreezing
        cb.set_model(model)
        cb.set_params({"epochs": cfg.train.epochs, "steps": built.steps})
        cb.on_train_begin()
        assert cb.lr_multipliers and min(cb.lr_multipliers.values()) < 1.0
        assert model.jit_compile is True  # Keras' own train function is XLA-compiled too
        # (b) The whole train step (forward, float32 loss, gradients, multiplied
        # updates) compiles with XLA, and runs compiled.
        step = tf.function(model.train_step, jit_compile=True)
        batch = next(iter(train_ds))
        hlo = step.experimental_get_compiler_ir(batch)(stage="hlo")
        assert "HloModule" in hlo and "bf16" in hlo
        graph = step.get_concrete_function(batch).graph.get_operations()
        assert not {op.type for op in graph} & set(HOST_OPS), {op.type for op in graph} & set(HOST_OPS)
        assert not any(t.dtype == tf.string for op in graph for t in op.outputs)
        before = [v.numpy().copy() for v in model.trainable_variables]
        logs = step(batch)
        assert np.isfinite(float(logs["loss"])) and int(model.optimizer.iterations.numpy()) == 1
        moved = [not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables)]
        assert all(moved), f"{moved.count(False)} of {len(moved)} trainable variables did not train"
    finally:
        keras.mixed_precision.set_global_policy("float32")
