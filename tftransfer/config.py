"""Typed experiment configs: YAML -> dataclasses, strict validation, overrides.

Only the entrypoints read these objects; library code takes plain keyword
arguments so that it is usable from a notebook without any config.

Every key is validated once, when the file loads: an unknown or mistyped key
raises `UserError` naming its dotted path and the allowed keys, before any
work dir is touched.

Why a small loader of our own (`from_dict`, ~165 lines) and not a library.
Tried on the same three mistakes (unknown `train.epochz`, `epochs: many`,
`learning_rate: 2e-5` read as a string by YAML 1.1), December 2026:
- dacite 1.9 (strict): the unknown key error has no path ("can not match
  "epochz" to any data class field") and no suggestion; `2e-5` is refused.
- pydantic 2.14 (`extra="forbid"`): errors are multi-line with a URL; no
  did-you-mean; lax mode silently turns `epochs: 2.5`-like floats and
  strings into ints, strict mode refuses `2e-5`. Adopting it also means
  rewriting every dataclass as a model.
- ml_collections: suggests a close key, but its configs are Python files
  and untyped dicts (no check that `epochs` is an int).
None gives one line with the dotted path, the allowed keys and a
suggestion, plus YAML-1.1-safe numbers; each would still need a wrapper of
about this size to turn its errors into that line. So the dataclasses stay
the schema and `from_dict` the loader.
"""

import dataclasses
import difflib
import math
import re
import typing
from typing import Any, Optional, Union

import yaml

from tftransfer.errors import UserError
from tftransfer.progress import VERBOSE_VALUES

# ---------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class BackboneConfig:
    """Where the pretrained network comes from (exactly one source).

    preset: keras-hub preset name (`resnet_50_imagenet`), `kaggle://` or
        `hf://` handle, or a local directory in keras-hub preset format or
        Hugging Face checkpoint format.
    spec: an architecture spec with random init, e.g.
        `{architecture: resnet, stackwise_num_filters: [64, 128], ...}`.
    keras_application: a `keras.applications` model name, e.g. `ResNet50`.
    """

    preset: Optional[str] = None
    spec: Optional[dict] = None
    keras_application: Optional[str] = None
    # keras_application weights: "imagenet", a local weights file, or null.
    weights: Optional[str] = "imagenet"
    # false: same architecture as `preset`, random init (transfer-vs-scratch).
    load_weights: bool = True
    # Images: side length the preprocessor resizes to. Null: the preset's own.
    image_size: Optional[int] = None
    # Text: tokens per example after the tokenizer (pad/truncate).
    sequence_length: int = 128

    def load_kwargs(self):
        """Keyword arguments of `tftransfer.backbones.load_backbone` for this backbone."""
        return {"preset": self.preset, "spec": self.spec, "keras_application": self.keras_application,
                "weights": self.weights, "load_weights": self.load_weights,
                "image_size": self.image_size, "sequence_length": self.sequence_length}

    def validate(self, path):
        given = [k for k in ("preset", "spec", "keras_application") if getattr(self, k)]
        if len(given) != 1:
            raise UserError(
                f"{path}: set exactly one of {path}.preset, {path}.spec, {path}.keras_application "
                f"(got {', '.join(given) or 'none'})."
            )
        if self.image_size is not None and self.image_size < 8:
            raise UserError(f"{path}.image_size must be >= 8. Received: {self.image_size}.")
        if self.sequence_length < 2:
            raise UserError(
                f"{path}.sequence_length must be >= 2. Received: {self.sequence_length}."
            )


HEAD_TYPES = ("classification", "multilabel", "regression")
POOLINGS = ("avg", "max", "cls", "mean")


