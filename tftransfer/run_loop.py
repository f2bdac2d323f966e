"""The run loop `train` and `distill` share: where to write, fit with resume, finish.

    run = cli.start_run(cfg)          # strategy first; a `Run`
    ... build model / pipelines inside run.strategy.scope() ...
    run.begin(message)                # the chief writes config.yaml
    result = run.fit(model, train_ds, val_ds, steps_per_epoch, callbacks)
    # <- after fit, before evaluate / save / export: the one place to add
    #    "pick best/last weights" or "recompute BatchNorm statistics".
    run.save_model(model)             # every worker saves; only the chief's lands in W
    run.finish(metrics)               # metrics.json last (chief), temp dirs removed

Chief-only writes: every worker runs the same program (saving and
evaluating can involve collectives, so all take part), but only the chief's
`run.out` is the work dir; the others' is a temporary directory, removed at
the end (the TensorFlow multi-worker guide's rule). Backups are read from
the work dir by every worker, so a restarted cluster resumes from the
chief's.

Mid-epoch resume: the training data is one endless stream
(`train_ds.repeat()`: a new shuffle order each pass, the same orders in
every process for a fixed seed), and `StepBackup` saves the weights and
optimizer state every `backup_every_steps` steps and at every epoch end,
with the global step. A restarted run restores them, skips the stream to
that step and first finishes the interrupted epoch (a `fit` of the
remaining steps, callbacks seeing the true batch indices), then runs the
remaining epochs, so schedules keyed by epoch or step (unfreezing,
distillation) continue where they were.
"""

import dataclasses
import json
import os
import shutil
import tempfile
import time

import keras
import tensorflow as tf
from absl import logging

from tftransfer import keras_private, workdir

STATE = "state.json"


