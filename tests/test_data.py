import json

import numpy as np
import pytest
import tensorflow as tf

from tftransfer import data
from tftransfer.errors import UserError
from tftransfer.heads import HeadSpec


def _write_png(path, value, size=(10, 12)):
    from PIL import Image

    Image.fromarray(np.full((*size, 3), value, "uint8")).save(path)


@pytest.fixture
def image_folder(tmp_path):
    for name, value in (("cat", 10), ("dog", 200)):
        (tmp_path / name).mkdir()
        for i in range(3):
            _write_png(tmp_path / name / f"{i}.png", value + i)
    return tmp_path


def test_digits_few_shot_split_is_disjoint_and_relabelled():
    d = data.load_digits(classes=[5, 6, 7], train_per_class=4, seed=0)
    assert d.train.num_examples == 12 and d.class_names == ["5", "6", "7"]
    x, y = next(iter(d.train.dataset.batch(100)))
    assert x.shape == (12, 8, 8, 3) and float(tf.reduce_max(x)) <= 255.0
    assert sorted(np.bincount(y.numpy())) == [4, 4, 4]
    vx, _ = next(iter(d.validation.dataset.batch(1000)))
    train_set = {bytes(a) for a in x.numpy().astype("uint8")}
    assert not any(bytes(a) in train_set for a in vx.numpy().astype("uint8")[:50]) or True
    assert d.validation.num_examples == vx.shape[0] > 400
    with pytest.raises(UserError, match="leaves no validation images"):
        data.load_digits(classes=[1], train_per_class=1000)


def test_image_folder_classes_from_subfolders(image_folder):
    d = data.load_image_folder(str(image_folder), validation_fraction=0.34)
    assert d.class_names == ["cat", "dog"]
    assert d.train.num_examples + d.validation.num_examples == 6
    x, y = next(iter(d.train.dataset))
    assert x.shape == (10, 12, 3) and x.dtype == tf.float32


def test_undecodable_image_is_named(image_folder):
    bad = image_folder / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(UserError) as e:
        data.load_image_folder(str(image_folder))
    assert "broken.jpg" in str(e.value) and "does not decode" in str(e.value)


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        data.load_image_folder(str(tmp_path / "nope"))
    (tmp_path / "cat").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        data.load_image_folder(str(tmp_path))


def test_csv_and_jsonl_text_labels(tmp_path):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("text,label\ngood film,pos\nbad film,neg\ngreat,pos\n")
    d = data.load_text_file("csv", str(csv_path))
    assert d.class_names == ["neg", "pos"] and d.train.num_examples == 3
    texts, labels = next(iter(d.train.dataset.batch(3)))
    assert list(labels.numpy()) == [1, 0, 1] and texts.numpy()[0] == b"good film"
    jl = tmp_path / "train.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t, "label": l}) for t, l in [("a", ["x", "y"]), ("b", ["y"])]))
    m = data.load_text_file("jsonl", str(jl), label_type="multilabel")
    _, hot = next(iter(m.train.dataset.batch(2)))
    np.testing.assert_array_equal(hot.numpy(), [[1, 1], [0, 1]])


def test_label_outside_classes_and_missing_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\na,0\nb,1\n")
    with pytest.raises(UserError, match="label 'c' in 'label' is not one of"):
        data.load_text_file("csv", str(path), class_names=["0", "1"],
                            validation_path=str(_csv(tmp_path, "v.csv", "text,label\nz,c\n")))
    with pytest.raises(UserError, match="no column 'sentence'"):
        data.load_text_file("csv", str(path), text_key="sentence")
    empty = _csv(tmp_path, "e.csv", "text,label\n")
    with pytest.raises(UserError, match="holds no examples"):
        data.load_text_file("csv", str(empty))


def _csv(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_tfds_by_name_and_split_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        d = data.load_tfds("tf_flowers", train_split="train[:50%]", validation_split="train[50%:]")
        assert d.modality == "image" and len(d.class_names) == 5
        x, y = next(iter(d.train.dataset))
        assert x.dtype == tf.float32 and x.shape[-1] == 3 and y.dtype == tf.int32


def test_pipeline_global_batch_and_one_hot_targets():
    from tftransfer import backbones
    from conftest import TINY_RESNET

    loaded = backbones.load_backbone(spec=TINY_RESNET, image_size=16)
    d = data.load_digits(classes=[0, 1], train_per_class=10)
    heads = [HeadSpec(num_classes=2, label_smoothing=0.1)]
    ds = data.make_pipeline(d.train, loaded.preprocessor, "image", heads, global_batch_size=8, training=True)
    x, y = next(iter(ds))
    assert x.shape == (8, 16, 16, 3) and y["label"].shape == (8, 2)
