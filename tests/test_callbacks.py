"""ProgressiveUnfreezing: schedules, frozen weights, BatchNorm, optimizer state,
discriminative learning rates, logging, resume, save, mixed precision and
MirroredStrategy.

Models are tiny (a 2-stack keras-hub ResNet on 16x16 images, or a chain of
bias layers whose gradients are identical by construction, so learning-rate
ratios can be read off the updates exactly).
"""

import glob
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tftransfer
from tftransfer.backbones import TINY_RESNET_SPEC
from tftransfer.backbones import LayerGroup
from tftransfer.callbacks import ProgressiveUnfreezing, resolve_schedule
from tftransfer.errors import UserError
from tftransfer.heads import HeadSpec
from tftransfer.lr_multipliers import discriminative_multipliers
from tftransfer.schedules import SlantedTriangular

GROUPS = ["stem", "stack0", "stack1"]
RESNET_SPEC = TINY_RESNET_SPEC
LOSS = {"label": keras.losses.SparseCategoricalCrossentropy(from_logits=True)}


def tiny_resnet(freeze_backbone=False, seed=0):
    keras.utils.set_random_seed(seed)
    loaded = tftransfer.load_backbone(spec=RESNET_SPEC, image_size=16)
    model = tftransfer.build_model(loaded, [HeadSpec(num_classes=3)], freeze_backbone=freeze_backbone)
    return loaded, model


def image_data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16, 16, 3)).astype("float32")
    y = {"label": rng.integers(0, 3, size=n)}
    return x, y


def snapshot(layers):
    return [w.numpy().copy() for layer in layers for w in layer.weights]


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def trainable_group_names(model, loaded):
    ids = {id(v) for v in model.trainable_variables}
    return {g.name for g in loaded.layer_groups if any(id(v) in ids for v in g.variables)}


def bn_layers(group):
    return [l for l in group.layers if isinstance(l, keras.layers.BatchNormalization)]


def conv_layers(group):
    return [l for l in group.layers if isinstance(l, keras.layers.Conv2D)]


class Recorder(keras.callbacks.Callback):
    """Runs after ProgressiveUnfreezing: what the model looks like per epoch."""

    def __init__(self, loaded):
        super().__init__()
        self.loaded = loaded
        self.begin, self.end, self.trainable = {}, {}, {}

    def _weights(self):
        return {g.name: snapshot(g.layers) for g in self.loaded.layer_groups} | {
            "head": snapshot([self.model.get_layer("label")]),
            "bn": {g.name: snapshot(bn_layers(g)) for g in self.loaded.layer_groups},
        }

    def on_epoch_begin(self, epoch, logs=None):
        self.trainable[epoch] = trainable_group_names(self.model, self.loaded)
        self.begin[epoch] = self._weights()

    def on_epoch_end(self, epoch, logs=None):
        self.end[epoch] = self._weights()


# ---------------------------------------------------------------------------
# Schedules, frozen weights, BatchNorm
# ---------------------------------------------------------------------------


def test_resolve_schedule_gradual_and_points():
    assert resolve_schedule("gradual", GROUPS) == [
        (0, frozenset()),
        (1, frozenset({"stack1"})),
        (2, frozenset({"stack0", "stack1"})),
        (3, frozenset(GROUPS)),
    ]
    assert resolve_schedule("gradual", GROUPS, "step", every=5)[1] == (5, frozenset({"stack1"}))
    points = resolve_schedule(
        [{"at_epoch": 4, "groups": "all"}, {"at_epoch": 2, "groups": ["stack1"]}], GROUPS
    )
    assert points == [(0, frozenset()), (2, frozenset({"stack1"})), (4, frozenset(GROUPS))]


