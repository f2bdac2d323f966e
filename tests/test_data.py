import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tftransfer import data
from tftransfer.errors import UserError
from tftransfer.heads import HeadSpec

from conftest import REPO, TINY_DIGITS_YAML, run_cli


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
    shared = [bytes(a) for a in vx.numpy().astype("uint8") if bytes(a) in train_set]
    # Disjoint by example: a validation image may equal a training image only
    # where scikit-learn's digits themselves hold that image more than once.
    from collections import Counter

    from sklearn.datasets import load_digits

    source = load_digits()
    counts = Counter(bytes(np.repeat((img * (255.0 / 16.0)).astype("float32")[..., None], 3, -1).astype("uint8"))
                     for img, t in zip(source.images, source.target) if t in (5, 6, 7))
    assert all(counts[b] > 1 for b in shared), len(shared)
    assert d.validation.num_examples == int(np.isin(source.target, [5, 6, 7]).sum()) - 12
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
    with tfds.testing.mock_data(num_examples=6):  # mock: nothing to download or prepare
        d = data.load_tfds("tf_flowers", train_split="train[:50%]", validation_split="train[50%:]",
                           download=False)
        assert d.modality == "image" and len(d.class_names) == 5
        x, y = next(iter(d.train.dataset))
        assert x.dtype == tf.float32 and x.shape[-1] == 3 and y.dtype == tf.int32


def test_tfds_prepared_locally_trains_through_the_cli(tmp_path):
    """A real TFDS builder prepared in data.data_dir: no mock, no network, the env `make` builds."""
    pytest.importorskip("tensorflow_datasets")
    data_dir = tmp_path / "tfds"
    prepare = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import tiny_tfds_builder as t; "
         "t.TinyShapes(data_dir=sys.argv[2]).download_and_prepare()",
         os.path.join(REPO, "tests", "fixtures"), str(data_dir)],
        capture_output=True, text=True, timeout=300)
    assert prepare.returncode == 0, prepare.stderr[-2000:]
    config = tmp_path / "c.yaml"
    config.write_text(TINY_DIGITS_YAML.split("data:")[0] + f"""
data: {{source: tfds, name: tiny_shapes, data_dir: {data_dir}, train_split: train, validation_split: test,
        batch_size: 12, train_per_class: 5}}
train: {{epochs: 1, verbose: 0}}
export: {{saved_model: false}}
""")
    W = tmp_path / "w"
    result = run_cli("tftransfer.train", f"--config={config}", f"--workdir={W}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.load(open(W / "metrics.json"))
    assert metrics["num_train_examples"] == 15 and metrics["num_validation_examples"] == 12  # 5-shot x 3
    ids = json.load(open(W / "train_ids.json"))
    assert ids["train_per_class"] == 5 and len(ids["ids"]) == 15
    tfds = pytest.importorskip("tensorflow_datasets")
    prepared = tfds.builder("tiny_shapes", data_dir=str(data_dir)).as_dataset(split="train", shuffle_files=False)
    all_labels = [int(ex["label"]) for ex in prepared.as_numpy_iterator()]
    assert sorted(all_labels[i] for i in ids["ids"]) == [0] * 5 + [1] * 5 + [2] * 5
    heads = json.load(open(W / "heads.json"))
    assert heads["heads"][0]["class_names"] == ["bright", "dark", "striped"]


def test_tfds_offline_download_fails_fast_with_one_line(tmp_path, monkeypatch):
    """An unprepared dataset whose download host is unreachable: one line at once, no minutes of retries."""
    tfds = pytest.importorskip("tensorflow_datasets")
    import socket
    import time

    def unreachable(address, *args, **kwargs):
        raise OSError(f"[Errno -2] Name or service not known: {address[0]}")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                        lambda *a, **k: pytest.fail("downloaded although the host is unreachable"))
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"data.name 'tf_flowers' is not prepared in .* download host "
                                         r"download.tensorflow.org is unreachable.*data.data_dir"):
        data.load_tfds("tf_flowers", data_dir=str(tmp_path / "empty"))
    assert time.perf_counter() - start < 30


def test_pipeline_global_batch_and_one_hot_targets():
    from tftransfer import backbones
    from conftest import TINY_RESNET

    loaded = backbones.load_backbone(spec=TINY_RESNET, image_size=16)
    d = data.load_digits(classes=[0, 1], train_per_class=10)
    heads = [HeadSpec(num_classes=2, label_smoothing=0.1)]
    ds = data.make_pipeline(d.train, loaded.preprocessor, "image", heads, global_batch_size=8, training=True)
    x, y = next(iter(ds))
    assert x.shape == (8, 16, 16, 3) and y["label"].shape == (8, 2)


