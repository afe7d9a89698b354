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
import itertools
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.layers import freeze_batch_norm_2d
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from harmonizer_fast._memory import keep_freed_memory
from harmonizer_fast.models import create_model, model_preprocess, preprocess_input

from harmonizer_fast.training import checkpoint as ckpt
from harmonizer_fast.training.config import (
    LOSS_BACKENDS,
    OPTIMIZERS,
    RESUMABLE_CHANGES,
    SCHEDULES,
    TrainerConfig,
    check_resumable,
    lr_multiplier,
)
from harmonizer_fast.training.data_mix import Batch
from harmonizer_fast.training.distributed import init_distributed_from_env, resolve_device, seed_everything
from harmonizer_fast.training.divergence import TrainingDiverged, check_finite_state, check_finite_step
from harmonizer_fast.training.double_backward import fast_double_backward
from harmonizer_fast.training.double_backward_checks import (
    DoubleBackwardError,
    diagnose_double_backward,
    unfused_attention,
)
from harmonizer_fast.training.loss import harmonizer_loss_components
from harmonizer_fast.training.metrics_log import MetricsLogger

__all__ = [
    "LOSS_BACKENDS", "OPTIMIZERS", "RESUMABLE_CHANGES", "SCHEDULES", "DoubleBackwardError", "MetricsLogger", "Trainer", "TrainerConfig",
    "TrainingDiverged", "init_distributed_from_env", "lr_multiplier", "seed_everything", "unfused_attention",
]


def _to_channels_last(model: nn.Module) -> None:
    """Every 4-D parameter and buffer of ``model`` in channels-last layout, in place; others as they
    are. (``model.to(memory_format=torch.channels_last)`` raises "required rank 4 tensor" on the
    first 5-D one, e.g. the Conv3d position embedding of timm's lambda layers.)"""
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.dim() == 4:
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)


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
        self.device = resolve_device(cfg.device)
        if cfg.keep_freed_memory and self.device.type == "cpu":
            keep_freed_memory()
        seed_everything(cfg.seed)
        if isinstance(model, str):
            cfg.model = model
            model = create_model(model, weights=cfg.weights, num_classes=cfg.num_classes, pretrained=cfg.pretrained)
        elif not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a model name or an nn.Module, got {type(model).__name__}")
        if cfg.freeze_bn:
            model = freeze_batch_norm_2d(model)
        model = model.to(self.device)
        if cfg.channels_last:
            _to_channels_last(model)
        self.model = model
        self.train_model: nn.Module = model
        if self.distributed:
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
        self._loss_backend = cfg.loss_backend if cfg.loss_backend is not None else "auto"

    # ------------------------------------------------------------------ pieces

    def _make_preprocess(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.config.preprocess == "none":
            return lambda images: images
        if self.config.preprocess == "model":
            return model_preprocess(self.model)
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
                        backend=self._loss_backend,
                    )
                # inputs=: only the parameters' gradients (not the images', which require one
                # for the saliency: the first layer's input gradient would be computed and dropped)
                trained = [p for p in self.model.parameters() if p.requires_grad]
                (out.loss * scale).backward(inputs=trained)
            except RuntimeError as err:
                diagnosis = diagnose_double_backward(err, self.model, batch.images)
                if diagnosis is None:
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                raise diagnosis from err
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
        lr = self.optimizer.param_groups[0]["lr"]
        check_finite_step(self.model, self.optimizer, totals, self.step + 1, lr,
                          self.output_dir / "last.pt" if self.output_dir else None)
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
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
        """The training state under the keys a checkpoint file uses (plus ``rng`` there)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "data": self.train_data.state_dict() if hasattr(self.train_data, "state_dict") else {},
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
            state = self.state_dict()
            check_finite_state(state["model"], path, self.step)
            written = ckpt.save_checkpoint(
                path, model_state=state["model"], optimizer_state=state["optimizer"],
                scheduler_state=state["scheduler"], step=state["step"], data_state=state["data"], config=state["config"],
            )
            if self.config.keep_checkpoints and Path(path).name == "last.pt":
                ckpt.atomic_torch_save(ckpt.load_checkpoint(path), Path(path).parent / f"step_{self.step:07d}.pt")
        if self.distributed:
            dist.barrier()
        return written

    def load_checkpoint(self, path: Union[str, os.PathLike], check_config: bool = True) -> int:
        """Restore model, optimizer, scheduler, step, data position and RNG states; returns the step.

        With ``check_config`` the checkpoint's configuration must equal this run's except for
        :data:`~harmonizer_fast.training.config.RESUMABLE_CHANGES` (``steps``, bookkeeping):
        any other change (learning rate, batch size, lambdas, optimizer ...) would not
        continue the same run, and raises :class:`ValueError` listing the keys.
        """
        state = ckpt.load_checkpoint(path, map_location="cpu")
        if check_config and state.get("config"):
            check_resumable(state["config"], self.config.to_dict(), path)
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
        (``unfuse_attention``, only where ``fast_double_backward`` is off: the fast mode records
        ``scaled_dot_product_attention`` with its own double backward)."""
        with contextlib.ExitStack() as stack:
            # the fast mode records scaled_dot_product_attention with a closed-form double
            # backward, so fused attention can stay on; without it, timm must use its math path
            if self.config.unfuse_attention and not self.config.fast_double_backward:
                stack.enter_context(unfused_attention(self.model))
            yield

    def fit(
        self,
        steps: Optional[int] = None,
        resume: Union[bool, str, os.PathLike, None] = None,
        overwrite: bool = False,
    ) -> List[Dict[str, Any]]:
        """Train until ``config.steps`` optimizer steps are done (or ``steps`` more).

        Args:
            steps: train this many more steps only (still bounded by ``config.steps``).
            resume: a checkpoint path, or True for ``output_dir/last.pt`` when it exists.
            overwrite: start at step 0 even though ``output_dir`` holds an earlier run
                (its checkpoint and logs are replaced); without it such a run raises
                :class:`FileExistsError` instead of being overwritten silently.

        Raises:
            TrainingDiverged: a non-finite loss or gradient (the step is not applied, no
                checkpoint is written).

        Returns:
            the logged metric rows of this call.
        """
        cfg = self.config
        if self.output_dir and self.is_main:
            for stale in ckpt.stale_temporaries(self.output_dir):
                stale.unlink()  # left by a write killed mid-way (kill -9); the real files are intact
        if resume:
            path = (self.output_dir / "last.pt") if resume is True and self.output_dir else resume
            if resume is True and (path is None or not Path(path).is_file()):
                path = None  # nothing to resume yet: start fresh
            if path is not None:
                self.load_checkpoint(path)
                if self.step > cfg.steps:  # training on would mean un-training: nothing to resume to
                    raise ValueError(f"cannot resume from {str(path)!r}: it is at step {self.step}, beyond `steps` "
                                     f"{cfg.steps}; pass steps > {self.step} (--steps) to train on")
        elif self.step == 0 and self.output_dir and not overwrite:
            existing = ckpt.existing_run(self.output_dir)
            if existing:
                raise FileExistsError(
                    f"{str(self.output_dir)!r} already holds a training run ({', '.join(existing)}): pass "
                    "resume=True (--resume) to continue it, or overwrite=True (--overwrite) to start again and "
                    "replace it"
                )
        target = cfg.steps if steps is None else min(cfg.steps, self.step + steps)
        logger = MetricsLogger(self.output_dir, self.step) if (self.output_dir and self.is_main) else None
        rows: List[Dict[str, Any]] = []
        progress = None
        if cfg.progress and self.is_main:
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
