"""`python -m tftransfer.pretrain`: domain-adaptive masked-LM pretraining, then fine-tuning from it."""

import json
import os
import random

import numpy as np

from conftest import run_cli

WORDS = "the patient was given aspirin for chest pain and the doctor ordered an ecg scan after surgery".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS))


def test_masked_lm_loss_falls_and_the_adapted_preset_fine_tunes(tmp_path):
    rng = random.Random(0)
    # A corpus with structure to learn: fixed phrases with one word varied.
    phrases = ["the patient was given aspirin for chest pain", "the doctor ordered an ecg scan after surgery"]
    lines = []
    for _ in range(160):
        words = rng.choice(phrases).split()
        words[rng.randrange(len(words))] = rng.choice(WORDS)
        lines.append(" ".join(words))
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    config = tmp_path / "dapt.yaml"
    config.write_text(f"""
name: dapt_tiny
backbone:
  spec: {{architecture: bert, vocabulary: {VOCAB}, num_layers: 1, num_heads: 2, hidden_dim: 16,
         intermediate_dim: 32, max_sequence_length: 16}}
  sequence_length: 12
data: {{batch_size: 32}}
train: {{epochs: 4, learning_rate: 0.01, optimizer: adam, verbose: 0}}
pretrain: {{corpus: [{tmp_path / 'corpus.txt'}], validation_fraction: 0.2}}
""")
    W = tmp_path / "dapt"
    result = run_cli("tftransfer.pretrain", f"--config={config}", f"--workdir={W}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.load(open(W / "metrics.json"))
    losses = [e["loss"] for e in metrics["history"]]
    assert losses[-1] < losses[0] * 0.9, losses
    assert metrics["validation"]["loss"] < metrics["validation_before"]["loss"]
    assert metrics["num_train_texts"] == 128 and metrics["num_validation_texts"] == 32
    assert not (W / "backup").exists()

    # The adapted backbone is a local preset: its weights moved, and it fine-tunes.
    import tftransfer

    adapted = tftransfer.load_backbone(str(W / "backbone_preset"), sequence_length=12)
    assert adapted.modality == "text" and adapted.preprocessor.tokenizer.get_vocabulary() == VOCAB
    (tmp_path / "labels.csv").write_text("text,label\n" + "".join(
        f"{p},{i}\n" for i, p in enumerate(phrases) for _ in range(6)))
    fine = tmp_path / "fine.yaml"
    fine.write_text(f"""
backbone: {{preset: {W / 'backbone_preset'}, sequence_length: 12}}
heads: [{{pooling: mean}}]
data: {{source: csv, train_path: {tmp_path / 'labels.csv'}, batch_size: 6}}
train: {{epochs: 1, verbose: 0}}
export: {{saved_model: false}}
""")
    result = run_cli("tftransfer.train", f"--config={fine}", f"--workdir={tmp_path / 'fine'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.load(open(tmp_path / "fine" / "metrics.json"))["backbone"]["pretrained"] is True
    # No corpus: one line.
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace(f"corpus: [{tmp_path / 'corpus.txt'}]", "corpus: [/no/such.txt]"))
    result = run_cli("tftransfer.pretrain", f"--config={bad}", f"--workdir={tmp_path / 'bad'}")
    assert result.returncode == 2 and "pretrain.corpus.0 '/no/such.txt': no such file" in result.stderr
    assert not (tmp_path / "bad").exists()
