"""LoRA: frozen base, adapter + head artefact with a base hash, merged export, resume."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tftransfer
from tftransfer import config as config_lib
from tftransfer import lora
from tftransfer.backbones import save_backbone_preset
from tftransfer.errors import UserError
from tftransfer.heads import HeadSpec

from conftest import TINY_RESNET, kill_after_first_backup_then_resume, minilm_dir, run_cli, tiny_bert_spec
from sentiment_data import HELD_OUT, TRAIN

SPEC = tiny_bert_spec()


def ids_of(loaded, texts):
    return {k: np.asarray(v).astype("int32") for k, v in loaded.preprocessor(tf.constant(texts)).items()}


@pytest.fixture(scope="module")
def bert_preset(tmp_path_factory):
    keras.utils.set_random_seed(0)
    path = str(tmp_path_factory.mktemp("base") / "tiny_bert")
    save_backbone_preset(tftransfer.load_backbone(spec=SPEC, sequence_length=16), path)
    return path


def test_fit_moves_only_adapters_and_heads_and_counts_match_the_formula(bert_preset, tmp_path):
    keras.utils.set_random_seed(1)
    loaded = tftransfer.load_backbone(preset=bert_preset, sequence_length=16)
    heads = [HeadSpec(num_classes=2)]
    model = tftransfer.build_model(loaded, heads)
    base_before = {v.path: v.numpy().copy() for v in loaded.model.weights}
    head_before = {v.path: v.numpy().copy() for v in model.get_layer("label").weights}
    rank = 4
    layers = lora.enable_lora(loaded.model, rank, alpha=8)
    # BERT query/value EinsumDense kernels are (hidden, heads, head_dim): a rank-r update of the
    # flattened (hidden, heads * head_dim) matrix, A (hidden, r) + B (r, heads, head_dim) per target
    # (Hu et al.), 2 targets x num_layers; + the Dense head.
    hidden, n_heads = SPEC["hidden_dim"], SPEC["num_heads"]
    per_target = rank * (hidden + hidden)
    assert len(layers) == 2 * SPEC["num_layers"]
    assert all(l.lora_kernel_a.shape == (hidden, rank) for l in layers)
    assert all(l.lora_kernel_b.shape == (rank, n_heads, hidden // n_heads) for l in layers)
    expected = 2 * SPEC["num_layers"] * per_target + (hidden * 2 + 2)
    assert lora.count_params(model.trainable_weights) == expected

    x = ids_of(loaded, [t for t, _ in TRAIN])
    y = np.array([l for _, l in TRAIN])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss={"label": "sparse_categorical_crossentropy"})
    model.fit(x, {"label": y}, epochs=2, batch_size=8, verbose=0)
    for v in loaded.model.weights:
        if lora.is_lora_weight(v):
            continue
        np.testing.assert_array_equal(v.numpy(), base_before[v.path], err_msg=v.path)  # bit-identical
    assert all(not np.array_equal(v.numpy(), head_before[v.path]) for v in model.get_layer("label").weights)
    assert all(np.abs(l.lora_kernel_b.numpy()).max() > 0 for l in layers)  # B starts at zero
    # The trained update is a rank-r matrix of the flattened projection, and the layer computes
    # with exactly the merged kernel.
    query = layers[0]
    update = (lora.merged_kernel(query) - query._kernel).numpy().reshape(hidden, hidden)
    assert np.linalg.matrix_rank(update, tol=1e-6) <= rank and np.abs(update).max() > 0
    h = np.random.RandomState(0).rand(2, 5, hidden).astype("float32")
    np.testing.assert_allclose(query(h).numpy(), (np.einsum(query.equation, h, lora.merged_kernel(query).numpy())
                                                   + query.bias.numpy()), atol=1e-5)

    # While training (BackupAndRestore), every weight is checkpointed as is; after, a plain layer's two.
    lora.raw_checkpoints([query], True)
    store = {}
    query.save_own_variables(store)
    assert len(store) == 4 and np.array_equal(store["2"], query.lora_kernel_a.numpy())
    lora.raw_checkpoints([query], False)
    store = {}
    query.save_own_variables(store)
    assert sorted(store) == ["0", "1"]

    # model.save stores the merged kernels: it reloads as a plain model with the same outputs.
    path = os.path.join(str(tmp_path), "m.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert not [v.path for v in reloaded.weights if lora.is_lora_weight(v)]
    np.testing.assert_allclose(reloaded(x)["label"].numpy(), model(x)["label"].numpy(), atol=1e-5)


def test_resnet_default_adapts_every_conv(tmp_path):
    loaded = tftransfer.load_backbone(spec=dict(TINY_RESNET), image_size=16)
    model = tftransfer.build_model(loaded, [HeadSpec(num_classes=3)])
    convs = [l for l in loaded.model._flatten_layers() if isinstance(l, keras.layers.Conv2D)]
    layers = lora.enable_lora(loaded.model, 2)
    assert sorted(l.name for l in layers) == sorted(l.name for l in convs)
    expected = sum(2 * (int(np.prod(l._kernel.shape[:-1])) + l._kernel.shape[-1]) for l in convs)
    assert lora.count_params(model.trainable_weights) == expected + 128 * 3 + 3
    with pytest.raises(UserError, match="no layer named 'qurey'"):
        lora.resolve_targets(loaded.model, ["qurey"])


def test_minilm_hf_checkpoint_gets_query_value_adapters():
    loaded = tftransfer.load_backbone(preset=minilm_dir(), sequence_length=16)
    model = tftransfer.build_model(loaded, [HeadSpec(num_classes=4, pooling="mean")])
    assert type(loaded.model).__name__ == "HFBertBackbone"
    layers = lora.enable_lora(loaded.model, 8)
    assert {l.name for l in layers} == {"query", "value"} and len(layers) == 12
    adapters = lora.count_params([v for v in loaded.model.weights if lora.is_lora_weight(v)])
    # A rank-8 update of each flattened 384 x (12 heads x 32) kernel: A (384, 8), B (8, 12, 32).
    assert adapters == 12 * 8 * (384 + 384)
    assert lora.count_params(model.trainable_weights) == adapters + 384 * 4 + 4
    backbone = lora.count_params([v for v in loaded.model.weights if not lora.is_lora_weight(v)])
    assert adapters / backbone <= 0.01  # the budget for rank 8 (0.32%)


def test_config_refuses_unfreeze_distill_and_random_init():
    with pytest.raises(UserError, match="train.lora with train.unfreeze"):
        config_lib.load_config(text="backbone: {preset: x}\ntrain: {lora: {rank: 4}, unfreeze: {schedule: gradual}}")
    with pytest.raises(UserError, match="train.lora with distill"):
        config_lib.load_config(text="backbone: {preset: x}\ntrain: {lora: {}}\ndistill: {teacher: x}")
    with pytest.raises(UserError, match="targets must be default or a list"):
        config_lib.load_config(text="backbone: {preset: x}\ntrain: {lora: {targets: all}}")
    cfg = config_lib.load_config(text="backbone: {spec: {architecture: resnet}}\ntrain: {lora: {}}")
    with pytest.raises(UserError, match="needs a pretrained base"):
        lora.base_spec(cfg.backbone)


FRESH = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    spec = json.load(open(sys.argv[1]))
    loaded = tf.saved_model.load(spec["path"])
    names = [v.name for v in loaded.variables]
    x = tf.constant(np.array(spec["image"], "float32"))
    out = loaded.signatures["serve_preprocessed"](image=x)["probabilities"].numpy()
    print(json.dumps({"names": names, "probabilities": out.tolist(),
                      "keras_hub": "keras_hub" in sys.modules, "tftransfer": "tftransfer" in sys.modules}))
""")