@dataclasses.dataclass
class HeadConfig:
    """One new head on the backbone (several heads: multi-task)."""

    name: str = "label"
    type: str = "classification"
    # Classes (classification / multilabel) or outputs (regression).
    # Null: taken from the data.
    num_classes: Optional[int] = None
    # Null: avg for images, cls for text.
    pooling: Optional[str] = None
    dropout: float = 0.0
    hidden_units: int = 0
    label_smoothing: float = 0.0
    loss_weight: float = 1.0
    # CSV/JSONL column or TFDS feature of this head's label. Null: data.label_key
    # with one head, the head's name with several (multi-task).
    label_key: Optional[str] = None
    # L2-normalise the pooled features before the head's layers (sentence-transformers'
    # Normalize module). auto: true under train.recipe contrastive (SetFit's head reads
    # unit-length embeddings, the directions its cosine loss trains), false otherwise.
    normalize: Union[bool, str] = "auto"
    # L2 penalty on the head's weights, as scikit-learn LogisticRegression's C: summed
    # per-example loss + ||W||^2 / (2 C), i.e. ||W||^2 / (2 C n) on the mean loss over n
    # training examples; smaller C: stronger. null: none. auto: 1.0 (LogisticRegression's
    # default, SetFit's head) under train.recipe contrastive, null otherwise.
    l2_c: Optional[Union[float, str]] = "auto"

    def resolve(self, recipe):
        """`auto` of normalize / l2_c -> the value for `recipe` (the resolved config records it)."""
        contrastive = recipe == "contrastive"
        if self.normalize == "auto":
            self.normalize = contrastive
        if self.l2_c == "auto":
            self.l2_c = 1.0 if contrastive else None

    def validate(self, path):
        _one_of(f"{path}.type", self.type, HEAD_TYPES)
        if self.normalize not in (True, False, "auto"):
            raise UserError(f"{path}.normalize must be true, false or auto. Received: {self.normalize!r}.")
        if self.l2_c != "auto" and self.l2_c is not None and (
                isinstance(self.l2_c, str) or not (math.isfinite(self.l2_c) and self.l2_c > 0)):
            raise UserError(f"{path}.l2_c must be a finite number > 0 (scikit-learn's C), null (no penalty) "
                            f"or auto. Received: {self.l2_c!r}.")
        if self.pooling is not None:
            _one_of(f"{path}.pooling", self.pooling, POOLINGS)
        if self.num_classes is not None and self.num_classes < 1:
            raise UserError(f"{path}.num_classes must be >= 1. Received: {self.num_classes}.")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"{path}.dropout must be in [0, 1). Received: {self.dropout}.")
        if self.hidden_units < 0:
            raise UserError(f"{path}.hidden_units must be >= 0. Received: {self.hidden_units}.")
        if not self.name.isidentifier():
            raise UserError(
                f"{path}.name must be a Python identifier (it names the model output). "
                f"Received: {self.name!r}."
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"{path}.label_smoothing must be in [0, 1). Received: {self.label_smoothing}.")
        if not (math.isfinite(self.loss_weight) and self.loss_weight >= 0):
            raise UserError(f"{path}.loss_weight must be a finite number >= 0. Received: {self.loss_weight}.")


@dataclasses.dataclass
class DigitsConfig:
    """The handwritten digits scikit-learn ships (offline, real images)."""

    classes: list = dataclasses.field(default_factory=lambda: list(range(10)))
    # Moved to data.train_per_class (any source); kept only to say so.
    train_per_class: Optional[int] = None

    def validate(self, path):
        if not self.classes or any(not isinstance(c, int) or not 0 <= c <= 9 for c in self.classes):
            raise UserError(f"{path}.classes must list digits 0-9. Received: {self.classes}.")
        if self.train_per_class is not None:
            parent = path.rsplit(".", 1)[0]
            raise UserError(
                f"{path}.train_per_class moved to {parent}.train_per_class (k-shot for every source); "
                f"write data.train_per_class: {self.train_per_class}."
            )


DATA_SOURCES = ("digits", "tfds", "image_folder", "csv", "jsonl")
FLIPS = ("horizontal", "vertical", "horizontal_and_vertical")