def test_explicit_schedule_trainable_sets_frozen_weights_and_batchnorm():
    # freeze_backbone=True: the callback also takes over a frozen backbone.
    loaded, model = tiny_resnet(freeze_backbone=True)
    model.compile(keras.optimizers.Adam(1e-2), loss=LOSS)
    recorder = Recorder(loaded)
    schedule = [
        {"at_epoch": 0, "groups": "head"},
        {"at_epoch": 1, "groups": ["stack1"]},
        {"at_epoch": 2, "groups": "all"},
    ]
    x, y = image_data()
    model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0,
              callbacks=[ProgressiveUnfreezing(loaded.layer_groups, schedule=schedule), recorder])

    # Exactly the scheduled groups are trainable (in trainable_variables,
    # i.e. in the gradient computation) at each epoch.
    assert recorder.trainable == {0: set(), 1: {"stack1"}, 2: set(GROUPS)}
    b, e = recorder.begin, recorder.end
    # Frozen groups are bit-identical across their frozen epochs.
    for group in GROUPS:
        assert same(b[0][group], e[0][group]), group
    assert same(b[1]["stem"], e[1]["stem"]) and same(b[1]["stack0"], e[1]["stack0"])
    # ... and do train once unfrozen; the head trains throughout.
    assert not same(b[1]["stack1"], e[1]["stack1"])
    assert not same(b[2]["stem"], e[2]["stem"]) and not same(b[2]["stack0"], e[2]["stack0"])
    assert all(not same(b[i]["head"], e[i]["head"]) for i in range(3))
    # BatchNorm: moving mean/variance (and gamma/beta) never change, frozen
    # or not (train_bn=False).
    for group in GROUPS:
        assert same(b[0]["bn"][group], e[2]["bn"][group]), group


def test_train_bn_lets_unfrozen_batchnorm_train_only():
    loaded, model = tiny_resnet()
    model.compile(keras.optimizers.Adam(1e-2), loss=LOSS)
    recorder = Recorder(loaded)
    schedule = [{"at_epoch": 1, "groups": ["stack1"]}]
    x, y = image_data()
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[ProgressiveUnfreezing(loaded.layer_groups, schedule=schedule, train_bn=True),
                         recorder])
    b, e = recorder.begin, recorder.end
    assert same(b[0]["bn"]["stack1"], e[0]["bn"]["stack1"])  # frozen: inference mode
    assert not same(b[1]["bn"]["stack1"], e[1]["bn"]["stack1"])  # unfrozen: trains
    assert same(b[1]["bn"]["stem"], e[1]["bn"]["stem"])  # still frozen group


def test_step_unit_schedule_changes_mid_epoch():
    loaded, model = tiny_resnet()
    model.compile(keras.optimizers.SGD(0.1), loss=LOSS)
    seen = []
    stack1 = loaded.layer_groups[2]

    class StepProbe(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_begin(self, batch, logs=None):
            seen.append((self.epoch * 4 + batch, trainable_group_names(model, loaded),
                         snapshot(conv_layers(stack1))))

    schedule = [{"at_step": 3, "groups": "stack1"}, {"at_step": 6, "groups": "all"}]
    x, y = image_data()
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
              callbacks=[ProgressiveUnfreezing(loaded.layer_groups, schedule=schedule, unit="step"),
                         StepProbe()])
    assert [(step, groups) for step, groups, _ in seen] == [
        (0, set()), (1, set()), (2, set()),
        (3, {"stack1"}), (4, {"stack1"}), (5, {"stack1"}),
        (6, set(GROUPS)), (7, set(GROUPS)),
    ]
    # The retraced step is the one that runs: stack1 moves from step 3 on.
    assert same(seen[0][2], seen[3][2]) and not same(seen[3][2], seen[4][2])