def test_best_epoch_restored_after_fit_keeps_its_adapters(bert_preset, tmp_path):
    """`train.keep: best` loads the best epoch's weights after `fit`; they were
    written raw (base, bias, A, B). Read back Keras' merged way instead, the
    adapters were zeroed and the run shipped the frozen base + head."""
    from tftransfer import epoch_selection

    keras.utils.set_random_seed(4)
    cfg = config_lib.load_config(
        text=f"backbone: {{preset: {bert_preset}, sequence_length: 16}}\ntrain: {{lora: {{rank: 4, alpha: 8}}}}")
    loaded = tftransfer.load_backbone(preset=bert_preset, sequence_length=16)
    model = tftransfer.build_model(loaded, [HeadSpec(num_classes=2)])
    adapters = lora.apply_from_config(cfg, loaded, model)
    x = ids_of(loaded, [t for t, _ in TRAIN])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss={"label": "sparse_categorical_crossentropy"})
    record, best = str(tmp_path / "history.json"), str(tmp_path / "best.weights.h5")
    snapshots = []

    class Snapshot(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            snapshots.append([v.numpy().copy() for v in self.model.weights])

    # mode "max" on a falling loss: epoch 1 is the best, epochs 2-3 are not.
    model.fit(x, {"label": np.array([l for _, l in TRAIN])}, epochs=3, batch_size=8, verbose=0,
              callbacks=[adapters, epoch_selection.EpochRecord(record, best, monitor="loss", mode="max"),
                         Snapshot()])
    selected, _ = epoch_selection.select(model, "best", record, best)
    assert selected == 1
    trained_b = [v for v in model.weights if "lora_kernel_b" in v.path]
    assert trained_b and all(np.abs(v.numpy()).max() > 0 for v in trained_b)  # adapters not zeroed
    for v, expected in zip(model.weights, snapshots[0]):
        np.testing.assert_array_equal(v.numpy(), expected, err_msg=v.path)
    # Then the model saves Keras' way: merged kernels, no LoRA variables in model.keras.
    adapters.merged_checkpoints()
    path = str(tmp_path / "m.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert not [v.path for v in reloaded.weights if lora.is_lora_weight(v)]
    np.testing.assert_allclose(reloaded(x)["label"].numpy(), model(x)["label"].numpy(), atol=1e-5)


def test_text_artefact_reloads_onto_a_fresh_base_and_merges(bert_preset, tmp_path):
    keras.utils.set_random_seed(3)
    cfg = config_lib.load_config(
        text=f"backbone: {{preset: {bert_preset}, sequence_length: 16}}\ntrain: {{lora: {{rank: 4, alpha: 8}}}}")
    loaded = tftransfer.load_backbone(preset=bert_preset, sequence_length=16)
    heads = [HeadSpec(num_classes=2, class_names=("negative", "positive"))]
    model = tftransfer.build_model(loaded, heads)
    adapters = lora.apply_from_config(cfg, loaded, model)
    x = ids_of(loaded, [t for t, _ in TRAIN])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss={"label": "sparse_categorical_crossentropy"})
    model.fit(x, {"label": np.array([l for _, l in TRAIN])}, epochs=2, batch_size=8, verbose=0,
              callbacks=[adapters])
    directory = adapters.save(str(tmp_path), heads)
    assert sorted(os.listdir(directory)) == ["adapter.json", "weights.npz"]
    ids = ids_of(loaded, [t for t, _ in HELD_OUT[:6]])
    expected = model(ids)["label"].numpy()

    fresh, _, _, info = lora.load_adapter_model(directory)  # base reloaded from the preset dir
    assert info["base"]["preset"] == bert_preset and info["params"]["trainable"] == lora.count_params(
        model.trainable_weights)
    np.testing.assert_allclose(fresh(ids)["label"].numpy(), expected, atol=1e-6)
    # An artefact of format 1 (per-head adapters) is refused with one line.
    old = tmp_path / "v1"
    old.mkdir()
    info_v1 = json.load(open(os.path.join(directory, "adapter.json")))
    (old / "adapter.json").write_text(json.dumps({**info_v1, "format_version": 1}))
    (old / "weights.npz").write_bytes(open(os.path.join(directory, "weights.npz"), "rb").read())
    with pytest.raises(UserError, match="has format_version 1; this tftransfer reads 2"):
        lora.load_adapter_model(str(old))
    plain = lora.merge(fresh)
    assert not [v.path for v in plain.weights if "lora" in v.path]
    assert not any(getattr(l, "lora_enabled", False) for l in plain._flatten_layers())
    np.testing.assert_allclose(plain(ids)["label"].numpy(), expected, atol=1e-5)


def test_killed_lora_run_resumes_exports_merged_and_refuses_a_changed_base(tmp_path):
    keras.utils.set_random_seed(0)
    preset = str(tmp_path / "tiny_resnet")
    save_backbone_preset(tftransfer.load_backbone(spec=dict(TINY_RESNET), image_size=16), preset)
    config = tmp_path / "c.yaml"
    config.write_text(f"""
backbone: {{preset: {preset}, image_size: 16}}
data: {{source: digits, digits: {{classes: [0, 1, 2]}}, train_per_class: 20, batch_size: 20}}
train: {{epochs: 8, optimizer: adam, verbose: 0, lora: {{rank: 2}}}}
export: {{saved_model: false}}
""")
    W = str(tmp_path / "w")
    args = [sys.executable, "-m", "tftransfer.train", f"--config={config}", f"--workdir={W}"]
    result = kill_after_first_backup_then_resume(args, W)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(resuming)" in result.stderr and "LoRA rank 2" in result.stderr
    metrics = json.load(open(os.path.join(W, "metrics.json")))
    assert metrics["resumed_at_step"] > 0 and metrics["epochs"] == 8  # resumed, and every epoch recorded
    assert os.path.isfile(os.path.join(W, "lora", "adapter.json"))

    # Export from the artefact: adapters merged, no LoRA variables, same outputs in plain TensorFlow.
    model, loaded, _, _ = lora.load_adapter_model(os.path.join(W, "lora"))
    image = np.random.RandomState(0).rand(3, 16, 16, 3).astype("float32")
    expected = tf.nn.softmax(model(image)["label"]).numpy()
    proc = run_cli("tftransfer.export", f"--workdir={W}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"path": os.path.join(W, "export", "1"), "image": image.tolist()}))
    fresh = subprocess.run([sys.executable, "-c", FRESH, str(spec)], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    got = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert not got["keras_hub"] and not got["tftransfer"]
    assert got["names"] and not [n for n in got["names"] if "lora" in n]
    np.testing.assert_allclose(np.array(got["probabilities"]), expected, atol=1e-5, rtol=0)

    # A different base under the same name: one line, exit 2, nothing exported.
    keras.utils.set_random_seed(7)
    save_backbone_preset(tftransfer.load_backbone(spec=dict(TINY_RESNET), image_size=16), preset)
    proc = run_cli("tftransfer.export", f"--workdir={W}")
    assert proc.returncode == 2
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "the base changed" in errors[0] and "Traceback" not in proc.stderr
    assert sorted(os.listdir(os.path.join(W, "export"))) == ["1"]
