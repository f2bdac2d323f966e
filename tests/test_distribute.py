"""tftransfer.distribute: cluster from TF_CONFIG / SLURM, strategies, replica-safe batching."""

import json
import os

import pytest

from tftransfer import data as data_lib
from tftransfer import distribute
from tftransfer.errors import UserError

from conftest import TINY_DIGITS_YAML, run_cli


def _tf_config(cluster, task):
    return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": task})}


def test_tf_config_gives_the_task_and_the_chief():
    workers = {"worker": ["localhost:1", "localhost:2"]}
    first, _ = distribute.cluster_from_env(_tf_config(workers, {"type": "worker", "index": 0}))
    second, _ = distribute.cluster_from_env(_tf_config(workers, {"type": "worker", "index": 1}))
    assert (first.source, first.num_workers, first.is_chief) == ("TF_CONFIG", 2, True)
    assert (second.task_id, second.is_chief) == (1, False)
    with_chief = {"chief": ["localhost:0"], **workers}
    worker0, _ = distribute.cluster_from_env(_tf_config(with_chief, {"type": "worker", "index": 0}))
    chief, _ = distribute.cluster_from_env(_tf_config(with_chief, {"type": "chief", "index": 0}))
    assert not worker0.is_chief and chief.is_chief and chief.num_workers == 3
    alone, resolver = distribute.cluster_from_env({})
    assert alone.is_chief and alone.num_workers == 1 and resolver is None


def test_slurm_allocation_without_tf_config_uses_the_slurm_resolver(monkeypatch):
    for key, value in {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "node[1-2]",
                       "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "CUDA_VISIBLE_DEVICES": ""}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    cluster, resolver = distribute.cluster_from_env()
    assert type(resolver).__name__ == "SlurmClusterResolver"
    assert (cluster.source, cluster.task_id, cluster.num_workers, cluster.is_chief) == ("SLURM", 1, 2, False)
    assert resolver.cluster_spec().as_dict() == {"worker": ["node1:8888", "node2:8888"]}


MALFORMED = {
    "bad_json": ("{cluster: nope", "not valid JSON"),
    "no_task": (json.dumps({"cluster": {"worker": ["localhost:1"]}}), 'no "task"'),
    "index_out_of_range": (json.dumps({"cluster": {"worker": ["localhost:1", "localhost:2"]},
                                       "task": {"type": "worker", "index": 2}}), "index 2 is out of range"),
    "unknown_type": (json.dumps({"cluster": {"worker": ["localhost:1"]}, "task": {"type": "ps", "index": 0}}),
                     "task type 'ps' is not in the cluster"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_tf_config_is_a_user_error(case):
    text, fragment = MALFORMED[case]
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        distribute.cluster_from_env({"TF_CONFIG": text})


@pytest.mark.parametrize("module, case", [("tftransfer.train", "bad_json"),
                                          ("tftransfer.distill", "index_out_of_range")])
def test_cli_malformed_tf_config_exits_2_before_writing(tmp_path, module, case):
    text, fragment = MALFORMED[case]
    config = tmp_path / "c.yaml"
    config.write_text(TINY_DIGITS_YAML + "distill: {teacher: [/no/such/teacher]}\n")
    W = str(tmp_path / "w")
    result = run_cli(module, f"--config={config}", f"--workdir={W}", "--strategy=multi_worker",
                     env={"TF_CONFIG": text}, timeout=300)
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert sum(l.startswith("error:") for l in lines) == 1
    assert lines[-1].startswith("error: TF_CONFIG") and fragment in lines[-1], lines[-1]
    assert not os.path.exists(W)


def test_tpu_without_a_tpu_exits_2(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(TINY_DIGITS_YAML)
    W = str(tmp_path / "w")
    result = run_cli("tftransfer.train", f"--config={config}", f"--workdir={W}", "--strategy=tpu", timeout=300)
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert result.returncode == 2 and lines[-1].startswith("error: --strategy=tpu: no TPU found"), lines[-3:]
    assert not os.path.exists(W)


@pytest.mark.parametrize("n, batch, replicas, drop", [
    (60, 20, 2, False), (61, 20, 2, True), (62, 20, 2, False), (5, 4, 2, True), (5, 4, 1, False)])
def test_final_training_batch_dropped_only_when_a_replica_would_get_nothing(n, batch, replicas, drop):
    assert data_lib.drop_final_batch(n, batch, replicas) is drop
    assert data_lib.batches_per_pass(n, batch, drop) == (n // batch if drop else -(-n // batch))


@pytest.mark.parametrize("n, batch, replicas", [(477, 128, 2), (41, 40, 2), (101, 64, 4), (7, 64, 2)])
def test_eval_batch_gives_every_replica_a_row_in_the_final_batch(n, batch, replicas):
    b = data_lib.eval_batch_size(n, batch, replicas)
    assert 0 < b <= batch and b % replicas == 0
    assert n % b == 0 or n % b >= replicas


def test_eval_batch_of_fewer_examples_than_replicas_is_refused():
    with pytest.raises(ValueError, match="cannot be spread"):
        data_lib.eval_batch_size(1, 64, 2)
