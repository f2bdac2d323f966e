import keras
import numpy as np

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
