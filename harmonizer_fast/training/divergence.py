"""The finite-state guard of a training run: no non-finite step is applied, no non-finite checkpoint written."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn

from harmonizer_fast.spec import all_finite

#: the order of the loss components in the totals a training step accumulates.
LOSS_COMPONENTS = ("loss", "cross_entropy", "weight_decay", "harmonization")


class TrainingDiverged(FloatingPointError):
    """The loss or a gradient became non-finite: training stopped before the step was applied.

    The last checkpoint written (if any) is the last good state; it is never overwritten by a
    non-finite one.
    """


def check_finite_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    totals: torch.Tensor,
    step: int,
    lr: float,
    last_checkpoint: Optional[Path],
) -> None:
    """Stop before a non-finite loss or gradient reaches the weights.

    Args:
        model: the model whose ``.grad`` the step would apply.
        optimizer: its gradients are cleared before raising, so nothing non-finite lingers.
        totals: the step's :data:`LOSS_COMPONENTS`, summed over micro-batches.
        step: the number of the step being checked (1-based).
        lr: its learning rate, for the message.
        last_checkpoint: the last good checkpoint to name in the message, if any.

    Raises:
        TrainingDiverged: naming the non-finite components (or the first parameters with
            non-finite gradients).
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if bool(torch.isfinite(totals).all()) and all_finite(grads):
        return
    optimizer.zero_grad(set_to_none=True)
    bad = [name for name, value in zip(LOSS_COMPONENTS, totals.tolist()) if not math.isfinite(value)]
    bad_grads = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    what = f"non-finite {', '.join(bad)}" if bad else f"non-finite gradients in {bad_grads[:3]}"
    raise TrainingDiverged(
        f"training diverged at step {step} (lr {lr:.3g}): {what}. The step was not applied"
        + (f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint is not None else "")
        + ". Lower --lr, add --max-grad-norm or warm-up steps, and resume or start again."
    )


def check_finite_state(model_state: Mapping[str, torch.Tensor], path: Union[str, os.PathLike], step: int) -> None:
    """Refuse to checkpoint a model that holds non-finite weights or buffers.

    Raises:
        TrainingDiverged: naming ``path`` and ``step`` (the previous checkpoint is kept).
    """
    if not all_finite(list(model_state.values())):
        raise TrainingDiverged(
            f"refusing to write checkpoint {str(path)!r} at step {step}: the model holds non-finite "
            "weights or buffers (the previous checkpoint, if any, is kept)"
        )
