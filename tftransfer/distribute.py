"""tf.distribute strategy, mixed precision and XLA from config names."""

import keras
import tensorflow as tf

from tftransfer.errors import UserError

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")


def get_strategy(name="auto", tpu=""):
    """A `tf.distribute.Strategy` by name.

    Args:
        name: str. `auto` (mirrored over all GPUs when there are several,
            else the default single-device strategy), `one_device`,
            `mirrored` (all local GPUs, or all logical CPUs when there are
            none), `multi_worker` (reads `TF_CONFIG`), or `tpu`.
        tpu: str. TPU name or address for `tpu`; empty for the local TPU.
    """
    if name not in STRATEGIES:
        raise UserError(f"--strategy must be one of {', '.join(STRATEGIES)}. Received: {name!r}.")
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "one_device"
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        if gpus:
            return tf.distribute.MirroredStrategy()
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(cpus)
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.NotFoundError) as e:
        raise UserError(f"--strategy=tpu: no TPU found ({str(e).splitlines()[0]}); run on a TPU VM or set distribute.tpu.")
    return tf.distribute.TPUStrategy(resolver)


def set_precision(policy="float32"):
    """Global Keras dtype policy: float32, mixed_float16 or mixed_bfloat16."""
    keras.mixed_precision.set_global_policy(policy)


def split_logical_cpus(count):
    """Expose `count` logical CPU devices (multi-replica tests without GPUs).

    Must run before TensorFlow initialises its devices.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
    )