def test_step_unit_with_unknown_epoch_length_counts_steps():
    model, groups, layers = bias_chain()
    model.compile(keras.optimizers.SGD(0.1), loss="mse")
    x = np.zeros((12, 4), "float32")
    ds = tf.data.Dataset.from_tensor_slices((x, x + 1)).filter(lambda a, b: True).batch(4)
    seen = []

    class Probe(keras.callbacks.Callback):
        # Batch end: Keras also calls batch begin once more at the end of
        # data of unknown length, for a batch that never runs.
        def on_train_batch_end(self, batch, logs=None):
            ids = {id(v) for v in model.trainable_variables}
            seen.append(sorted(g.name for g in groups if id(g.layers[0].b) in ids))

    model.fit(ds, epochs=2, verbose=0, callbacks=[
        ProgressiveUnfreezing(groups, unit="step", schedule=[{"at_step": 4, "groups": "all"}]), Probe()])
    assert seen == [[]] * 4 + [["g0", "g1", "g2"]] * 2  # 3 steps per epoch, all from step 4
    with pytest.raises(UserError, match="every="):
        model.fit(ds, epochs=1, verbose=0,
                  callbacks=[ProgressiveUnfreezing(groups, unit="step", schedule="gradual")])


# ---------------------------------------------------------------------------
# Optimizer state across an unfreeze
# ---------------------------------------------------------------------------


def test_adam_state_of_head_survives_unfreeze():
    loaded, model = tiny_resnet()
    optimizer = keras.optimizers.Adam(1e-2)
    model.compile(optimizer, loss=LOSS)
    head_kernel = model.get_layer("label").kernel
    stem_kernel = loaded.layer_groups[0].layers[1].kernel  # conv1_conv
    state = {}

    class MomentProbe(keras.callbacks.Callback):
        def _moments(self, variable):
            i = optimizer._get_variable_index(variable)
            return optimizer._momentums[i], optimizer._velocities[i]

        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                m, v = self._moments(head_kernel)
                state["end0"] = (m, v, m.numpy().copy(), v.numpy().copy(), int(optimizer.iterations))
                state["stem_m0"] = self._moments(stem_kernel)[0].numpy().copy()

        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:  # after the stage change to "all"
                m, v = self._moments(head_kernel)
                state["begin1"] = (m, v, m.numpy().copy(), v.numpy().copy(), int(optimizer.iterations))

    x, y = image_data()
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[ProgressiveUnfreezing(loaded.layer_groups,
                                               schedule=[{"at_epoch": 1, "groups": "all"}]),
                         MomentProbe()])
    m0, v0, m0_val, v0_val, it0 = state["end0"]
    m1, v1, m1_val, v1_val, it1 = state["begin1"]
    assert m1 is m0 and v1 is v0  # same slot variables: no new optimizer
    assert np.abs(m0_val).max() > 0 and np.array_equal(m0_val, m1_val) and np.array_equal(v0_val, v1_val)
    assert it0 == it1 == 2  # iteration count carries on (2 steps per epoch)
    assert int(optimizer.iterations) == 4
    assert not np.array_equal(m0.numpy(), m0_val)  # and the moments continue updating
    # The frozen stem had no update during epoch 0, then trains.
    assert not np.any(state["stem_m0"])
    i = optimizer._get_variable_index(stem_kernel)
    assert np.abs(optimizer._momentums[i].numpy()).max() > 0


# ---------------------------------------------------------------------------
# Discriminative learning rates
# ---------------------------------------------------------------------------


class AddBias(keras.layers.Layer):
    """y = x + b: every bias in a chain of these gets the same gradient."""

    def __init__(self, init=0.0, **kwargs):
        super().__init__(**kwargs)
        self.init = init

    def build(self, input_shape):
        self.b = self.add_weight(shape=(input_shape[-1],),
                                 initializer=keras.initializers.Constant(self.init), name="b")

    def call(self, x):
        return x + keras.ops.cast(self.b, x.dtype)


def bias_chain(init=0.0):
    inputs = keras.Input((4,))
    layers = [AddBias(init, name=n) for n in ("g0", "g1", "g2", "top")]
    x = inputs
    for layer in layers:
        x = layer(x)
    model = keras.Model(inputs, x)
    groups = [LayerGroup(layer.name, [layer]) for layer in layers[:3]]
    return model, groups, {layer.name: layer for layer in layers}


def update_ratios(layers, before):
    """Each layer's update divided by the head's ('top') update."""
    delta = {n: layers[n].b.numpy().astype("float64") - before[n] for n in layers}
    return {n: delta[n] / delta["top"] for n in layers}


