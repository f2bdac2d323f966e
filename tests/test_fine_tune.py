"""tftransfer.fine_tune: the one-call ULMFiT recipe on tiny image and text models."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tftransfer
from tftransfer.backbones import TINY_RESNET_SPEC
from tftransfer.callbacks import ProgressiveUnfreezing
from tftransfer.errors import UserError
from tftransfer.fine_tune import fine_tune
from tftransfer.heads import HeadSpec
from tftransfer.schedules import SlantedTriangular

RESNET_SPEC = TINY_RESNET_SPEC
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "great", "awful",
         "the", "was", "plot", "fun", "boring"]


def image_model():
    keras.utils.set_random_seed(0)
    loaded = tftransfer.load_backbone(spec=RESNET_SPEC, image_size=16)
    return loaded, tftransfer.build_model(loaded, [HeadSpec(num_classes=3)])


def image_ds(n=16, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16, 16, 3)).astype("float32")
    y = {"label": rng.integers(0, 3, size=n)}
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def test_uncompiled_image_model_gradual_ulmfit_recipe():
    loaded, model = image_model()
    stem_before = [w.numpy().copy() for w in loaded.layer_groups[0].variables]
    history = fine_tune(model, image_ds(), image_ds(seed=1), epochs=3, freeze_epochs=1, lr=1e-2,
                        verbose=0)
    h = history.history
    assert len(h["loss"]) == 4 and len(h["val_loss"]) == 4
    # Head only, then the groups found in the backbone unfreeze top-down.
    assert h["unfrozen_groups"] == [0, 1, 2, 3]
    assert [h[f"lr_{g}"][-1] > 0 for g in ("stem", "stack0", "stack1")] == [True] * 3
    assert [h["lr_stem"][i] for i in range(3)] == [0, 0, 0]
    # Compiled with Adam + slanted triangular over 4 epochs x 2 steps, and
    # discriminative rates at 1/2.6 per group.
    schedule = model.optimizer._learning_rate
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert isinstance(schedule, SlantedTriangular) and schedule.total_steps == 8
    np.testing.assert_allclose(h["lr_head"][-1], float(schedule(8)), rtol=1e-6)
    np.testing.assert_allclose(h["lr_stack1"][-1], h["lr_head"][-1] / 2.6, rtol=1e-6)
    np.testing.assert_allclose(h["lr_stem"][-1], h["lr_head"][-1] / 2.6**3, rtol=1e-6)
    assert not all(np.array_equal(a, b.numpy()) for a, b in zip(stem_before, loaded.layer_groups[0].variables))


def test_unfreeze_all_after_freeze_epochs_and_compiled_model_keeps_optimizer():
    loaded, model = image_model()
    optimizer = keras.optimizers.SGD(0.05)
    model.compile(optimizer, loss={"label": keras.losses.SparseCategoricalCrossentropy(from_logits=True)})
    history = fine_tune(model, image_ds(), epochs=2, freeze_epochs=1, unfreeze="all", lr_decay=0.5,
                        layer_groups=loaded.layer_groups, verbose=0)
    h = history.history
    assert h["unfrozen_groups"] == [0, 3, 3]
    assert model.optimizer is optimizer and int(optimizer.iterations) == 6
    np.testing.assert_allclose(h["lr_stack0"], [0, 0.0125, 0.0125], rtol=1e-6)


def test_text_model_groups_found_and_trained():
    keras.utils.set_random_seed(0)
    loaded = tftransfer.load_backbone(spec={
        "architecture": "bert", "vocabulary": VOCAB, "num_layers": 2, "num_heads": 2,
        "hidden_dim": 16, "intermediate_dim": 32, "max_sequence_length": 32}, sequence_length=8)
    model = tftransfer.build_model(loaded, [HeadSpec(num_classes=2, pooling="mean")])
    texts = ["good movie", "great fun", "bad plot", "awful boring movie"] * 2
    labels = [1, 1, 0, 0] * 2
    x = loaded.preprocessor(tf.constant(texts))
    ds = tf.data.Dataset.from_tensor_slices((x, {"label": labels})).batch(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fine_tune(model, ds, epochs=1, freeze_epochs=1, lr=1e-2, verbose=0)
    # Mean pooling leaves BERT's pooler unused: it stays out of training even
    # when the top group unfreezes (no "Gradients do not exist" warning).
    assert not [w for w in caught if "Gradients do not exist" in str(w.message)]
    assert not model.get_layer(loaded.model.name).get_layer("pooled_dense").trainable
    h = history.history
    assert [k for k in h if k.startswith("lr_")] == [
        "lr_head", "lr_embeddings", "lr_transformer_layer_0", "lr_transformer_layer_1"]
    assert h["unfrozen_groups"] == [0, 1]
    assert h["lr_transformer_layer_1"][1] > 0 and h["lr_transformer_layer_0"] == [0, 0]


def test_errors():
    loaded, model = image_model()
    unknown_length = image_ds().filter(lambda x, y: True)
    with pytest.raises(UserError, match="steps_per_epoch"):
        fine_tune(model, unknown_length, epochs=1, verbose=0)
    with pytest.raises(UserError, match="unfreeze must be gradual or all"):
        fine_tune(model, image_ds(), unfreeze="sometimes")
    model.compile("adam", loss="mse")
    with pytest.raises(UserError, match="already compiled.*lr"):
        fine_tune(model, image_ds(), lr=1e-3)
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(UserError, match="layer_groups=loaded.layer_groups"):
        fine_tune(plain, image_ds())
