"""The bad-input catalogue: every user mistake is one `error:` line, exit 2, and an untouched work dir.

Each case is run through the real entrypoint (`cli.run(main)`: flag parsing,
overrides, the exit-code contract) by `tests/bad_inputs_runner.py`, one
process per entrypoint so TensorFlow starts once. Each case asserts:
exit code 2; exactly one line starting with `error:`, which is the last line
and contains the fragments that name the key, file or value; no traceback;
and the work dir exactly as it was before (absent, or its files unchanged).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, TINY_DIGITS_YAML

TINY_TEXT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "meh"]


def _text_backbone(extra=""):
    return (f"backbone:\n  spec: {{architecture: bert, vocabulary: {TINY_TEXT_VOCAB}, num_layers: 1, "
            f"num_heads: 1, hidden_dim: 8, intermediate_dim: 8, max_sequence_length: 16}}\n"
            f"  sequence_length: 8\n{extra}")


def _files(root):
    """`{relative path: bytes}` of every file under `root` (None when absent)."""
    if not os.path.exists(root):
        return None
    if os.path.isfile(root):
        return {".": open(root, "rb").read()}
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def _train_cases(t):
    """(name, argv, fragments) for `python -m tftransfer.train`; files made under `t`."""
    cases = []

    def config(name, text):
        path = t / f"{name}.yaml"
        path.write_text(text)
        return str(path)

    def add(name, text, fragments, flags=(), workdir=None):
        cases.append((name, [f"--config={config(name, text)}", f"--workdir={workdir or t / ('w_' + name)}",
                             *flags], fragments))

    digits_head = TINY_DIGITS_YAML.split("data:")[0]

    def csv(name, content, encoding="utf-8"):
        path = t / f"{name}.csv"
        path.write_bytes(content.encode(encoding))
        return path

    def text_csv_case(name, content, fragments, extra="", data_extra="", encoding="utf-8"):
        path = csv(name, content, encoding)
        add(name, _text_backbone(extra) + f"data: {{source: csv, train_path: {path}{data_extra}}}\n"
            "train: {epochs: 1, verbose: 0}\n", fragments)

    add("unknown_key", TINY_DIGITS_YAML + "extra_top: 3\n", ["Unknown config key 'extra_top'"])
    add("unknown_nested_key", TINY_DIGITS_YAML.replace("train: {epochs: 2", "train: {epochz: 2"),
        ["'train.epochz'", "Did you mean 'epochs'"])
    add("wrong_type", TINY_DIGITS_YAML.replace("epochs: 2", "epochs: many"),
        ["train.epochs: wrong type", "Expected int"])
    add("yaml_syntax", TINY_DIGITS_YAML + "heads: [{name: label\n", ["not valid YAML at line", "column"])
    add("no_backbone", "train: {epochs: 1}\n", ["backbone: set exactly one of backbone.preset"])
    add("two_backbones", TINY_DIGITS_YAML.replace("backbone:\n", "backbone:\n  preset: x\n"),
        ["got preset, spec"])
    add("missing_image_folder", digits_head + "data: {source: image_folder, train_path: /no/such/dir}\n",
        ["data.train_path", "no such directory"])
    add("missing_csv", _text_backbone() + "data: {source: csv, train_path: /no/such.csv}\n",
        ["data.train_path", "no such file"])
    add("num_classes_disagrees", TINY_DIGITS_YAML + "heads: [{num_classes: 7}]\n",
        ["num_classes=7 disagrees", "3 classes"])
    add("preset_offline", TINY_DIGITS_YAML, ["resnet_18_imagenet", "download"],
        ["--config.backbone.spec=null", "--config.backbone.preset=resnet_18_imagenet"])
    add("local_preset_missing", TINY_DIGITS_YAML, ["./no/such/preset_dir"],
        ["--config.backbone.spec=null", "--config.backbone.preset=./no/such/preset_dir"])
    add("spec_unknown_key", TINY_DIGITS_YAML.replace("block_type:", "blok_type:"),
        ["backbone.spec.blok_type", "Did you mean 'block_type'"])
    bad_json, no_weights, truncated = (t / "preset_bad_json", t / "hf_no_weights", t / "hf_truncated")
    for d in (bad_json, no_weights, truncated):
        d.mkdir()
    (bad_json / "config.json").write_text("{not json")
    hf_config = json.dumps({"model_type": "bert", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
                            "num_attention_heads": 1, "intermediate_size": 8})
    for d in (no_weights, truncated):
        (d / "config.json").write_text(hf_config)
        (d / "vocab.txt").write_text("\n".join(TINY_TEXT_VOCAB))
    (truncated / "model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\": {\"dtype\"")
    for name, d, fragments in (("preset_config_not_json", bad_json, ["config.json is not valid JSON"]),
                               ("hf_no_safetensors", no_weights, ["has no model.safetensors"]),
                               ("hf_truncated_safetensors", truncated, ["model.safetensors is not a complete"])):
        path = csv(name, "text,label\ngood,a\nbad,b\n")
        add(name, f"backbone: {{preset: {d}, sequence_length: 8}}\ndata: {{source: csv, train_path: {path}}}\n",
            [str(d)] + fragments)
    add("unknown_flag", TINY_DIGITS_YAML, ["Unknown command line flag 'epochs'"], ["--epochs=3"])
    add("bad_strategy_flag", TINY_DIGITS_YAML, ["--strategy"], ["--strategy=gpu_cluster"])
    add("eval_batch_size_negative", TINY_DIGITS_YAML, ["data.eval_batch_size must be >= 1"],
        ["--config.data.eval_batch_size=-4"])
    add("shuffle_buffer_zero", TINY_DIGITS_YAML, ["data.shuffle_buffer must be >= 1"],
        ["--config.data.shuffle_buffer=0"])
    add("label_smoothing_range", TINY_DIGITS_YAML, ["heads.0.label_smoothing must be in [0, 1)"],
        ["--config.heads.0.label_smoothing=1.5"])
    add("steps_per_epoch_zero", TINY_DIGITS_YAML, ["train.steps_per_epoch must be >= 1"],
        ["--config.train.steps_per_epoch=0"])
    add("learning_rate_inf", TINY_DIGITS_YAML, ["train.learning_rate must be a finite number > 0"],
        ["--config.train.learning_rate=.inf"])
    add("keep_unknown", TINY_DIGITS_YAML, ["train.keep must be one of best, last"], ["--config.train.keep=median"])
    add("unfreeze_every_zero", TINY_DIGITS_YAML, ["train.unfreeze.every must be auto, epoch or an integer"],
        ["--config.train.unfreeze.every=0"])
    add("unfreeze_unknown_group", TINY_DIGITS_YAML, ["unknown layer group 'stack9'"],
        ["--config.train.unfreeze.schedule=[{at_epoch: 0, groups: [stack9]}]"])
    add("lr_decay_range", TINY_DIGITS_YAML, ["train.unfreeze.lr_decay must be in (0, 1]"],
        ["--config.train.unfreeze.lr_decay=2.6"])
    add("head_name_not_identifier", TINY_DIGITS_YAML + "heads: [{name: my-label}]\n",
        ["heads.0.name must be a Python identifier"])
    add("duplicate_head_names", TINY_DIGITS_YAML + "heads: [{name: a}, {name: a}]\n",
        ["head names must be unique"])
    add("old_digits_kshot_key", TINY_DIGITS_YAML.replace("train_per_class: 20", "digits: {train_per_class: 3}")
        .replace("  digits: {classes: [0, 1, 2]}\n", ""), ["data.digits.train_per_class moved to data.train_per_class"])
    add("kshot_too_many", TINY_DIGITS_YAML, ["data.train_per_class=500 leaves no validation images"],
        ["--config.data.train_per_class=500"])
    add("text_backbone_on_images", _text_backbone() + "data: {source: digits, digits: {classes: [0, 1]}}\n",
        ["backbone is a text model", "gives image"])
    text_csv_case("augment_on_text", "text,label\ngood,a\nbad,b\n", ["data.augment applies to images only"],
                  data_extra=", augment: {flip: horizontal}")
    path = csv("seq_len", "text,label\ngood,a\nbad,b\n")
    add("sequence_length_over_positions",
        _text_backbone().replace("sequence_length: 8", "sequence_length: 64")
        + f"data: {{source: csv, train_path: {path}}}\n",
        ["backbone.sequence_length=64 exceeds the backbone's 16 position embeddings"])
    text_csv_case("label_outside_num_classes", "text,label\ngood,0\nbad,1\ngood,4\n",
                  ["label 4 is outside heads.0.num_classes=2"], extra="heads: [{num_classes: 2}]\n")
    text_csv_case("empty_csv", "text,label\n", ["holds no examples"])
    text_csv_case("missing_column", "sentence,label\ngood,a\n", ["no column 'text'", "data.input_key"])
    # Sentence pairs (data.input_key: [first, second]).
    text_csv_case("pair_missing_column", "first,label\ngood,a\nbad,b\n", ["pair_missing_column.csv", "no column 'second'"],
                  data_extra=", input_key: [first, second]")
    text_csv_case("pair_three_keys", "a,b,c,label\ngood,bad,meh,a\n", ["data.input_key", "exactly 2"],
                  data_extra=", input_key: [a, b, c]")
    pair_csv = csv("pair_image_backbone", "first,second,label\ngood,bad,a\nbad,good,b\n")
    add("pair_on_image_backbone", digits_head + f"data: {{source: csv, train_path: {pair_csv}, "
        "input_key: [first, second]}\n", ["sentence pairs need a text backbone"])
    add("pair_on_image_source", TINY_DIGITS_YAML, ["data.input_key", "source digits gives images"],
        ["--config.data.input_key=[a, b]"])
    text_csv_case("missing_label", "text,label\ngood,a\nbad,\n", ["example 2: no label in 'label'"])
    text_csv_case("single_class", "text,label\ngood,a\nbad,a\n", ["classification needs at least two classes"])
    text_csv_case("not_utf8", "text,label\ngood,a\ncaf\xe9,b\n", ["line 3: not UTF-8 text"], encoding="latin-1")
    text_csv_case("regression_nan", "text,label\ngood,1.0\nbad,nan\n", ["regression label 'nan' is not finite"],
                  extra="heads: [{type: regression}]\n")
    text_csv_case("kshot_class_too_small", "text,label\ngood,a\nbad,a\nmeh,b\n",
                  ["data.train_per_class=2: class 'b' has only 1 training example"], data_extra=", train_per_class: 2")
    two_classes = csv("cw_two_classes", "text,label\ngood,a\nbad,b\n")
    add("class_weight_unknown_label", _text_backbone() + f"data: {{source: csv, train_path: {two_classes}}}\n"
        "train: {class_weight: {zzz: 2.0}}\n", ["train.class_weight.zzz: label 'zzz' is not one of head 'label'"])
    numbers = csv("cw_regression", "text,label\ngood,1.0\nbad,2.0\n")
    add("class_weight_on_regression", _text_backbone("heads: [{type: regression}]\n")
        + f"data: {{source: csv, train_path: {numbers}}}\ntrain: {{class_weight: balanced}}\n",
        ["train.class_weight: head 'label' is regression"])
    multi = csv("multi", "text,sentiment,topic\ngood,pos,film\nbad,,food\nmeh,neg,\n")
    two_heads = "heads: [{name: sentiment}, {name: topic}]\n"
    add("multitask_on_digits", TINY_DIGITS_YAML + two_heads, ["need a label per head", "data.source digits"])
    add("multitask_kshot", _text_backbone(two_heads) + f"data: {{source: csv, train_path: {multi}, "
        f"train_per_class: 1}}\n", ["data.train_per_class with several heads"])
    add("multitask_missing_column", _text_backbone("heads: [{name: sentiment}, {name: stars, type: regression}]\n")
        + f"data: {{source: csv, train_path: {multi}}}\n", ["no column 'stars'"])
    add("multitask_same_label_key", _text_backbone("heads: [{name: a, label_key: topic}, {name: b, label_key: topic}]\n")
        + f"data: {{source: csv, train_path: {multi}}}\n", ["label keys ['topic', 'topic'] repeat"])
    add("multitask_data_label_key", _text_backbone(two_heads) + f"data: {{source: csv, train_path: {multi}, "
        f"label_key: sentiment}}\n", ["data.label_key='sentiment' applies to one head", "heads.N.label_key"])
    one_class = csv("multi_one_class", "text,sentiment,topic\ngood,pos,film\nbad,,film\nmeh,neg,\n")
    add("multitask_head_single_class", _text_backbone(two_heads) + f"data: {{source: csv, train_path: {one_class}}}\n",
        ["every label in 'topic' is 'film'", "at least two classes"])
    multi_val = csv("multi_val", "text,sentiment,topic\ngood,pos,book\n")
    add("multitask_validation_unseen", _text_backbone(two_heads) + f"data: {{source: csv, train_path: {multi}, "
        f"validation_path: {multi_val}}}\n", ["label(s) ['book'] in 'topic' never occur"])
    no_topic = t / "no_topic.jsonl"
    no_topic.write_text('{"text": "good", "sentiment": "pos"}\n{"text": "bad", "sentiment": "neg"}\n')
    add("multitask_key_never_labelled", _text_backbone(two_heads) + f"data: {{source: jsonl, train_path: {no_topic}}}\n",
        ["no example has a label in 'topic' (head 'topic')"])
    mixed_multi = t / "mixed_multi.jsonl"
    mixed_multi.write_text('{"text": "good", "sentiment": 1, "topic": "a"}\n{"text": "bad", "sentiment": "0", '
                           '"topic": "b"}\n')
    add("multitask_mixed_label_types", _text_backbone(two_heads) + f"data: {{source: jsonl, train_path: {mixed_multi}}}\n",
        ["labels in 'sentiment' mix types"])
    add("class_weight_unknown_head", _text_backbone(two_heads) + f"data: {{source: csv, train_path: {multi}}}\n"
        "train: {class_weight: {nope: balanced}}\n", ["train.class_weight.nope: no head named 'nope'"])
    add("class_weight_non_positive", TINY_DIGITS_YAML, ["train.class_weight.1 must be a finite number > 0"],
        ["--config.train.class_weight={0: 2.0, 1: 0}"])
    jsonl = t / "mixed.jsonl"
    jsonl.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": "1"}\n{"text": "meh", "label": 0}\n')
    add("jsonl_mixed_label_types", _text_backbone() + f"data: {{source: jsonl, train_path: {jsonl}}}\n",
        ["labels in 'label' mix types"])
    bad_json = t / "bad.jsonl"
    bad_json.write_text('{"text": "good", "label": 1}\n{"text": "bad", label: 0}\n')
    add("jsonl_not_json", _text_backbone() + f"data: {{source: jsonl, train_path: {bad_json}}}\n",
        ["line 2: not valid JSON"])
    train, val = csv("vtrain", "text,label\ngood,a\nbad,b\n"), csv("vval", "text,label\ngood,a\nmeh,c\n")
    add("validation_only_class", _text_backbone() + f"data: {{source: csv, train_path: {train}, "
        f"validation_path: {val}}}\n", ["label(s) ['c'] in 'label' never occur in data.train_path"])
    images = t / "images"
    for name in ("a", "b"):
        (images / name).mkdir(parents=True)
        for i in range(2):
            from PIL import Image

            Image.fromarray(np.full((8, 8, 3), 40 * i, "uint8")).save(images / name / f"{i}.png")
    (images / "b" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    add("undecodable_image", digits_head + f"data: {{source: image_folder, train_path: {images}}}\n",
        ["corrupt.png"])
    add("regression_on_image_folder", digits_head.replace("image_size: 16", "image_size: 16\nheads: [{type: regression}]")
        + f"data: {{source: image_folder, train_path: {images}}}\n", ["provides class labels only"])
    cases.append(("config_file_missing", [f"--config={t / 'none.yaml'}", f"--workdir={t / 'w_noconfig'}"],
                  ["--config: cannot read"]))
    a_file = t / "a_file"
    a_file.write_text("not a directory")
    add("workdir_is_a_file", TINY_DIGITS_YAML, ["is a file; pass a directory"], workdir=a_file)
    add("workdir_parent_is_a_file", TINY_DIGITS_YAML, ["cannot be created", "is a file"],
        workdir=a_file / "run")
    read_only = t / "read_only"
    read_only.mkdir(mode=0o555)
    if os.geteuid() != 0:  # root writes anywhere: the case cannot happen
        add("workdir_not_writable", TINY_DIGITS_YAML, ["not writable"], workdir=read_only / "run")
    finished = t / "w_finished"
    finished.mkdir()
    (finished / "metrics.json").write_text("{}")
    add("workdir_finished", TINY_DIGITS_YAML, ["holds a finished run", "--overwrite"], workdir=finished)
    unfinished = t / "w_unfinished"
    (unfinished / "backup").mkdir(parents=True)
    (unfinished / "backup" / "state.json").write_text("{}")
    (unfinished / "config.yaml").write_text("name: other\n")
    add("resume_with_other_config", TINY_DIGITS_YAML, ["different config"], workdir=unfinished)
    add("tpu_without_tpu", TINY_DIGITS_YAML, ["--strategy=tpu", "no TPU"], ["--strategy=tpu"])
    return cases


def _export_cases(t, trained):
    cases = []
    truncated = t / "w_truncated"
    truncated.mkdir()
    for name in ("heads.json", "config.yaml"):
        (truncated / name).write_bytes(open(os.path.join(trained, name), "rb").read())
    import shutil

    shutil.copytree(os.path.join(trained, "preprocessor"), truncated / "preprocessor")
    (truncated / "model.keras").write_bytes(open(os.path.join(trained, "model.keras"), "rb").read()[:300])
    cases.append(("export_truncated_model", [f"--workdir={truncated}"], ["model.keras", "could not be loaded"]))
    cases.append(("export_no_workdir", [f"--workdir={t / 'w_nothing'}"], ["is not a directory", "trained work dir"]))
    a_file = t / "export_base_file"
    a_file.write_text("x")
    cases.append(("export_base_is_a_file", [f"--workdir={trained}", f"--export_base={a_file}"], ["is a file"]))
    cases.append(("export_version_zero", [f"--workdir={trained}", "--version=0",
                                          f"--export_base={t / 'w_v0'}"], ["positive integer"]))
    cases.append(("export_version_beyond_int64", [f"--workdir={trained}", f"--version={2**63}",
                                                  f"--export_base={t / 'w_vbig'}"], ["int64"]))
    cases.append(("export_version_exists", [f"--workdir={trained}", "--version=1"],
                  ["exists; pass --overwrite or another --version"]))
    cases.append(("export_unknown_format", [f"--workdir={trained}", "--format=onnx"], ["--format"]))
    cases.append(("export_extra_argument", [f"--workdir={trained}", "stray"], ["unexpected arguments"]))
    cases.append(("export_integer_only_float16", [f"--workdir={trained}", "--format=tflite", "--quantize=float16",
                                                  "--integer_only"], ["--integer_only applies to", "--quantize=int8"]))
    cases.append(("export_integer_only_saved_model", [f"--workdir={trained}", "--integer_only"],
                  ["--integer_only applies to", "--format=tflite", "received --format=saved_model"]))
    # Ensembles: members must be finished runs sharing preprocessing and heads.
    bigger = t / "w_bigger_images"
    shutil.copytree(trained, bigger)
    converter = json.load(open(bigger / "preprocessor" / "image_converter.json"))
    converter["config"]["image_size"] = [24, 24]
    (bigger / "preprocessor" / "image_converter.json").write_text(json.dumps(converter))
    unfinished = t / "w_unfinished_member"
    shutil.copytree(trained, unfinished)
    os.remove(unfinished / "metrics.json")
    out = str(t / "w_ensemble")
    cases.append(("ensemble_mismatched_member", [f"--workdir={out}", f"--ensemble={trained},{bigger}"],
                  ["member", "w_bigger_images", "differs", "preprocessing.image_size"]))
    cases.append(("ensemble_one_member", [f"--workdir={out}", f"--ensemble={trained}"], ["at least two"]))
    cases.append(("ensemble_unfinished_member", [f"--workdir={out}", f"--ensemble={trained},{unfinished}"],
                  ["w_unfinished_member", "not a finished run"]))
    cases.append(("ensemble_tflite", [f"--workdir={out}", f"--ensemble={trained},{bigger}", "--format=tflite"],
                  ["--ensemble writes a float SavedModel"]))
    cases.append(("ensemble_integer_only", [f"--workdir={out}", f"--ensemble={trained},{bigger}", "--integer_only"],
                  ["--ensemble writes a float SavedModel", "--integer_only"]))
    cases.append(("ensemble_into_training_run", [f"--workdir={unfinished}", f"--ensemble={trained},{bigger}"],
                  ["holds a training run"]))
    return cases


def _run(module, cases, tmp_path):
    spec = tmp_path / f"{module}.cases.json"
    spec.write_text(json.dumps({"module": module, "cases": [{"name": n, "argv": a} for n, a, _ in cases]}))
    out = tmp_path / f"{module}.results.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "bad_inputs_runner.py"), str(spec),
                           str(out)], capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _check(cases, results, before):
    problems = []
    for name, argv, fragments in cases:
        r = results[name]
        lines = [l for l in r["stderr"].strip().splitlines() if l.strip()]
        workdir = next((a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")), None)
        why = []
        if r["traceback"]:
            why.append("traceback: " + r["traceback"].strip().splitlines()[-1])
        if r["code"] != 2:
            why.append(f"exit {r['code']}")
        if not lines or not lines[-1].startswith("error: ") or sum(l.startswith("error:") for l in lines) != 1:
            why.append(f"stderr {lines[-3:]}")
        elif any(f not in lines[-1] for f in fragments):
            why.append(f"message lacks {[f for f in fragments if f not in lines[-1]]}: {lines[-1]}")
        if workdir is not None and _files(workdir) != before[name]:
            why.append(f"work dir {workdir} changed")
        if why:
            problems.append(f"{name}: {'; '.join(why)}")
    return problems


def test_train_bad_inputs(tmp_path):
    cases = _train_cases(tmp_path)
    assert len(cases) >= 40
    before = {n: _files(next((a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")), "")) for n, argv, _ in cases}
    problems = _check(cases, _run("tftransfer.train", cases, tmp_path), before)
    assert not problems, "\n".join(problems)


def test_export_bad_inputs(tmp_path, tiny_digits_workdir):
    trained = tiny_digits_workdir  # a finished TINY_DIGITS_YAML run (conftest), with its export/1
    cases = _export_cases(tmp_path, trained)
    before = {n: _files(next((a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")), "")) for n, argv, _ in cases}
    problems = _check(cases, _run("tftransfer.export", cases, tmp_path), before)
    assert not problems, "\n".join(problems)