@dataclasses.dataclass
class AugmentConfig:
    """Random image augmentation of training batches (Keras random layers,
    each batch seeded from `train.seed`: see `tftransfer.data.augment_batches`).

    Factors are fractions as in `keras.layers.RandomTranslation` /
    `RandomRotation` (of a full turn) / `RandomZoom`; 0 disables one.
    """

    flip: Optional[str] = None
    translate: float = 0.0
    rotate: float = 0.0
    zoom: float = 0.0

    def validate(self, path):
        if self.flip is not None:
            _one_of(f"{path}.flip", self.flip, FLIPS)
        for key in ("translate", "rotate", "zoom"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise UserError(f"{path}.{key} must be in [0, 1). Received: {value}.")

    @property
    def enabled(self):
        return bool(self.flip or self.translate or self.rotate or self.zoom)


@dataclasses.dataclass
class DataConfig:
    source: str = "digits"
    # tfds: dataset name (e.g. tf_flowers, glue/sst2) and optional data_dir.
    name: Optional[str] = None
    data_dir: Optional[str] = None
    train_split: str = "train"
    validation_split: Optional[str] = None
    # image_folder (root/<class>/*.jpg|png) or csv/jsonl file.
    train_path: Optional[str] = None
    validation_path: Optional[str] = None
    # Held out of the training data when there is no validation split/path.
    validation_fraction: float = 0.0
    # tfds feature / csv column / jsonl key holding the input and the label.
    # Two keys `[first, second]`: sentence pairs (text backbones; the
    # preprocessor packs `[CLS] first [SEP] second [SEP]`, segment ids 0 / 1).
    input_key: Optional[Union[str, list[str]]] = None
    label_key: str = "label"
    digits: DigitsConfig = dataclasses.field(default_factory=DigitsConfig)
    # k-shot: exactly this many labelled training examples per class (stratified,
    # seeded by train.seed; ids written to W/train_ids.json). digits: the other
    # images validate. Null: all.
    train_per_class: Optional[int] = None
    # Per replica; the global batch is batch_size x replicas.
    batch_size: int = 32
    # Per replica, for validation/evaluation (no activations kept, so it can
    # be larger). Null: max(4 x batch_size, 64).
    eval_batch_size: Optional[int] = None
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    shuffle_buffer: int = 2048
    # Preprocessed examples: auto (memory when the estimate fits
    # cache_memory_budget_mb, else disk), memory (true), disk (W/cache/data/,
    # keyed by data and preprocessing), false. See tftransfer.data.cache.
    cache: Union[bool, str] = "auto"
    # auto's memory budget in MB; null: half the available RAM.
    cache_memory_budget_mb: Optional[float] = None
    # Image folders: decode every file once up front so a bad file is named.
    validate_images: bool = True
    # Image folders: leave out (and count) files that do not decode, instead of failing.
    skip_bad_images: bool = False
    # RGB 0-255 that transparent pixels are composited over (training and serving).
    image_background: list = dataclasses.field(default_factory=lambda: [255.0, 255.0, 255.0])

    def validate(self, path):
        _one_of(f"{path}.source", self.source, DATA_SOURCES)
        from tftransfer.data.cache import CACHE_MODES, setting  # noqa: E402  (owned there)

        _one_of(f"{path}.cache", setting(self.cache), CACHE_MODES)
        if self.cache_memory_budget_mb is not None and not self.cache_memory_budget_mb > 0:
            raise UserError(f"{path}.cache_memory_budget_mb must be > 0 (or null: half the available RAM). "
                            f"Received: {self.cache_memory_budget_mb}.")
        if self.source == "tfds" and not self.name:
            raise UserError(f"{path}.name is required for source tfds (e.g. tf_flowers).")
        if self.source in ("image_folder", "csv", "jsonl") and not self.train_path:
            raise UserError(f"{path}.train_path is required for source {self.source}.")
        if self.batch_size < 1:
            raise UserError(f"{path}.batch_size must be >= 1. Received: {self.batch_size}.")
        if isinstance(self.input_key, list):
            keys = self.input_key
            if len(keys) != 2 or not all(keys) or keys[0] == keys[1]:
                raise UserError(f"{path}.input_key: a sentence pair takes exactly 2 different keys "
                                f"[first, second]. Received: {keys!r}.")
            if self.source not in ("csv", "jsonl", "tfds"):
                raise UserError(f"{path}.input_key: sentence pairs need text data (source csv, jsonl or "
                                f"tfds); source {self.source} gives images. Received: {keys!r}.")
        bg = self.image_background
        if (not isinstance(bg, (list, tuple)) or len(bg) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 255 for v in bg)):
            raise UserError(f"{path}.image_background must be 3 numbers in 0-255 (RGB). Received: {bg!r}.")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise UserError(f"{path}.eval_batch_size must be >= 1 (or null). Received: {self.eval_batch_size}.")
        if self.train_per_class is not None and self.train_per_class < 1:
            raise UserError(f"{path}.train_per_class must be >= 1 (or null). Received: {self.train_per_class}.")
        if self.shuffle_buffer < 1:
            raise UserError(f"{path}.shuffle_buffer must be >= 1. Received: {self.shuffle_buffer}.")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise UserError(
                f"{path}.validation_fraction must be in [0, 1). "
                f"Received: {self.validation_fraction}."
            )


UNFREEZE_PRESETS = ("all", "frozen", "gradual")


