"""Drop-in harmonized training of any timm model (or ``nn.Module``) on ClickMe records.

:class:`Trainer` runs the reference loss (:func:`harmonizer_fast.training.loss.harmonizer_loss_components`:
cross entropy + ``lambda_weights`` * L2 + ``lambda_harmonization`` * pyramidal saliency MSE)
with SGD or AdamW, cosine/step/constant schedules with linear warm-up, gradient
accumulation, bf16 autocast on CUDA, channels_last, DDP (``torchrun``), atomic
checkpoints and exact resumption, and logs the three loss components, the learning rate
and the throughput to a tqdm bar, ``metrics.csv`` and ``metrics.jsonl``.

Second-order saliency: the harmonization term differentiates the input gradient, so
every op of the model needs a double backward. Fused attention kernels have none; the
trainer switches timm's ``fused_attn`` flags off while it trains and restores them. A
model with another such op fails at its first step with :class:`DoubleBackwardError`
naming the op and the module that calls it.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import inspect
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from harmonizer_fast._io import atomic_write_text

from harmonizer_fast.training import checkpoint as ckpt
from harmonizer_fast.training.data_mix import Batch
from harmonizer_fast.training.double_backward import fast_double_backward
from harmonizer_fast.training.loss import harmonizer_loss_components

# --------------------------------------------------------------------------- configuration


@dataclass
class TrainerConfig:
    """Everything a harmonized training run depends on (plain values, saved in checkpoints).

    Model: ``model`` is a timm name or a reference name (``ResNet50``); ``weights`` a local
    file; ``pretrained`` loads packaged weights (efficientnet_lite0/1/2 only).

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

    Second order: ``unfuse_attention`` switches timm's fused attention off while training;
    ``fast_double_backward`` records 2-D convolutions, training-mode batch norms and layer norms so that their
    double backward uses the backend's own kernels instead of PyTorch's generic formulas (for
    convolutions: a convolution with the output gradient as kernel and a per-group loop for
    depthwise layers; :mod:`harmonizer_fast.training.double_backward`); same gradients, on by
    default.

    ``freeze_bn`` turns BatchNorm layers into frozen ones (running statistics, affine
    parameters not trained; ``timm.layers.freeze_batch_norm_2d``): for fine-tuning on small
    or correlated batches, whose batch statistics are unrepresentative.

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

    def __post_init__(self) -> None:
        positive = {"batch_size": self.batch_size, "steps": self.steps, "grad_accum_steps": self.grad_accum_steps,
                    "log_every": self.log_every, "step_size": self.step_size}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        for name in ("warmup_steps", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be a non-negative int, got {getattr(self, name)!r}")
        choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "preprocess": ("imagenet", "model", "none")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {sorted(allowed)}, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"`lr` must be positive, got {self.lr!r}")
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


# --------------------------------------------------------------------------- attention and double backward


@contextlib.contextmanager
def unfused_attention(model: nn.Module) -> Iterator[int]:
    """Turn fused attention off in ``model`` (and timm's global default) and restore both after.

    timm modules read ``timm.layers.use_fused_attn()`` once, at construction, into a
    ``fused_attn`` attribute; the fused kernels have no double backward, which the
    harmonization loss needs. Yields the number of modules switched.
    """
    switched = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    # timm's global default matters only to timm models built meanwhile; a model from
    # timm means timm is imported already, so importing it here would only cost time.
    timm_config = sys.modules.get("timm.layers.config")
    previous_global = getattr(timm_config, "_USE_FUSED_ATTN", None)
    if previous_global is None:
        timm_config = None
    else:
        timm_config.set_fused_attn(False)
    for module, _ in switched:
        module.fused_attn = False
    try:
        yield len(switched)
    finally:
        for module, value in switched:
            module.fused_attn = value
        if timm_config is not None:
            timm_config._USE_FUSED_ATTN = previous_global


_MISSING_DERIVATIVE = re.compile(r"derivative for (\S+) is not implemented")


