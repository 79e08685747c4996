"""The typed config: the dataclasses below hold the only defaults, with the allowed values and numeric ranges.

:func:`segmentation.config_loading.load_config` merges a YAML file and dotted overrides (``train.lr=0.02``) onto this
schema and checks them against :data:`CHOICES` and :data:`RANGES`. The helpers at the end turn a :class:`Config` into
nested dicts, YAML and dotted keys (for the run's params).

The top-level sections keep the config groups of the pipeline this project replaces:
``data``, ``augmentation``, ``model``, ``loss``, ``optimizer``, ``scheduler``, ``train``, ``callbacks``,
``eval`` and ``system``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass
class DataConfig:
    root: str = ""  # preprocess out_dir (holding split/<split_id>.parquet) or the path of a split table
    split_id: str = "split01"
    train_split: str = "train"
    val_split: str = "val"
    ignore_index: int = 255


@dataclass
class AugmentationConfig:
    crop_height: int = 1024
    crop_width: int = 1024
    scale_min: float = 0.5
    scale_max: float = 2.0
    hflip_prob: float = 0.5
    color_jitter: float = 0.0  # strength of brightness/contrast/saturation jitter; 0 disables it
    val_height: int = 0  # 0 keeps validation images at full resolution
    val_width: int = 0


@dataclass
class ModelConfig:
    arch: str = "fchardnet70"
    num_classes: int = 19
    pretrained: str = ""  # released checkpoint, plain state_dict or backbone-only file; empty = Xavier init


@dataclass
class LossConfig:
    name: str = "bootstrapped_ce"  # bootstrapped_ce | ce
    min_k: int = 4096
    threshold: float = 0.3
    class_weights: list[float] | None = None  # only for name=ce
    ignore_index: int = 255


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adamw  (the learning rate is train.lr, the one hyperparameter users sweep)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class SchedulerConfig:
    name: str = "poly"  # poly | constant
    power: float = 0.9
    warmup_steps: int = 0
    warmup_start_factor: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 484  # the recipe's 90k iterations at batch 16 over 2975 images; max_steps stops it first
    max_steps: int = 90000  # 0 = no cap; the poly schedule decays to zero over the effective total
    batch_size: int = 16  # per process
    lr: float = 0.02
    grad_accum_steps: int = 1
    clip_grad_norm: float = 0.0  # 0 disables clipping
    val_every_n_steps: int = 500
    log_every_n_steps: int = 10
    sanity_val_batches: int = 2  # validation batches run before training to catch errors early
    num_val_images_logged: int = 2
    output_dir: str = "outputs"


@dataclass
class CheckpointCallbackConfig:
    monitor: str = "val/mIoU"
    mode: str = "max"  # max | min
    top_k: int = 1


@dataclass
class EarlyStoppingConfig:
    enabled: bool = False
    monitor: str = "val/mIoU"
    mode: str = "max"
    patience: int = 10  # validations without improvement
    min_delta: float = 0.0


@dataclass
class CallbacksConfig:
    checkpoint: CheckpointCallbackConfig = field(default_factory=CheckpointCallbackConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class EvalConfig:
    batch_size: int = 1
    tta: str = "none"  # none | flip | multiscale
    scales: list[float] = field(default_factory=lambda: [0.75, 1.0, 1.25])
    sliding_window: int = 0  # window side in px for inputs larger than it; 0 = whole image at once
    num_worst: int = 4


@dataclass
class SystemConfig:
    seed: int = 1337
    num_workers: int = 4
    deterministic: bool = False
    cudnn_benchmark: bool = True
    mixed_precision: str = "no"  # no | fp16 | bf16
    cpu: bool = False  # force CPU even when a GPU is present


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    system: SystemConfig = field(default_factory=SystemConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.arch": ("fchardnet70",),
    "loss.name": ("bootstrapped_ce", "ce"),
    "optimizer.name": ("sgd", "adamw"),
    "scheduler.name": ("poly", "constant"),
    "callbacks.checkpoint.mode": ("max", "min"),
    "callbacks.early_stopping.mode": ("max", "min"),
    "eval.tta": ("none", "flip", "multiscale"),
    "system.mixed_precision": ("no", "fp16", "bf16"),
}


@dataclass(frozen=True)
class Range:
    """Allowed numbers: at least ``ge`` (or above ``gt``), at most ``le`` (or below ``lt``); ``None``: no bound."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def __str__(self) -> str:
        if (self.ge, self.gt) != (None, None) and (self.le, self.lt) != (None, None):
            left = f"[{self.ge}" if self.ge is not None else f"({self.gt}"
            right = f"{self.le}]" if self.le is not None else f"{self.lt})"
            return f"in {left}, {right}"
        bounds = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
        return " and ".join(f"{op} {bound}" for op, bound in bounds if bound is not None) or "any finite number"


