"""`python -m tftransfer.train` killed again and again ends in the uninterrupted run's result.

Kept apart from test_train.py so that pytest-xdist (`--dist loadfile`) runs this
long test beside the rest of the train tests."""

import json
import os
import subprocess
import sys

import pytest

from conftest import TINY_DIGITS_YAML as TINY_DIGITS


def _config(tmp_path, text=TINY_DIGITS, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# Augmented, 3 x 60 images, batch 10: 18 steps per epoch, a backup every 3.
FAULT_CONFIG = TINY_DIGITS.replace("train_per_class: 20", "train_per_class: 60").replace(
    "batch_size: 20", "batch_size: 10\n  augment: {flip: horizontal, translate: 0.1}").replace(
    "train: {epochs: 2, optimizer: adam, verbose: 0}",
    "train: {epochs: 4, optimizer: adam, verbose: 0, backup_every_steps: 3}")


def test_repeated_sigkills_end_in_the_uninterrupted_runs_result(tmp_path):
    """SIGKILL one run at 4 random moments, re-running the same command each
    time: once during start-up, twice mid-training (after randomly
    drawn backed-up steps, plus a random delay), once while finishing
    (saving or exporting). It ends finished, every epoch recorded once,
    one export version, with the metrics of an uninterrupted run.
    Augmentation is on: seeded per batch, so resumed passes replay the
    same images. Tolerance 1e-5: the same batches in the same order on CPU.
    Moments are observable states (a backup's step, `model.keras`), not
    fixed sleeps, so the test holds on fast and slow machines."""
    import random
    import signal
    import time

    from conftest import REPO

    config = _config(tmp_path, FAULT_CONFIG)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

    def command(W):
        return [sys.executable, "-m", "tftransfer.train", f"--config={config}", f"--workdir={W}"]

    W, ref = str(tmp_path / "faults"), str(tmp_path / "reference")
    state, model = os.path.join(W, "backup", "state.json"), os.path.join(W, "model.keras")

    def backed_up_step():
        try:
            return json.load(open(state))["step"]
        except (OSError, ValueError, KeyError):  # none yet, or being replaced
            return 0

    seed = random.randrange(10**6)
    draw = random.Random(seed)
    steps = sorted(draw.sample(range(3, 72, 3), 2))  # 4 epochs x 18 steps, a backup every 3
    moments = [("start-up", lambda: True, draw.uniform(0.5, 3.0))]
    moments += [(f"step {k}", lambda k=k: backed_up_step() >= k, draw.uniform(0.0, 0.5)) for k in steps]
    moments.append(("finishing", lambda: os.path.exists(model), draw.uniform(0.0, 1.0)))

    reference = subprocess.Popen(command(ref), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    killed = []
    for name, reached, delay in moments:
        proc = subprocess.Popen(command(W), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while proc.poll() is None and not reached() and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        if proc.poll() is not None:  # It finished (or failed) first: checked below.
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed.append((name, backed_up_step()))
        assert not os.path.exists(os.path.join(W, "metrics.json")), f"seed {seed}: {killed}"
    final = subprocess.run(command(W), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert reference.wait(timeout=600) == 0
    assert final.returncode == 0, f"seed {seed}, kills {killed}: " + final.stderr[-3000:]
    assert len(killed) >= 3, f"seed {seed}: only {killed} before the run finished"
    got = json.load(open(os.path.join(W, "metrics.json")))
    want = json.load(open(os.path.join(ref, "metrics.json")))
    assert [e["epoch"] for e in got["history"]] == [1, 2, 3, 4], f"seed {seed}: {killed}"
    for key in ("accuracy", "loss"):
        assert got["validation"][key] == pytest.approx(want["validation"][key], abs=1e-5), \
            f"seed {seed}: {killed}"
    assert sorted(os.listdir(os.path.join(W, "export"))) == ["1"], f"seed {seed}: {killed}"
    assert not os.path.exists(os.path.join(W, "backup"))
