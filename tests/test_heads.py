import keras
import numpy as np
import pytest

from tftransfer import backbones, builders
from tftransfer.errors import UserError
from tftransfer.heads import HeadSpec

from conftest import TINY_RESNET, tiny_bert_spec


def test_every_head_layer_is_named_after_the_head():
    loaded = backbones.load_backbone(spec=TINY_RESNET, image_size=32)
    model = builders.build_model(loaded, [HeadSpec(name="animal", num_classes=3, dropout=0.2, hidden_units=8)])
    names = {l.name for l in model.layers}
    assert {"animal_pool", "animal_hidden", "animal_dropout", "animal"} <= names
    assert model.get_layer("animal").dtype == "float32"


def test_loss_and_metrics_match_head_type():
    assert isinstance(HeadSpec(type="classification").loss(), keras.losses.SparseCategoricalCrossentropy)
    assert isinstance(HeadSpec(type="classification", label_smoothing=0.1).loss(), keras.losses.CategoricalCrossentropy)
    assert isinstance(HeadSpec(type="multilabel", num_classes=4).loss(), keras.losses.BinaryCrossentropy)
    assert isinstance(HeadSpec(type="regression", num_classes=1).loss(), keras.losses.MeanSquaredError)
    with pytest.raises(UserError, match="type must be one of"):
        HeadSpec(type="ranking")


def test_image_max_vs_avg_pooling_differ():
    loaded = backbones.load_backbone(spec=TINY_RESNET, image_size=32)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    avg = builders.build_model(loaded, [HeadSpec(pooling="avg")])
    mx = builders.build_model(loaded, [HeadSpec(pooling="max")])
    assert isinstance(avg.get_layer("label_pool"), keras.layers.GlobalAveragePooling2D)
    assert isinstance(mx.get_layer("label_pool"), keras.layers.GlobalMaxPooling2D)
    # The pooled features themselves: max >= mean everywhere, and not equal.
    features = np.asarray(loaded.model(x, training=False))
    pooled_avg = np.asarray(keras.Model(avg.inputs, avg.get_layer("label_pool").output)(x))
    pooled_max = np.asarray(keras.Model(mx.inputs, mx.get_layer("label_pool").output)(x))
    np.testing.assert_allclose(pooled_avg, features.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled_max, features.max(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    assert np.all(pooled_max >= pooled_avg - 1e-6) and not np.allclose(pooled_max, pooled_avg)
    with pytest.raises(UserError, match="pooling for an image backbone"):
        builders.build_model(loaded, [HeadSpec(pooling="cls")])


def test_text_masked_mean_ignores_padding_tokens():
    loaded = backbones.load_backbone(spec=tiny_bert_spec(), sequence_length=8)
    model = builders.build_model(loaded, [HeadSpec(pooling="mean", num_classes=2)])
    x = {k: np.asarray(v) for k, v in loaded.preprocessor(["the movie was good"]).items()}
    a = model(x)["label"]
    noisy = dict(x, token_ids=np.where(x["padding_mask"] == 1, x["token_ids"], 7))
    b = model(noisy)["label"]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    cls = builders.build_model(loaded, [HeadSpec(pooling="cls", num_classes=2)])
    assert cls(x)["label"].shape == (1, 2)


def _ce(logits, labels):
    logits = np.asarray(logits, "float64")
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -log_p[np.arange(len(labels)), labels]


def test_class_weight_scales_each_example_by_its_class_weight():
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-1.0, 1.0, 3.0], [0.0, 2.0, 0.0]], "float32")
    labels = np.array([0, 2, 2, 1])
    weights = [0.5, 3.0, 1.5]
    ce = _ce(logits, labels)
    plain = HeadSpec(num_classes=3).loss()
    weighted = HeadSpec(num_classes=3, class_weight=weights).loss()
    assert float(plain(labels, logits)) == pytest.approx(ce.mean(), rel=1e-5)
    expected = (np.array(weights)[labels] * ce).sum() / len(labels)  # sum_i w_{y_i} CE_i / n
    assert float(weighted(labels, logits)) == pytest.approx(expected, rel=1e-5)
    # One-hot labels (label smoothing 0 vs a tiny smoothing): the class still comes from the label.
    smooth = HeadSpec(num_classes=3, label_smoothing=1e-6, class_weight=weights).loss()
    assert float(smooth(np.eye(3, dtype="float32")[labels], logits)) == pytest.approx(expected, rel=1e-4)
    # Unlabelled examples (sample weight 0) are out of both sum and count.
    mask = np.array([1.0, 0.0, 1.0, 1.0], "float32")
    keep = mask > 0
    expected_masked = (np.array(weights)[labels[keep]] * ce[keep]).sum() / keep.sum()
    assert float(weighted(labels, logits, sample_weight=mask)) == pytest.approx(expected_masked, rel=1e-5)
    with pytest.raises(UserError, match="class_weight needs a classification head"):
        HeadSpec(type="regression", num_classes=1, class_weight=[1.0])


def test_class_weight_in_the_compiled_model_loss_and_not_in_accuracy():
    x = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")
    y = np.array([0, 0, 0, 0, 1, 1])
    inputs = keras.Input((4,))
    model = keras.Model(inputs, {"label": keras.layers.Dense(2, name="label")(inputs)})
    logits = model.predict(x, verbose=0)["label"]
    results = {}
    for weights in (None, (0.75, 1.5)):  # balanced for counts 4, 2: 6 / (2 * 4), 6 / (2 * 2)
        heads = [HeadSpec(num_classes=2, class_weight=weights)]
        builders.compile_for_heads(model, heads, "sgd")
        results[weights] = model.evaluate(x, {"label": y}, batch_size=6, return_dict=True, verbose=0)
    ce = _ce(logits, y)
    assert results[None]["loss"] == pytest.approx(ce.mean(), rel=1e-4)
    assert results[(0.75, 1.5)]["loss"] == pytest.approx((np.array([0.75, 1.5])[y] * ce).mean(), rel=1e-4)
    assert results[(0.75, 1.5)]["accuracy"] == results[None]["accuracy"]
