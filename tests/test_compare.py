"""`python -m tftransfer.compare`: both curves at every budget; a killed study resumes cell by cell."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY_DIGITS_YAML, TINY_RESNET, run_cli


def _target_yaml(preset):
    return f"""
name: tiny_compare
backbone: {{preset: {preset}}}
data:
  source: digits
  digits: {{classes: [5, 6, 7]}}
  batch_size: 16
train: {{epochs: 1, optimizer: adam}}
"""


def test_compare_table_and_resume_after_kill(tmp_path):
    # The study's "pretrained" backbone: a tiny ResNet preset written in-process (what a source
    # run's export.backbone_preset writes; that path runs through the CLI in test_notebook.py).
    # This test is about compare's table and resume, not about what the source learnt.
    import keras

    import tftransfer
    from tftransfer.backbones import save_backbone_preset

    keras.utils.set_random_seed(0)
    preset = tmp_path / "source" / "backbone_preset"
    save_backbone_preset(tftransfer.load_backbone(spec=dict(TINY_RESNET), image_size=16), str(preset))
    config = tmp_path / "target.yaml"
    config.write_text(_target_yaml(preset))
    out = tmp_path / "cmp"
    args = [f"--config={config}", f"--workdir={out}", "--labels_per_class=2,all", "--seeds=1"]

    # Kill the study (its whole process group) once the first cell is recorded.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "tftransfer.compare", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    plan = out / "compare.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if plan.exists() and json.loads(plan.read_text())["cells"]:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    first = json.loads(plan.read_text())["cells"]
    assert len(first) == 1
    (done,) = first.values()
    stamp = os.path.getmtime(os.path.join(done["workdir"], "metrics.json"))

    result = run_cli("tftransfer.compare", *args, "--parallel=2")  # the rest two at a time
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 cells (1 done, 3 to train)" in result.stdout
    assert os.path.getmtime(os.path.join(done["workdir"], "metrics.json")) == stamp  # not redone
    cells = json.loads(plan.read_text())["cells"]
    assert sorted(cells) == ["scratch_k2_seed0", "scratch_kall_seed0", "transfer_k2_seed0", "transfer_kall_seed0"]
    assert cells[next(iter(first))] == done
    page = (out / "compare.md").read_text()
    for budget in (r"2", r"all \(~\d+\)"):  # summary rows: every budget, both curves
        for arm in (r"transfer \(pretrained backbone\)", r"from scratch \(same architecture\)"):
            assert re.search(rf"^\| {budget} \| {arm} \| 1 \| [01]\.\d{{3}} \|", page, re.M), (budget, arm)
    assert "Transfer gain at k=2: " in page and "k=all: " in page
    assert (out / "data_efficiency.png").read_bytes()[:4] == b"\x89PNG"


def test_label_budget_key_and_random_init_is_refused():
    from tftransfer import compare
    from tftransfer.config import load_config
    from tftransfer.errors import UserError

    csv = load_config(text=_target_yaml("p").replace("source: digits", "source: csv\n  train_path: x.csv"))
    assert compare.k_shot_key(csv) == "data.train_per_class"  # k-shot works on every source
    with pytest.raises(UserError, match="nothing pretrained"):
        compare.k_shot_key(load_config(text=TINY_DIGITS_YAML))
    assert compare.k_shot_key(load_config(text=_target_yaml("p"))) == "data.train_per_class"
    assert compare.parse_budgets(["all", "8", "2"]) == [2, 8, "all"]
    with pytest.raises(UserError, match="neither a positive integer nor all"):
        compare.parse_budgets(["0"])