class DoubleBackwardError(RuntimeError):
    """A model op has no double backward, so its saliency cannot be trained (harmonized)."""

    def __init__(self, message: str, op: str, module: Optional[str]) -> None:
        super().__init__(message)
        self.op = op
        self.module = module


def missing_derivative_op(error: BaseException) -> Optional[str]:
    """The op named by autograd's "derivative for X is not implemented", or None."""
    match = _MISSING_DERIVATIVE.search(str(error))
    return match.group(1) if match else None


def _float_leaves(values) -> Tuple[list, list]:
    """Detached, grad-requiring copies of the float tensors in ``values`` (other values kept)."""
    copies, leaves = [], []
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().requires_grad_(True)
            leaves.append(value)
        copies.append(value)
    return copies, leaves


def _double_backward_fails(module: nn.Module, args: tuple, kwargs: dict, op: str) -> bool:
    """Whether differentiating ``module``'s input gradient again raises the missing-``op`` error."""
    args, leaves = _float_leaves(args)
    if not leaves:
        return False
    try:
        out = module(*args, **kwargs)
        outputs = out if isinstance(out, (tuple, list)) else [out]
        score = sum(o.float().sum() for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad)
        if not isinstance(score, torch.Tensor):
            return False
        grads = torch.autograd.grad(score, leaves, create_graph=True, allow_unused=True)
        second = sum(g.square().sum() for g in grads if g is not None and g.requires_grad)
        if not isinstance(second, torch.Tensor):
            return False
        targets = leaves + [p for p in module.parameters() if p.requires_grad]
        torch.autograd.grad(second, targets, allow_unused=True)
    except RuntimeError as err:
        return missing_derivative_op(err) == op
    return False


def locate_op(model: nn.Module, images: torch.Tensor, op: str) -> Optional[str]:
    """Qualified name of the deepest submodule whose double backward raises the missing-``op`` error.

    Records every submodule's inputs in one forward pass, then differentiates each module
    alone twice, deepest first. Parameters and buffers are restored afterwards.
    """
    captured: Dict[str, Tuple[tuple, dict]] = {}
    hooks = []
    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_pre_hook(
                lambda m, a, k, name=name: captured.setdefault(name, (a, k)) and None, with_kwargs=True))
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            model(images[:2])
    except Exception:  # the forward alone may fail for unrelated reasons; then nothing to locate
        return None
    finally:
        for hook in hooks:
            hook.remove()
    modules = dict(model.named_modules())
    try:
        for name in sorted(captured, key=lambda n: -n.count(".")):
            args, kwargs = captured[name]
            if _double_backward_fails(modules[name], args, kwargs, op):
                return name
    finally:
        model.load_state_dict(buffers)
    return None


# --------------------------------------------------------------------------- logging


