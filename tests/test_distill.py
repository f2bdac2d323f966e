"""tftransfer.distill: distiller, schedule, teacher cache, ensembles, init, CLI."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tftransfer import backbones, builders
from tftransfer.data import Split, make_pipeline
from tftransfer.distill import (
    DistillationSchedule,
    Distiller,
    Teacher,
    cached_pipeline,
    check_compatible,
    ensemble,
    init_from_teacher,
    load_or_compute,
    load_teacher,
    schedule_value,
)
from tftransfer.distill.student_init import evenly_spaced
from tftransfer.errors import UserError
from tftransfer.heads import HeadSpec

from conftest import TINY_VOCAB, run_cli, tiny_bert_spec

HEADS = [HeadSpec(num_classes=3)]
ACCURACY = {"label": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]}


def _dense_model(width, name, seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,), name="image")
    pooled = keras.layers.Dense(width, activation="relu", name="label_pool")(inputs)
    return keras.Model(inputs, {"label": keras.layers.Dense(3, name="label")(pooled)}, name=name)


def _dense_split(n=64, unlabelled_every=0):
    rng = np.random.RandomState(0)
    x = rng.rand(n, 4).astype("float32")
    y = rng.randint(0, 3, n).astype("int32")
    if unlabelled_every:
        y[::unlabelled_every] = -1
    return Split(tf.data.Dataset.from_tensor_slices((x, y)), n)


def _text_split():
    words = TINY_VOCAB[5:]
    rng = np.random.RandomState(1)
    texts = [" ".join(rng.choice(words, 5)) for _ in range(48)]
    labels = rng.randint(0, 3, 48).astype("int32")
    labels[::6] = -1  # some unlabelled transfer examples
    return Split(tf.data.Dataset.from_tensor_slices((texts, labels)), 48)


def _tiny_text_model(seed, **spec):
    keras.utils.set_random_seed(seed)
    loaded = backbones.load_backbone(spec={**tiny_bert_spec(), **spec}, sequence_length=8)
    return loaded, builders.build_model(loaded, HEADS)


class _Target:
    def __init__(self):
        self.alpha = keras.Variable(0.0, trainable=False)
        self.temperature = keras.Variable(1.0, trainable=False)


def _run_schedule(schedule, epochs, steps):
    schedule.set_params({"epochs": epochs, "steps": steps})
    schedule.on_train_begin()
    seen = []
    for epoch in range(epochs):
        schedule.on_epoch_begin(epoch)
        for batch in range(steps):
            schedule.on_train_batch_begin(batch)
            seen.append((float(schedule.target.alpha.numpy()), float(schedule.target.temperature.numpy())))
            schedule.on_train_batch_end(batch)
    return seen


# ---------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------


def test_schedule_sets_alpha_and_temperature_by_epoch_and_step():
    assert schedule_value("linear", 0.0, 1.0, 0.25) == pytest.approx(0.25)
    assert schedule_value("cosine", 1.0, 0.0, 0.5) == pytest.approx(0.5)
    assert schedule_value("cosine", 1.0, 0.0, 2.0) == pytest.approx(0.0)  # clipped
    by_epoch = DistillationSchedule(alpha=0.0, temperature=4.0, alpha_end=0.5, temperature_end=1.0,
                                    schedule="linear", target=_Target())
    seen = _run_schedule(by_epoch, epochs=5, steps=2)
    expected = [(0.0, 4.0), (0.125, 3.25), (0.25, 2.5), (0.375, 1.75), (0.5, 1.0)]
    assert seen[::2] == [pytest.approx(e) for e in expected] and seen[1::2] == seen[::2]
    logs = {}
    by_epoch.on_epoch_end(4, logs)
    assert logs == {"alpha": 0.5, "temperature": 1.0}
    # Resuming at epoch 3 (BackupAndRestore) gives epoch 3's values at once.
    by_epoch.on_epoch_begin(3)
    assert float(by_epoch.target.alpha.numpy()) == pytest.approx(0.375)

    by_step = DistillationSchedule(alpha=1.0, temperature=2.0, alpha_end=0.0, schedule="cosine",
                                   unit="step", duration=4, target=_Target())
    seen = _run_schedule(by_step, epochs=2, steps=3)
    alphas = [a for a, _ in seen]
    assert alphas == pytest.approx([1.0, 0.853553, 0.5, 0.146447, 0.0, 0.0], abs=1e-5)
    assert {t for _, t in seen} == {2.0}

    constant = DistillationSchedule(alpha=0.3, temperature=3.0, target=_Target())
    assert _run_schedule(constant, 2, 1) == [pytest.approx((0.3, 3.0))] * 2
    with pytest.raises(UserError, match="schedule must be one of"):
        DistillationSchedule(alpha=0.1, temperature=2.0, schedule="step")
    with pytest.raises(UserError, match="alpha must be in"):
        DistillationSchedule(alpha=1.5, temperature=2.0)
    with pytest.raises(UserError, match="needs a model with an `alpha`"):
        DistillationSchedule(alpha=0.1, temperature=2.0, target=object()).set_params({}) or \
            DistillationSchedule(alpha=0.1, temperature=2.0, target=object()).on_train_begin()


def test_schedule_takes_effect_in_the_compiled_step_without_retracing():
    traces = []

    class CountingDistiller(Distiller):
        def compute_loss(self, *args, **kwargs):
            traces.append(1)
            return super().compute_loss(*args, **kwargs)

    teacher, student = _dense_model(16, "teacher", 0), _dense_model(8, "student", 1)
    distiller = CountingDistiller(teacher, student, HEADS, alpha=0.0, temperature=3.0)
    distiller.compile(keras.optimizers.SGD(0.05), metrics=ACCURACY)
    ds = make_pipeline(_dense_split(), keras.layers.Identity(), "image", HEADS, 16, training=True)
    schedule = DistillationSchedule(alpha=0.0, temperature=3.0, alpha_end=1.0, temperature_end=1.0,
                                    schedule="linear")
    history = distiller.fit(ds, epochs=3, verbose=0, callbacks=[schedule], shuffle=False).history
    assert len(traces) == 1  # one trace for three epochs of changing alpha / T
    assert history["alpha"] == [0.0, 0.5, 1.0] and history["temperature"] == [3.0, 2.0, 1.0]
    # alpha = 0: only the soft term; alpha = 1: only the labels.
    assert history["total_loss"][0] == pytest.approx(history["distillation_loss"][0], rel=1e-5)
    assert history["total_loss"][2] == pytest.approx(history["student_loss"][2], rel=1e-5)


# ---------------------------------------------------------------------------
# Distiller
# ---------------------------------------------------------------------------


def test_teacher_unchanged_student_trained_and_unlabelled_rows_masked():
    teacher, student = _dense_model(16, "teacher", 0), _dense_model(8, "student", 1)
    before_teacher = [w.numpy().copy() for w in teacher.weights]
    before_student = [w.numpy().copy() for w in student.weights]
    distiller = Distiller(teacher, student, HEADS, alpha=0.5, temperature=2.0)
    distiller.compile(keras.optimizers.Adam(0.05), metrics=ACCURACY)
    split = _dense_split(unlabelled_every=2)
    distiller.fit(make_pipeline(split, keras.layers.Identity(), "image", HEADS, 16, training=True),
                  epochs=2, verbose=0, shuffle=False)
    for w, b in zip(teacher.weights, before_teacher):
        np.testing.assert_array_equal(w.numpy(), b)
    assert all(not np.allclose(w.numpy(), b) for w, b in zip(student.weights, before_student))
    assert len(distiller.trainable_weights) == len(student.trainable_weights)
    # Metrics skip unlabelled rows: accuracy over the 32 labelled rows only.
    x = np.stack([e[0] for e in split.dataset.as_numpy_iterator()])
    y = np.array([e[1] for e in split.dataset.as_numpy_iterator()])
    result = distiller.evaluate(x, {"label": y}, batch_size=64, return_dict=True, verbose=0)
    predicted = student.predict(x, verbose=0)["label"].argmax(-1)
    assert result["accuracy"] == pytest.approx(np.mean(predicted[y >= 0] == y[y >= 0]), abs=1e-6)
    with pytest.raises(UserError, match="only classification heads distil"):
        Distiller(teacher, student, [HeadSpec(type="regression", num_classes=3)])


def test_cached_and_uncached_training_give_the_same_student(tmp_path):
    split = _text_split()
    _, teacher = _tiny_text_model(0)
    students = {}
    for mode in ("none", "disk"):
        loaded, student = _tiny_text_model(1, num_layers=1, hidden_dim=8, intermediate_dim=16)
        distiller = Distiller(teacher, student, HEADS, alpha=0.3, temperature=2.0,
                              feature_loss_weight=0.5)  # hint on the pooled features, 16 vs 8 wide
        distiller.compile(keras.optimizers.Adam(1e-2), metrics=ACCURACY)
        args = dict(preprocessor=loaded.preprocessor, modality="text", heads=HEADS,
                    global_batch_size=16, training=True, seed=7)
        if mode == "none":
            ds = make_pipeline(split, **args)
        else:
            outputs, info = load_or_compute(distiller, split, loaded.preprocessor, "text", mode="disk",
                                            cache_dir=str(tmp_path), key="k")
            assert info["source"] == "computed" and os.path.isfile(info["path"])
            assert set(outputs) == {"final_output", "label_pool"}
            assert outputs["final_output"]["label"].shape == (48, 3)
            assert outputs["label_pool"].shape == (48, 16)
            ds = cached_pipeline(split, outputs, **args)
        keras.utils.set_random_seed(3)
        history = distiller.fit(ds, epochs=2, verbose=0, shuffle=False).history
        students[mode] = (student, history)
    (reference, ref_history), (student, history) = students["none"], students["disk"]
    for a, b in zip(reference.weights, student.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4, rtol=1e-4)
    assert history["loss"] == pytest.approx(ref_history["loss"], rel=1e-4)
    assert ref_history["loss"][-1] < ref_history["loss"][0]
    # Second lookups: the file (disk) or a fresh teacher pass (memory), same numbers.
    for mode, source in (("disk", "disk"), ("memory", "computed")):
        again, info = load_or_compute(distiller, split, loaded.preprocessor, "text", mode=mode,
                                      cache_dir=str(tmp_path), key="k")
        assert info["source"] == source
        np.testing.assert_allclose(again["final_output"]["label"], outputs["final_output"]["label"], atol=1e-6)


def test_teacher_outputs_of_sentence_pairs_read_both_texts():
    rng = np.random.RandomState(2)
    first, second = ([" ".join(rng.choice(TINY_VOCAB[5:], 3)) for _ in range(6)] for _ in range(2))
    split = Split(tf.data.Dataset.from_tensor_slices(((first, second), np.zeros(6, "int32"))), 6)
    loaded, teacher = _tiny_text_model(0)
    _, student = _tiny_text_model(1, num_layers=1, hidden_dim=8, intermediate_dim=16)
    outputs, _ = load_or_compute(Distiller(teacher, student, HEADS), split, loaded.preprocessor, "text")
    pairs = loaded.preprocessor(x=(tf.constant(first), tf.constant(second)))
    np.testing.assert_allclose(outputs["final_output"]["label"], teacher(pairs)["label"], atol=1e-6)
    alone = teacher(loaded.preprocessor(tf.constant(first)))["label"]
    assert np.abs(outputs["final_output"]["label"] - np.asarray(alone)).max() > 1e-4  # the second text counted


def test_ensemble_teacher_averages_logits(tmp_path):
    a, b = _dense_model(16, "transfer_model", 0), _dense_model(12, "transfer_model", 1)  # same names
    paths = [str(tmp_path / "a.keras"), str(tmp_path / "b.keras")]
    a.save(paths[0])
    b.save(paths[1])
    x = np.random.RandomState(0).rand(5, 4).astype("float32")
    expected = (a(x)["label"] + b(x)["label"]) / 2
    np.testing.assert_allclose(ensemble([a, b])(x)["label"], expected, atol=1e-6)
    teacher = load_teacher(paths)
    np.testing.assert_allclose(teacher.model(x)["label"], expected, atol=1e-6)
    assert teacher.parameters == a.count_params() + b.count_params()
    assert teacher.size_bytes == sum(os.path.getsize(p) for p in paths)
    assert teacher.head_classes == {"label": 3} and teacher.modality == "image"
    assert not teacher.model.trainable_weights
    with pytest.raises(UserError, match="no such work dir or .keras file"):
        load_teacher([str(tmp_path / "missing")])
    with pytest.raises(UserError, match="has no model.keras; train the teacher first"):
        load_teacher([str(tmp_path)])


def test_teacher_and_student_must_share_input_and_classes():
    _, teacher_model = _tiny_text_model(0)
    teacher_loaded = backbones.load_backbone(spec=tiny_bert_spec(), sequence_length=8)
    teacher = Teacher(teacher_model, [teacher_model], ["runs/t"], [teacher_loaded.preprocessor], "text", 1)
    other_vocab = backbones.load_backbone(spec=tiny_bert_spec(TINY_VOCAB + ["extra"]), sequence_length=8)
    student = builders.build_model(other_vocab, HEADS)
    with pytest.raises(UserError, match="different tokenizer .* give the student the teacher's vocabulary"):
        check_compatible(teacher, student, other_vocab.preprocessor, "text")
    # Without the teacher's preprocessor (a bare .keras file) the embedding size still tells.
    bare = Teacher(teacher_model, [teacher_model], ["t.keras"], [None], "text", 1)
    with pytest.raises(UserError, match="embeds 20 token ids but the student's tokenizer has 21"):
        check_compatible(bare, student, other_vocab.preprocessor, "text")
    five = builders.build_model(teacher_loaded, [HeadSpec(num_classes=5)])
    with pytest.raises(UserError, match="head 'label' has 3 classes but the student's has 5"):
        check_compatible(teacher, five, teacher_loaded.preprocessor, "text")
    with pytest.raises(UserError, match="is a text model but the student is a image model"):
        check_compatible(teacher, five, teacher_loaded.preprocessor, "image")
    check_compatible(teacher, builders.build_model(teacher_loaded, HEADS), teacher_loaded.preprocessor, "text")


def test_init_from_teacher_copies_slices_of_the_chosen_layers():
    assert evenly_spaced(6, 2) == [0, 5] and evenly_spaced(6, 3) == [0, 2, 5]
    teacher, _ = _tiny_text_model(0)
    student, _ = _tiny_text_model(1, num_layers=1, num_heads=1, hidden_dim=8, intermediate_dim=16)
    report = init_from_teacher(student.model, teacher.model)
    assert report["teacher_layers"] == [1] and report["sliced"] > 10 and not report["skipped"]
    t_emb = teacher.model.get_layer("token_embedding").embeddings.numpy()
    s_emb = student.model.get_layer("token_embedding").embeddings.numpy()
    np.testing.assert_array_equal(s_emb, t_emb[:, :8])
    t_ffn = teacher.model.get_layer("transformer_layer_1")._feedforward_intermediate_dense.kernel.numpy()
    s_ffn = student.model.get_layer("transformer_layer_0")._feedforward_intermediate_dense.kernel.numpy()
    np.testing.assert_array_equal(s_ffn, t_ffn[:8, :16])
    with pytest.raises(UserError, match="teacher_layers must list 1 teacher block indices"):
        init_from_teacher(student.model, teacher.model, layers=[0, 1])


# ---------------------------------------------------------------------------
# python -m tftransfer.distill
# ---------------------------------------------------------------------------

STUDENT_YAML = """
name: tiny_student
backbone:
  spec: {architecture: resnet, input_conv_filters: [64], input_conv_kernel_sizes: [3],
         stackwise_num_filters: [64], stackwise_num_blocks: [1],
         stackwise_num_strides: [1], block_type: basic_block}
  image_size: 16
