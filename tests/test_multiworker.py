"""Multi-replica runs through the CLI: 2-process MultiWorkerMirroredStrategy
(train and distill) on loopback, and mirrored over 2 logical CPUs.

Tolerance: the 2-worker run and the 1-process mirrored run (2 replicas,
same global and per-replica batch, so the same BatchNorm batches) compute
the same steps with differently ordered all-reduces; final weights agree to
`WEIGHT_ATOL`. (A 1-replica run is not comparable this tightly: BatchNorm
statistics of a 20-row batch differ from those of two 10-row halves.)
"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, TINY_DIGITS_YAML, run_cli

WEIGHT_ATOL = 1e-4
# 3 classes x 20 = 60 training images; 10 per replica x 2 = global batch 20: 3 steps per epoch.
CONFIG = TINY_DIGITS_YAML.replace("batch_size: 20", "batch_size: 10").replace(
    "train: {epochs: 2, optimizer: adam, verbose: 0}",
    "train: {epochs: 2, optimizer: adam, verbose: 0}\nexport: {saved_model: false}")
DIGEST = re.compile(r"weights digest ([0-9a-f]{16}), trainable ([0-9a-f]{16})")


def _config(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _run_workers(module, args, tmp, n=2, timeout=600):
    """Launch `n` processes of `python -m module args` with TF_CONFIG on loopback."""
    workers = [f"127.0.0.1:{p}" for p in _free_ports(n)]
    os.makedirs(tmp, exist_ok=True)
    procs = []
    for i in range(n):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_CONFIG": tf_config, "TMPDIR": str(tmp)}
        procs.append(subprocess.Popen([sys.executable, "-m", module, *args, "--strategy=multi_worker"],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def _weights(path):
    import keras

    return keras.saving.load_model(path).get_weights()


@pytest.fixture(scope="module")
def mirrored_run(tmp_path_factory):
    """1 process, mirrored over 2 logical CPUs (also the distillation teacher)."""
    root = tmp_path_factory.mktemp("mirrored")
    W = str(root / "w")
    result = run_cli("tftransfer.train", f"--config={_config(root, CONFIG)}", f"--workdir={W}",
                     "--strategy=mirrored", "--config.distribute.logical_cpus=2")
    assert result.returncode == 0, result.stderr[-3000:]
    return W, result


def test_mirrored_over_two_logical_cpus(mirrored_run):
    W, result = mirrored_run
    metrics = json.load(open(os.path.join(W, "metrics.json")))
    assert (metrics["replicas"], metrics["workers"], metrics["global_batch_size"]) == (2, 1, 20)
    assert metrics["strategy"] == "mirrored" and metrics["epochs"] == 2
    # 477 validation images: the eval batch is chosen so no replica gets an empty final batch.
    assert metrics["num_validation_examples"] == 477 and 0 <= metrics["validation"]["accuracy"] <= 1


def test_two_worker_train_writes_once_and_matches_the_mirrored_run(mirrored_run, tmp_path):
    W = str(tmp_path / "w")
    results = _run_workers("tftransfer.train", [f"--config={_config(tmp_path, CONFIG)}", f"--workdir={W}"],
                           tmp_path / "tmp")
    for code, _, err in results:
        assert code == 0, err[-3000:]
    digests = [DIGEST.findall(err) for _, _, err in results]
    assert len(digests[0]) == 1 and digests[0] == digests[1]  # identical weights on both workers
    assert "chief" in results[0][2] and "writes to a temporary dir" in results[1][2]
    assert not os.listdir(tmp_path / "tmp")  # the other worker removed its temporary outputs
    metrics = json.load(open(os.path.join(W, "metrics.json")))
    assert (metrics["replicas"], metrics["workers"], metrics["global_batch_size"]) == (2, 2, 20)
    assert sorted(os.listdir(W)) == ["checkpoints", "config.yaml", "heads.json", "history.json", "logs",
                                     "metrics.json", "model.keras", "preprocessor", "train_ids.json"]
    reference = _weights(os.path.join(mirrored_run[0], "model.keras"))
    for got, want in zip(_weights(os.path.join(W, "model.keras")), reference):
        np.testing.assert_allclose(got, want, atol=WEIGHT_ATOL)
    ref_metrics = json.load(open(os.path.join(mirrored_run[0], "metrics.json")))
    assert metrics["validation"]["loss"] == pytest.approx(ref_metrics["validation"]["loss"], abs=1e-3)


def test_two_worker_distill(mirrored_run, tmp_path):
    teacher = mirrored_run[0]
    text = CONFIG + f"distill: {{teacher: [{teacher}], alpha: 0.2, temperature: 2.0, cache: memory}}\n"
    W = str(tmp_path / "w")
    results = _run_workers("tftransfer.distill", [f"--config={_config(tmp_path, text)}", f"--workdir={W}",
                                                  "--config.train.epochs=1"],
                           tmp_path / "tmp")
    for code, _, err in results:
        assert code == 0, err[-3000:]
    digests = [DIGEST.findall(err) for _, _, err in results]
    assert len(digests[0]) == 1 and digests[0] == digests[1]
    assert not os.listdir(tmp_path / "tmp")
    metrics = json.load(open(os.path.join(W, "metrics.json")))
    assert (metrics["replicas"], metrics["workers"], metrics["global_batch_size"]) == (2, 2, 20)
    assert metrics["student"]["accuracy"] is not None and "% retained" in results[0][1]
