"""Training callbacks: progressive unfreezing with discriminative learning rates.

`ProgressiveUnfreezing` is ULMFiT's gradual unfreezing and discriminative
fine-tuning as one Keras callback: during a single `model.fit`, backbone
layer groups become trainable on a schedule (by epoch or by step), each at
its own learning rate, without the user recompiling.

Keras 3 facts this relies on (verified with Keras 3.15, TF 2.21):
- An optimizer only updates the variables it was built with ("Unknown
  variable" otherwise), so it is built once over every variable that will
  ever train, before the first step. Its slots (Adam moments) and iteration
  count then simply carry on when a group unfreezes.
- The train function captures `model.trainable_variables` when traced, so it
  is rebuilt (`make_train_function(force=True)`) whenever the trainable set
  changes. Frozen variables are absent from the gradient computation: they
  cost no backward work and get no optimizer update (no weight decay either).
- A BatchNormalization layer with `trainable=False` runs in inference mode
  (moving statistics frozen), which is what transfer learning wants.
- `BackupAndRestore` restores the weights, the optimizer state (iterations
  included, so learning-rate schedules resume) and `model._initial_epoch`;
  the stage is a pure function of the epoch / step, so a resumed run gets
  the same trainable groups and learning rates without extra state.
"""

import logging
import math
import os

import keras

from tftransfer import lr_multipliers
from tftransfer.errors import UserError
from tftransfer.keras_private import sublayers, tracks_variable

HEAD = "head"
ALL = "all"
FROZEN = "frozen"
GRADUAL = "gradual"
UNITS = ("epoch", "step")
# Gradual pacing: `every` is one of these or a positive integer.
EVERY_AUTO = "auto"
EVERY_EPOCH = "epoch"
EVERY_CHOICES = (EVERY_AUTO, EVERY_EPOCH)
# A group whose learning rate is below this fraction of the head's barely trains.
MIN_USEFUL_LR_FRACTION = 0.005
_OWNER = "ProgressiveUnfreezing"
_log = logging.getLogger(__name__)