heads: [{name: label, label_smoothing: 0.1}]
data:
  source: digits
  digits: {classes: [0, 1, 2]}
  train_per_class: 20
  batch_size: 20
train: {epochs: 2, optimizer: adam, verbose: 0}
distill:
  teacher: [TEACHER]
  alpha: 0.2
  temperature: 4.0
  temperature_end: 2.0
  schedule: linear
  cache: disk
"""


@pytest.fixture(scope="module")
def teacher_workdir(_tiny_digits_run, tmp_path_factory):
    """A copy of the session's finished TINY_DIGITS_YAML run (conftest): a real trained teacher."""
    import shutil

    W = str(tmp_path_factory.mktemp("teacher") / "w")
    shutil.copytree(_tiny_digits_run, W)
    return W


def _student_config(tmp_path, teacher, extra=""):
    path = tmp_path / "student.yaml"
    path.write_text(STUDENT_YAML.replace("TEACHER", teacher) + extra)
    return str(path)


def test_cli_distils_a_trained_work_dir(teacher_workdir, tmp_path):
    W = str(tmp_path / "student")
    result = run_cli("tftransfer.distill", f"--config={_student_config(tmp_path, teacher_workdir)}",
                     f"--workdir={W}")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.yaml", "model.keras", "metrics.json", "export/1/saved_model.pb",
                 "export/1/assets/labels.txt"):
        assert os.path.exists(os.path.join(W, name)), name
    assert len(os.listdir(os.path.join(W, "cache"))) == 2  # train + validation teacher outputs
    metrics = json.load(open(os.path.join(W, "metrics.json")))
    for who in ("teacher", "student"):
        for key in ("accuracy", "parameters", "size_bytes", "latency_ms_per_example"):
            assert metrics[who][key] is not None and metrics[who][key] >= 0, (who, key)
    teacher, student = metrics["teacher"], metrics["student"]
    assert student["parameters"] < teacher["parameters"]
    assert metrics["accuracy_retained_percent"] == pytest.approx(
        100 * student["accuracy"] / teacher["accuracy"])
    assert metrics["train"]["temperature"] == 2.0 and metrics["epochs"] == 2
    assert 0 <= metrics["train"]["accuracy"] <= 1 and "val_accuracy" not in metrics["train"]
    assert metrics["teacher"]["accuracy"] > 0.5  # 3 classes: chance is 0.33
    assert "% retained" in result.stdout
    student_model = keras.saving.load_model(os.path.join(W, "model.keras"))
    assert student_model.count_params() == student["parameters"]


