"""train.class_weight: scikit-learn's balanced formula, mappings, and the refusals (one line each)."""

import numpy as np
import pytest

from tftransfer import class_weights
from tftransfer.errors import UserError


def test_balanced_is_n_over_classes_times_count():
    labels = [0, 0, 0, 0, 0, 0, 1, 1, 2]  # counts 6, 2, 1; n = 9, 3 classes present
    assert class_weights.balanced(labels, 4) == pytest.approx([9 / (3 * 6), 9 / (3 * 2), 9 / (3 * 1), 1.0])


def _resolve(setting, heads=(("label", "classification", ("a", "b", "c")),), labels=(0, 0, 0, 1, 2, 2)):
    return class_weights.resolve(setting, list(heads), lambda name: np.array(labels))


def test_mapping_sets_listed_classes_and_leaves_the_rest_at_one():
    assert _resolve({"b": 3.0, "c": 0.5}) == {"label": [1.0, 3.0, 0.5]}
    ints = (("label", "classification", ("0", "1")),)
    assert _resolve({1: 2.0}, ints) == {"label": [1.0, 2.0]}  # YAML integer keys match integer-id classes


def test_several_heads_balanced_covers_classification_heads_and_mapping_is_per_head():
    heads = (("sentiment", "classification", ("neg", "pos")), ("stars", "regression", None),
             ("topic", "classification", ("x", "y")))
    labels = {"sentiment": np.array([1, 1, 1, 0]), "topic": np.array([0, 1])}
    got = class_weights.resolve("balanced", list(heads), labels.__getitem__)
    assert got == {"sentiment": pytest.approx([2.0, 4 / 6]), "topic": [1.0, 1.0]}
    got = class_weights.resolve({"topic": {"y": 5.0}}, list(heads), labels.__getitem__)
    assert got == {"topic": [1.0, 5.0]}


@pytest.mark.parametrize("setting, heads, fragment", [
    ({"zzz": 2.0}, None, "train.class_weight.zzz: label 'zzz' is not one of head 'label'"),
    ("balanced", (("label", "regression", None),), "train.class_weight: head 'label' is regression"),
    ({"s": "balanced"}, (("m", "multilabel", ("a", "b")), ("s", "regression", None)),
     "train.class_weight.s: head 's' is regression"),
    ({"nope": "balanced"}, (("a", "classification", ("x", "y")), ("b", "regression", None)),
     "train.class_weight.nope: no head named 'nope'"),
    ("balanced", (("a", "regression", None), ("b", "multilabel", ("x", "y"))), "no head is a classification head"),
])
def test_refusals_name_the_key(setting, heads, fragment):
    with pytest.raises(UserError) as e:
        _resolve(setting, heads or (("label", "classification", ("a", "b", "c")),))
    assert fragment in str(e.value)


@pytest.mark.parametrize("setting, fragment", [
    ({"a": 0}, "train.class_weight.a must be a finite number > 0"),
    ({"a": -1.5}, "train.class_weight.a must be a finite number > 0"),
    ({"a": float("nan")}, "train.class_weight.a must be a finite number > 0"),
    ("inverse", "train.class_weight must be balanced or a mapping"),
    ({"h": {"a": "x"}}, "train.class_weight.h.a must be a finite number > 0"),
    ({}, "non-empty mapping"),
])
def test_config_shape_checks(setting, fragment):
    with pytest.raises(UserError) as e:
        class_weights.check_setting(setting)
    assert fragment in str(e.value)
