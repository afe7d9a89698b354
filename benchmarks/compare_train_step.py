"""One harmonized training step end to end: pure-torch loss vs the fused Triton loss path.

A step is what :class:`harmonizer_fast.training.HarmonizerLoss` costs inside a training
loop: the forward pass, the input gradient with its graph (second order), the
harmonization term, the cross entropy and weight decay, ``loss.backward()`` through the
double-backward graph, and an SGD update. The two variants differ only in
``backend`` ("torch" or "triton"); the model dominates the step, so this shows how much
of it the fused loss path saves in practice.

GPU: timm ``resnet50`` and ``vit_base_patch16_224`` at batch 32 (quick: 16). CPU: the
fused kernels are GPU-only (Triton's CPU interpreter is not a speed), so only the torch
step of ``resnet18`` and ``vit_tiny_patch16_224`` at batch 4 is timed, as the absolute
cost. Weights are random (no download).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from benchmarks._timing import Comparison, measure
from harmonizer_fast.training import HarmonizerLoss

NUM_CLASSES = 1000
IMAGE_SIZE = 224


def make_batch(batch: int, device: torch.device, seed: int = 0):
    """images, tokens, one-hot labels and human maps, on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    tokens = (torch.rand(batch, generator=gen) > 0.25).float()
    labels = torch.nn.functional.one_hot(torch.randint(0, NUM_CLASSES, (batch,), generator=gen), NUM_CLASSES).float()
    heatmaps = torch.rand(batch, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    return [t.to(device) for t in (images, tokens, labels, heatmaps)]


def make_step(model: torch.nn.Module, backend: str, batch_tensors):
    """A closure running one optimisation step with the given loss backend."""
    criterion = HarmonizerLoss(backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    device = batch_tensors[0].device

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = criterion(model, *batch_tensors)
        out.loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return step


def setup(device: torch.device, quick: bool) -> Tuple[Dict[str, str], int]:
    if device.type == "cuda":
        return {"resnet50": "resnet50", "ViT-B/16": "vit_base_patch16_224"}, 16 if quick else 32
    return {"resnet18": "resnet18", "ViT-Ti/16": "vit_tiny_patch16_224"}, 4


def compare(quick: bool = False) -> Tuple[str, List[Comparison]]:
    """Torch-loss step vs fused-loss step per model (CPU: torch step only)."""
    import timm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models, batch = setup(device, quick)
    repeats = 2 if quick else 5
    batch_tensors = make_batch(batch, device)
    comparisons = []
    for label, name in models.items():
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES).to(device)
        baseline = measure(make_step(model, "torch", batch_tensors), repeats=repeats, name="pure-torch loss")
        candidates, note = [], f"batch {batch}, {device.type}"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            fused = measure(make_step(model, "triton", batch_tensors), repeats=repeats, name="fused Triton loss")
            fused.extra["peak GiB"] = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}"
            candidates.append(fused)
        else:
            note += "; fused Triton loss: GPU only"
        comparisons.append(Comparison(f"{label} training step", baseline, candidates, note))
    return "Harmonized training step (`train_step`): pure-torch vs fused loss", comparisons