def test_augmentation_is_seeded_per_batch_and_replays_after_a_resume():
    """Two builds with one seed augment identically (in a parallel map); a
    pipeline rebuilt at pass 1 (a resumed run) replays pass 1 exactly;
    another seed augments differently."""
    from tftransfer import backbones
    from conftest import TINY_RESNET

    loaded = backbones.load_backbone(spec=TINY_RESNET, image_size=16)
    d = data.load_digits(classes=[0, 1], train_per_class=10)
    heads = [HeadSpec(num_classes=2)]

    def images(seed, passes):
        augment = data.augmentation_layers("horizontal", 0.2, 0.1, 0.1, seed=seed)
        ds = data.make_pipeline(d.train, loaded.preprocessor, "image", heads, global_batch_size=5,
                                training=True, seed=seed, augment=augment, passes=passes)
        return [x.numpy() for x, _ in ds]

    run, again, resumed = images(0, (0, 2)), images(0, (0, 2)), images(0, (1, 2))
    plain = [x.numpy() for x, _ in data.make_pipeline(
        d.train, loaded.preprocessor, "image", heads, global_batch_size=5, training=True,
        passes=(0, 2))]
    assert len(run) == 8 and all(np.array_equal(a, b) for a, b in zip(run, again))
    assert all(np.array_equal(a, b) for a, b in zip(run[4:], resumed))
    assert not np.allclose(run[0], plain[0])  # Augmentation is on.
    assert not np.allclose(run[0], images(1, (0, 2))[0])