@pytest.mark.parametrize("make_optimizer", [
    lambda: keras.optimizers.SGD(0.1),
    lambda: keras.optimizers.Adam(SlantedTriangular(0.01, total_steps=10)),
], ids=["sgd", "adam_slanted_triangular"])
def test_discriminative_update_ratios_equal_decay_powers(make_optimizer):
    model, groups, layers = bias_chain()
    model.compile(make_optimizer(), loss="mse")
    decay = 1 / 2.6
    x = np.zeros((8, 4), "float32")
    y = np.linspace(1, 2, 32, dtype="float32").reshape(8, 4)
    before = {n: l.b.numpy().astype("float64") for n, l in layers.items()}
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[ProgressiveUnfreezing(groups, schedule="all", lr_decay=decay)])
    ratios = update_ratios(layers, before)
    # Head at the full rate, top group lr*decay, ... bottom lr*decay**3.
    expected = {"top": 1.0, "g2": decay, "g1": decay**2, "g0": decay**3}
    for name, value in expected.items():
        np.testing.assert_allclose(ratios[name], value, rtol=1e-6, err_msg=name)


def test_discriminative_weight_decay_is_scaled_too():
    # Biases start at 1 and the targets equal the prediction: zero gradient,
    # so AdamW's update is its decoupled weight decay alone (lr * wd * w).
    model, groups, layers = bias_chain(init=1.0)
    # Dyadic rates: every update below is exact in float32.
    model.compile(keras.optimizers.AdamW(0.5, weight_decay=0.5), loss="mse")
    x = np.zeros((8, 4), "float32")
    before = {n: l.b.numpy().astype("float64") for n, l in layers.items()}
    model.fit(x, x + 4.0, batch_size=8, epochs=1, verbose=0,
              callbacks=[ProgressiveUnfreezing(groups, schedule="all", lr_decay=0.5)])
    ratios = update_ratios(layers, before)
    np.testing.assert_allclose(layers["top"].b.numpy(), 1 - 0.5 * 0.5, rtol=1e-6)
    for name, value in {"g2": 0.5, "g1": 0.25, "g0": 0.125}.items():
        np.testing.assert_allclose(ratios[name], value, rtol=1e-6, err_msg=name)


