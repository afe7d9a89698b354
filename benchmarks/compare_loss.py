"""Harmonization term, input gradient -> loss -> backward: the package's torch path vs a naive eager port.

The work timed is what every training step adds on top of the model: from the input
gradient (N, 3, 224, 224) and the human maps (N, 224, 224), the standardized saliency,
the rescaled human map, the token-weighted pyramidal MSE, and the backward pass to the
input gradient. The baseline is a literal transcription of the reference TensorFlow code
(two full 6-level pyramids, ``torch.std``-based standardization, one op per line); fast
paths (the package's torch path now, fused kernels later) must beat it and give the same
numbers, which :func:`compare` checks before timing.
"""
from __future__ import annotations

import inspect
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F

from benchmarks._timing import Comparison, measure
from harmonizer_fast.training import alignment_loss, saliency_standardize_cut

IMAGE_SIZE = 224
CHANNELS = 3


# --------------------------------------------------------------------------- naive baseline

def naive_standardize_cut(maps: torch.Tensor, epsilon: float = 1e-5) -> torch.Tensor:
    """The reference's ``standardize_cut``, spelled with ``torch.std`` (population)."""
    mean = maps.mean(dim=(1, 2), keepdim=True)
    std = maps.std(dim=(1, 2), keepdim=True, unbiased=False)
    return F.relu((maps - mean) / (std + epsilon))


def naive_pyramid(maps: torch.Tensor, num_levels: int = 5) -> List[torch.Tensor]:
    """The reference's ``pyramidal_representation``: every level of one pyramid, TF 'SAME' padding."""
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=maps.dtype, device=maps.device)
    kernel = (torch.outer(taps, taps) / 256.0)[None, None]
    levels = [maps[:, None]]
    for _ in range(num_levels):
        current = levels[-1]
        pads = []
        for size in (current.shape[3], current.shape[2]):  # F.pad order: width first
            total = max((-(-size // 2) - 1) * 2 + 5 - size, 0)
            pads += [total // 2, total - total // 2]
        levels.append(F.conv2d(F.pad(current, pads), kernel, stride=2))
    return [level[:, 0] for level in levels]


def naive_alignment(input_gradient: torch.Tensor, true_heatmaps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Steps 2-5 of the reference ``harmonizer_loss``, one op per line, nothing fused or shared."""
    saliency = naive_standardize_cut(input_gradient.mean(dim=1))
    human = naive_standardize_cut(true_heatmaps)
    human = human / (human.amax(dim=(1, 2), keepdim=True) + 1e-6)
    human = human * (saliency.amax(dim=(1, 2), keepdim=True).detach() + 1e-6)
    saliency_pyramid, human_pyramid = naive_pyramid(saliency), naive_pyramid(human)
    per_level = [
        ((a - b) ** 2 * tokens[:, None, None]).mean() for a, b in zip(saliency_pyramid[:5], human_pyramid[:5])
    ]
    return torch.stack(per_level).mean()


# --------------------------------------------------------------------------- the package

def package_alignment(input_gradient: torch.Tensor, true_heatmaps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The package's pure-torch path (the specification the fused kernels are tested against)."""
    extra = {"backend": "torch"} if "backend" in inspect.signature(alignment_loss).parameters else {}
    saliency = saliency_standardize_cut(input_gradient, **extra)
    return alignment_loss(saliency, true_heatmaps, tokens, **extra)


def make_inputs(batch: int, device: str = "cpu", seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random input gradient (N, 3, 224, 224), human maps (N, 224, 224) and 0/1 tokens."""
    gen = torch.Generator().manual_seed(seed)
    gradient = torch.randn(batch, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * 1e-3
    heatmaps = torch.rand(batch, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    tokens = (torch.rand(batch, generator=gen) > 0.25).float()
    return gradient.to(device), heatmaps.to(device), tokens.to(device)


def forward_backward(loss_fn: Callable, inputs) -> Tuple[torch.Tensor, torch.Tensor]:
    """Loss and its gradient with respect to the input gradient (what the training step needs)."""
    gradient, heatmaps, tokens = inputs
    gradient = gradient.detach().requires_grad_(True)
    loss = loss_fn(gradient, heatmaps, tokens)
    loss.backward()
    if gradient.is_cuda:
        torch.cuda.synchronize()
    return loss.detach(), gradient.grad


def check_equal(inputs, rtol: float = 1e-5) -> str:
    """Both paths give the same loss and input gradient (float32, 1e-5 relative); returns a note."""
    naive_loss, naive_grad = forward_backward(naive_alignment, inputs)
    loss, grad = forward_backward(package_alignment, inputs)
    loss_diff = abs(loss.item() - naive_loss.item()) / abs(naive_loss.item())
    grad_diff = ((grad - naive_grad).abs().max() / naive_grad.abs().max()).item()
    if loss_diff > rtol or grad_diff > rtol:
        raise AssertionError(f"package and naive losses differ: loss {loss_diff:.2e}, input gradient {grad_diff:.2e}")
    return f"equal: loss rel diff {loss_diff:.1e}, grad max diff / max {grad_diff:.1e}"


def compare(quick: bool = False) -> Tuple[str, List[Comparison]]:
    """Naive eager port vs the package's torch path, forward + backward, batch 8 and 32 (quick: 8)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    repeats = 3 if quick else 7
    comparisons = []
    for batch in (8,) if quick else (8, 32):
        inputs = make_inputs(batch, device)
        note = check_equal(inputs)
        baseline = measure(lambda: forward_backward(naive_alignment, inputs), repeats=repeats, name="naive eager port")
        package = measure(lambda: forward_backward(package_alignment, inputs), repeats=repeats, name="package torch")
        comparisons.append(Comparison(f"batch {batch}, {IMAGE_SIZE}x{IMAGE_SIZE}, {device}", baseline, [package], note))
    return "Harmonization loss: input gradient -> loss -> backward", comparisons
