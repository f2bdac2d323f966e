import keras
import numpy as np
import pytest

from tftransfer import backbones, builders
from tftransfer.heads import HeadSpec

from conftest import TINY_RESNET


def _bn_layers(model):
    return [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]


def test_frozen_backbone_keeps_weights_and_batchnorm_statistics():
    loaded = backbones.load_backbone(spec=TINY_RESNET, image_size=32)
    heads = [HeadSpec(num_classes=3)]
    model = builders.build_model(loaded, heads, freeze_backbone=True)
    builders.compile_for_heads(model, heads, keras.optimizers.Adam(1e-2))
    before = [w.copy() for w in loaded.model.get_weights()]
    head_before = model.get_layer("label").get_weights()[0].copy()
    x = np.random.default_rng(0).normal(3.0, 2.0, (16, 32, 32, 3)).astype("float32")
    model.fit(x, {"label": np.arange(16) % 3}, epochs=2, batch_size=8, verbose=0)
    for a, b in zip(before, loaded.model.get_weights()):
        np.testing.assert_array_equal(a, b)  # incl. BN moving mean / variance
    assert np.abs(model.get_layer("label").get_weights()[0] - head_before).max() > 0
    assert _bn_layers(loaded.model) and all(not l.trainable for l in _bn_layers(loaded.model))


def test_multi_task_model_outputs_every_head_and_trains():
    loaded = backbones.load_backbone(spec=TINY_RESNET, image_size=32)
    heads = [HeadSpec(name="digit", num_classes=4),
             HeadSpec(name="tags", type="multilabel", num_classes=3),
             HeadSpec(name="size", type="regression", num_classes=1, loss_weight=0.5)]
    model = builders.build_model(loaded, heads)
    builders.compile_for_heads(model, heads, "adam")
    x = np.zeros((4, 32, 32, 3), "float32")
    y = {"digit": np.array([0, 1, 2, 3]), "tags": np.eye(3, dtype="float32")[[0, 1, 2, 0]],
         "size": np.ones((4, 1), "float32")}
    history = model.fit(x, y, epochs=1, verbose=0)
    assert {"digit_accuracy", "tags_auc", "size_mae"} <= set(history.history)
    out = model(x)
    assert out["digit"].shape == (4, 4) and out["tags"].shape == (4, 3) and out["size"].shape == (4, 1)


def test_unused_bert_pooler_is_frozen_so_fit_warns_nothing(tiny_bert):
    import warnings

    import keras
    import numpy as np

    import tftransfer
    from tftransfer.callbacks import ProgressiveUnfreezing
    from tftransfer.heads import HeadSpec

    loaded = tftransfer.load_backbone(spec=tiny_bert, sequence_length=8)
    heads = [HeadSpec(num_classes=2, pooling="mean")]
    model = tftransfer.build_model(loaded, heads)
    pooler = loaded.model.get_layer("pooled_dense")
    assert not pooler.trainable
    assert all(pooler not in g.layers for g in loaded.layer_groups)
    tftransfer.compile_for_heads(model, heads, "adam")
    x = {"token_ids": np.full((4, 8), 5, "int32"), "segment_ids": np.zeros((4, 8), "int32"),
         "padding_mask": np.ones((4, 8), "int32")}
    kernel = pooler.kernel.numpy().copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, {"label": np.array([0, 1, 0, 1])}, epochs=1, verbose=0,
                  callbacks=[ProgressiveUnfreezing(loaded.layer_groups, schedule="all")])
    assert not [w for w in caught if "Gradients do not exist" in str(w.message)]
    np.testing.assert_array_equal(kernel, pooler.kernel.numpy())
    # cls pooling reads the pooler: it trains.
    loaded_cls = tftransfer.load_backbone(spec=tiny_bert, sequence_length=8)
    tftransfer.build_model(loaded_cls, [HeadSpec(num_classes=2)])
    assert loaded_cls.model.get_layer("pooled_dense").trainable


def test_multi_task_text_model_missing_label_contributes_no_loss(tmp_path):
    """One output per head with its shape; an example without a sentiment label leaves that
    head's loss exactly as it is without the example, while the other heads see it."""
    import tensorflow as tf

    from conftest import tiny_bert_spec

    from tftransfer import data

    path = tmp_path / "all.csv"
    path.write_text("text,sentiment,topic,stars\nthe movie was good,pos,film,5\nthe food was bad,neg,food,1\n"
                    "a great movie,,film,4\nthe food was awful,neg,,2\na bad film,neg,film,\n")
    tasks = [("sentiment", "sentiment", "classification"), ("topic", "topic", "classification"),
             ("stars", "stars", "regression")]
    loaded = backbones.load_backbone(spec=tiny_bert_spec(), sequence_length=8)
    heads = [HeadSpec(name="sentiment", num_classes=2, class_weight=(2.0, 0.5)),
             HeadSpec(name="topic", num_classes=2), HeadSpec(name="stars", type="regression", num_classes=1)]
    model = builders.build_model(loaded, heads)
    builders.compile_for_heads(model, heads, "adam")
    model.run_eagerly = True  # two tiny batches: tracing would cost more than running
    split = data.load_text_tasks("csv", str(path), tasks=tasks).train
    x, y, w = next(iter(data.make_pipeline(split, loaded.preprocessor, "text", heads, 8)))
    np.testing.assert_array_equal(w["sentiment"], [1, 1, 0, 1, 1])
    assert {k: tuple(v.shape) for k, v in model(x).items()} == {"sentiment": (5, 2), "topic": (5, 2),
                                                                "stars": (5, 1)}
    keep = [0, 1, 3, 4]  # the same batch without the example that has no sentiment label
    less = tf.nest.map_structure(lambda t: tf.gather(t, keep), (x, y, w))
    results = {name: model.evaluate(tf.data.Dataset.from_tensors(batch), return_dict=True, verbose=0)
               for name, batch in (("with", (x, y, w)), ("without", less))}
    assert results["with"]["sentiment_loss"] == pytest.approx(results["without"]["sentiment_loss"], rel=1e-6)
    assert results["with"]["sentiment_accuracy"] == results["without"]["sentiment_accuracy"]
    assert results["with"]["stars_loss"] != results["without"]["stars_loss"]  # the row has stars: it counts