@dataclasses.dataclass
class UnfreezeConfig:
    """Which backbone layer groups train when (see tftransfer.callbacks).

    schedule: `all` (full fine-tune), `frozen` (head only), `gradual`
        (top-down, one group per epoch), or a list of points such as
        `[{at_epoch: 0, groups: head}, {at_epoch: 2, groups: [stack1]},
        {at_epoch: 4, groups: all}]` (`at_step` with unit step).
    """

    schedule: Union[str, list] = "all"
    unit: str = "epoch"
    # Discriminative learning rates: group at depth d gets lr * lr_decay**d.
    # Null: one learning rate for everything.
    lr_decay: Optional[float] = None
    # Let backbone BatchNorm layers train (batch statistics) once unfrozen.
    # Null (auto): false for pretrained backbones (keep their statistics, as
    # the Keras transfer-learning guide advises), true for random init.
    train_bn: Optional[bool] = None
    # Gradual pace: auto (one group per epoch when epochs >= 2 x groups, else
    # evenly spaced steps over the first half of the run so every group
    # trains), epoch (ULMFiT: one group per epoch), or N epochs/steps (unit).
    every: Union[int, str] = "auto"

    def validate(self, path):
        from tftransfer.callbacks import EVERY_CHOICES

        _one_of(f"{path}.unit", self.unit, ("epoch", "step"))
        if isinstance(self.every, str):
            _one_of(f"{path}.every", self.every, EVERY_CHOICES)
        elif self.every < 1:
            raise UserError(f"{path}.every must be auto, epoch or an integer >= 1. Received: {self.every}.")
        if isinstance(self.schedule, str):
            _one_of(f"{path}.schedule", self.schedule, UNFREEZE_PRESETS)
        else:
            key = f"at_{self.unit}"
            for i, point in enumerate(self.schedule):
                where = f"{path}.schedule.{i}"
                if not isinstance(point, dict) or set(point) != {key, "groups"}:
                    raise UserError(
                        f"{where} must be a mapping with keys {key} and groups. "
                        f"Received: {point!r}."
                    )
                if not isinstance(point[key], int) or point[key] < 0:
                    raise UserError(f"{where}.{key} must be an integer >= 0.")
        if self.lr_decay is not None and not 0.0 < self.lr_decay <= 1.0:
            raise UserError(f"{path}.lr_decay must be in (0, 1]. Received: {self.lr_decay}.")


@dataclasses.dataclass
class LoraConfig:
    """Low-rank adapters instead of full fine-tuning (see tftransfer/lora.py).

    rank: rank r of each update A @ B. alpha: scale alpha / r (null: r).
    targets: `default` (BERT: attention query/value; ResNet: every Conv2D)
        or a list of backbone layer names.
    """

    rank: int = 8
    alpha: Optional[float] = None
    targets: Union[str, list[str]] = "default"

    def validate(self, path):
        if self.rank < 1:
            raise UserError(f"{path}.rank must be >= 1. Received: {self.rank}.")
        if self.alpha is not None and self.alpha <= 0:
            raise UserError(f"{path}.alpha must be > 0. Received: {self.alpha}.")
        if isinstance(self.targets, str) and self.targets != "default" or self.targets == []:
            raise UserError(f"{path}.targets must be default or a list of layer names. Received: {self.targets!r}.")


OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULES = ("constant", "cosine", "slanted_triangular")
RECIPES = ("finetune", "contrastive")