def gradual_interval(num_groups, epochs, steps_per_epoch, every=EVERY_AUTO):
    """Steps between two gradual unfreezes, or None for one per epoch.

    `every="epoch"`: one group per epoch, ULMFiT's rule. `every="auto"`: the
    same when the run has at least twice as many epochs as groups (so the
    bottom group still trains for half of the run); otherwise unfreezing is
    paced over the first half of the run, at evenly spaced steps, so that
    every group trains for at least half of it. A 7-group MiniLM in a
    10-epoch run thus unfreezes a group every 10/14 epoch, where one per
    epoch would reach its embeddings only at epoch 7.

    Args:
        num_groups: int. Backbone layer groups.
        epochs: int. Epochs in the run.
        steps_per_epoch: int or None. None (unknown) keeps one per epoch.
        every: `"auto"` or `"epoch"`.

    Returns:
        int (steps) or None (per epoch).
    """
    if every == EVERY_EPOCH or not steps_per_epoch or not epochs or epochs >= 2 * num_groups:
        return None
    return max(1, (epochs * steps_per_epoch) // (2 * num_groups))


def resolve_schedule(schedule, group_names, unit="epoch", every=1):
    """Normalise a schedule to `[(at, frozenset(trainable group names)), ...]`.

    Args:
        schedule: `"all"` (every group trains from the start), `"frozen"`
            (head only, throughout), `"gradual"` (ULMFiT: head only first,
            then the top group, then one more group each `every` epochs or
            steps, top-down), or a list of points
            `{"at_epoch" | "at_step": int, "groups": "head" | "all" | name | [names]}`.
            Groups accumulate from point to point (a point never re-freezes);
            before the first point only the head trains.
        group_names: list of str. The backbone's groups, bottom to top.
        unit: str. `"epoch"` or `"step"`. Defaults to `"epoch"`.
        every: int. Gradual only: epochs or steps between two unfreezes.
            Defaults to 1.

    Returns:
        list of `(at, frozenset)` sorted by `at`, starting at 0.

    Example:
    ```python
    resolve_schedule("gradual", ["stem", "stack0", "stack1"])
    # [(0, {}), (1, {'stack1'}), (2, {'stack0', 'stack1'}), (3, {all three})]
    ```
    """
    if isinstance(schedule, str):
        if schedule == ALL:
            return [(0, frozenset(group_names))]
        if schedule == FROZEN:
            return [(0, frozenset())]
        if schedule == GRADUAL:
            points = [(0, frozenset())]
            for depth in range(1, len(group_names) + 1):
                points.append((depth * every, frozenset(group_names[-depth:])))
            return points
    if not isinstance(schedule, (list, tuple)):
        raise UserError(
            f"unfreeze schedule must be all, frozen, gradual or a list of points like "
            f"{{at_{unit}: 0, groups: head}}. Received: schedule={schedule!r}."
        )
    key = f"at_{unit}"
    for i, point in enumerate(schedule):
        if not isinstance(point, dict) or set(point) != {key, "groups"}:
            raise UserError(
                f"unfreeze schedule point {i} must be a mapping with keys {key} and groups "
                f"(unit={unit}). Received: {point!r}."
            )
        at = point[key]
        if isinstance(at, bool) or not isinstance(at, int) or at < 0:
            raise UserError(f"unfreeze schedule point {i}: {key} must be an integer >= 0. Received: {at!r}.")
    points, current = [], set()
    for i, point in sorted(enumerate(schedule), key=lambda p: p[1][key]):
        groups = point["groups"]
        if groups == ALL:
            current = set(group_names)
        elif groups != HEAD:
            if isinstance(groups, str):
                groups = [groups]
            if not isinstance(groups, (list, tuple)) or not all(isinstance(g, str) for g in groups):
                raise UserError(
                    f"unfreeze schedule point {i}: groups must be head, all, a group name or "
                    f"a list of names. Received: {groups!r}."
                )
            unknown = [g for g in groups if g not in group_names]
            if unknown:
                raise UserError(
                    f"unfreeze schedule point {i}: unknown layer group {unknown[0]!r}. "
                    f"Groups, bottom to top: {', '.join(group_names)}."
                )
            current |= set(groups)
        points.append((point[key], frozenset(current)))
    if not points or points[0][0] != 0:
        points.insert(0, (0, frozenset()))
    return points


class ProgressiveUnfreezing(keras.callbacks.Callback):
    """Unfreeze backbone layer groups on a schedule, within one `fit`.

    The head (every layer outside `layer_groups`) always trains. Backbone
    groups become trainable at their scheduled epoch or step and stay so.
    The optimizer is built once over every variable that will ever train and
    the train function is rebuilt at each change, so the user compiles once
    and the optimizer's state (Adam moments, iteration count, the learning
    rate schedule's position) carries on across every unfreeze.

    Discriminative learning rates (`lr_decay`, ULMFiT): the head trains at
    the optimizer's learning rate `lr` (a float or any schedule), the top
    backbone group at `lr * lr_decay`, the next one down at
    `lr * lr_decay**2`, ..., the bottom group at `lr * lr_decay**N`. The
    rate is scaled inside the optimizer's update step
    (`tftransfer.lr_multipliers.set_lr_multipliers`), so it is exact for every
    Keras optimizer, Adam included, and also scales decoupled weight decay.
    The multipliers are not saved with the model: `model.save` writes the
    plain optimizer and the callback sets them again at each `fit`.

    BatchNorm: backbone BatchNormalization layers run in inference mode
    (moving mean/variance unchanged, gamma/beta fixed) while their group is
    frozen and, by default, after it unfreezes too. `train_bn=True` lets
    them train (batch statistics, updated moving averages, trainable
    gamma/beta) once their group unfreezes. Unlike fastai's `train_bn`,
    BatchNorm layers of still-frozen groups stay frozen.

    Logs: at each epoch end, `unfrozen_groups` (number of trainable
    backbone groups), `lr_head` and `lr_<group>` (the learning rate each
    group trained at at the end of the epoch; 0 for a frozen group) are
    added to `logs`, so they land in `History` and in any later callback
    (`TensorBoard`, `CSVLogger`); with `log_dir` they are also written as
    TensorBoard scalars `unfreezing/<name>` under `<log_dir>/train`.

    Resume: the stage is a pure function of the epoch (or global step
    `epoch * steps_per_epoch + batch`), so a run resumed by
    `keras.callbacks.BackupAndRestore` gets the right groups and rates.

    Args:
        layer_groups: list of `tftransfer.LayerGroup`, bottom to top (e.g.
            `loaded.layer_groups`).
        schedule: `"gradual"`, `"all"`, `"frozen"` or a list of points; see
            `resolve_schedule`. Defaults to `"gradual"`.
        unit: str. `"epoch"` or `"step"` (global training step; changes
            apply at the next batch, or the next `steps_per_execution`
            boundary). Defaults to `"epoch"`.
        train_bn: bool. Let backbone BatchNorm layers train once their group
            unfreezes. Defaults to False.
        lr_decay: float in (0, 1], or None. Discriminative learning-rate
            factor per group below the head; ULMFiT uses `1 / 2.6`
            (`tftransfer.lr_multipliers.ULMFIT_LR_DECAY`). None: one learning
            rate for every variable. Defaults to None.
        log_dir: str or None. TensorBoard directory (the one given to
            `keras.callbacks.TensorBoard`). Defaults to None (History only).
        every: `"auto"`, `"epoch"`, an int, or None. `"gradual"` only:
            the pace of unfreezing. An int: epochs (unit epoch) or steps
            (unit step) between two unfreezes. `"epoch"` or None: one group
            per epoch (ULMFiT; one epoch's worth of steps for unit step).
            `"auto"`: one per epoch when the run has at least twice as many
            epochs as groups, otherwise evenly spaced steps over the first
            half of the run, so every group trains (see `gradual_interval`).
            Defaults to None.

    Example:
    ```python
    import keras, numpy as np, tftransfer
    from tftransfer.callbacks import ProgressiveUnfreezing
    from tftransfer.schedules import SlantedTriangular

    loaded = tftransfer.load_backbone(
        spec=tftransfer.backbones.TINY_RESNET_SPEC, image_size=32)
    model = tftransfer.build_model(loaded, [tftransfer.HeadSpec(num_classes=5)])
    model.compile(keras.optimizers.Adam(SlantedTriangular(1e-3, total_steps=6)),
                  loss={"label": keras.losses.SparseCategoricalCrossentropy(from_logits=True)})
    x, y = np.random.rand(8, 32, 32, 3), {"label": np.arange(8) % 5}
    history = model.fit(x, y, batch_size=8, epochs=6, callbacks=[ProgressiveUnfreezing(
        loaded.layer_groups, lr_decay=1 / 2.6,
        schedule=[{"at_epoch": 0, "groups": "head"},
                  {"at_epoch": 2, "groups": ["stack1"]},
                  {"at_epoch": 4, "groups": "all"}])])
    history.history["unfrozen_groups"]  # [0, 0, 1, 1, 3, 3]
    ```
    """

    def __init__(
        self,
        layer_groups,
        schedule=GRADUAL,
        unit="epoch",
        train_bn=False,
        lr_decay=None,
        log_dir=None,
        every=None,
    ):
        super().__init__()
        if unit not in UNITS:
            raise UserError(f"ProgressiveUnfreezing: unit must be epoch or step. Received: unit={unit!r}.")
        layer_groups = list(layer_groups or [])
        if not layer_groups or not all(hasattr(g, "name") and hasattr(g, "layers") for g in layer_groups):
            raise UserError(
                "ProgressiveUnfreezing: layer_groups must be a non-empty list of LayerGroup "
                "(e.g. loaded.layer_groups from tftransfer.load_backbone)."
            )
        names = [g.name for g in layer_groups]
        if len(set(names)) != len(names) or {HEAD, ALL} & set(names):
            raise UserError(
                f"ProgressiveUnfreezing: layer group names must be unique and not 'head' or 'all'. "
                f"Received: {names}."
            )
        if not isinstance(train_bn, bool):
            raise UserError(f"ProgressiveUnfreezing: train_bn must be true or false. Received: {train_bn!r}.")
        if lr_decay is not None and (
            isinstance(lr_decay, bool) or not isinstance(lr_decay, (int, float)) or not 0.0 < lr_decay <= 1.0
        ):
            raise UserError(
                f"ProgressiveUnfreezing: lr_decay must be in (0, 1] (ULMFiT: 1/2.6) or None. "
                f"Received: lr_decay={lr_decay!r}."
            )
        if len(layer_groups) == 1 and (schedule == GRADUAL or lr_decay is not None):
            # One group: gradual would unfreeze everything at once and
            # lr_decay would scale nothing, silently. Say so instead.
            what = "schedule gradual" if schedule == GRADUAL else f"lr_decay={lr_decay}"
            raise UserError(
                f"train.unfreeze: {what} needs a backbone with several layer groups, but this "
                f"backbone is one group ({names[0]!r}: tftransfer knows no block structure for it; "
                f"see README 'Backbones'). Use schedule all or frozen without lr_decay."
            )
        if every is not None and every not in EVERY_CHOICES and (
            isinstance(every, bool) or not isinstance(every, int) or every < 1
        ):
            raise UserError(
                f"ProgressiveUnfreezing: every must be auto, epoch or an integer >= 1. Received: every={every!r}."
            )
        self.layer_groups = layer_groups
        self.group_names = names
        self.schedule = schedule
        self.unit = unit
        self.train_bn = train_bn
        self.lr_decay = None if lr_decay is None else float(lr_decay)
        self.log_dir = log_dir
        self.every = every
        # Validates names now; gradual by step is re-resolved in
        # on_train_begin once the steps per epoch are known.
        self.points = resolve_schedule(schedule, names, unit, every if isinstance(every, int) else 1)
        self._pace_unit = unit
        self.lr_multipliers = (
            lr_multipliers.discriminative_multipliers(names, self.lr_decay)
            if self.lr_decay is not None
            else None
        )
        self.current = None
        self._writer = None

    # --- schedule -----------------------------------------------------------

    def groups_at(self, at):
        """Names of the trainable groups at epoch/step `at`."""
        groups = frozenset()
        for point, names in self.points:
            if at >= point:
                groups = names
        return groups

    @property
    def trainable_groups(self):
        """Currently trainable group names, bottom to top."""
        current = self.current or frozenset()
        return [n for n in self.group_names if n in current]

    def _ever_trainable(self):
        out = frozenset()
        for _, names in self.points:
            out |= names
        return out

    def _apply(self, groups, all_bn=False):
        """Make exactly `groups` trainable; BatchNorm per `train_bn`."""
        for group in self.layer_groups:
            trainable = group.name in groups
            for layer in group.layers:
                layer.trainable = trainable
                if all_bn or self.train_bn:
                    continue
                for sub in sublayers(layer, include_self=True):
                    if isinstance(sub, keras.layers.BatchNormalization):
                        sub.trainable = False
        self.current = frozenset(groups)

    def _set_stage(self, at):
        groups = self.groups_at(at)
        if groups == self.current:
            return
        self._apply(groups)
        # The compiled step captured the old trainable set: retrace it.
        self.model.make_train_function(force=True)

    # --- Keras hooks --------------------------------------------------------

    def on_train_begin(self, logs=None):
        model = self.model
        optimizer = model.optimizer
        if optimizer is None:
            raise UserError("ProgressiveUnfreezing: compile the model before fit (it has no optimizer).")
        self._unfreeze_containers()
        if not optimizer.built:
            # Build over every variable that could ever train (BatchNorm
            # included: the same layout Keras itself builds), so unfreezing
            # never meets an "Unknown variable" and checkpoints always match.
            self._apply(frozenset(self.group_names), all_bn=True)
            with _strategy_scope(model):
                optimizer.build(model.trainable_variables)
        self._check_optimizer(optimizer)
        if self.lr_multipliers is not None:
            lr_multipliers.set_lr_multipliers(
                optimizer,
                [(g.variables, self.lr_multipliers[g.name]) for g in self.layer_groups],
                owner=_OWNER,
            )
        else:  # A previous fit's discriminative rates must not linger.
            lr_multipliers.clear_lr_multipliers(optimizer, owner=_OWNER)
        self._steps = self.params.get("steps") if self.params else None
        self._pace_unit = self.unit
        if self.schedule == GRADUAL and not isinstance(self.every, int):
            self._pace_gradual()
        self._warn_untrained_groups()
        self._epoch = getattr(model, "_initial_epoch", None) or 0
        self._epoch_start = None
        self._batches = 0
        self.current = None
        self._set_stage(self._at(self._steps * self._epoch if self._steps else 0))
        # Retrace once per fit, with the learning-rate multipliers in place.
        model.make_train_function(force=True)
        if self.log_dir and self._writer is None:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "train"))

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if self._steps:
            self._epoch_start = epoch * self._steps
        elif self._epoch_start is None:
            # Unknown epoch length: continue from the optimizer's step count
            # (restored by BackupAndRestore).
            self._epoch_start = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        else:
            self._epoch_start += self._batches
        self._batches = 0
        self._set_stage(self._at(self._epoch_start))

    def on_train_batch_begin(self, batch, logs=None):
        if self._pace_unit == "step":
            self._set_stage(self._epoch_start + batch)

    def on_train_batch_end(self, batch, logs=None):
        self._batches = batch + 1

    def on_epoch_end(self, epoch, logs=None):
        values = self.log_values()
        if logs is not None:
            logs.update(values)
        if self._writer is not None:
            import tensorflow as tf

            with self._writer.as_default(step=epoch):
                for key, value in values.items():
                    tf.summary.scalar(f"unfreezing/{key}", value)
            # No flush per epoch (~3 ms, a tenth of an epoch on cached
            # features): the writer flushes on its own every 2 minutes, as
            # Keras' TensorBoard callback's do, and at `on_train_end`.

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # --- helpers ------------------------------------------------------------

    def log_values(self):
        """`{"unfrozen_groups": n, "lr_head": lr, "lr_<group>": lr_g}` now."""
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        current = self.current or frozenset()
        values = {"unfrozen_groups": float(len(current)), "lr_head": lr}
        for name in self.group_names:
            m = self.lr_multipliers[name] if self.lr_multipliers else 1.0
            values[f"lr_{name}"] = lr * m if name in current else 0.0
        return values

    def _at(self, step):
        return self._epoch if self._pace_unit == "epoch" else step

    def _pace_gradual(self):
        """Resolve `every` (None / epoch / auto) for a gradual schedule now that the run's length is known."""
        epochs = self.params.get("epochs") if self.params else None
        every = EVERY_EPOCH if self.every is None else self.every
        interval = gradual_interval(len(self.group_names), epochs, self._steps, every)
        if interval is not None:  # paced in steps, whatever the unit
            self._pace_unit = "step"
            self.points = resolve_schedule(GRADUAL, self.group_names, "step", interval)
        elif self.unit == "step":
            if not self._steps:
                raise UserError(
                    "ProgressiveUnfreezing: schedule gradual with unit step needs the epoch length; "
                    "pass every=<steps between unfreezes> or fit with steps_per_epoch."
                )
            self.points = resolve_schedule(GRADUAL, self.group_names, "step", self._steps)
        else:
            self.points = resolve_schedule(GRADUAL, self.group_names, "epoch", 1)

    def _warn_untrained_groups(self):
        """One warning line for groups the run will not (really) train."""
        epochs = self.params.get("epochs") if self.params else None
        if epochs:
            end = epochs if self._pace_unit == "epoch" else (epochs * self._steps if self._steps else None)
            if end is not None:
                reached = frozenset()
                for at, names in self.points:
                    if at < end:
                        reached |= names
                never = [n for n in self.group_names if n in self._ever_trainable() and n not in reached]
                if never:
                    _log.warning(
                        "ProgressiveUnfreezing: layer groups %s unfreeze only after the run's %d epochs and "
                        "will not train; use unfreeze every=auto (the config default), more epochs, or "
                        "an earlier schedule point.", ", ".join(never), epochs)
        if self.lr_multipliers:
            slow = [n for n in self.group_names
                    if n in self._ever_trainable() and self.lr_multipliers[n] < MIN_USEFUL_LR_FRACTION]
            if slow:
                _log.warning(
                    "ProgressiveUnfreezing: layer groups %s train at less than %g of the head's learning "
                    "rate (lr_decay=%g over %d groups) and will barely change; raise unfreeze.lr_decay "
                    "toward 1 to train them.", ", ".join(slow), MIN_USEFUL_LR_FRACTION, self.lr_decay,
                    len(self.group_names))

    def _unfreeze_containers(self):
        """A frozen model containing the groups (e.g. `freeze_backbone=True`)
        would hide them from `trainable_variables`: the callback owns it now."""
        group_layers = {id(l) for g in self.layer_groups for l in g.layers}
        for layer in sublayers(self.model, include_self=True):
            if id(layer) in group_layers or layer.trainable:
                continue
            inner = sublayers(layer)
            if any(id(l) in group_layers for l in inner):
                layer.trainable = True

    def _check_optimizer(self, optimizer):
        """Every variable the schedule will train must be known to the optimizer."""
        inner = lr_multipliers.inner_optimizer(optimizer)
        for group in self.layer_groups:
            if group.name not in self._ever_trainable():
                continue
            self._apply(frozenset([group.name]))
            for layer in group.layers:
                for v in layer.trainable_weights:
                    if not tracks_variable(inner, v):
                        self.current = None
                        raise UserError(
                            f"ProgressiveUnfreezing: the optimizer was built before layer group "
                            f"{group.name!r} was trainable (variable {v.path}), so it could never "
                            f"update it. Compile the model with every backbone layer trainable "
                            f"(do not freeze it yourself) and use a fresh optimizer; the callback "
                            f"freezes groups itself."
                        )
        self.current = None