def _assert_user_error(result, W, fragment):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("error: ") and fragment in lines[-1], lines[-1]
    assert not os.path.exists(os.path.join(W, "metrics.json"))
    assert not os.path.exists(os.path.join(W, "config.yaml"))


def test_cli_missing_teacher_dir_exits_2(tmp_path):
    W = str(tmp_path / "w")
    missing = str(tmp_path / "no_teacher")
    result = run_cli("tftransfer.distill", f"--config={_student_config(tmp_path, missing)}", f"--workdir={W}")
    _assert_user_error(result, W, "no such work dir or .keras file")


@pytest.mark.parametrize("override, fragment", [
    ("--config.data.digits.classes=[0, 1, 2, 3]", "head 'label' has 3 classes but the student's has 4"),
    ("--config.data.augment.flip=horizontal", "cached teacher outputs would not match the augmented"),
])
def test_cli_mismatched_teacher_or_augmented_cache_exits_2(teacher_workdir, tmp_path, override, fragment):
    W = str(tmp_path / "w")
    config = _student_config(tmp_path, teacher_workdir)
    result = run_cli("tftransfer.distill", f"--config={config}", f"--workdir={W}", override)
    _assert_user_error(result, W, fragment)


# ---------------------------------------------------------------------------
# Layerwise feature distillation (narrow, shallow students)
# ---------------------------------------------------------------------------


