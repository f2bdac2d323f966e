"""The shared run loop: mid-epoch resume after SIGKILL through the CLI.

Tolerance: with `train.deterministic` (op determinism) and a fixed seed the
resumed run replays exactly the batches the killed run had left, so its
validation metrics equal the uninterrupted run's to 1e-6.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY_DIGITS_YAML

# 3 x 100 training images, batch 4: 75 steps per epoch; a backup every 5 steps.
# Unfreezing by step (all groups at step 40) checks that the stage follows the
# true global step after a resume.
CONFIG = TINY_DIGITS_YAML.replace("train_per_class: 20", "train_per_class: 100").replace(
    "batch_size: 20", "batch_size: 4").replace(
    "train: {epochs: 2, optimizer: adam, verbose: 0}",
    "train: {epochs: 2, optimizer: adam, verbose: 0, backup_every_steps: 5, deterministic: true,\n"
    "        unfreeze: {unit: step, schedule: [{at_step: 0, groups: head}, {at_step: 40, groups: all}]}}\n"
    "export: {saved_model: false}")
STEPS = 75


def _args(tmp_path, W):
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    return [sys.executable, "-m", "tftransfer.train", f"--config={config}", f"--workdir={W}"]


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def test_sigkill_mid_epoch_resumes_at_the_step_and_matches_an_uninterrupted_run(tmp_path):
    W = str(tmp_path / "killed")
    proc = subprocess.Popen(_args(tmp_path, W), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = os.path.join(W, "backup", "state.json")
    deadline = time.time() + 300
    step = 0
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(state):
            try:
                step = json.load(open(state))["step"]
            except (ValueError, OSError):  # being replaced
                continue
            if step > 0:
                break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.load(open(state))["step"]
    assert 0 < step < STEPS, f"killed at step {step}: not mid-epoch 0"
    assert not os.path.exists(os.path.join(W, "metrics.json"))

    # The uninterrupted reference runs alongside the resumed run.
    reference = subprocess.Popen(_args(tmp_path, str(tmp_path / "reference")), cwd=REPO, env=_env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    resumed = subprocess.run(_args(tmp_path, W), cwd=REPO, env=_env(), capture_output=True, text=True,
                             timeout=600)
    reference.stderr_text = reference.communicate(timeout=600)[1]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert reference.returncode == 0, reference.stderr_text[-3000:]
    logged = re.findall(r"resumed at step (\d+) \(epoch 0, step (\d+) of 75\)", resumed.stderr)
    assert logged and int(logged[0][0]) == step and int(logged[0][1]) == step
    got = json.load(open(os.path.join(W, "metrics.json")))
    want = json.load(open(os.path.join(tmp_path, "reference", "metrics.json")))
    assert got["resumed_at_step"] == step and want["resumed_at_step"] == 0
    assert got["epochs"] == 2  # the finished epoch 0, then epoch 1
    for key in ("accuracy", "loss"):
        assert got["validation"][key] == pytest.approx(want["validation"][key], abs=1e-6)
    # The last epoch ran whole after the resume: its training logs match too.
    assert got["train"]["loss"] == pytest.approx(want["train"]["loss"], abs=1e-6)
    assert not os.path.exists(os.path.join(W, "backup"))  # finished: nothing left to resume


def test_step_backup_leaves_an_epochs_last_step_to_the_epoch_end(tmp_path):
    """A step backup at an epoch's last step would mark the epoch done before
    its validation and History record exist: a kill in between resumed past
    an epoch that was never recorded. The epoch end backs that step up."""
    import keras
    import numpy as np

    from tftransfer.run_loop import STATE, StepBackup

    saved = []

    class Spy(keras.callbacks.Callback):  # runs after the backup: reads what it committed
        def on_train_batch_end(self, batch, logs=None):
            saved.append(("batch", json.load(open(tmp_path / STATE))["step"]) if (tmp_path / STATE).exists()
                         else ("batch", 0))

        def on_epoch_end(self, epoch, logs=None):
            saved.append(("epoch", json.load(open(tmp_path / STATE))["step"]))

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x, y = np.zeros((8, 2), "float32"), np.zeros((8, 1), "float32")
    model.fit(x, y, batch_size=2, epochs=2, verbose=0,
              callbacks=[StepBackup(str(tmp_path), str(tmp_path), steps_per_epoch=4, every_steps=2), Spy()])
    assert saved == [("batch", 0), ("batch", 2), ("batch", 2), ("batch", 2), ("epoch", 4),
                     ("batch", 4), ("batch", 6), ("batch", 6), ("batch", 6), ("epoch", 8)]


@pytest.mark.parametrize("mode", ["min", "max"])  # loss falls: "min" improves every epoch, "max" only at epoch 1
def test_epoch_end_backup_links_the_best_weights_written_that_epoch_and_holds_the_epochs_weights(tmp_path, mode):
    """When the record has just written the epoch's weights as the best, the
    backup is a hard link to that file (one write per epoch, not two); when
    it has not, the backup is its own write. Either way the backup holds the
    weights and optimizer state of the epoch it is named for."""
    import keras
    import numpy as np

    from tftransfer.epoch_selection import EpochRecord
    from tftransfer.run_loop import STATE, StepBackup

    keras.utils.set_random_seed(0)  # an unseeded init made the loss rise in some epoch now and then
    backup_dir, best = tmp_path / "backup", tmp_path / "best.weights.h5"
    record = EpochRecord(str(tmp_path / "history.json"), str(best), monitor="loss", mode=mode)
    backup = StepBackup(str(backup_dir), str(backup_dir), steps_per_epoch=4, record=record)
    seen, losses = [], []

    def build():
        m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        m.compile(keras.optimizers.Adam(0.1), "mse")
        return m

    class Spy(keras.callbacks.Callback):  # after the backup
        def on_epoch_end(self, epoch, logs=None):
            path = backup_dir / json.load(open(backup_dir / STATE))["weights"]
            linked = os.path.samefile(path, best)
            probe = build()
            probe.optimizer.build(probe.trainable_variables)
            probe.load_weights(str(path))
            for a, b in zip(probe.weights + probe.optimizer.variables,
                            self.model.weights + self.model.optimizer.variables):
                np.testing.assert_array_equal(a.numpy(), b.numpy())
            seen.append(linked)
            losses.append(logs["loss"])

    model = build()
    x = np.random.default_rng(0).normal(size=(8, 2)).astype("float32")
    model.fit(x, x.sum(-1, keepdims=True), batch_size=2, epochs=3, verbose=0, shuffle=False,
              callbacks=[record, backup, Spy()])
    assert losses == sorted(losses, reverse=True), losses  # the premise: the loss falls every epoch
    assert seen == ([True, True, True] if mode == "min" else [True, False, False])
