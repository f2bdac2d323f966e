"""Training callbacks: progressive unfreezing of backbone layer groups.

Keras 3 facts this relies on (verified with Keras 3.15):
- An optimizer only updates the variables it was built with ("Unknown
  variable" otherwise), so the optimizer is built once over every variable
  that will ever train, before the first step.
- The train function captures `model.trainable_variables` when traced, so it
  is rebuilt (`make_train_function(force=True)`) whenever the trainable set
  changes. Frozen variables are then absent from the gradient computation:
  they cost no backward work.
- A BatchNormalization layer with `trainable=False` runs in inference mode
  (moving statistics frozen), which is what transfer learning wants.
"""

import keras

from tftransfer.errors import UserError

HEAD = "head"
ALL = "all"


def resolve_schedule(schedule, group_names, unit="epoch"):
    """Normalise a schedule to `[(at, frozenset(trainable group names)), ...]`.

    Args:
        schedule: `"all"` (everything trains from the start), `"frozen"`
            (head only), `"gradual"` (ULMFiT: top group at epoch 1, one more
            group each epoch, top-down), or a list of points
            `{"at_epoch" | "at_step": int, "groups": "head" | "all" | [names]}`;
            groups accumulate from point to point.
        group_names: list of str. The backbone's groups, bottom to top.
        unit: str. `"epoch"` or `"step"`.

    Returns:
        list of `(at, frozenset)` sorted by `at`, starting at 0.
    """
    if schedule == ALL:
        return [(0, frozenset(group_names))]
    if schedule == "frozen":
        return [(0, frozenset())]
    if schedule == "gradual":
        points = [(0, frozenset())]
        for depth in range(1, len(group_names) + 1):
            points.append((depth, frozenset(group_names[-depth:])))
        return points
    if not isinstance(schedule, (list, tuple)):
        raise UserError(
            f"unfreeze schedule must be all, frozen, gradual or a list of points. "
            f"Received: {schedule!r}."
        )
    key = f"at_{unit}"
    points, current = [], set()
    for i, point in enumerate(sorted(schedule, key=lambda p: p[key])):
        groups = point["groups"]
        if groups == ALL:
            current = set(group_names)
        elif groups != HEAD:
            groups = [groups] if isinstance(groups, str) else list(groups)
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

    Args:
        layer_groups: list of `tftransfer.backbones.LayerGroup`, bottom to top.
        schedule: see `resolve_schedule`. Defaults to `"gradual"`.
        unit: str. `"epoch"` or `"step"` (global step). Defaults to `"epoch"`.
        train_bn: bool. Let BatchNorm layers of unfrozen groups train (batch
            statistics, updated moving averages). False keeps them in
            inference mode, as the Keras transfer-learning guide advises.
            Defaults to False.

    Example:
    ```python
    model.fit(ds, epochs=5, callbacks=[ProgressiveUnfreezing(
        loaded.layer_groups,
        schedule=[{"at_epoch": 0, "groups": "head"},
                  {"at_epoch": 2, "groups": ["stack1"]},
                  {"at_epoch": 4, "groups": "all"}])])
    ```
    """

    def __init__(self, layer_groups, schedule="gradual", unit="epoch", train_bn=False):
        super().__init__()
        if unit not in ("epoch", "step"):
            raise UserError(f"unit must be epoch or step. Received: unit={unit!r}.")
        self.layer_groups = list(layer_groups)
        self.group_names = [g.name for g in self.layer_groups]
        self.unit = unit
        self.train_bn = train_bn
        self.points = resolve_schedule(schedule, self.group_names, unit)
        self.current = None
        self._global_step = 0

    # --- schedule -----------------------------------------------------------

    def groups_at(self, at):
        """Names of the trainable groups at epoch/step `at`."""
        groups = frozenset()
        for point, names in self.points:
            if at >= point:
                groups = names
        return groups

    def _apply(self, groups):
        for group in self.layer_groups:
            trainable = group.name in groups
            for layer in group.layers:
                if isinstance(layer, keras.layers.BatchNormalization) and not self.train_bn:
                    layer.trainable = False
                else:
                    layer.trainable = trainable
        self.current = groups

    def _set_stage(self, at):
        groups = self.groups_at(at)
        if groups == self.current:
            return
        self._apply(groups)
        # The compiled step captured the old trainable set: retrace it.
        self.model.make_train_function(force=True)

    # --- Keras hooks --------------------------------------------------------

    def on_train_begin(self, logs=None):
        optimizer = self.model.optimizer
        if not optimizer.built:
            # Build over every variable that will ever train, so unfreezing
            # later never meets an "Unknown variable".
            self._apply(frozenset(self.group_names))
            optimizer.build(self.model.trainable_variables)
        self.current = None
        initial_epoch = getattr(self.model, "_initial_epoch", None) or 0
        steps = self.params.get("steps") or 0
        self._global_step = initial_epoch * steps
        if self.unit == "epoch":
            self._set_stage(initial_epoch)
        else:
            self._set_stage(self._global_step)

    def on_epoch_begin(self, epoch, logs=None):
        if self.unit == "epoch":
            self._set_stage(epoch)

    def on_train_batch_begin(self, batch, logs=None):
        if self.unit == "step":
            self._set_stage(self._global_step)

    def on_train_batch_end(self, batch, logs=None):
        self._global_step += 1