class MetricsLogger:
    """Append per-step metrics to ``metrics.csv`` and ``metrics.jsonl`` under ``directory``.

    On resume, rows after the resumed step (written by the interrupted run) are dropped
    first, so the logs read as one uninterrupted run.
    """

    FIELDS = ("step", "lr", "loss", "cross_entropy", "weight_decay", "harmonization", "images_per_s", "time_s")

    def __init__(self, directory: Union[str, os.PathLike], resume_step: int = 0) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.directory / "metrics.csv"
        self.jsonl_path = self.directory / "metrics.jsonl"
        self._truncate(resume_step)

    def _truncate(self, resume_step: int) -> None:
        rows = []
        if self.jsonl_path.exists():
            with open(self.jsonl_path) as handle:
                rows = [json.loads(line) for line in handle if line.strip()]
        rows = [r for r in rows if r.get("step", 0) <= resume_step] if resume_step else []
        extra = sorted({k for r in rows for k in r} - set(self.FIELDS))
        self.fields = list(self.FIELDS) + extra
        atomic_write_text(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(self.csv_path, self._csv_text(rows))

    def _csv_text(self, rows: List[Dict[str, Any]]) -> str:
        import io

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    def log(self, row: Dict[str, Any]) -> None:
        new_fields = [k for k in row if k not in self.fields]
        with open(self.jsonl_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if new_fields:  # a new metric (e.g. an evaluation score): rewrite the CSV with the wider header
            self.fields += new_fields
            with open(self.jsonl_path) as handle:
                rows = [json.loads(line) for line in handle if line.strip()]
            atomic_write_text(self.csv_path, self._csv_text(rows))
            return
        with open(self.csv_path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore").writerow(row)


# --------------------------------------------------------------------------- the trainer


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        if dist.is_available() and dist.is_initialized() and torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_distributed_from_env() -> bool:
    """Join the process group ``torchrun`` describes (gloo on CPU, NCCL on GPU); False when single-process."""
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return True


class Trainer:
    """Harmonized training loop.

    Example::

        from harmonizer_fast.training import Trainer, TrainerConfig
        trainer = Trainer("resnet50", TrainerConfig(steps=1000, output_dir="runs/r50"), train_data=stream)
        history = trainer.fit()

    Args:
        model: timm/reference name (built with ``config.num_classes`` and ``config.weights``),
            or an ``nn.Module`` returning (N, K) logits.
        config: :class:`TrainerConfig` (``config.model`` is ignored for an ``nn.Module``).
        train_data: endless stream of :class:`~harmonizer_fast.training.data_mix.Batch` with
            ``state_dict()``/``load_state_dict()`` (see :mod:`harmonizer_fast.training.data_mix`);
            under DDP each rank's stream yields its own slice of the global batch.
        eval_fn: optional ``eval_fn(model) -> dict`` of scores, run every ``eval_every`` steps
            and at the end, logged with the step's metrics.
        eval_every: steps between evaluations (0: only at the end when ``eval_fn`` is set).

    The DDP world is taken from ``torch.distributed`` (initialised, or described by
    ``torchrun``'s environment). DDP averages gradients over ranks, which equals the
    gradient of the global batch because every loss term is a per-sample mean. Batch
    normalisation is the exception: each rank normalises with its own batch statistics
    (use ``nn.SyncBatchNorm.convert_sync_batchnorm`` or a model without BN if the global
    statistics matter).
    """

    def __init__(
        self,
        model: Union[str, nn.Module],
        config: Optional[TrainerConfig] = None,
        train_data=None,
        eval_fn: Optional[Callable[[nn.Module], Dict[str, float]]] = None,
        eval_every: int = 0,
    ) -> None:
        self.config = config if config is not None else TrainerConfig()
        cfg = self.config
        self.distributed = init_distributed_from_env()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.device = _resolve_device(cfg.device)
        seed_everything(cfg.seed)
        if isinstance(model, str):
            from harmonizer_fast.models import create_model

            cfg.model = model
            model = create_model(model, weights=cfg.weights, num_classes=cfg.num_classes, pretrained=cfg.pretrained)
        elif not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a model name or an nn.Module, got {type(model).__name__}")
        if cfg.freeze_bn:
            from timm.layers import freeze_batch_norm_2d

            model = freeze_batch_norm_2d(model)
        model = model.to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.train_model: nn.Module = model
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # The saliency forward runs autograd.grad (create_graph) before loss.backward();
            # only the final backward reaches the parameters' gradient hooks, so each
            # gradient is reduced exactly once, after the full second-order gradient is
            # known. Neither static_graph (its first-iteration reduction is queued from the
            # output's backward, i.e. from the saliency autograd.grad, and averages
            # incomplete gradients) nor find_unused_parameters may be used.
            self.train_model = DistributedDataParallel(model, device_ids=device_ids)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = OPTIMIZERS[cfg.optimizer](params, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_multiplier(step, cfg))
        self.amp = cfg.amp if cfg.amp is not None else self.device.type == "cuda"
        self.train_data = train_data
        self._data_iter = None
        self.eval_fn = eval_fn
        self.eval_every = eval_every
        self.step = 0
        self.history: List[Dict[str, Any]] = []
        self._preprocess = self._make_preprocess()
        self._loss_kwargs = {}
        if cfg.loss_backend is not None:
            if "backend" not in inspect.signature(harmonizer_loss_components).parameters:
                raise ValueError(f"`loss_backend`={cfg.loss_backend!r}: this loss has no backends")
            self._loss_kwargs["backend"] = cfg.loss_backend

    # ------------------------------------------------------------------ pieces

    def _make_preprocess(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.config.preprocess == "none":
            return lambda images: images
        if self.config.preprocess == "model":
            from harmonizer_fast.models import model_preprocess

            return model_preprocess(self.model)
        from harmonizer_fast.models import preprocess_input

        return preprocess_input

    @property
    def output_dir(self) -> Optional[Path]:
        return Path(self.config.output_dir) if self.config.output_dir else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _next_batch(self) -> Batch:
        if self.train_data is None:
            raise ValueError("no training data: pass `train_data` (a batch stream) to Trainer")
        if self._data_iter is None:
            self._data_iter = iter(self.train_data)
        return next(self._data_iter)

    def _to_device(self, batch: Batch) -> Batch:
        images = self._preprocess(batch.images.to(self.device, torch.float32, non_blocking=True))
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return Batch(images, batch.heatmaps.to(self.device, torch.float32), batch.labels.to(self.device, torch.float32),
                     batch.tokens.to(self.device, torch.float32))

    def _micro_step(self, batch: Batch, scale: float, sync: bool):
        """Forward + backward of one micro-batch; the gradient is scaled by ``scale``."""
        sync_context = contextlib.nullcontext() if (sync or not self.distributed) else self.train_model.no_sync()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)
        fast_layers = fast_double_backward() if self.config.fast_double_backward else contextlib.nullcontext()
        with sync_context:
            try:
                with autocast, fast_layers:
                    out = harmonizer_loss_components(
                        self.train_model, batch.images, batch.tokens, batch.labels, batch.heatmaps,
                        lambda_weights=self.config.lambda_weights,
                        lambda_harmonization=self.config.lambda_harmonization,
                        **self._loss_kwargs,
                    )
                (out.loss * scale).backward()
            except RuntimeError as err:
                op = missing_derivative_op(err)
                if op is None:
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                module = locate_op(self.model, batch.images.detach(), op)
                where = f"module `{module}` ({type(self.model.get_submodule(module)).__name__})" if module else "an unidentified module"
                raise DoubleBackwardError(
                    f"{type(self.model).__name__} cannot be harmonized: op `{op}` in {where} has no double "
                    "backward (autograd: 'derivative for {op} is not implemented'). The harmonization loss "
                    "differentiates the input gradient again; replace that op/module with a twice-differentiable "
                    "one (or train with lambda_harmonization=0).".replace("{op}", op),
                    op, module,
                ) from err
        return out

    def train_step(self) -> Dict[str, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns its metrics."""
        cfg = self.config
        self.train_model.train()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        totals = torch.zeros(4, dtype=torch.float64)
        images = 0
        for micro in range(cfg.grad_accum_steps):
            batch = self._to_device(self._next_batch())
            out = self._micro_step(batch, 1.0 / cfg.grad_accum_steps, sync=micro == cfg.grad_accum_steps - 1)
            totals += torch.stack([t.detach().double().cpu() for t in out])
            images += batch.images.shape[0] * self.world_size
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        totals /= cfg.grad_accum_steps
        if self.distributed:  # report the global mean of each component
            totals = totals.to(self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(totals)
            totals = totals.cpu() / self.world_size
        loss, ce, wd, harm = totals.tolist()
        return {"step": self.step, "lr": lr, "loss": loss, "cross_entropy": ce, "weight_decay": wd,
                "harmonization": harm, "images_per_s": images / elapsed, "time_s": elapsed}

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> Dict[str, Any]:
        return {
            "model_state": self.model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "step": self.step,
            "data_state": self.train_data.state_dict() if hasattr(self.train_data, "state_dict") else {},
            "config": self.config.to_dict(),
        }

    def save_checkpoint(self, path: Optional[Union[str, os.PathLike]] = None) -> Optional[Path]:
        """Write the full training state atomically (rank 0 only); default ``output_dir/last.pt``."""
        if path is None:
            if self.output_dir is None:
                raise ValueError("no checkpoint path: pass `path` or set `config.output_dir`")
            path = self.output_dir / "last.pt"
        written = None
        if self.is_main:
            written = ckpt.save_checkpoint(path, **self.state_dict())
            if self.config.keep_checkpoints and Path(path).name == "last.pt":
                ckpt.atomic_torch_save(ckpt.load_checkpoint(path), Path(path).parent / f"step_{self.step:07d}.pt")
        if self.distributed:
            dist.barrier()
        return written

    def load_checkpoint(self, path: Union[str, os.PathLike]) -> int:
        """Restore model, optimizer, scheduler, step, data position and RNG states; returns the step."""
        state = ckpt.load_checkpoint(path, map_location="cpu")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        if state.get("data") and hasattr(self.train_data, "load_state_dict"):
            self.train_data.load_state_dict(state["data"])
            self._data_iter = None
        ckpt.set_rng_state(state["rng"])
        return self.step

    # ------------------------------------------------------------------ loop

    @contextlib.contextmanager
    def harmonizing(self) -> Iterator[None]:
        """Model switches for second-order training, undone on exit: fused attention off
        (``unfuse_attention``)."""
        with contextlib.ExitStack() as stack:
            if self.config.unfuse_attention:
                stack.enter_context(unfused_attention(self.model))
            yield

    def fit(self, steps: Optional[int] = None, resume: Union[bool, str, os.PathLike, None] = None) -> List[Dict[str, Any]]:
        """Train until ``config.steps`` optimizer steps are done (or ``steps`` more).

        Args:
            steps: train this many more steps only (still bounded by ``config.steps``).
            resume: a checkpoint path, or True for ``output_dir/last.pt`` when it exists.

        Returns:
            the logged metric rows of this call.
        """
        cfg = self.config
        if resume:
            path = (self.output_dir / "last.pt") if resume is True and self.output_dir else resume
            if resume is True and (path is None or not Path(path).is_file()):
                path = None  # nothing to resume yet: start fresh
            if path is not None:
                self.load_checkpoint(path)
        target = cfg.steps if steps is None else min(cfg.steps, self.step + steps)
        logger = MetricsLogger(self.output_dir, self.step) if (self.output_dir and self.is_main) else None
        rows: List[Dict[str, Any]] = []
        progress = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            progress = tqdm(total=target, initial=self.step, desc="harmonized training", unit="step", dynamic_ncols=True)
        try:
            with self.harmonizing():
                while self.step < target:
                    row = self.train_step()
                    last = self.step == target
                    if self.eval_fn is not None and ((self.eval_every and self.step % self.eval_every == 0) or last):
                        row.update({k: float(v) for k, v in self.eval_fn(self.model).items()})
                        self.model.train()
                    if progress is not None:
                        progress.update(1)
                        progress.set_postfix(loss=f"{row['loss']:.4f}", ce=f"{row['cross_entropy']:.4f}",
                                             harm=f"{row['harmonization']:.4f}", lr=f"{row['lr']:.2e}",
                                             img_s=f"{row['images_per_s']:.1f}")
                    if self.step % cfg.log_every == 0 or last:
                        rows.append(row)
                        self.history.append(row)
                        if logger is not None:
                            logger.log(row)
                    if self.output_dir and ((cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or last):
                        self.save_checkpoint()
        finally:
            if progress is not None:
                progress.close()
        return rows
