"""Every Keras internal behind `tftransfer.keras_private` still behaves as relied on.

A Keras upgrade that renames or changes one of them fails here, loudly and
by name, instead of silently mis-training (e.g. a frozen layer group that
never unfreezes, a learning-rate multiplier that finds no variable).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tftransfer import keras_private


def test_checked_keras_version():
    assert keras.__version__.startswith(keras_private.CHECKED_KERAS_VERSION.rsplit(".", 1)[0]), (
        f"Keras {keras.__version__}: re-check every function in tftransfer/keras_private.py, then "
        f"update CHECKED_KERAS_VERSION")


def test_sublayers_finds_layers_held_in_attributes():
    class Block(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.inner = {"dense": keras.layers.Dense(2, name="held")}

        def call(self, x):
            return self.inner["dense"](x)

    inputs = keras.Input((3,))
    model = keras.Model(inputs, Block()(inputs))
    names = [l.name for l in keras_private.sublayers(model)]
    assert "held" in names and model.name not in names  # Model.layers would miss "held"
    assert keras_private.sublayers(model, include_self=True)[0] is model
    assert "held" not in [l.name for l in keras_private.sublayers(model, recursive=False)]


def test_optimizer_variable_key_tracking_and_weight_decay():
    a, b = keras.Variable(np.ones(2), name="a"), keras.Variable(np.ones(2), name="bias")
    optimizer = keras.optimizers.AdamW(weight_decay=0.1)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    optimizer.build([a, b])
    c = keras.Variable(np.ones(2), name="c")
    assert keras_private.tracks_variable(optimizer, a) and not keras_private.tracks_variable(optimizer, c)
    assert keras_private.variable_key(optimizer, a) != keras_private.variable_key(optimizer, b)
    assert keras_private.uses_weight_decay(optimizer, a) and not keras_private.uses_weight_decay(optimizer, b)
    assert type(optimizer)._apply_weight_decay in keras_private.default_weight_decay_methods()


def test_stateless_seed_depends_only_on_its_seed():
    def draws(seed):
        generator = keras_private.StatelessSeed(tf.constant(seed, tf.int64))
        return [keras.random.uniform((4,), seed=generator).numpy() for _ in range(2)]

    first, again, other = draws([1, 2]), draws([1, 2]), draws([1, 3])
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not np.allclose(first[0], first[1])  # each draw is a new one
    assert not np.allclose(first[0], other[0])


def test_kernel_variable_and_adding_weights_to_a_built_layer():
    dense = keras.layers.EinsumDense("ab,bcd->acd", output_shape=(2, 3))
    dense.build((None, 4))
    embedding = keras.layers.Embedding(5, 3)
    embedding.build((None,))
    assert keras_private.kernel_variable(dense) is dense.kernel  # no Keras LoRA: the variable itself
    assert keras_private.kernel_variable(embedding) is embedding.embeddings
    dense.enable_lora(1)  # the public property is now the merged value, not the variable
    assert keras_private.kernel_variable(dense) is not dense.kernel
    assert isinstance(keras_private.kernel_variable(dense), keras.Variable)
    before = len(dense.weights)
    with pytest.raises(ValueError):
        dense.add_weight(name="extra", shape=(1,))  # a built layer refuses new weights
    with keras_private.weights_unlocked(dense):
        dense.extra = dense.add_weight(name="extra", shape=(1,))
    assert len(dense.weights) == before + 1


def _h5_contents(path):
    import h5py

    contents = {}
    with h5py.File(path) as f:
        contents["/"] = (sorted(f.attrs.items()), None)

        def visit(name, obj):
            value = obj[()] if isinstance(obj, h5py.Dataset) else None
            contents[name] = (sorted((k, str(v)) for k, v in obj.attrs.items()), value)

        f.visititems(visit)
    return contents


def _assert_same_file(a, b):
    ca, cb = _h5_contents(a), _h5_contents(b)
    assert sorted(ca) == sorted(cb)
    for name in ca:
        assert ca[name][0] == cb[name][0], name
        if ca[name][1] is None:
            assert cb[name][1] is None, name
        else:
            assert ca[name][1].dtype == cb[name][1].dtype, name
            np.testing.assert_array_equal(ca[name][1], cb[name][1], err_msg=name)


def test_weights_writer_writes_keras_file_without_walking_the_model_again(tmp_path, monkeypatch):
    from keras.src.saving import saving_lib

    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(3)(keras.layers.BatchNormalization()(keras.layers.Dense(4)(inputs)))
    model = keras.Model(inputs, outputs)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = np.random.default_rng(0).random((8, 6)), np.arange(8) % 3
    model.fit(x, y, epochs=1, verbose=0)
    walks = []
    real_save_state = saving_lib._save_state

    def counting(saveable, *args, **kwargs):
        if kwargs.get("inner_path") == "":  # a whole walk (it recurses with the children's paths)
            walks.append(saveable)
        return real_save_state(saveable, *args, **kwargs)

    def keras_save():  # the reference file, uncounted
        monkeypatch.setattr(saving_lib, "_save_state", real_save_state)
        model.save_weights(str(tmp_path / "keras.weights.h5"))
        monkeypatch.setattr(saving_lib, "_save_state", counting)

    monkeypatch.setattr(saving_lib, "_save_state", counting)
    writer = keras_private.WeightsWriter()
    for step in range(3):
        model.fit(x, y, epochs=1, verbose=0)  # new values (weights, BatchNorm statistics, Adam slots)
        writer.save(model, str(tmp_path / "fast.weights.h5"))
        keras_save()
        _assert_same_file(tmp_path / "fast.weights.h5", tmp_path / "keras.weights.h5")
    assert len(walks) == 1  # the walk ran once (recording); later saves replayed it

    # Keras reads it back: weights and optimizer state.
    clone = keras.models.clone_model(model)
    clone.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    clone.optimizer.build(clone.trainable_variables)
    clone.load_weights(str(tmp_path / "fast.weights.h5"))
    for a, b in zip(model.weights + model.optimizer.variables, clone.weights + clone.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    # A rebuilt optimizer (new variables, as unfreezing makes) is walked again.
    model.layers[1].trainable = False
    model.compile("sgd", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, verbose=0)
    writer.save(model, str(tmp_path / "fast.weights.h5"))
    keras_save()
    _assert_same_file(tmp_path / "fast.weights.h5", tmp_path / "keras.weights.h5")
    assert len(walks) == 2


def test_weights_writer_leaves_computed_values_to_keras(tmp_path):
    # Keras' LoRA stores the merged kernel, computed at save time: no replay.
    inputs = keras.Input((6,))
    dense = keras.layers.Dense(3)
    model = keras.Model(inputs, dense(inputs))
    dense.enable_lora(2)
    dense.lora_kernel_b.assign(np.ones((2, 3)))
    writer = keras_private.WeightsWriter()
    writer.save(model, str(tmp_path / "fast.weights.h5"))
    assert writer._plan is None
    model.save_weights(str(tmp_path / "keras.weights.h5"))
    _assert_same_file(tmp_path / "fast.weights.h5", tmp_path / "keras.weights.h5")


def _events(log_dir):
    """{(split, tag): [(step, value)]} of the scalar events under `log_dir`."""
    import glob
    import os

    from tensorflow.core.util import event_pb2

    out = {}
    for split in ("train", "validation"):
        for path in glob.glob(os.path.join(log_dir, split, "events.out.tfevents.*")):
            for record in tf.data.TFRecordDataset(path):
                event = event_pb2.Event.FromString(record.numpy())
                for v in event.summary.value:
                    if v.tag.startswith("epoch_"):
                        value = tf.make_ndarray(v.tensor) if v.HasField("tensor") else v.simple_value
                        out.setdefault((split, v.tag), []).append((event.step, float(value)))
    return {key: sorted(values) for key, values in out.items()}  # one event file per fit


def test_tensorboard_writes_keras_epoch_scalars_in_one_call_per_writer(tmp_path):
    class Extra(keras.callbacks.Callback):  # values that are not Keras metrics, as tftransfer adds
        def on_epoch_end(self, epoch, logs=None):
            logs.update(lr_head=0.5 ** epoch, val_macro_f1=np.float64(1 / (epoch + 3)))

    def fit(callback):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
        model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy", metrics=["accuracy"])
        x, y = np.random.default_rng(0).random((16, 4)), np.arange(16) % 3
        for initial in (0, 2):  # two fits (a resumed run): new writers each time
            model.fit(x, y, validation_data=(x, y), initial_epoch=initial, epochs=initial + 2, verbose=0,
                      callbacks=[Extra(), callback])
        return callback

    ours = fit(keras_private.TensorBoard(str(tmp_path / "ours")))
    fit(keras.callbacks.TensorBoard(str(tmp_path / "keras")))
    got, want = _events(str(tmp_path / "ours")), _events(str(tmp_path / "keras"))
    assert sorted(got) == sorted(want) and ("validation", "epoch_macro_f1") in got
    for key in want:
        assert [s for s, _ in got[key]] == [s for s, _ in want[key]] == [0, 1, 2, 3], key
        np.testing.assert_allclose([v for _, v in got[key]], [v for _, v in want[key]], rtol=1e-6, err_msg=str(key))
    # One compiled writer per writer and set of names, not one eager op per scalar.
    assert len(ours._epoch_writers) == 2
