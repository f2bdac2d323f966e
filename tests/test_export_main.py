"""`python -m tftransfer.export`, `export_workdir`, tools/check_export.py and saved_model_cli."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

import tftransfer
from tftransfer.errors import UserError
from tftransfer.export import export_workdir, save_serving_assets, token_ids_base
from tftransfer.heads import HeadSpec

from conftest import REPO, TINY_RESNET, run_cli, tiny_bert_spec


def make_workdir(path, modality):
    """What `tftransfer.train` leaves: model.keras, preprocessor/, heads.json, config.yaml."""
    keras.utils.set_random_seed(0)
    if modality == "image":
        loaded = tftransfer.load_backbone(spec=dict(TINY_RESNET), image_size=32)
        heads = [HeadSpec(num_classes=3, class_names=("0", "1", "2"))]
    else:
        loaded = tftransfer.load_backbone(spec=tiny_bert_spec(), sequence_length=16)
        heads = [HeadSpec(num_classes=2, class_names=("negative", "positive"))]
    model = tftransfer.build_model(loaded, heads)
    os.makedirs(path, exist_ok=True)
    model.save(os.path.join(path, "model.keras"))
    save_serving_assets(path, loaded, heads)
    with open(os.path.join(path, "config.yaml"), "w") as f:
        yaml.safe_dump({"name": f"{modality}_unit", "train": {"epochs": 1}}, f)
    return str(path), loaded, model


@pytest.fixture(scope="module")
def image_workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("w") / "image", "image")


def test_cli_writes_versions_and_exits_2_on_user_error(image_workdir):
    workdir, _, _ = image_workdir
    proc = run_cli("tftransfer.export", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith(os.path.join(workdir, "export", "1"))
    assert sorted(os.listdir(os.path.join(workdir, "export"))) == ["1"]

    proc = run_cli("tftransfer.export", f"--workdir={workdir}", "--version=1")
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert lines == [f"error: export version '{workdir}/export/1' exists; pass --overwrite or another --version."]
    assert "Traceback" not in proc.stderr


def test_check_export_tool_and_saved_model_cli(image_workdir, tmp_path):
    workdir, _, _ = image_workdir
    base = os.path.join(workdir, "export")
    if not os.path.isdir(os.path.join(base, "1")):
        export_workdir(workdir)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "check_export.py"), base],
                          capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "signature 'serving_default'" in proc.stdout
    assert "input  image_bytes: string (None,)" in proc.stdout
    assert "signature 'serve_preprocessed'" in proc.stdout
    assert proc.stdout.strip().endswith("OK")

    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if not os.path.exists(cli):
        pytest.skip("saved_model_cli is not installed beside this python")
    proc = subprocess.run([cli, "show", "--dir", os.path.join(base, "1"), "--all"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "signature_def['serving_default']" in proc.stdout
    assert "signature_def['serve_preprocessed']" in proc.stdout
    assert "inputs['image_bytes']" in proc.stdout
    assert "outputs['top_k_class_names']" in proc.stdout


def test_export_workdir_text(tmp_path):
    workdir, loaded, model = make_workdir(tmp_path / "text", "text")
    result = export_workdir(workdir)
    assert result["path"] == os.path.join(workdir, "export", "1")
    assert os.path.isdir(os.path.join(token_ids_base(os.path.join(workdir, "export")), "1"))
    served = tf.saved_model.load(result["path"]).signatures["serving_default"]
    sentences = ["the movie was good", "boring !"]
    expected = keras.ops.softmax(model(loaded.preprocessor(tf.constant(sentences)))["label"])
    got = served(text=tf.constant(sentences))["probabilities"]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)

    with open(os.path.join(result["path"], "assets", "tftransfer.json")) as f:
        record = yaml.safe_load(f)
    assert record["config"]["name"] == "text_unit"  # from W/config.yaml
    assert record["backbone"]["architecture"] == "bert"


def test_export_workdir_user_errors(image_workdir, tmp_path):
    workdir, _, _ = image_workdir
    with pytest.raises(UserError, match="--quantize=float16 applies to --format=tflite only"):
        export_workdir(workdir, quantize="float16")
    with pytest.raises(UserError, match="--format must be saved_model or tflite"):
        export_workdir(workdir, format="onnx")
    with pytest.raises(UserError, match="is not a directory"):
        export_workdir(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"model.keras' is missing: train first"):
        export_workdir(str(empty))
    old = tmp_path / "old"
    old.mkdir()
    os.link(os.path.join(workdir, "model.keras"), old / "model.keras")
    with pytest.raises(UserError, match=r"heads.json' is missing"):
        export_workdir(str(old))


def test_export_workdir_text_keras_int8_saved_model_measures_and_serves(tmp_path):
    workdir, loaded, model = make_workdir(tmp_path / "text_int8", "text")
    sentences = ["the movie was good", "boring !", "a great film", "not fun", "awful movie", "very good"]
    ids = {k: np.asarray(v).astype("int32") for k, v in loaded.preprocessor(tf.constant(sentences)).items()}
    float_classes = np.argmax(keras.ops.convert_to_numpy(model(ids)["label"]), -1)
    validation = [(ids, {"label": float_classes})]  # labels = float predictions: float accuracy is 1
    result = export_workdir(workdir, quantize="int8", validation_data=validation, max_accuracy_drop=1.0)
    record = result["accuracy"]
    assert record["float"]["label"] == 1.0 and record["quantize"] == "int8"
    twin = os.path.join(token_ids_base(os.path.join(workdir, "export")), "1")
    served = tf.saved_model.load(twin).signatures["serving_default"]
    got = served(**{k: tf.constant(v) for k, v in ids.items()})["probabilities"].numpy()
    expected = keras.ops.convert_to_numpy(keras.ops.softmax(model(ids)["label"]))
    assert np.abs(got - expected).max() < 0.05  # int8 weights vs the float model
    assert any(v.dtype == tf.int8 for v in tf.saved_model.load(twin).variables)
    with open(os.path.join(result["path"], "assets", "tftransfer.json")) as f:
        assert yaml.safe_load(f)["accuracy"]["quantized"]["label"] == record["quantized"]["label"]
    with pytest.raises(UserError, match="leaves Conv2D layers in float32"):
        export_workdir(make_workdir(tmp_path / "image_int8", "image")[0], quantize="int8")