# Numeric bounds, checked when the config loads: a value outside them would fail (ZeroDivisionError, DataLoader or
# NumPy errors) or silently mean something else only once the run has started. A list's bound holds for each of its
# numbers. NaN and infinities are refused everywhere, with or without an entry here.
RANGES: dict[str, Range] = {
    "data.ignore_index": Range(ge=0, le=255),  # masks are uint8
    "augmentation.crop_height": Range(ge=1),
    "augmentation.crop_width": Range(ge=1),
    "augmentation.hflip_prob": Range(ge=0, le=1),
    "augmentation.color_jitter": Range(ge=0),  # 0 disables it; a negative strength would silently disable it too
    "augmentation.val_height": Range(ge=0),  # 0 = full resolution
    "augmentation.val_width": Range(ge=0),
    "model.num_classes": Range(ge=1, le=256),  # class ids travel as uint8 masks
    "loss.min_k": Range(ge=1),
    "loss.threshold": Range(ge=0),  # a per-pixel cross-entropy value, not a probability: values above 1 are valid
    "loss.class_weights": Range(ge=0),
    "loss.ignore_index": Range(ge=0, le=255),
    "optimizer.momentum": Range(ge=0, lt=1),  # 1 never forgets a gradient, above 1 the velocity diverges
    "optimizer.weight_decay": Range(ge=0),
    "optimizer.betas": Range(ge=0, lt=1),  # AdamW's moment decays
    "scheduler.power": Range(ge=0),
    "scheduler.warmup_steps": Range(ge=0),
    "scheduler.warmup_start_factor": Range(gt=0, le=1),  # the first step's fraction of train.lr
    "train.epochs": Range(ge=0),
    "train.max_steps": Range(ge=0),  # 0 = no cap
    "train.batch_size": Range(ge=1),
    "train.lr": Range(gt=0),
    "train.grad_accum_steps": Range(ge=1),
    "train.clip_grad_norm": Range(ge=0),  # 0 = no clipping; a negative norm would silently mean the same
    "train.val_every_n_steps": Range(ge=1),  # step % n
    "train.log_every_n_steps": Range(ge=1),
    "train.sanity_val_batches": Range(ge=0),
    "train.num_val_images_logged": Range(ge=0),
    "callbacks.checkpoint.top_k": Range(ge=0),  # best checkpoints kept besides the last one
    "callbacks.early_stopping.patience": Range(ge=1),  # 0 would stop at the first validation
    "callbacks.early_stopping.min_delta": Range(ge=0),  # a negative one would count a worse value as improvement
    "eval.batch_size": Range(ge=1),
    "eval.scales": Range(gt=0),
    "eval.sliding_window": Range(ge=0),  # 0 = whole image
    "eval.num_worst": Range(ge=0),
    "system.seed": Range(ge=0, le=2**32 - 1),  # NumPy's seed range
    "system.num_workers": Range(ge=0),
}


def valid_keys(node: Any = Config, prefix: str = "") -> list[str]:
    """All dotted leaf keys of the schema, e.g. ``train.batch_size``."""
    keys = []
    for f in dataclasses.fields(node):
        name = f"{prefix}{f.name}"
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            keys.extend(valid_keys(sub, name + "."))
        else:
            keys.append(name)
    return keys


def list_keys(node: Any = Config, prefix: str = "") -> list[str]:
    """Dotted keys of the schema's list fields, e.g. ``eval.scales`` (optional lists included)."""
    keys = []
    for name, hint in typing.get_type_hints(node).items():
        if dataclasses.is_dataclass(hint):
            keys.extend(list_keys(hint, f"{prefix}{name}."))
        elif list in (typing.get_origin(hint), *(typing.get_origin(arg) for arg in typing.get_args(hint))):
            keys.append(prefix + name)
    return keys


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as nested plain dicts."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Config, prefix: str = "") -> dict[str, Any]:
    """Dotted ``{"train.lr": 0.02, ...}`` (with ``prefix`` in front of every key); lists stay lists."""
    out: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], path: str) -> None:
        for key, value in node.items():
            name = f"{path}{key}"
            if isinstance(value, Mapping):
                walk(value, name + ".")
            else:
                out[prefix + name] = value

    walk(to_dict(cfg), "")
    return out