def test_mixed_float16_loss_scale_optimizer():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model, groups, layers = bias_chain()
        model.compile(keras.optimizers.SGD(0.1), loss="mse")
        x = np.zeros((8, 4), "float32")
        y = np.full((8, 4), 0.5, "float32")
        before = {n: l.b.numpy().astype("float64") for n, l in layers.items()}
        model.fit(x, y, batch_size=8, epochs=2, verbose=0,
                  callbacks=[ProgressiveUnfreezing(groups, schedule=[{"at_epoch": 0, "groups": ["g1", "g2"]}],
                                                   lr_decay=0.5)])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert int(model.optimizer.iterations) == 2
    ratios = update_ratios(layers, before)
    np.testing.assert_array_equal(layers["g0"].b.numpy(), before["g0"])  # frozen
    np.testing.assert_allclose(ratios["g2"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(ratios["g1"], 0.25, rtol=1e-6)


def test_discriminative_multipliers_are_ulmfit_order():
    m = discriminative_multipliers(GROUPS, 0.5)
    assert m == {"head": 1.0, "stack1": 0.5, "stack0": 0.25, "stem": 0.125}


# ---------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------


def read_scalars(log_dir):
    from tensorflow.core.util import event_pb2

    out = {}
    for path in glob.glob(os.path.join(log_dir, "train", "events.out.tfevents.*")):
        for raw in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(raw.numpy())
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    return out


def test_history_and_tensorboard_get_stage_and_group_learning_rates(tmp_path):
    loaded, model = tiny_resnet()
    model.compile(keras.optimizers.SGD(0.1), loss=LOSS)
    x, y = image_data()
    history = model.fit(x, y, batch_size=8, epochs=4, verbose=0, callbacks=[
        ProgressiveUnfreezing(loaded.layer_groups, lr_decay=0.5, log_dir=str(tmp_path))])
    h = history.history
    assert h["unfrozen_groups"] == [0, 1, 2, 3]
    np.testing.assert_allclose(h["lr_head"], [0.1] * 4, rtol=1e-6)
    np.testing.assert_allclose(h["lr_stack1"], [0, 0.05, 0.05, 0.05], rtol=1e-6)
    np.testing.assert_allclose(h["lr_stack0"], [0, 0, 0.025, 0.025], rtol=1e-6)
    np.testing.assert_allclose(h["lr_stem"], [0, 0, 0, 0.0125], rtol=1e-6)
    scalars = read_scalars(str(tmp_path))
    assert scalars["unfreezing/unfrozen_groups"] == {0: 0, 1: 1, 2: 2, 3: 3}
    np.testing.assert_allclose([scalars["unfreezing/lr_stem"][i] for i in range(4)], h["lr_stem"],
                               rtol=1e-6)


# ---------------------------------------------------------------------------
# Resume with BackupAndRestore
# ---------------------------------------------------------------------------


class Kill(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("simulated kill")


class StageLog(keras.callbacks.Callback):
    """(global step, trainable groups, optimizer iterations) at each batch."""

    def __init__(self, loaded, steps):
        super().__init__()
        self.loaded, self.steps, self.rows = loaded, steps, []

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self.rows.append((self.epoch * self.steps + batch,
                          frozenset(trainable_group_names(self.model, self.loaded)),
                          int(self.model.optimizer.iterations)))


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_resume_after_kill_restores_stage_and_learning_rates(tmp_path, unit):
    x, y = image_data()
    steps, epochs = 2, 4
    if unit == "epoch":
        schedule = [{"at_epoch": 1, "groups": ["stack1"]}, {"at_epoch": 2, "groups": "all"}]
    else:
        schedule = [{"at_step": 3, "groups": ["stack1"]}, {"at_step": 5, "groups": "all"}]
    _, initial = tiny_resnet()
    initial_weights = initial.get_weights()

    def run(callbacks_before, callbacks_after=()):
        loaded, model = tiny_resnet()
        model.set_weights(initial_weights)
        model.compile(keras.optimizers.Adam(SlantedTriangular(1e-2, total_steps=steps * epochs)),
                      loss=LOSS)
        log = StageLog(loaded, steps)
        unfreezing = ProgressiveUnfreezing(loaded.layer_groups, schedule=schedule, unit=unit,
                                           lr_decay=0.5)
        try:
            history = model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0,
                                callbacks=[unfreezing, *callbacks_before, log, *callbacks_after])
        except RuntimeError as e:
            assert "simulated kill" in str(e)
            history = None
        return model, log.rows, history

    reference, ref_rows, ref_history = run([])
    backup = str(tmp_path / "backup")
    _, killed_rows, _ = run([keras.callbacks.BackupAndRestore(backup)], [Kill(2)])
    assert len(killed_rows) == 2 * steps
    resumed, rows, history = run([keras.callbacks.BackupAndRestore(backup)])

    # The resumed run starts at epoch 2 / step 4 with the optimizer's
    # iteration count restored and the same stage as the uninterrupted run.
    assert rows[0][0] == 2 * steps and rows[0][2] == 2 * steps
    assert rows == ref_rows[2 * steps:]
    expected_at_4 = frozenset(GROUPS) if unit == "epoch" else frozenset({"stack1"})
    assert rows[0][1] == expected_at_4
    # Same learning rates per group, same final weights.
    for key in ("lr_head", "lr_stem", "lr_stack0", "lr_stack1", "unfrozen_groups"):
        np.testing.assert_allclose(history.history[key], ref_history.history[key][2:], rtol=1e-6)
    for a, b in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------


def test_model_save_and_safe_mode_reload_after_fit(tmp_path):
    loaded, model = tiny_resnet()
    model.compile(keras.optimizers.AdamW(SlantedTriangular(1e-3, total_steps=8), weight_decay=0.01),
                  loss=LOSS)
    x, y = image_data()
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[ProgressiveUnfreezing(loaded.layer_groups, schedule="gradual", lr_decay=0.4)])
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0)["label"],
                               model.predict(x, verbose=0)["label"], atol=1e-6)
    schedule = reloaded.optimizer._learning_rate
    assert isinstance(schedule, SlantedTriangular) and schedule.get_config()["total_steps"] == 8
    assert int(reloaded.optimizer.iterations) == 4


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_bad_arguments_raise_user_error():
    groups = [LayerGroup(n, []) for n in GROUPS]
    with pytest.raises(UserError, match="unknown layer group 'stack9'"):
        ProgressiveUnfreezing(groups, schedule=[{"at_epoch": 1, "groups": ["stack9"]}])
    with pytest.raises(UserError, match="unit must be epoch or step"):
        ProgressiveUnfreezing(groups, unit="batch")
    with pytest.raises(UserError, match="lr_decay must be in"):
        ProgressiveUnfreezing(groups, lr_decay=2.6)
    with pytest.raises(UserError, match="keys at_step and groups"):
        ProgressiveUnfreezing(groups, unit="step", schedule=[{"at_epoch": 1, "groups": "all"}])
    with pytest.raises(UserError, match="must be all, frozen, gradual"):
        ProgressiveUnfreezing(groups, schedule="sometimes")


