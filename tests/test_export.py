"""Serving export: signatures, parity in a fresh process, bad inputs, atomic versions, TFLite."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tftransfer
from tftransfer.errors import UserError
from tftransfer.export import (
    export_saved_model,
    export_tflite,
    load_serving_assets,
    next_version,
    save_serving_assets,
    token_ids_base,
)
from tftransfer.export import saved_model as saved_model_lib
from tftransfer.export import tflite as tflite_lib
from tftransfer.heads import HeadSpec

from conftest import TINY_RESNET, tiny_bert_spec

# float32 end to end: the same ops on the same input (measured ~1e-8).
PARITY = 1e-5
SENTENCES = ["the movie was good", "a very boring film !", "great fun", "not bad"]


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def encoded_images(seed=0):
    """A PNG (40x50) and a JPEG (31x47): other sizes than the model's 32x32."""
    rng = np.random.RandomState(seed)
    png = tf.io.encode_png(rng.randint(0, 256, (40, 50, 3)).astype("uint8")).numpy()
    jpeg = tf.io.encode_jpeg(rng.randint(0, 256, (31, 47, 3)).astype("uint8")).numpy()
    return [png, jpeg]


def host_images(loaded, contents):
    """What training feeds the model for these files (decode -> float 0-255 -> converter)."""
    return np.stack([
        loaded.preprocessor(tf.cast(tf.io.decode_image(c, channels=3, expand_animations=False), tf.float32))
        for c in contents
    ])


def logits(model, x, head="label"):
    return np.asarray(model(x, training=False)[head])


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    keras.utils.set_random_seed(1)
    loaded = tftransfer.load_backbone(spec=dict(TINY_RESNET), image_size=32)
    heads = [HeadSpec(num_classes=3, class_names=("cat", "dog", "fish"))]
    model = tftransfer.build_model(loaded, heads)
    base = str(tmp_path_factory.mktemp("image") / "export")
    path = export_saved_model(model, loaded.preprocessor, "image", heads, base,
                              metadata={"config": {"name": "unit"}})
    return {"loaded": loaded, "heads": heads, "model": model, "base": base, "path": path,
            "serving": tf.saved_model.load(path)}


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    keras.utils.set_random_seed(2)
    loaded = tftransfer.load_backbone(spec=tiny_bert_spec(), sequence_length=16)
    heads = [HeadSpec(num_classes=2, class_names=("negative", "positive"))]
    model = tftransfer.build_model(loaded, heads)
    base = str(tmp_path_factory.mktemp("text") / "export")
    path = export_saved_model(model, loaded.preprocessor, "text", heads, base)
    return {"loaded": loaded, "heads": heads, "model": model, "base": base, "path": path,
            "twin": os.path.join(token_ids_base(base), "1"), "serving": tf.saved_model.load(path)}


@pytest.fixture(scope="module")
def multitask(tmp_path_factory):
    keras.utils.set_random_seed(3)
    loaded = tftransfer.load_backbone(spec=dict(TINY_RESNET), image_size=32)
    heads = [
        HeadSpec(name="species", num_classes=7, class_names=tuple("abcdefg")),
        HeadSpec(name="tags", type="multilabel", num_classes=4, class_names=("wet", "dry", "big", "small")),
        HeadSpec(name="weight", type="regression", num_classes=1),
    ]
    model = tftransfer.build_model(loaded, heads)
    base = str(tmp_path_factory.mktemp("multi") / "export")
    path = export_saved_model(model, loaded.preprocessor, "image", heads, base)
    return {"loaded": loaded, "heads": heads, "model": model, "path": path}


# ---------------------------------------------------------------------------
# Loading needs nothing of ours: a fresh process with plain TensorFlow
# ---------------------------------------------------------------------------

FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf

    spec = json.load(open(sys.argv[1]))
    data = np.load(spec["arrays"])
    contents = [open(p, "rb").read() for p in spec["images"]]
    out = {}
    image = tf.saved_model.load(spec["image"])
    raw = image.signatures["serving_default"](image_bytes=tf.constant(contents))
    out["image_raw"] = raw["probabilities"].numpy()
    out["image_top_k"] = raw["top_k_probabilities"].numpy()
    names = [n.decode() for n in raw["class_name"].numpy()]
    pre = image.signatures["serve_preprocessed"](image=tf.constant(data["image_x"]))
    out["image_pre"] = pre["probabilities"].numpy()
    multi = tf.saved_model.load(spec["multi"]).signatures["serving_default"](image_bytes=tf.constant(contents))
    for key, value in multi.items():
        if value.dtype != tf.string:
            out["multi_" + key] = value.numpy()
    twin = tf.saved_model.load(spec["twin"])
    ids = {k: tf.constant(data[k]) for k in ("token_ids", "segment_ids", "padding_mask")}
    out["twin_default"] = twin.signatures["serving_default"](**ids)["probabilities"].numpy()
    out["twin_pre"] = twin.signatures["serve_preprocessed"](**ids)["probabilities"].numpy()
    before = sorted(m for m in ("tensorflow_text", "keras_hub", "tftransfer") if m in sys.modules)
    import tensorflow_text  # TF Serving needs the TF Text ops too
    full = tf.saved_model.load(spec["text"]).signatures["serving_default"]
    out["text_raw"] = full(text=tf.constant(spec["sentences"]))["probabilities"].numpy()
    # Empty requests on every signature: empty outputs, never a kernel error
    # (oneDNN's fused Conv2D + BatchNorm fails on zero rows).
    empty_ids = {k: tf.zeros((0, data["token_ids"].shape[1]), tf.int32) for k in ids}
    empty = {
        "image_raw": image.signatures["serving_default"](image_bytes=tf.constant([], tf.string)),
        "image_pre": image.signatures["serve_preprocessed"](image=tf.zeros((0,) + data["image_x"].shape[1:])),
        "multi": tf.saved_model.load(spec["multi"]).signatures["serving_default"](
            image_bytes=tf.constant([], tf.string)),
        "twin_default": twin.signatures["serving_default"](**empty_ids),
        "twin_pre": twin.signatures["serve_preprocessed"](**empty_ids),
        "text_raw": full(text=tf.constant([], tf.string)),
    }
    empty = {sig: {k: [list(v.shape), v.dtype.name] for k, v in o.items()} for sig, o in empty.items()}
    np.savez(spec["result"], **out)
    print(json.dumps({"imported_before_text": before, "class_names": names,
                      "multi_keys": sorted(multi), "empty": empty}))
