"""tftransfer.workdir: the one safe-mode loader, strict JSON, layout constants."""

import os

import keras
import numpy as np
import pytest

from tftransfer import workdir
from tftransfer.errors import UserError


def test_load_model_refuses_lambda_layers_truncated_and_missing_files(tmp_path):
    inputs = keras.Input((3,))
    unsafe = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    path = str(tmp_path / "lambda.keras")
    unsafe.save(path)
    with pytest.raises(UserError, match=r"lambda.keras' could not be loaded as a Keras model: .*[Ll]ambda"):
        workdir.load_model(path, "distill.teacher.0")
    safe = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    good = str(tmp_path / "good.keras")
    safe.save(good)
    reloaded = workdir.load_model(good)
    np.testing.assert_array_equal(reloaded.get_weights()[0], safe.get_weights()[0])
    truncated = str(tmp_path / "truncated.keras")
    with open(good, "rb") as f, open(truncated, "wb") as out:
        out.write(f.read()[:200])
    with pytest.raises(UserError, match=r"^--workdir model '.*truncated.keras' could not be loaded"):
        workdir.load_model(truncated, "--workdir model")
    with pytest.raises(UserError, match=r"is missing; train first"):
        workdir.load_model(str(tmp_path / "none.keras"))


def test_clear_removes_every_run_output_and_nothing_else(tmp_path):
    for name in (workdir.METRICS, workdir.HISTORY, workdir.CONFIG, "notes.txt"):
        (tmp_path / name).write_text("x")
    os.makedirs(tmp_path / workdir.CHECKPOINTS)
    workdir.clear(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
