import re
import glob
import os

import pytest

from tftransfer import config as config_lib
from tftransfer.errors import UserError

from conftest import REPO


def test_defaults_validate_and_round_trip_yaml():
    cfg = config_lib.load_config(text="backbone: {preset: some_dir}\n")
    again = config_lib.load_config(text=config_lib.dump_yaml(cfg))
    assert again == cfg
    assert cfg.heads[0].name == "label" and cfg.train.unfreeze.schedule == "all"


def test_unknown_key_names_dotted_path_and_allowed_keys():
    with pytest.raises(UserError) as e:
        config_lib.load_config(text="backbone: {preset: x}\ntrain: {epoch: 3}\n")
    msg = str(e.value)
    assert "'train.epoch'" in msg and "Did you mean 'epochs'" in msg and "learning_rate" in msg
    assert "\n" not in msg


def test_unknown_nested_key_in_list_item():
    with pytest.raises(UserError, match=r"'heads\.0\.num_class'"):
        config_lib.load_config(text="backbone: {preset: x}\nheads: [{num_class: 3}]\n")


def test_wrong_type_names_path_and_expected_type():
    with pytest.raises(UserError, match=r"train\.epochs: wrong type. Expected int. Received: 'three'"):
        config_lib.load_config(text="backbone: {preset: x}\ntrain: {epochs: three}\n")
    with pytest.raises(UserError, match=r"train\.seed: wrong type"):
        config_lib.load_config(text="backbone: {preset: x}\ntrain: {seed: true}\n")


def test_int_accepted_for_float_and_bad_enum_rejected():
    cfg = config_lib.load_config(text="backbone: {preset: x}\ntrain: {learning_rate: 1}\n")
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    with pytest.raises(UserError, match="train.optimizer must be one of adamw, adam, sgd"):
        config_lib.load_config(text="backbone: {preset: x}\ntrain: {optimizer: rmsprop}\n")


def test_dotted_overrides_apply_before_validation():
    cfg = config_lib.load_config(
        text="backbone: {preset: x}\n",
        overrides=["train.epochs=7", "heads.0.num_classes=4", "train.unfreeze.lr_decay=0.5",
                   "data.digits.classes=[1, 2]"],
    )
    assert cfg.train.epochs == 7 and cfg.heads[0].num_classes == 4
    assert cfg.train.unfreeze.lr_decay == 0.5 and cfg.data.digits.classes == [1, 2]
    with pytest.raises(UserError, match="'train.epochz'"):
        config_lib.load_config(text="backbone: {preset: x}\n", overrides=["train.epochz=1"])


def test_exactly_one_backbone_source():
    with pytest.raises(UserError, match="exactly one of backbone.preset, backbone.spec, backbone.keras_application"):
        config_lib.load_config(text="backbone: {preset: x, keras_application: ResNet50}\n")


def test_unfreeze_schedule_points_validated():
    ok = config_lib.load_config(
        text="backbone: {preset: x}\ntrain: {unfreeze: {schedule: [{at_epoch: 0, groups: head}, {at_epoch: 2, groups: all}]}}\n"
    )
    assert ok.train.unfreeze.schedule[1] == {"at_epoch": 2, "groups": "all"}
    with pytest.raises(UserError, match=r"train.unfreeze.schedule.0 must be a mapping with keys at_epoch and groups"):
        config_lib.load_config(text="backbone: {preset: x}\ntrain: {unfreeze: {schedule: [{at_step: 0, groups: all}]}}\n")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))))
def test_every_shipped_config_validates_and_documents_itself(path):
    config_lib.load_config(path)
    with open(path) as f:
        head = f.read().split("\n")
    comment = "\n".join(line for line in head[:15] if line.startswith("#")).lower()
    assert head[0].startswith("#"), f"{path} must open with a comment"
    for word in ("purpose", "command", "expected"):
        assert word in comment, f"{path}: opening comment must state the {word}"


def test_numeric_ranges_scientific_notation_yaml_position_and_missing_backbone(tmp_path):
    base = "backbone: {preset: x}\n"
    for override, message in [
        ("data.eval_batch_size=-1", "data.eval_batch_size must be >= 1"),
        ("data.shuffle_buffer=0", "data.shuffle_buffer must be >= 1"),
        ("heads.0.label_smoothing=1.0", "heads.0.label_smoothing must be in [0, 1)"),
        ("train.steps_per_epoch=0", "train.steps_per_epoch must be >= 1"),
        ("train.learning_rate=.inf", "train.learning_rate must be a finite number > 0"),
        ("train.keep=median", "train.keep must be one of best, last"),
        ("train.unfreeze.every=0", "train.unfreeze.every must be auto, epoch or an integer >= 1"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            config_lib.load_config(text=base, overrides=[override])
    # YAML 1.1 reads 2e-5 as a string; we read the number, in files and overrides.
    assert config_lib.load_config(text=base + "train: {learning_rate: 2e-5}\n").train.learning_rate == 2e-5
    assert config_lib.load_config(text=base, overrides=["train.learning_rate=3E-4"]).train.learning_rate == 3e-4
    with pytest.raises(UserError, match=r"not valid YAML at line 2, column \d+: .*fix the file there"):
        config_lib.load_config(text=base + "train: {epochs: [1, 2}\n")
    with pytest.raises(UserError, match=r"^backbone: set exactly one of backbone.preset.*\(got none\)"):
        config_lib.load_config(text="train: {epochs: 1}\n")


def test_adamw_without_weight_decay_is_adam():
    """train.optimizer adamw with weight_decay 0 (the default) builds Keras' Adam: the
    same update without AdamW's per-variable `w -= lr * 0 * w` every step (#9 speed)."""
    import keras

    from tftransfer import experiment

    default = config_lib.load_config(text="backbone: {preset: x}")
    assert default.train.optimizer == "adamw" and default.train.weight_decay == 0
    assert type(experiment.optimizer(default, 10)) is keras.optimizers.Adam
    decayed = config_lib.load_config(text="backbone: {preset: x}", overrides=["train.weight_decay=0.01"])
    optimizer = experiment.optimizer(decayed, 10)
    assert type(optimizer) is keras.optimizers.AdamW and optimizer.weight_decay == 0.01
