"""tf.distribute strategy, cluster, precision and XLA from config names.

Order matters: `MultiWorkerMirroredStrategy` must be constructed before
anything initialises TensorFlow's context (even
`tf.config.list_logical_devices`), otherwise TensorFlow raises "Collective
ops must be configured at program startup". So `get_strategy` validates the
cluster description (`TF_CONFIG`, or a SLURM allocation) from the
environment alone, builds the strategy, and only then looks at devices; the
entrypoints call it before anything else touches TensorFlow.

Who writes: in a multi-worker run every worker runs the same program; only
the chief (task `chief`, else `worker` 0) writes the work dir
(`RunPlace.is_chief`); the others write what Keras must write to temporary
directories they delete (the TensorFlow multi-worker guide's rule).
"""

import dataclasses
import json
import os

from tftransfer.errors import UserError

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
MULTI_WORKER = "multi_worker"
# Task types a TF_CONFIG cluster may name for MultiWorkerMirroredStrategy.
_TASK_TYPES = ("chief", "worker")


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where this process sits in a multi-worker run.

    source: str. `TF_CONFIG`, `SLURM` or `local` (one process).
    task_type: str. `chief` or `worker`.
    task_id: int. Index of this task within its type.
    num_workers: int. Processes taking part (chief included).
    """

    source: str = "local"
    task_type: str = "worker"
    task_id: int = 0
    num_workers: int = 1

    @property
    def is_chief(self):
        """The chief writes the work dir: task `chief`, or `worker` 0 when there is none."""
        if self.source == "TF_CONFIG" and self._has_chief:
            return self.task_type == "chief"
        return self.task_id == 0

    _has_chief: bool = False


def cluster_from_env(environ=None):
    """The cluster this process belongs to, from `TF_CONFIG` or SLURM (no TF calls).

    Args:
        environ: mapping. Defaults to `os.environ`.

    Returns:
        `(Cluster, resolver)`: resolver is a
        `tf.distribute.cluster_resolver.SlurmClusterResolver` for a SLURM
        allocation without `TF_CONFIG`, else None (TensorFlow reads
        `TF_CONFIG` itself).

    Raises:
        UserError: malformed `TF_CONFIG` (bad JSON, no `task`, unknown task
            type, index out of range, no cluster).
    """
    env = os.environ if environ is None else environ
    text = env.get("TF_CONFIG", "").strip()
    if text:
        return _parse_tf_config(text), None
    if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        import tensorflow as tf  # Importing does not initialise the context.

        from tensorflow.python.distribute.cluster_resolver import slurm_cluster_resolver as slurm_lib

        slurm = tf.distribute.cluster_resolver.SlurmClusterResolver
        try:
            try:
                gpus = slurm_lib.get_num_gpus()
            except (RuntimeError, OSError):  # No nvidia-smi: a CPU allocation.
                gpus = 0
            resolver = slurm(port_base=int(env.get("TFTRANSFER_SLURM_PORT_BASE", 8888)),
                             gpus_per_node=gpus)
            spec = resolver.cluster_spec().as_dict()
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"--strategy=multi_worker: cannot read the SLURM allocation ({e}); "
                            f"set TF_CONFIG instead.")
        workers = sum(len(v) for v in spec.values())
        return Cluster("SLURM", resolver.task_type, int(resolver.task_id), workers), resolver
    return Cluster(), None


def _parse_tf_config(text):
    where = "TF_CONFIG"
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not valid JSON ({e.msg} at character {e.pos}); "
                        f'expected {{"cluster": {{"worker": ["host:port", ...]}}, "task": {{"type": "worker", "index": 0}}}}.')
    if not isinstance(config, dict):
        raise UserError(f"{where} must be a JSON object with keys cluster and task. Received: {text[:80]!r}.")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise UserError(f'{where} has no "cluster" mapping of task type -> ["host:port", ...].')
    unknown = [t for t in cluster if t not in _TASK_TYPES]
    if unknown:
        raise UserError(f"{where}: cluster task type {unknown[0]!r} is not supported by multi_worker "
                        f"(allowed: {', '.join(_TASK_TYPES)}).")
    for name, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses or not all(isinstance(a, str) for a in addresses):
            raise UserError(f'{where}: cluster "{name}" must be a non-empty list of "host:port" strings.')
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise UserError(f'{where} has no "task" with "type" and "index" (which process is this?); '
                        f'add e.g. "task": {{"type": "worker", "index": 0}}.')
    task_type, index = task["type"], task["index"]
    if task_type not in cluster:
        raise UserError(f"{where}: task type {task_type!r} is not in the cluster ({', '.join(cluster)}).")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(cluster[task_type]):
        raise UserError(f"{where}: task index {index!r} is out of range for {task_type!r} "
                        f"({len(cluster[task_type])} address(es): 0..{len(cluster[task_type]) - 1}).")
    workers = sum(len(v) for v in cluster.values())
    return Cluster("TF_CONFIG", task_type, index, workers, _has_chief="chief" in cluster)


def get_strategy(name="auto", tpu=""):
    """A `tf.distribute.Strategy` by name, and this process's `Cluster`.

    Call before anything else touches TensorFlow's devices (see module doc).

    Args:
        name: str. `auto` (mirrored over all GPUs when there are several,
            else the default single-device strategy), `one_device`,
            `mirrored` (all local GPUs, or all logical CPUs when there are
            none), `multi_worker` (cluster from `TF_CONFIG`, else a SLURM
            allocation, else this process alone), or `tpu`.
        tpu: str. TPU name or address for `tpu`; empty for the local TPU.

    Returns:
        `(strategy, cluster)`.
    """
    if name not in STRATEGIES:
        raise UserError(f"--strategy must be one of {', '.join(STRATEGIES)}. Received: {name!r}.")
    import tensorflow as tf

    if name == MULTI_WORKER:
        cluster, resolver = cluster_from_env()
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
        from tftransfer import keras_compat

        keras_compat.apply_multi_worker_fixes()
        return strategy, cluster
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.NotFoundError) as e:
            raise UserError(f"--strategy=tpu: no TPU found ({str(e).splitlines()[0]}); "
                            f"run on a TPU VM or set distribute.tpu.")
        return tf.distribute.TPUStrategy(resolver), Cluster()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "one_device"
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0"), Cluster()
    if gpus:
        return tf.distribute.MirroredStrategy(), Cluster()
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(cpus), Cluster()


def set_precision(policy="float32"):
    """Global Keras dtype policy: float32, mixed_float16 or mixed_bfloat16.

    Under `mixed_float16` Keras wraps the optimizer in a `LossScaleOptimizer`
    at compile time; heads compute their logits in float32 (see
    `tftransfer.heads`), so losses and exported probabilities are float32.
    """
    if policy not in PRECISIONS:
        raise UserError(f"distribute.precision must be one of {', '.join(PRECISIONS)}. Received: {policy!r}.")
    import keras

    keras.mixed_precision.set_global_policy(policy)


def split_logical_cpus(count):
    """Expose `count` logical CPU devices (multi-replica runs without GPUs).

    Must run before TensorFlow initialises its devices. Set by the
    `TFTRANSFER_LOGICAL_CPUS` environment variable for the entrypoints.
    """
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
    )