def test_optimizer_built_without_backbone_variables_is_a_user_error():
    loaded, model = tiny_resnet(freeze_backbone=True)
    optimizer = keras.optimizers.Adam()
    model.compile(optimizer, loss=LOSS)
    optimizer.build(model.trainable_variables)  # head only
    x, y = image_data(8)
    with pytest.raises(UserError, match="optimizer was built before layer group"):
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[ProgressiveUnfreezing(loaded.layer_groups, schedule="all")])


# ---------------------------------------------------------------------------
# MirroredStrategy (2 logical CPUs, in a subprocess: devices split before TF starts)
# ---------------------------------------------------------------------------

MIRRORED_SCRIPT = textwrap.dedent("""
    from tftransfer.distribute import split_logical_cpus
    split_logical_cpus(2)
    import json, keras, numpy as np, tensorflow as tf, tftransfer
    from tftransfer.callbacks import ProgressiveUnfreezing
    from tftransfer.heads import HeadSpec
    from tftransfer.schedules import SlantedTriangular
    spec = json.loads('SPEC')
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 16, 16, 3)).astype("float32")
    y = {"label": rng.integers(0, 3, size=16)}
    initial = None

    def run(strategy):
        global initial
        with strategy.scope():
            keras.utils.set_random_seed(0)
            loaded = tftransfer.load_backbone(spec=dict(spec), image_size=16)
            model = tftransfer.build_model(loaded, [HeadSpec(num_classes=3)])
            if initial is None:
                initial = model.get_weights()
            model.set_weights(initial)
            model.compile(keras.optimizers.Adam(SlantedTriangular(1e-2, total_steps=6)),
                          loss={"label": keras.losses.SparseCategoricalCrossentropy(from_logits=True)})
        cb = ProgressiveUnfreezing(loaded.layer_groups, lr_decay=0.5,
                                   schedule=[{"at_epoch": 1, "groups": ["stack1"]},
                                             {"at_epoch": 2, "groups": "all"}])
        h = model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[cb])
        return model, h.history, cb.trainable_groups

    one, h1, g1 = run(tf.distribute.get_strategy())
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    two, h2, g2 = run(mirrored)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(one.get_weights(), two.get_weights()))
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(one.get_weights(), initial))
    print(json.dumps({"replicas": mirrored.num_replicas_in_sync, "diff": diff, "moved": moved,
                      "groups": [g1, g2], "h1": h1, "h2": h2}))
""")