def test_layerwise_projections_train_loss_falls_and_student_exports_without_them(tmp_path):
    from tftransfer.distill.features import LayerwiseFeatures

    t_loaded, teacher = _tiny_text_model(11, num_layers=4, hidden_dim=32, intermediate_dim=64)
    s_loaded, student = _tiny_text_model(12)  # 2 layers, width 16: narrower and shallower
    init_from_teacher(s_loaded.model, t_loaded.model)
    distiller = Distiller(teacher, student, HEADS, alpha=0.5, features="layerwise", feature_loss_weight=1.0)
    layerwise = distiller.layerwise
    assert isinstance(layerwise, LayerwiseFeatures)
    assert layerwise.pairs == [(0, 0), (3, 1)]  # one per student layer, evenly spaced
    assert [tuple(p.kernel.shape) for p in layerwise.projections] == [(16, 32), (16, 32)]
    projection_ids = {id(p.kernel) for p in layerwise.projections}
    assert projection_ids <= {id(v) for v in distiller.trainable_weights}
    before = [p.kernel.numpy().copy() for p in layerwise.projections]

    distiller.compile(keras.optimizers.Adam(1e-2), metrics=ACCURACY)
    train = make_pipeline(_text_split(), s_loaded.preprocessor, "text", HEADS, 16, training=True)  # some unlabelled
    history = distiller.fit(train, epochs=4, verbose=0).history["layerwise_loss"]
    assert history[-1] < 0.7 * history[0], history
    assert all(not np.array_equal(b, p.kernel.numpy()) for b, p in zip(before, layerwise.projections))

    path = str(tmp_path / "student.keras")
    student.save(path)
    reloaded = keras.saving.load_model(path)
    assert reloaded.count_params() == student.count_params()
    assert not [v.path for v in reloaded.weights if "layerwise" in v.path]


def test_layerwise_pairs_and_config_errors():
    from tftransfer import config as config_lib
    from tftransfer.distill.features import resolve_pairs

    assert resolve_pairs([[5, 1], [1, 0]], 6, 2) == [(5, 1), (1, 0)]
    with pytest.raises(UserError, match=r"distill.features.0: \[6, 0\] is out of range"):
        resolve_pairs([[6, 0]], 6, 2)
    with pytest.raises(UserError, match="set distill.cache: none"):
        config_lib.load_config(text="distill: {teacher: x, features: layerwise, feature_loss_weight: 1}")
    with pytest.raises(UserError, match="needs distill.feature_loss_weight > 0"):
        config_lib.load_config(text="distill: {teacher: x, features: layerwise, cache: none}")
    with pytest.raises(UserError, match="must be layerwise or a list"):
        config_lib.load_config(text="distill: {teacher: x, features: all, cache: none, feature_loss_weight: 1}")