@dataclasses.dataclass
class Run:
    """One entrypoint invocation: strategy, cluster place and work dir.

    workdir: str. The work dir (`--workdir`), read by every worker.
    out: str. Where this process writes: `workdir` on the chief, else a
        temporary directory removed by `finish` / `cleanup`.
    strategy: `tf.distribute.Strategy`.
    cluster: `tftransfer.distribute.Cluster`.
    config_text: str. The resolved config (YAML), written by `begin`.
    resuming: bool. A backup will be resumed.
    backup_every_steps: int. Step backups (0: only at epoch ends).
    epochs: int. Training epochs. verbose: int. Keras fit verbosity.
    """

    workdir: str
    out: str
    strategy: object
    cluster: object
    config_text: str
    resuming: bool = False
    backup_every_steps: int = 0
    epochs: int = 1
    verbose: int = 2

    @property
    def is_chief(self):
        return self.cluster.is_chief

    @property
    def replicas(self):
        return self.strategy.num_replicas_in_sync

    def path(self, name):
        """`name` (a `tftransfer.workdir` constant) under this process's output dir."""
        return os.path.join(self.out, name)

    def begin(self, message):
        """Mark the work dir as this run's (chief: config.yaml) and log `message`."""
        os.makedirs(self.out, exist_ok=True)
        if self.is_chief:
            workdir.atomic_write_text(os.path.join(self.workdir, workdir.CONFIG), self.config_text)
        where = "" if self.cluster.num_workers == 1 else (
            f", worker {self.cluster.task_type}:{self.cluster.task_id} of {self.cluster.num_workers}"
            f"{' (chief)' if self.is_chief else ' (writes to a temporary dir)'}")
        logging.info("%s; %d replica(s)%s%s", message, self.replicas, where,
                     " (resuming)" if self.resuming else "")

    def fit(self, model, train_ds, val_ds, steps_per_epoch, callbacks=(), monitor=None,
            checkpoint=True, train_stream=None, batches_per_pass=None):
        """`model.fit` with backups, checkpoints, TensorBoard and mid-epoch resume.

        Args:
            model: compiled keras.Model (a Distiller too).
            train_ds: callable returning a new `tf.data.Dataset` of one pass
                of training batches (global batch); a dataset is accepted
                when no mid-epoch resume is needed. Why a callable: a
                shuffle with `reshuffle_each_iteration` draws each pass's
                order from a seed generator owned by the dataset object,
                so the second `fit` of a resume needs a fresh object to
                replay the orders of an uninterrupted run.
            val_ds: validation batches or None.
            steps_per_epoch: int. Steps per epoch.
            callbacks: the entrypoint's own callbacks (schedules).
            monitor: str. Quantity for the best-weights checkpoint and early
                stopping. Defaults to val_loss / loss.
            checkpoint: bool. Keep `history.json` and the best epoch's
                weights (`checkpoints/best.weights.h5`, see
                `tftransfer.epoch_selection`).
            train_stream: callable `(first_pass, end_pass) -> dataset` of
                those passes back to back, each shuffled with its own seed
                (`make_pipeline(passes=...)`), or None. When given it is
                used instead of `train_ds`: a resumed run then replays
                exactly the uninterrupted run's batches. (With `train_ds`
                the orders after a resume depend on how many iterators
                Keras made; Keras' symbolic build under a strategy makes one
                more per `fit`.)
            batches_per_pass: int. Batches in one pass (with `train_stream`).

        Returns:
            `FitResult`.
        """
        monitor = monitor or ("val_loss" if val_ds is not None else "loss")
        own, backup = self.fit_callbacks(callbacks, steps_per_epoch, monitor, checkpoint)
        def stream(skip):
            if train_stream is not None:  # Passes with their own seeds: exact replay.
                first = skip // batches_per_pass
                end = -(-(self.epochs * steps_per_epoch) // batches_per_pass) + 1
                dataset = train_stream(first, end).skip(skip - first * batches_per_pass)
                return shard_by_data(dataset)
            dataset = train_ds() if callable(train_ds) else train_ds
            return shard_by_data(dataset).repeat().skip(skip)

        val_ds = None if val_ds is None else shard_by_data(val_ds)
        start_step = backup.restore_point()
        epoch, offset = divmod(start_step, steps_per_epoch)
        if start_step:
            logging.info("resumed at step %d (epoch %d, step %d of %d)", start_step, epoch,
                         offset, steps_per_epoch)
        histories = []
        started = time.perf_counter()
        if offset and epoch < self.epochs:  # First finish the interrupted epoch.
            shifted = [_Shifted(cb, epoch, offset, steps_per_epoch) for cb in own]
            histories.append(model.fit(
                stream(start_step), validation_data=val_ds, initial_epoch=epoch,
                epochs=epoch + 1, steps_per_epoch=steps_per_epoch - offset,
                callbacks=shifted, verbose=self.verbose, shuffle=False))
            epoch += 1
        if epoch < self.epochs and not model.stop_training:
            histories.append(model.fit(
                stream(epoch * steps_per_epoch), validation_data=val_ds, initial_epoch=epoch,
                epochs=self.epochs, steps_per_epoch=steps_per_epoch, callbacks=own,
                verbose=self.verbose, shuffle=False))
        average_replica_state(model, self.strategy)
        seconds = time.perf_counter() - started
        history = {}
        for h in histories:
            for key, values in h.history.items():
                history.setdefault(key, []).extend(values)
        return FitResult(history, seconds, start_step, self.epochs * steps_per_epoch)

    def fit_callbacks(self, callbacks, steps_per_epoch, monitor, checkpoint=True):
        """The callbacks `fit` runs, in order, and its `StepBackup` (also what
        tools/bench_throughput.py times).

        Callbacks run in order. Divergence first: a diverged step raises
        before the record or the backup can take its weights. The record
        (every epoch's logs, the best epoch's weights) before the backup: a
        backup that marks an epoch done implies the epoch is recorded (a
        kill between the two re-runs the epoch, whose entry then replaces itself).
        """
        from tftransfer.callbacks import StopOnDivergence
        from tftransfer.epoch_selection import EpochRecord

        record = EpochRecord(self.path(workdir.HISTORY), self.path(workdir.BEST_WEIGHTS), monitor) \
            if checkpoint else None
        backup = StepBackup(os.path.join(self.workdir, workdir.BACKUP), self.path(workdir.BACKUP),
                            steps_per_epoch, self.backup_every_steps, record=record)
        own = [StopOnDivergence()] + list(callbacks) + ([record] if record else [])
        return own + [backup, keras_private.TensorBoard(self.path(workdir.LOGS))], backup

    def save_model(self, model):
        """`model.keras` (every worker saves; the chief's is the work dir's).

        Logs a digest of the weights, the same on every worker of a
        synchronous run (a quick check that replicas stayed in step).
        """
        model.save(self.path(workdir.MODEL))
        logging.info("weights digest %s, trainable %s (%s:%d)", weights_digest(model.weights),
                     weights_digest(model.trainable_weights), self.cluster.task_type,
                     self.cluster.task_id)
        return self.path(workdir.MODEL)

    def finish(self, metrics):
        """Write metrics.json (chief; it marks the run finished) and clean up."""
        metrics = {**metrics, "replicas": self.replicas, "workers": self.cluster.num_workers}
        if self.is_chief:
            backup = os.path.join(self.workdir, workdir.BACKUP)
            if os.path.isdir(backup):  # Training is over: nothing to resume.
                shutil.rmtree(backup)
            workdir.write_json(os.path.join(self.workdir, workdir.METRICS), metrics)
        self.cleanup()
        return metrics

    def cleanup(self):
        """Remove a non-chief worker's temporary output dir."""
        if not self.is_chief and os.path.isdir(self.out):
            shutil.rmtree(self.out, ignore_errors=True)


@dataclasses.dataclass
class FitResult:
    """history: `{key: [value per epoch]}`; seconds: fit wall time;
    resumed_at_step: global step restored from a backup (0: fresh);
    total_steps: int."""

    history: dict
    seconds: float
    resumed_at_step: int
    total_steps: int

    @property
    def epochs(self):
        return len(self.history.get("loss", []))

    def summary(self):
        """Common metrics.json fields: last-epoch train logs, epochs, timing, resume."""
        return {
            "train": {k: float(v[-1]) for k, v in self.history.items() if not k.startswith("val_")},
            "epochs": self.epochs,
            "train_seconds": self.seconds,
            "seconds_per_epoch": self.seconds / max(self.epochs, 1),
            "resumed_at_step": self.resumed_at_step,
        }


def average_replica_state(model, strategy):
    """Average per-replica non-trainable state (BatchNorm moving statistics)
    over the replicas, so every worker saves and evaluates the same model.

    Why: Keras 3 creates moving statistics with aggregation "none", so each
    replica updates its own copy from its own batches (tf.keras averaged
    them, `VariableAggregation.MEAN`); without this the workers end with
    identical trainable weights but different moving statistics.
    """
    if strategy.num_replicas_in_sync == 1:
        return
    variables = [v for v in model.non_trainable_variables
                 if v.aggregation == "none" and "float" in str(v.dtype)]
    if not variables:
        return

    with strategy.scope():
        local = strategy.run(lambda: [tf.identity(v.value) for v in variables])
        for v, value in zip(variables, local):
            v.assign(strategy.reduce("MEAN", value, axis=None))


def weights_digest(variables):
    """sha256 (16 hex digits) over a list of variables' values, in order."""
    import hashlib

    digest = hashlib.sha256()
    for v in variables:
        digest.update(keras.ops.convert_to_numpy(v).tobytes())
    return digest.hexdigest()[:16]


def make_out_dir(workdir_path, cluster):
    """The chief writes `workdir_path`; any other worker a fresh temporary dir."""
    if cluster.is_chief:
        return workdir_path
    return tempfile.mkdtemp(prefix=f"tftransfer-{cluster.task_type}{cluster.task_id}-")


def shard_by_data(dataset):
    """Auto-shard policy DATA: every worker reads all of the (in-memory) data
    and keeps its share of each global batch. The sources give in-memory
    tensors or file paths mapped through `read_file`, which FILE sharding
    cannot see; every worker uses the same shuffle seed, so the shares are
    disjoint."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


class StepBackup(keras.callbacks.Callback):
    """Weights + optimizer state every `every_steps` steps and at each epoch end.

    Like `keras.callbacks.BackupAndRestore(save_freq=N)`, plus what a
    mid-epoch resume needs (Keras 3.15 restores the weights but restarts the
    epoch from its first batch): the global step of the backup, read by
    `restore_point` before `fit`. Writes go to `write_dir` (a worker's own),
    reads come from `read_dir` (the chief's); each backup is a new weights
    file, committed by atomically replacing `state.json`, so a kill at any
    moment leaves the previous backup intact.

    Args:
        read_dir: str. Backup directory to restore from.
        write_dir: str. Backup directory to write to.
        steps_per_epoch: int.
        every_steps: int. Steps between backups; 0: epoch ends only.
        record: the run's `EpochRecord`, which runs just before this
            callback, or None. When it has just saved this epoch's weights
            as the best epoch's, the epoch-end backup is a hard link to that
            file instead of a second write of the same weights and optimizer
            state (Keras' `save_weights` costs ~25 ms even for a linear
            head, most of an epoch on cached features). Replacing the best
            file later leaves the linked backup's contents untouched.
    """

    def __init__(self, read_dir, write_dir, steps_per_epoch, every_steps=0, record=None):
        super().__init__()
        self.read_dir, self.write_dir = read_dir, write_dir
        self.steps_per_epoch = steps_per_epoch
        self.every_steps = every_steps
        self.record = record
        self._state = self._read_state()
        self._restored = False
        self._step = self.restore_point()
        self._since = 0
        self._writer = keras_private.WeightsWriter()  # save_weights, without Keras' walk every time

    def _read_state(self):
        path = os.path.join(self.read_dir, STATE)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            state = json.load(f)
        if not os.path.isfile(os.path.join(self.read_dir, state["weights"])):
            return None
        return state

    def restore_point(self):
        """Global step of the backup to resume from (0: none)."""
        return int(self._state["step"]) if self._state else 0

    def on_train_begin(self, logs=None):
        if self._state and not self._restored:
            if self.model.optimizer is not None and not self.model.optimizer.built:
                self.model.optimizer.build(self.model.trainable_variables)
            self.model.load_weights(os.path.join(self.read_dir, self._state["weights"]))
        self._restored = True

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        self._since += 1
        if self._step % self.steps_per_epoch == 0:
            # An epoch's last step: `on_epoch_end` backs it up once the epoch
            # is validated and recorded. A backup here would mark the epoch
            # done before its record exists, and a kill in between would
            # resume past an epoch that History never saw.
            return
        if self.every_steps and self._since >= self.every_steps:
            self._save()

    def on_epoch_end(self, epoch, logs=None):
        self._step = (epoch + 1) * self.steps_per_epoch
        best = self.record.saved_at(epoch + 1) if self.record is not None else None
        self._save(link_to=best)

    def _save(self, link_to=None):
        self._since = 0
        os.makedirs(self.write_dir, exist_ok=True)
        name = f"step-{self._step}.weights.h5"
        path = os.path.join(self.write_dir, name)
        if not (link_to and _linked(link_to, path)):
            self._writer.save(self.model, path)
        previous = self._read_own()
        workdir.write_json(os.path.join(self.write_dir, STATE), {"step": self._step, "weights": name})
        if previous and previous != name and os.path.exists(os.path.join(self.write_dir, previous)):
            os.remove(os.path.join(self.write_dir, previous))

    def _read_own(self):
        path = os.path.join(self.write_dir, STATE)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)["weights"]


def _linked(source, path):
    """Hard-link `source` as `path` (replacing it); False where links are not possible."""
    tmp = path + ".link-tmp"
    try:
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.link(source, tmp)
        os.replace(tmp, path)
        return True
    except OSError:
        return False


class _Shifted(keras.callbacks.Callback):
    """A callback seen through a resumed partial epoch: batch indices of
    `epoch` shifted by `offset`, and `params["steps"]` the full epoch
    length, so epoch/step schedules compute the true global step."""

    def __init__(self, inner, epoch, offset, steps_per_epoch):
        super().__init__()
        self.inner, self.epoch, self.offset, self.steps = inner, epoch, offset, steps_per_epoch

    def set_model(self, model):
        super().set_model(model)
        self.inner.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.inner.set_params({**params, "steps": self.steps})

    def on_train_batch_begin(self, batch, logs=None):
        self.inner.on_train_batch_begin(batch + self.offset, logs)

    def on_train_batch_end(self, batch, logs=None):
        self.inner.on_train_batch_end(batch + self.offset, logs)


def _forward(name):
    return lambda self, *args, **kwargs: getattr(self.inner, name)(*args, **kwargs)


for _hook in ("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end",
              "on_test_begin", "on_test_end", "on_test_batch_begin", "on_test_batch_end",
              "on_predict_begin", "on_predict_end", "on_predict_batch_begin",
              "on_predict_batch_end"):
    setattr(_Shifted, _hook, _forward(_hook))