def test_mirrored_two_replicas_match_one_device(tmp_path):
    import json

    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT.replace("SPEC", json.dumps(RESNET_SPEC)))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(tftransfer.__file__)))}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert result["groups"] == [GROUPS, GROUPS]
    assert result["moved"] > 1e-3  # it trained
    assert result["diff"] < 1e-4, result["diff"]
    for key in ("unfrozen_groups", "lr_stem", "lr_stack1", "lr_head"):
        np.testing.assert_allclose(result["h2"][key], result["h1"][key], rtol=1e-6)
    np.testing.assert_allclose(result["h2"]["loss"], result["h1"]["loss"], rtol=1e-4)


# ---------------------------------------------------------------------------
# Pacing: gradual unfreezing that fits the epoch budget
# ---------------------------------------------------------------------------


def test_gradual_interval_is_ulmfit_when_epochs_allow_and_paced_otherwise():
    from tftransfer.callbacks import gradual_interval

    assert gradual_interval(3, epochs=10, steps_per_epoch=4) is None  # 10 >= 2 x 3: one per epoch
    assert gradual_interval(7, epochs=10, steps_per_epoch=14) == 10  # 140 steps / 14
    assert gradual_interval(7, epochs=10, steps_per_epoch=14, every="epoch") is None
    assert gradual_interval(7, epochs=10, steps_per_epoch=None) is None
    assert gradual_interval(40, epochs=1, steps_per_epoch=3) == 1


def test_seven_group_backbone_gradual_over_ten_epochs_trains_every_group(caplog):
    keras.utils.set_random_seed(0)
    spec = {"architecture": "bert", "vocabulary": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c"],
            "num_layers": 6, "num_heads": 1, "hidden_dim": 8, "intermediate_dim": 8, "max_sequence_length": 8}
    loaded = tftransfer.load_backbone(spec=spec, sequence_length=8)
    assert len(loaded.layer_groups) == 7
    model = tftransfer.build_model(loaded, [HeadSpec(num_classes=2, pooling="cls")])
    model.compile(keras.optimizers.Adam(1e-2), loss=LOSS)
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(5, 8, (8, 8)).astype("int32"), "segment_ids": np.zeros((8, 8), "int32"),
         "padding_mask": np.ones((8, 8), "int32")}
    y = {"label": rng.integers(0, 2, 8)}
    before = {g.name: snapshot(g.layers) for g in loaded.layer_groups}
    callback = ProgressiveUnfreezing(loaded.layer_groups, schedule="gradual", every="auto")
    history = model.fit(x, y, batch_size=4, epochs=10, verbose=0, callbacks=[callback])  # 2 steps an epoch
    assert [int(v) for v in history.history["unfrozen_groups"]][-5:] == [7] * 5  # all in by the half
    for group in loaded.layer_groups:
        assert not same(before[group.name], snapshot(group.layers)), group.name
    # One per epoch (ULMFiT's pace) over 5 epochs never reaches the bottom groups, and says so.
    loaded2 = tftransfer.load_backbone(spec=spec, sequence_length=8)
    model2 = tftransfer.build_model(loaded2, [HeadSpec(num_classes=2, pooling="cls")])
    # Eager: this fit checks the schedule's warnings only (the compiled path is the fit above),
    # and saves the five retraces of a 6-layer BERT that graph mode would do here.
    model2.compile(keras.optimizers.Adam(1e-2), loss=LOSS, run_eagerly=True)
    with caplog.at_level("WARNING", logger="tftransfer.callbacks"):
        model2.fit(x, y, batch_size=4, epochs=5, verbose=0, callbacks=[ProgressiveUnfreezing(
            loaded2.layer_groups, schedule="gradual", every="epoch", lr_decay=1 / 2.6)])
    lines = [r.getMessage() for r in caplog.records]
    assert any("embeddings, transformer_layer_0, transformer_layer_1 unfreeze only after the run's 5 epochs"
               in line for line in lines), lines
    assert any("embeddings, transformer_layer_0 train at less than 0.005 of the head's learning rate"
               in line for line in lines), lines