@pytest.mark.parametrize("fmt, content, message", [
    ("jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 1.0}\n{"text": "c", "label": "1"}\n',
     r"labels in 'label' mix types: int 1 \(row 0\), float 1.0 \(row 1\), str '1' \(row 2\)"),
    ("jsonl", '{"text": "a", "label": true}\n{"text": "b", "label": 0}\n', "mix types: bool True"),
    ("csv", "text,label\na,pos\nb,\n", r"example 2: no label in 'label'"),
    ("jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n', r"example 2: no label in 'label'"),
    ("csv", "text,label\na,pos\nb,pos\n", r"every label in 'label' is 'pos'; classification needs at least two"),
])
def test_degenerate_labels_are_refused(tmp_path, fmt, content, message):
    path = tmp_path / f"train.{fmt}"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        data.load_text_file(fmt, str(path))


def test_validation_label_never_seen_in_training_and_non_utf8_and_non_finite_targets(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,pos\nb,neg\n")
    (tmp_path / "val.csv").write_text("text,label\nc,pos\nd,maybe\n")
    with pytest.raises(UserError, match=r"label\(s\) \['maybe'\] in 'label' never occur in data.train_path"):
        data.load_text_file("csv", str(tmp_path / "train.csv"), str(tmp_path / "val.csv"))
    (tmp_path / "latin1.csv").write_bytes("text,label\ngood,pos\ncaf\xe9,neg\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.csv' line 3: not UTF-8 text \(byte 0xe9\); re-save"):
        data.load_text_file("csv", str(tmp_path / "latin1.csv"))
    (tmp_path / "bom.csv").write_bytes("text,label\ngood,pos\nbad,neg\n".encode("utf-8-sig"))
    assert data.load_text_file("csv", str(tmp_path / "bom.csv")).class_names == ["neg", "pos"]
    (tmp_path / "reg.csv").write_text("text,label\na,1.5\nb,nan\n")
    with pytest.raises(UserError, match=r"regression label 'nan' is not finite"):
        data.load_text_file("csv", str(tmp_path / "reg.csv"), label_type="regression")


def _kshot_labels(cfg_text, seed, tmp_path):
    from tftransfer import config as config_lib
    from tftransfer import experiment

    cfg = config_lib.load_config(text=cfg_text, overrides=[f"train.seed={seed}"])
    loaded = experiment.load_data(cfg)
    labels = [int(y) for _, y in loaded.train.dataset.as_numpy_iterator()]
    return loaded, labels


def test_kshot_on_csv_and_image_folder_through_the_cli_and_by_seed(tmp_path_factory, image_folder):
    tmp_path = tmp_path_factory.mktemp("kshot")  # image_folder is its own tmp dir: keep it clean
    rows = "".join(f"{w} {i},{w}\n" for i in range(6) for w in ("good", "bad", "meh"))
    (tmp_path / "t.csv").write_text("text,label\n" + rows)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "meh"]
    text_cfg = f"""
backbone:
  spec: {{architecture: bert, vocabulary: {vocab}, num_layers: 1, num_heads: 1, hidden_dim: 8,
         intermediate_dim: 8, max_sequence_length: 8}}
  sequence_length: 8
data: {{source: csv, train_path: {tmp_path / 't.csv'}, train_per_class: 2, batch_size: 6}}
train: {{epochs: 1, verbose: 0}}
export: {{saved_model: false}}
"""
    loaded, labels = _kshot_labels(text_cfg, 0, tmp_path)
    assert sorted(labels) == [0, 0, 1, 1, 2, 2] and loaded.train.num_examples == 6
    again, _ = _kshot_labels(text_cfg, 0, tmp_path)
    other, _ = _kshot_labels(text_cfg, 1, tmp_path)
    assert again.train_ids == loaded.train_ids and other.train_ids != loaded.train_ids
    config = tmp_path / "text.yaml"
    config.write_text(text_cfg)
    result = run_cli("tftransfer.train", f"--config={config}", f"--workdir={tmp_path / 'wt'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.load(open(tmp_path / "wt" / "train_ids.json"))["ids"] == loaded.train_ids
    # Image folder (2 classes x 3 images), through the CLI; too few examples is named.
    image_cfg = TINY_DIGITS_YAML.split("data:")[0] + f"""
data: {{source: image_folder, train_path: {image_folder}, train_per_class: 2, batch_size: 4}}
train: {{epochs: 1, verbose: 0}}
export: {{saved_model: false}}
"""
    config = tmp_path / "image.yaml"
    config.write_text(image_cfg)
    result = run_cli("tftransfer.train", f"--config={config}", f"--workdir={tmp_path / 'wi'}")
    assert result.returncode == 0, result.stderr[-3000:]
    ids = json.load(open(tmp_path / "wi" / "train_ids.json"))["ids"]
    assert len(ids) == 4 and sorted(i // 3 for i in ids) == [0, 0, 1, 1]  # files sorted: cat 0-2, dog 3-5
    with pytest.raises(UserError, match=r"data.train_per_class=4: class 'cat' has only 3 training example"):
        _kshot_labels(image_cfg.replace("train_per_class: 2", "train_per_class: 4"), 0, tmp_path)
    with pytest.raises(UserError, match=r"data.digits.train_per_class moved to data.train_per_class"):
        _kshot_labels("backbone: {preset: x}\ndata: {digits: {train_per_class: 3}}\n", 0, tmp_path)


# ---------------------------------------------------------------------------
# Sentence pairs: data.input_key [first, second]
# ---------------------------------------------------------------------------

PAIR_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "movie", "film", "was", "good", "bad"]


def test_sentence_pairs_pack_both_segments_with_segment_ids(tmp_path):
    import keras_hub

    path = tmp_path / "pairs.jsonl"
    rows = [{"q": "the movie was good", "p": "a film", "label": "yes"},
            {"q": "bad", "p": "the film was bad a movie the film was good", "label": "no"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = data.load_text_file("jsonl", str(path), text_key=["q", "p"])
    assert d.pair and d.class_names == ["no", "yes"]
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer=keras_hub.models.BertTokenizer(vocabulary=PAIR_VOCAB), sequence_length=10)
    heads = [HeadSpec(num_classes=2)]
    x, y = next(iter(data.make_pipeline(d.train, preprocessor, "text", heads, 2)))
    ids, segments, mask = (np.asarray(x[k]) for k in ("token_ids", "segment_ids", "padding_mask"))
    word = {t: i for i, t in enumerate(PAIR_VOCAB)}
    tokens = lambda text: [word[t] for t in text.split()]  # noqa: E731
    CLS, SEP = word["[CLS]"], word["[SEP]"]
    # [CLS] first [SEP] second [SEP] [PAD]..., segment ids 0 through the first [SEP], then 1.
    np.testing.assert_array_equal(ids[0], [CLS, *tokens("the movie was good"), SEP, *tokens("a film"), SEP, 0])
    np.testing.assert_array_equal(segments[0], [0] * 6 + [1] * 3 + [0])
    np.testing.assert_array_equal(mask[0], [True] * 9 + [False])
    # Too long for 10: round-robin truncation keeps both segments and both [SEP]s.
    np.testing.assert_array_equal(ids[1], [CLS, word["bad"], SEP, *tokens("the film was bad a movie"), SEP])
    np.testing.assert_array_equal(segments[1], [0, 0, 0] + [1] * 7)
    assert list(np.asarray(y["label"])) == [1, 0]
    # The report describes an example by both texts.
    from tftransfer.report.predictions import describe_examples

    assert describe_examples(d.train, "text")[0] == "the movie was good [SEP] a film"
    # CSV: a missing second column is named with the file.
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("q,label\nthe movie,yes\na film,no\n")
    with pytest.raises(UserError, match=r"pairs.csv.*no column 'p'"):
        data.load_text_file("csv", str(csv_path), text_key=["q", "p"])


def test_tfds_sentence_pairs_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=4):
        d = data.load_tfds("glue/mrpc", input_key=["sentence1", "sentence2"], download=False)
        (first, second), y = next(iter(d.train.dataset))
        assert d.pair and d.modality == "text" and first.dtype == second.dtype == tf.string
        with pytest.raises(UserError, match="not a text feature"):
            data.load_tfds("glue/mrpc", input_key=["sentence1", "idx"], download=False)
MULTITASK_TASKS = [("sentiment", "sentiment", "classification"), ("tags", "tags", "multilabel"),
                   ("stars", "stars", "regression")]


def test_multitask_csv_and_jsonl_missing_labels_get_sample_weight_zero(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("text,sentiment,tags,stars\ngood,pos,x|y,5\nbad,,y,1\nmeh,neg,,\nfine,pos,x,4\n")
    jl = tmp_path / "t.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [
        {"text": "good", "sentiment": "pos", "tags": ["x", "y"], "stars": 5},
        {"text": "bad", "sentiment": None, "tags": ["y"], "stars": 1},  # null: no label
        {"text": "meh", "sentiment": "neg"},  # absent keys: no label
        {"text": "fine", "sentiment": "pos", "tags": ["x"], "stars": 4}]))
    heads = [HeadSpec(name="sentiment", num_classes=2), HeadSpec(name="tags", type="multilabel", num_classes=2),
             HeadSpec(name="stars", type="regression", num_classes=1)]
    for fmt, path in (("csv", csv_path), ("jsonl", jl)):
        d = data.load_text_tasks(fmt, str(path), tasks=MULTITASK_TASKS)
        assert d.tasks["sentiment"].class_names == ["neg", "pos"] and d.tasks["tags"].class_names == ["x", "y"]
        assert [d.tasks[n].num_labelled for n in ("sentiment", "tags", "stars")] == [3, 3, 3]
        x, y, w = next(iter(data.make_pipeline(d.train, lambda t: t, "text", heads, 4)))
        assert list(x.numpy()) == [b"good", b"bad", b"meh", b"fine"]
        np.testing.assert_array_equal(w["sentiment"], [1, 0, 1, 1])
        np.testing.assert_array_equal(w["tags"], [1, 1, 0, 1])
        np.testing.assert_array_equal(w["stars"], [1, 1, 0, 1])
        np.testing.assert_array_equal(y["sentiment"], [1, 0, 0, 1])  # placeholders are valid class ids
        np.testing.assert_array_equal(y["tags"], [[1, 1], [0, 1], [0, 0], [1, 0]])
        np.testing.assert_array_equal(y["stars"], [5, 1, 0, 4])