""")


# TensorFlow reads TF_ENABLE_ONEDNN_OPTS when it loads: each setting needs its
# own process. Forcing both makes the result independent of this machine's CPU.
@pytest.mark.parametrize("onednn", ["1", "0"], ids=["onednn_on", "onednn_off"])
def test_fresh_process_plain_tensorflow_gets_same_predictions(image, text, multitask, tmp_path, onednn):
    contents = encoded_images()
    paths = []
    for i, c in enumerate(contents):
        paths.append(str(tmp_path / f"img{i}"))
        with open(paths[-1], "wb") as f:
            f.write(c)
    image_x = host_images(image["loaded"], contents)
    ids = {k: np.asarray(v).astype("int32") for k, v in text["loaded"].preprocessor(tf.constant(SENTENCES)).items()}
    np.savez(tmp_path / "arrays.npz", image_x=image_x, **ids)
    spec = {"arrays": str(tmp_path / "arrays.npz"), "images": paths, "image": image["path"],
            "multi": multitask["path"], "twin": text["twin"], "text": text["path"],
            "sentences": SENTENCES, "result": str(tmp_path / "result.npz")}
    with open(tmp_path / "spec.json", "w") as f:
        json.dump(spec, f)
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_PROCESS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "spec.json")],
                          capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["imported_before_text"] == []  # the token-id twin loaded without TF Text
    got = np.load(tmp_path / "result.npz")

    expected = softmax(logits(image["model"], image_x))
    np.testing.assert_allclose(got["image_raw"], expected, atol=PARITY, rtol=0)
    np.testing.assert_allclose(got["image_pre"], expected, atol=PARITY, rtol=0)
    np.testing.assert_allclose(got["image_top_k"], -np.sort(-expected, axis=-1), atol=PARITY, rtol=0)
    assert report["class_names"] == [("cat", "dog", "fish")[i] for i in expected.argmax(-1)]

    expected_text = softmax(logits(text["model"], ids))
    for key in ("twin_default", "twin_pre", "text_raw"):
        np.testing.assert_allclose(got[key], expected_text, atol=PARITY, rtol=0, err_msg=key)

    outputs = multitask["model"](image_x, training=False)
    assert report["multi_keys"] == sorted(
        [f"species_{k}" for k in ("probabilities", "class_id", "class_name", "top_k_class_ids",
                                  "top_k_probabilities", "top_k_class_names")]
        + ["tags_probabilities", "tags_labels", "weight_values"]
    )
    np.testing.assert_allclose(got["multi_species_probabilities"], softmax(np.asarray(outputs["species"])),
                               atol=PARITY, rtol=0)
    assert got["multi_species_top_k_class_ids"].shape == (2, 5)  # k = min(5, 7)
    tags = 1 / (1 + np.exp(-np.asarray(outputs["tags"])))
    np.testing.assert_allclose(got["multi_tags_probabilities"], tags, atol=PARITY, rtol=0)
    np.testing.assert_array_equal(got["multi_tags_labels"], tags > 0.5)
    np.testing.assert_allclose(got["multi_weight_values"], np.asarray(outputs["weight"]), atol=PARITY, rtol=0)

    empty = report["empty"]
    for sig in ("image_raw", "image_pre"):
        assert empty[sig]["probabilities"] == [[0, 3], "float32"], sig
        assert empty[sig]["class_id"] == [[0], "int32"], sig
        assert empty[sig]["top_k_class_ids"] == [[0, 3], "int32"], sig
    assert empty["image_raw"]["class_name"] == [[0], "string"]
    assert empty["image_raw"]["top_k_class_names"] == [[0, 3], "string"]
    assert empty["multi"]["species_probabilities"] == [[0, 7], "float32"]
    assert empty["multi"]["species_top_k_probabilities"] == [[0, 5], "float32"]
    assert empty["multi"]["tags_labels"] == [[0, 4], "bool"]
    assert empty["multi"]["weight_values"] == [[0, 1], "float32"]
    for sig in ("twin_default", "twin_pre", "text_raw"):
        assert empty[sig]["probabilities"] == [[0, 2], "float32"], sig
        assert empty[sig]["top_k_class_ids"] == [[0, 2], "int32"], sig


# ---------------------------------------------------------------------------
# Layout and assets
# ---------------------------------------------------------------------------


def test_version_layout_labels_and_metadata(image, text, multitask):
    assert sorted(os.listdir(image["base"])) == ["1"]  # no temp dirs left
    assets = os.path.join(image["path"], "assets")
    with open(os.path.join(assets, "labels.txt")) as f:
        assert f.read() == "cat\ndog\nfish\n"
    with open(os.path.join(assets, "tftransfer.json")) as f:
        info = json.load(f)
    assert info["modality"] == "image"
    assert info["signatures"]["serving_default"]["image_bytes"] == [None]
    assert info["signatures"]["serve_preprocessed"]["image"] == [None, 32, 32, 3]
    assert info["preprocessing"]["class_name"] == "ResNetImageConverter"
    assert info["config"] == {"name": "unit"}
    assert info["custom_ops"] == []
    assert info["heads"][0]["class_names"] == ["cat", "dog", "fish"]
    assert oct(os.stat(image["path"]).st_mode & 0o777) == oct(0o755)  # readable by a server user

    with open(os.path.join(text["path"], "assets", "tftransfer.json")) as f:
        text_info = json.load(f)
    assert "RegexSplitWithOffsets" in text_info["custom_ops"]
    with open(os.path.join(text["twin"], "assets", "tftransfer.json")) as f:
        assert json.load(f)["custom_ops"] == []
    for version in (text["path"], text["twin"]):
        with open(os.path.join(version, "assets", "vocabulary.txt")) as f:
            assert f.read().split("\n")[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

    multi_assets = os.listdir(os.path.join(multitask["path"], "assets"))
    assert {"labels.txt", "labels_species.txt", "labels_tags.txt"} <= set(multi_assets)
    assert "labels_weight.txt" not in multi_assets


def test_serving_assets_round_trip(image, text, tmp_path):
    for name, setup, raw in (("image", image, tf.random.uniform((2, 40, 50, 3), 0, 255)),
                             ("text", text, tf.constant(SENTENCES))):
        workdir = str(tmp_path / name)
        save_serving_assets(workdir, setup["loaded"], setup["heads"])
        save_serving_assets(workdir, setup["loaded"], setup["heads"])  # replaces in place
        assert not [n for n in os.listdir(workdir) if n.startswith(".tmp")]
        assets = load_serving_assets(workdir)
        assert assets.modality == name
        assert assets.heads == setup["heads"]
        assert assets.backbone == setup["loaded"].description
        expected = setup["loaded"].preprocessor(raw)
        got = assets.preprocessor(raw)
        if name == "image":
            np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
        else:
            for key in ("token_ids", "segment_ids", "padding_mask"):
                np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(expected[key]))


def test_load_serving_assets_missing_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match=r"heads.json' is missing.*re-run training"):
        load_serving_assets(str(tmp_path))


@pytest.mark.parametrize("name", ["image", "text"])
def test_model_keras_reloads_in_safe_mode(name, image, text, tmp_path):
    setup = {"image": image, "text": text}[name]
    path = str(tmp_path / "model.keras")
    setup["model"].save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True, compile=False)
    if name == "image":
        x = np.random.RandomState(0).randn(2, 32, 32, 3).astype("float32")
    else:
        x = setup["loaded"].preprocessor(tf.constant(SENTENCES))
    np.testing.assert_allclose(logits(reloaded, x), logits(setup["model"], x), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------
# Bad requests: a clear InvalidArgumentError, and the model keeps serving
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad, match", [
    ([b"this is not an image"], r"image_bytes\[0\] is not a JPEG/PNG/GIF/BMP/WebP image"),
    ([b""], r"image_bytes\[0\] is an empty string"),
    ("second_not_image", r"image_bytes\[1\] is not a JPEG/PNG"),
    ("truncated_png", r"decode_image_bytes"),
    ("corrupt_jpeg", r"decode_image_bytes"),
])
def test_bad_image_bytes_are_invalid_argument_then_next_request_works(image, bad, match):
    good = encoded_images()
    if isinstance(bad, str):
        bad = {"second_not_image": [good[0], b"GIF"],
               "truncated_png": [good[0][:60]],
               "corrupt_jpeg": [good[1][:200] + b"\x00" * 50]}[bad]
    serve = image["serving"].signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        serve(image_bytes=tf.constant(bad))
    out = serve(image_bytes=tf.constant(good))
    assert out["probabilities"].shape == (2, 3)


def test_empty_batches_return_empty_outputs(image, text, multitask):
    out = image["serving"].signatures["serving_default"](image_bytes=tf.constant([], tf.string))
    assert out["probabilities"].shape == (0, 3)
    assert out["class_name"].shape == (0,)
    out = image["serving"].signatures["serve_preprocessed"](image=tf.zeros((0, 32, 32, 3)))
    assert out["probabilities"].shape == (0, 3) and out["class_id"].dtype == tf.int32
    out = tf.saved_model.load(multitask["path"]).signatures["serving_default"](
        image_bytes=tf.constant([], tf.string))
    assert out["species_probabilities"].shape == (0, 7) and out["weight_values"].shape == (0, 1)
    twin = tf.saved_model.load(text["twin"]).signatures["serving_default"]
    out = twin(**{k: tf.zeros((0, 16), tf.int32) for k in ("token_ids", "segment_ids", "padding_mask")})
    assert out["probabilities"].shape == (0, 2)
    out = text["serving"].signatures["serving_default"](text=tf.constant([], tf.string))
    assert out["probabilities"].shape == (0, 2)
    # An empty sentence is valid text: [CLS] [SEP] and padding.
    out = text["serving"].signatures["serving_default"](text=tf.constant([""]))
    assert out["probabilities"].shape == (1, 2)


def test_wrong_dtype_or_shape_in_tensor_signatures(image, text):
    pre = image["serving"].signatures["serve_preprocessed"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a float tensor but is a int32"):
        pre(image=tf.zeros((1, 32, 32, 3), tf.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="check_image_shape"):
        pre(image=tf.zeros((1, 16, 16, 3)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a string tensor"):
        image["serving"].signatures["serving_default"](image_bytes=tf.zeros((1,)))
    ids = text["serving"].signatures["serve_preprocessed"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a int32 tensor but is a float"):
        ids(token_ids=tf.zeros((1, 16)), segment_ids=tf.zeros((1, 16), tf.int32),
            padding_mask=tf.ones((1, 16), tf.int32))
    assert pre(image=tf.zeros((1, 32, 32, 3)))["probabilities"].shape == (1, 3)


# ---------------------------------------------------------------------------
# Versions: atomic, never overwritten by accident
# ---------------------------------------------------------------------------


def test_next_version_ignores_non_integer_dirs(tmp_path):
    for name in ("1", "7", "tmp", ".tmp-export-123", "10a"):
        (tmp_path / "a" / name).mkdir(parents=True)
    (tmp_path / "b" / "9").mkdir(parents=True)
    assert next_version(str(tmp_path / "a")) == 8
    assert next_version(str(tmp_path / "a"), str(tmp_path / "b")) == 10
    assert next_version(str(tmp_path / "missing")) == 1


def test_existing_version_needs_overwrite(image, tmp_path):
    args = (image["model"], image["loaded"].preprocessor, "image")
    base = str(tmp_path / "export")
    assert export_saved_model(*args, image["heads"], base) == os.path.join(base, "1")
    with pytest.raises(UserError, match=r"export/1' exists; pass --overwrite or another --version"):
        export_saved_model(*args, image["heads"], base, version=1)
    renamed = [HeadSpec(num_classes=3, class_names=("x", "y", "z"))]
    export_saved_model(*args, renamed, base, version=1, overwrite=True)
    with open(os.path.join(base, "1", "assets", "labels.txt")) as f:
        assert f.read() == "x\ny\nz\n"
    with pytest.raises(UserError, match="positive integer"):
        export_saved_model(*args, image["heads"], base, version=0)
    assert sorted(os.listdir(base)) == ["1"]  # the replaced version's temp dirs are gone


def test_failed_export_leaves_no_version_and_no_temp_dir(image, tmp_path, monkeypatch):
    seen = []

    class FailsMidWrite:
        def write_out(self, directory, verbose=False):
            seen.append(directory)
            with open(os.path.join(directory, "saved_model.pb"), "wb") as f:
                f.write(b"half a model")
            raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(saved_model_lib, "build_archive", lambda *args, **kwargs: FailsMidWrite())
    base = str(tmp_path / "export")
    with pytest.raises(RuntimeError, match="simulated"):
        export_saved_model(image["model"], image["loaded"].preprocessor, "image", image["heads"], base)
    assert os.listdir(base) == []
    (tmp,) = seen  # where the SavedModel was being written when it failed
    assert os.path.dirname(tmp) == base  # same filesystem: the final rename is atomic
    name = os.path.basename(tmp)
    assert name.startswith(".tmp-export-") and not name.isdigit()  # TF Serving ignores it


def test_versions_are_all_or_nothing_across_bases(tmp_path, monkeypatch):
    """A text export writes two bases; a failure in the second restores both."""
    bases = [str(tmp_path / "export"), str(tmp_path / "export_token_ids")]

    def writer(content):
        def write(directory):
            with open(os.path.join(directory, "marker"), "w") as f:
                f.write(content)
        return write

    saved_model_lib.write_versions(bases, None, False, {b: writer("old") for b in bases})
    real_rename = os.rename
    calls = []

    def failing_rename(src, dst):
        calls.append(dst)
        if dst == os.path.join(bases[1], "1") and os.path.basename(src).startswith(".tmp-export-"):
            raise OSError(28, "No space left on device (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="simulated"):
        saved_model_lib.write_versions(bases, 1, True, {b: writer("new") for b in bases})
    assert calls.count(os.path.join(bases[0], "1")) == 2  # published, then the old one restored
    for base in bases:  # the old version 1 is back in both, nothing else is left
        assert sorted(os.listdir(base)) == ["1"]
        with open(os.path.join(base, "1", "marker")) as f:
            assert f.read() == "old"


def test_text_export_writes_the_core_ops_twin(text):
    assert sorted(os.listdir(token_ids_base(text["base"]))) == ["1"]
    signatures = tf.saved_model.load(text["twin"]).signatures
    assert sorted(signatures) == ["serve_preprocessed", "serving_default"]
    assert sorted(signatures["serving_default"].structured_input_signature[1]) == [
        "padding_mask", "segment_ids", "token_ids"]


def test_export_base_that_is_a_file(image, tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(UserError, match=r"is a file; pass a directory \(--export_base\)"):
        export_saved_model(image["model"], image["loaded"].preprocessor, "image", image["heads"], str(path))


def test_export_base_without_write_permission(image, tmp_path, monkeypatch):
    base = tmp_path / "readonly"
    base.mkdir()
    if os.geteuid() == 0:  # root ignores file modes: simulate what a read-only dir does
        monkeypatch.setattr(os, "access", lambda path, mode: False)
    else:
        base.chmod(0o555)
    try:
        with pytest.raises(UserError, match="is not writable; pass a writable directory"):
            export_saved_model(image["model"], image["loaded"].preprocessor, "image", image["heads"], str(base))
    finally:
        base.chmod(0o755)
    assert os.listdir(base) == []


def test_permission_error_while_creating_the_version(image, tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(saved_model_lib.tempfile, "mkdtemp", denied)
    with pytest.raises(UserError, match="is not writable"):
        export_saved_model(image["model"], image["loaded"].preprocessor, "image", image["heads"],
                           str(tmp_path / "export"))


# ---------------------------------------------------------------------------
# TFLite
# ---------------------------------------------------------------------------


def tflite_run(path, **inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        interpreter = tf.lite.Interpreter(model_path=path)
    return interpreter.get_signature_runner()(**inputs)


def test_tflite_image_quantisation_matches_saved_model_and_shrinks(image, tmp_path):
    x = host_images(image["loaded"], encoded_images())
    served = image["serving"].signatures["serve_preprocessed"](image=tf.constant(x))
    base = str(tmp_path / "tflite")
    sizes = {}
    for quantize in ("none", "float16", "dynamic_range"):  # int8: tests/test_tflite.py
        info = export_tflite(image["model"], image["loaded"].preprocessor, "image", image["heads"], base,
                             quantize=quantize)
        sizes[quantize] = info["size_bytes"]
        out = tflite_run(info["tflite_file"], image=x)
        diff = np.abs(out["probabilities"] - served["probabilities"].numpy()).max()
        assert diff <= tflite_lib.TOLERANCE[quantize], (quantize, diff)
        np.testing.assert_array_equal(out["top_k_class_ids"].shape, (2, 3))
        assert sorted(out) == ["class_id", "probabilities", "top_k_class_ids", "top_k_probabilities"]
    assert sorted(os.listdir(base)) == ["1", "2", "3"]
    assert sorted(os.listdir(os.path.join(base, "2"))) == ["labels.txt", "model.tflite", "tftransfer.json"]
    assert sizes["none"] == pytest.approx(4 * image["model"].count_params(), rel=0.02)
    assert sizes["float16"] < 0.55 * sizes["none"]
    assert sizes["dynamic_range"] < 0.3 * sizes["none"]


def test_tflite_text_takes_token_ids(text, tmp_path):
    ids = {k: np.asarray(v).astype("int32") for k, v in text["loaded"].preprocessor(tf.constant(SENTENCES)).items()}
    info = export_tflite(text["model"], text["loaded"].preprocessor, "text", text["heads"], str(tmp_path))
    out = tflite_run(info["tflite_file"], **ids)
    expected = softmax(logits(text["model"], ids))
    np.testing.assert_allclose(out["probabilities"], expected, atol=tflite_lib.TOLERANCE["none"], rtol=0)
    with open(os.path.join(info["path"], "vocabulary.txt")) as f:
        assert f.read().split("\n")[:3] == ["[PAD]", "[UNK]", "[CLS]"]


def test_tflite_rejects_unknown_quantisation(image, tmp_path):
    with pytest.raises(UserError, match="--quantize must be one of none, float16, dynamic_range, int8"):
        export_tflite(image["model"], image["loaded"].preprocessor, "image", image["heads"], str(tmp_path),
                      quantize="int4")


def test_next_export_removes_what_a_killed_export_left(tmp_path):
    """SIGKILL skips the roll-back: the next export into the base removes a
    dead process's temporary version and restores a version it had moved
    aside; a live export's temporaries stay."""
    import socket

    base = tmp_path / "export"
    base.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = base / f"{saved_model_lib.TMP_PREFIX}{dead.pid}@{host}@4@abc"
    (stale / "variables").mkdir(parents=True)
    moved = base / f"{saved_model_lib.OLD_PREFIX}{dead.pid}@{host}@3@def"
    (moved / "v").mkdir(parents=True)
    (moved / "v" / "saved_model.pb").write_text("version 3")
    live = base / f"{saved_model_lib.TMP_PREFIX}{os.getpid()}@{host}@5@ghi"
    live.mkdir()
    foreign = base / f"{saved_model_lib.TMP_PREFIX}{dead.pid}@another-host@6@jkl"
    foreign.mkdir()

    finals = saved_model_lib.write_versions(
        [str(base)], 7, False, {str(base): lambda d: open(os.path.join(d, "saved_model.pb"), "w").close()})
    assert finals == [str(base / "7")]
    assert sorted(os.listdir(base)) == sorted(["3", "7", live.name, foreign.name])
    assert (base / "3" / "saved_model.pb").read_text() == "version 3"
