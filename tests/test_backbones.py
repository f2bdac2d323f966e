import os

import keras
import numpy as np
import pytest

from tftransfer import backbones
from tftransfer.errors import UserError

from conftest import TINY_RESNET, minilm_dir, tiny_bert_spec


def test_resnet_spec_groups_and_preprocessing():
    loaded = backbones.load_backbone(spec=TINY_RESNET, image_size=32)
    assert loaded.modality == "image" and loaded.image_size == (32, 32)
    assert [g.name for g in loaded.layer_groups] == ["stem", "stack0", "stack1"]
    grouped = [l for g in loaded.layer_groups for l in g.layers]
    assert len(grouped) == len(loaded.model.layers) - 1  # every layer but the input
    # The preprocessor resizes any image and applies ImageNet normalisation.
    out = np.asarray(loaded.preprocessor(np.full((8, 8, 3), 255.0, "float32")))
    assert out.shape == (32, 32, 3)
    np.testing.assert_allclose(out[0, 0], [(1 - m) / s for m, s in zip(backbones.IMAGENET_MEAN, backbones.IMAGENET_STD)], rtol=1e-5)
    assert not loaded.description["pretrained"]


def test_preset_directory_round_trip_keeps_weights_and_normalisation(tmp_path):
    loaded = backbones.load_backbone(spec=TINY_RESNET, image_size=32)
    backbones.save_backbone_preset(loaded, str(tmp_path))
    again = backbones.load_backbone(str(tmp_path))
    x = np.random.default_rng(0).uniform(0, 255, (2, 20, 20, 3)).astype("float32")
    a = loaded.model(loaded.preprocessor(x))
    b = again.model(again.preprocessor(x))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert again.description["format"] == "keras_hub" and again.description["pretrained"]
    scratch = backbones.load_backbone(str(tmp_path), load_weights=False)
    c = scratch.model(scratch.preprocessor(x))
    assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-3  # random init differs


def test_bert_spec_text_groups_and_tokenizer():
    loaded = backbones.load_backbone(spec=tiny_bert_spec(), sequence_length=8)
    assert loaded.modality == "text" and loaded.sequence_length == 8
    assert [g.name for g in loaded.layer_groups] == ["embeddings", "transformer_layer_0", "transformer_layer_1"]
    assert "pooled_dense" in [l.name for l in loaded.layer_groups[-1].layers]
    x = loaded.preprocessor(["the movie was good"])
    assert x["token_ids"].shape == (1, 8)
    assert int(np.asarray(x["padding_mask"]).sum()) == 6  # [CLS] 4 words [SEP]


def test_huggingface_bert_checkpoint_loads_offline_with_groups():
    loaded = backbones.load_backbone(minilm_dir(), sequence_length=16)
    assert loaded.modality == "text" and loaded.description["format"] == "huggingface"
    assert [g.name for g in loaded.layer_groups][:2] == ["embeddings", "transformer_layer_0"]
    assert len(loaded.layer_groups) == 7  # embeddings + 6 transformer blocks
    out = loaded.model(loaded.preprocessor(["a sentence"]))
    assert out["sequence_output"].shape == (1, 16, 384)


def test_keras_applications_resnet50_local_weights_take_rgb(tmp_path):
    reference = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3))
    path = str(tmp_path / "resnet50_notop.weights.h5")
    reference.save_weights(path)
    loaded = backbones.load_backbone(keras_application="ResNet50", weights=path, image_size=64)
    assert [g.name for g in loaded.layer_groups] == ["stem", "conv2", "conv3", "conv4", "conv5"]
    rgb = np.random.default_rng(1).uniform(0, 255, (1, 64, 64, 3)).astype("float32")
    ours = loaded.model(loaded.preprocessor(rgb))
    # keras.applications' own preprocessing: RGB -> BGR, minus the caffe mean.
    theirs = reference(keras.applications.resnet50.preprocess_input(rgb.copy()))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-4, atol=1e-4)


def test_unknown_preset_name_and_missing_directory_are_user_errors():
    with pytest.raises(UserError, match="not a keras-hub preset name"):
        backbones.load_backbone("resnet_51_imagenet")
    with pytest.raises(UserError, match="no such local directory"):
        backbones.load_backbone("./no/such/preset_dir")


def test_builtin_preset_offline_says_download_failed():
    # A real preset name: its download goes through conftest's unreachable proxy.
    with pytest.raises(UserError) as e:
        backbones.load_backbone("resnet_18_imagenet")
    assert "download" in str(e.value) and "local preset directory" in str(e.value)


def test_bad_spec_is_a_user_error():
    with pytest.raises(UserError, match="architecture must be one of resnet, bert"):
        backbones.load_backbone(spec={"architecture": "vgg"})
    with pytest.raises(UserError, match="stackwise_num_filters"):
        backbones.load_backbone(spec={**TINY_RESNET, "stackwise_num_filters": [32, 128]})