@pytest.mark.parametrize("content, message", [
    ("text,sentiment,tags,stars\na,pos,x,1\nb,pos,y,2\n", "every label in 'sentiment' is 'pos'"),
    ("text,sentiment,tags,stars\na,pos,x,\nb,neg,y,\n", "no example has a label in 'stars' (head 'stars')"),
    ("text,sentiment,tags\na,pos,x\nb,neg,y\n", "no column 'stars'"),
])
def test_multitask_degenerate_labels_are_refused_per_head(tmp_path, content, message):
    path = tmp_path / "t.csv"
    path.write_text(content)
    with pytest.raises(UserError) as e:
        data.load_text_tasks("csv", str(path), tasks=MULTITASK_TASKS)
    assert message in str(e.value)


def test_tfds_multitask_one_feature_per_head_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    tasks = [("category", "label_category", "classification"), ("elevation", "label_elevation", "regression")]
    with tfds.testing.mock_data(num_examples=12):
        d = data.load_tfds("smallnorb", "train", "test", download=False, tasks=tasks)
        assert d.tasks["category"].class_names[:2] == ["four-legged animals", "human figures"]
        assert d.tasks["elevation"].class_names is None and d.tasks["category"].num_labelled == 12
        _, y = next(iter(d.train.dataset))
        assert y["category"].dtype == tf.int32 and y["elevation"].dtype == tf.float32
        with pytest.raises(UserError, match="head 'tags' \\(multilabel\\): TFDS feature 'label_lighting'"):
            data.load_tfds("smallnorb", "train", download=False, tasks=[("tags", "label_lighting", "multilabel")])