class StopOnDivergence(keras.callbacks.Callback):
    """Stop `fit` when training diverges, with a one-line `UserError`.

    Diverged means a non-finite loss, or a loss above `max_growth` times the
    first batch's (scale-free: it holds for a cross-entropy near ln(classes)
    and for a regression loss of 1e10 alike). Keras' `TerminateOnNaN` only
    ends `fit` quietly on NaN, so whatever runs next (evaluation, save,
    export) would ship the diverged weights as a success. Put this callback
    before `BackupAndRestore` and any checkpointing callback: callbacks run
    in order, so the backup and the best checkpoint on disk stay those of
    the last good step.

    The batch-level `loss` Keras reports is the epoch's running mean, which
    stays non-finite once any step was.

    Args:
        max_growth: float. Loss growth over the first batch's that counts as
            divergence. Defaults to 1e4.
    """

    def __init__(self, max_growth=1e4):
        super().__init__()
        self.max_growth = float(max_growth)

    def on_train_begin(self, logs=None):
        self._first = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        loss = float(loss)
        if self._first is None and math.isfinite(loss):
            self._first = max(abs(loss), 1e-12)
            return
        grew = self._first is not None and loss > self.max_growth * self._first
        if math.isfinite(loss) and not grew:
            return
        what = f"became {loss}" if not math.isfinite(loss) else (
            f"grew to {loss:.3g}, over {self.max_growth:g} times the first step's {self._first:.3g}")
        raise UserError(
            f"training diverged: the loss {what} at epoch {self._epoch + 1}, step {batch + 1}; "
            f"lower train.learning_rate, check the labels for NaN/infinite values, or train in "
            f"float32 (mixed_float16 needs loss scaling). Nothing from the diverged steps was saved."
        )


def check_finite_weights(model, what="the model"):
    """UserError when a weight of `model` holds NaN or infinity: never save or serve such a model."""
    import numpy as np

    for variable in model.weights:
        if not np.all(np.isfinite(keras.ops.convert_to_numpy(variable))):
            raise UserError(
                f"{what}: weight {variable.path} is not finite (NaN or infinity): the training "
                f"diverged. Retrain with a lower train.learning_rate; nothing was saved or exported."
            )


def _strategy_scope(model):
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None:
        import contextlib

        return contextlib.nullcontext()
    return strategy.scope()

