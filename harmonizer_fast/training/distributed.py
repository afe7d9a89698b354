"""Process-level helpers of a training run: device choice, seeding, joining a ``torchrun`` world."""
from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist


def resolve_device(name: str) -> torch.device:
    """``"auto"``: this rank's CUDA device when there is one, else the CPU; any other name as given."""
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