@dataclasses.dataclass
class ContrastiveConfig:
    """Phase 1 of `train.recipe: contrastive` (SetFit, Tunstall et al. 2022; tftransfer/contrastive.py).

    The encoder trains on sentence pairs of the training examples before the
    head trains (phase 2: the rest of `train`). Defaults are SetFit's.
    """

    # Each iteration gives every example one positive and one negative pair:
    # 2 x num_iterations x examples pairs (SetFit's num_iterations).
    num_iterations: int = 20
    # cosine: (cos(u, v) - 1/0)^2 (SetFit's CosineSimilarityLoss); contrastive:
    # margin loss on the cosine distance (negatives stop pushing once `margin` apart).
    loss: str = "cosine"
    margin: float = 0.5
    epochs: int = 1
    learning_rate: float = 2e-5
    # Pairs per batch (each pair: two sentences through the encoder).
    batch_size: int = 16

    def validate(self, path):
        from tftransfer.contrastive import PAIR_LOSSES

        _one_of(f"{path}.loss", self.loss, PAIR_LOSSES)
        for key in ("num_iterations", "epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise UserError(f"{path}.{key} must be >= 1. Received: {getattr(self, key)}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UserError(f"{path}.learning_rate must be a finite number > 0. Received: {self.learning_rate}.")
        if not 0.0 < self.margin <= 2.0:
            raise UserError(f"{path}.margin must be in (0, 2] (a cosine distance). Received: {self.margin}.")


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 3
    # Null: one pass over the training data per epoch.
    steps_per_epoch: Optional[int] = None
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    unfreeze: UnfreezeConfig = dataclasses.field(default_factory=UnfreezeConfig)
    # Stop when the validation loss has not improved for this many epochs.
    early_stopping_patience: Optional[int] = None
    # Back up weights + optimizer state every N steps (and at every epoch
    # end) so a killed run resumes mid-epoch; 0: epoch ends only. 500 steps
    # lose minutes at most on an accelerator, for one weights+optimizer
    # write per 500 steps (well under 1% of a ResNet-50 or BERT-base run).
    backup_every_steps: int = 500
    seed: int = 0
    # tf.config.experimental.enable_op_determinism (bitwise-repeatable
    # runs and resumes, somewhat slower).
    deterministic: bool = False
    # Which weights ship (model.keras, export, metrics.json): best (the epoch
    # with the best `monitor`; default, since on small data the last epoch is
    # often past the best one) or last. Without validation data: last.
    keep: str = "best"
    # The value that decides "best" (and early stopping). Null: val_loss, or
    # loss without validation data.
    monitor: Optional[str] = None
    # Precise BatchNorm: recompute moving statistics over training batches
    # after fit. auto: exactly when BatchNorm statistics changed in training.
    recompute_bn_stats: Union[bool, str] = "auto"
    bn_stats_batches: int = 200
    # auto: a progress bar on a terminal, one line per epoch otherwise; 0, 1, 2 as in Keras.
    verbose: Union[int, str] = "auto"
    # LoRA adapters (null: off). The base stays frozen; no unfreeze schedule.
    lora: Optional[LoraConfig] = None
    # Classification loss weights per class (tftransfer/class_weights.py): balanced
    # (n / (classes x count), every classification head) or {label: weight} (one
    # head; several heads: {head name: balanced or {label: weight}}). Null: off.
    class_weight: Optional[Union[str, dict]] = None
    # Feature extraction, cached (tftransfer/feature_cache.py): auto computes the pooled
    # backbone features once when the backbone is frozen for the whole run and the inputs
    # are not augmented, and trains the head on them; false: the backbone runs every step.
    cache_features: Union[bool, str] = "auto"
    # finetune: the run as configured. contrastive (SetFit, few-shot text): the
    # encoder first trains on sentence pairs (train.contrastive), then the run
    # as configured trains the head (use unfreeze.schedule: frozen, SetFit's).
    recipe: str = "finetune"
    # Phase 1 of recipe contrastive (null: the defaults, SetFit's).
    contrastive: Optional[ContrastiveConfig] = None

    def validate(self, path):
        from tftransfer.epoch_selection import KEEP_CHOICES

        _one_of(f"{path}.recipe", self.recipe, RECIPES)
        if self.recipe == "contrastive" and self.contrastive is None:
            self.contrastive = ContrastiveConfig()
        if self.recipe != "contrastive" and self.contrastive is not None:
            raise UserError(f"{path}.contrastive is read by {path}.recipe: contrastive only (recipe is "
                            f"{self.recipe}); set {path}.recipe: contrastive or remove {path}.contrastive.")
        from tftransfer.feature_cache import check_mode

        check_mode(self.cache_features, f"{path}.cache_features")

        u = self.unfreeze
        if self.lora is not None and (u.schedule != "all" or u.lr_decay is not None or u.train_bn):
            raise UserError(
                f"{path}.lora with {path}.unfreeze: LoRA keeps every base weight frozen and trains adapters "
                f"and heads, an unfreeze schedule trains base weights group by group; use one of them "
                f"(remove {path}.unfreeze or {path}.lora)."
            )
        if self.epochs < 1:
            raise UserError(f"{path}.epochs must be >= 1. Received: {self.epochs}.")
        _one_of(f"{path}.keep", self.keep, KEEP_CHOICES)
        if isinstance(self.recompute_bn_stats, str):
            _one_of(f"{path}.recompute_bn_stats", self.recompute_bn_stats, ("auto",))
        if self.bn_stats_batches < 1:
            raise UserError(f"{path}.bn_stats_batches must be >= 1. Received: {self.bn_stats_batches}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UserError(f"{path}.learning_rate must be a finite number > 0. Received: {self.learning_rate}.")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise UserError(f"{path}.steps_per_epoch must be >= 1 (or null). Received: {self.steps_per_epoch}.")
        if self.weight_decay < 0:
            raise UserError(f"{path}.weight_decay must be >= 0. Received: {self.weight_decay}.")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise UserError(
                f"{path}.early_stopping_patience must be >= 1 (or null). Received: {self.early_stopping_patience}."
            )
        _one_of(f"{path}.optimizer", self.optimizer, OPTIMIZERS)
        _one_of(f"{path}.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.backup_every_steps < 0:
            raise UserError(f"{path}.backup_every_steps must be >= 0 (0: epoch ends only). "
                            f"Received: {self.backup_every_steps}.")
        if self.verbose not in VERBOSE_VALUES or isinstance(self.verbose, bool):
            raise UserError(f"{path}.verbose must be one of auto, 0, 1, 2. Received: {self.verbose!r}.")
        if self.class_weight is not None:
            from tftransfer.class_weights import check_setting

            check_setting(self.class_weight, f"{path}.class_weight")


from tftransfer.distribute import PRECISIONS, STRATEGIES  # noqa: E402  (owned there)


@dataclasses.dataclass
class DistributeConfig:
    strategy: str = "auto"
    precision: str = "float32"
    jit_compile: bool = False
    # TPU name/address for strategy tpu (empty: the local TPU).
    tpu: str = ""
    # Split the CPU into this many logical devices (mirrored on a CPU-only
    # machine, e.g. to test multi-replica runs); 0: as the machine has.
    logical_cpus: int = 0

    def validate(self, path):
        _one_of(f"{path}.strategy", self.strategy, STRATEGIES)
        _one_of(f"{path}.precision", self.precision, PRECISIONS)
        if self.logical_cpus < 0:
            raise UserError(f"{path}.logical_cpus must be >= 0. Received: {self.logical_cpus}.")


@dataclasses.dataclass
class ExportConfig:
    # Write W/export/<version>/ (SavedModel for TF Serving) after training.
    saved_model: bool = True
    # Also save the fine-tuned backbone as a keras-hub preset in
    # W/backbone_preset/ (for a later transfer run to load).
    backbone_preset: bool = False


DISTILL_CACHES = ("none", "memory", "disk")
DISTILL_SCHEDULES = ("constant", "linear", "cosine")
DISTILL_FEATURE_LOSSES = ("similarity", "mse", "cosine")


@dataclasses.dataclass
class DistillConfig:
    """Knowledge distillation (`python -m tftransfer.distill`).

    The student is the config's usual `backbone` / `heads`; the teacher is
    one or more trained work dirs or `.keras` files (several: an ensemble,
    logits averaged). See README.md, "Knowledge distillation".
    """

    # Trained work dirs (W/model.keras + W/config.yaml) or .keras files.
    teacher: Union[str, list[str]] = dataclasses.field(default_factory=list)
    # loss = alpha * CE(labels) + (1 - alpha) * T**2 * KL(teacher_T || student_T)
    alpha: float = 0.1
    temperature: float = 2.0
    # constant, or linear / cosine from (alpha, temperature) to the *_end values.
    schedule: str = "constant"
    schedule_unit: str = "epoch"
    alpha_end: Optional[float] = None
    temperature_end: Optional[float] = None
    # Teacher outputs: none (run the teacher every step), memory (once per
    # run), disk (once, in W/cache/, reused by later runs).
    cache: str = "memory"
    # Hint loss between a teacher and a student layer (0: off). Null layers:
    # <first head>_pool. similarity works across widths; mse/cosine need equal.
    feature_loss_weight: float = 0.0
    feature_loss: str = "similarity"
    teacher_feature_layer: Optional[str] = None
    student_feature_layer: Optional[str] = None
    # Start the student from (slices of) the teacher's layers.
    init_from_teacher: bool = False
    # Teacher block index per student block. Null: evenly spaced.
    teacher_layers: Optional[list[int]] = None
    # Unlabelled text for the transfer set (soft targets only): .txt (one
    # example per line), or .csv / .jsonl with the data.input_key column.
    transfer_path: Optional[str] = None
    # Match every student transformer layer's hidden states to a teacher
    # layer through a learned projection (tftransfer/distill/features.py):
    # `layerwise` (evenly spaced) or [[teacher index, student index], ...].
    # Weighted by feature_loss_weight; needs cache: none.
    features: Optional[Union[str, list]] = None

    def validate(self, path):
        if isinstance(self.teacher, str):
            self.teacher = [self.teacher]
        if not self.teacher:
            raise UserError(f"{path}.teacher must list at least one trained work dir or .keras file.")
        for name in ("alpha", "alpha_end"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise UserError(f"{path}.{name} must be in [0, 1]. Received: {value}.")
        for name in ("temperature", "temperature_end"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"{path}.{name} must be > 0. Received: {value}.")
        _one_of(f"{path}.schedule", self.schedule, DISTILL_SCHEDULES)
        _one_of(f"{path}.schedule_unit", self.schedule_unit, ("epoch", "step"))
        if self.schedule == "constant" and (self.alpha_end is not None or self.temperature_end is not None):
            raise UserError(
                f"{path}: alpha_end/temperature_end need schedule linear or cosine (schedule is constant)."
            )
        _one_of(f"{path}.cache", self.cache, DISTILL_CACHES)
        _one_of(f"{path}.feature_loss", self.feature_loss, DISTILL_FEATURE_LOSSES)
        if self.feature_loss_weight < 0:
            raise UserError(
                f"{path}.feature_loss_weight must be >= 0. Received: {self.feature_loss_weight}."
            )
        if self.teacher_layers is not None and not self.init_from_teacher:
            raise UserError(f"{path}.teacher_layers needs {path}.init_from_teacher: true.")
        if self.features is not None:
            if isinstance(self.features, str) and self.features != "layerwise":
                raise UserError(f"{path}.features must be layerwise or a list of [teacher, student] layer "
                                f"index pairs. Received: {self.features!r}.")
            if not self.feature_loss_weight:
                raise UserError(f"{path}.features needs {path}.feature_loss_weight > 0 (e.g. 1.0).")
            if self.cache != "none":
                raise UserError(
                    f"{path}.features: layerwise distillation reads the teacher's hidden states every step, "
                    f"which the teacher-output cache does not hold; set {path}.cache: none."
                )
            if self.teacher_feature_layer or self.student_feature_layer:
                raise UserError(f"{path}.features replaces the single hint; remove "
                                f"{path}.teacher_feature_layer / student_feature_layer.")


@dataclasses.dataclass
class PretrainConfig:
    """Domain-adaptive masked-LM pretraining (`python -m tftransfer.pretrain`).

    corpus: unlabelled text files: `.txt` (a line each), `.csv` / `.jsonl`
        (column / key `data.input_key`, default `text`).
    """

    corpus: Union[str, list[str]] = dataclasses.field(default_factory=list)
    # Fraction of tokens selected for prediction (BERT: 0.15).
    mask_rate: float = 0.15
    # Held-out text for the before/after masked-LM loss.
    validation_fraction: float = 0.1

    def validate(self, path):
        if not 0.0 < self.mask_rate < 1.0:
            raise UserError(f"{path}.mask_rate must be in (0, 1). Received: {self.mask_rate}.")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise UserError(f"{path}.validation_fraction must be in [0, 1). Received: {self.validation_fraction}.")


@dataclasses.dataclass
class ExperimentConfig:
    name: str = "experiment"
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    heads: list[HeadConfig] = dataclasses.field(default_factory=lambda: [HeadConfig()])
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    distribute: DistributeConfig = dataclasses.field(default_factory=DistributeConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    # Only `python -m tftransfer.distill` reads it (the student is backbone/heads).
    distill: Optional[DistillConfig] = None
    # Only `python -m tftransfer.pretrain` reads it.
    pretrain: Optional[PretrainConfig] = None

    def validate(self, path):
        if not self.heads:
            raise UserError(f"{path or 'config'}.heads must list at least one head.")
        if self.distill is not None and self.train.lora is not None:
            raise UserError(
                "train.lora with distill: tftransfer.distill trains the whole student, LoRA adapters on a "
                "distilled student are not supported; remove train.lora (or distill)."
            )
        names = [h.name for h in self.heads]
        if len(set(names)) != len(names):
            raise UserError(f"heads: head names must be unique. Received: {names}.")
        for h in self.heads:
            h.resolve(self.train.recipe)
        if self.train.recipe == "contrastive":
            _check_contrastive(self)


def _check_contrastive(cfg):
    """train.recipe contrastive applies to one classification head on mean-pooled single texts."""
    why = "train.recipe contrastive (SetFit) "
    head = cfg.heads[0]
    if len(cfg.heads) > 1:
        raise UserError(why + f"builds pairs from one class label per example; heads lists "
                              f"{len(cfg.heads)} heads. Use one head, or train.recipe finetune.")
    if head.type != "classification":
        raise UserError(why + f"pairs examples of the same and of different classes; heads.0.type is "
                              f"{head.type}. Use type classification, or train.recipe finetune.")
    if head.pooling != "mean":
        raise UserError(why + f"trains the masked-mean sentence embedding the head then reads "
                              f"(sentence-transformers' pooling); set heads.0.pooling: mean. "
                              f"Received: {head.pooling!r}.")
    if cfg.train.lora is not None:
        raise UserError(why + "trains every encoder weight on pairs; LoRA keeps them frozen. "
                              "Remove train.lora, or use train.recipe finetune.")
    if isinstance(cfg.data.input_key, list):
        raise UserError(why + f"pairs single texts itself; data.input_key {cfg.data.input_key} gives "
                              f"sentence pairs. Use one input_key, or train.recipe finetune.")
    if cfg.backbone.keras_application or cfg.data.source in ("digits", "image_folder"):
        raise UserError(why + "needs text: a BERT-family backbone and data.source csv, jsonl or tfds "
                              f"(data.source is {cfg.data.source}).")
    if cfg.distribute.strategy in ("multi_worker", "tpu"):
        raise UserError(why + f"runs on one machine; distribute.strategy {cfg.distribute.strategy} is not "
                              f"supported. Use auto, one_device or mirrored.")


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load_config(path=None, overrides=(), text=None):
    """Load, override and validate an experiment config.

    Args:
        path: str. YAML file. Defaults to None (all defaults).
        overrides: iterable of `"dotted.key=value"` strings, values parsed as
            YAML (`train.epochs=3`, `heads.0.num_classes=5`).
        text: str. YAML text instead of a file (tests, notebooks).

    Returns:
        ExperimentConfig.

    Raises:
        UserError: unreadable file, unknown key, wrong type or bad value.
    """
    raw = {}
    if path is not None:
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise UserError(f"--config: cannot read {path!r} ({e.strerror}); pass an existing YAML file.")
    if text is not None:
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise UserError(f"--config {path or ''}: not valid YAML{where}: {problem}; fix the file there.")
        if not isinstance(raw, dict):
            raise UserError(f"--config {path or ''}: the top level must be a mapping of keys.")
    for item in overrides:
        _apply_override(raw, item)
    return from_dict(ExperimentConfig, raw)


def from_dict(cls, raw, path=""):
    """Builds dataclass `cls` from a mapping, checking every key and type."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path or 'config'} must be a mapping. Received: {raw!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UserError(
                f"Unknown config key {where!r}.{hint} Allowed keys at "
                f"{path or 'the top level'}: {', '.join(sorted(fields))}."
            )
        kwargs[key] = _convert(hints[key], value, where)
    for name in fields:  # sections left out are validated too (backbone is required)
        if name not in kwargs and dataclasses.is_dataclass(hints[name]):
            kwargs[name] = from_dict(hints[name], {}, f"{path}.{name}" if path else name)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(path)
    return obj


def to_dict(config):
    """The resolved config as plain YAML-able data."""
    return dataclasses.asdict(config)


def dump_yaml(config):
    return yaml.safe_dump(to_dict(config), sort_keys=False)


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert(hint, value, where):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except UserError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else UserError(
            f"{where}: wrong type. Expected {_type_name(hint)}. Received: {value!r}."
        )
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: wrong type. Expected a list. Received: {value!r}.")
        (item_type,) = args or (Any,)
        return [_convert(item_type, v, f"{where}.{i}") for i, v in enumerate(value)]
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: wrong type. Expected a mapping. Received: {value!r}.")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 (PyYAML) reads `2e-5` (no dot) as a string; YAML 1.2 and
        # every user mean the number.
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    raise UserError(f"{where}: wrong type. Expected {_type_name(hint)}. Received: {value!r}.")


def _type_name(hint):
    if typing.get_origin(hint) is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _apply_override(raw, item):
    if "=" not in item:
        raise UserError(f"Override {item!r} must look like --config.train.epochs=3.")
    dotted, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    keys = dotted.split(".")
    node = raw
    for i, key in enumerate(keys[:-1]):
        nxt = keys[i + 1]
        if isinstance(node, list):
            index = _list_index(node, key, dotted)
            node = node[index]
            continue
        if key == "heads" and "heads" not in node:
            node["heads"] = [{}]
        if key not in node or node[key] is None:
            node[key] = [] if nxt.isdigit() else {}
        node = node[key]
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(node, last, dotted)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise UserError(f"Override {dotted!r}: {'.'.join(keys[:-1])} is not a mapping.")


def _list_index(node, key, dotted):
    if not key.isdigit():
        raise UserError(f"Override {dotted!r}: {key!r} must be a list index.")
    index = int(key)
    while len(node) <= index:
        node.append({})
    return index


def _one_of(where, value, allowed):
    if value not in allowed:
        raise UserError(
            f"{where} must be one of {', '.join(allowed)}. Received: {value!r}."
        )
