"""Fused Triton loss path vs eager PyTorch vs ``torch.compile`` of the eager code.

Work timed (one training step's harmonization term): input gradient (N, 3, 224, 224) and
human maps (N, 224, 224) -> standardized saliency -> rescaled human map -> token-weighted
pyramidal MSE -> backward to the input gradient. Variants:

- eager: the package's pure-torch path (``backend="torch"``), the baseline;
- torch.compile: the same eager function compiled (forward and backward, inductor);
- triton: the fused kernels (``backend="triton"``); GPU only: on CPU Triton runs in its
  interpreter, whose speed means nothing, so it is not timed there;
- C++ (CPU): the harmonization term's C++ op (``ops.harmonization_term_cpu``, what
  ``backend="auto"`` runs on the CPU); CPU only.

Each variant is checked equal to eager (loss and input gradient, 1e-5 relative) before
timing. Besides the median, every row reports the peak memory of the step (CUDA: peak
allocated above the inputs; CPU: not measurable per variant, omitted) and the bandwidth
floor: each input read once (gradient, maps, tokens) and each output written once (loss,
input gradient), ``28 N H W`` bytes in float32, divided by the median, and as a fraction
of the device's measured copy bandwidth (a large tensor copy: read + write).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from benchmarks._timing import Comparison, Timing, measure
from benchmarks.compare_loss import CHANNELS, IMAGE_SIZE, forward_backward, make_inputs
from harmonizer_fast._ext import HAS_EXTENSION
from harmonizer_fast.training import alignment_loss, saliency_standardize_cut

#: Targets for the GPU figures (README "Fused Triton kernels").
TARGETS = "targets (GPU): >= 3x eager, >= 1.5x torch.compile, >= 50% of the bandwidth floor"


def eager_alignment(gradient: torch.Tensor, heatmaps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Steps 2-5 of the harmonizer loss on the pure-torch reference path."""
    return alignment_loss(saliency_standardize_cut(gradient, backend="torch"), heatmaps, tokens, backend="torch")


def triton_alignment(gradient: torch.Tensor, heatmaps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Steps 2-5 through the fused kernels (saliency maximum handed from the cut to the loss)."""
    from harmonizer_fast.ops.alignment_loss import harmonization_term

    return harmonization_term(gradient, heatmaps, tokens)


def cpu_alignment(gradient: torch.Tensor, heatmaps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Steps 2-5 through the C++ op of the CPU."""
    from harmonizer_fast.ops.harmonization_term_cpu import cpu_harmonization_term

    return cpu_harmonization_term(gradient, heatmaps, tokens, 5)


def compiled_alignment() -> Callable:
    """``torch.compile`` of :func:`eager_alignment` (compiled on first call, i.e. in the warm-up)."""
    return torch.compile(eager_alignment, dynamic=False)


def variants(device: torch.device) -> Dict[str, Optional[Callable]]:
    """name -> loss function; ``None`` for a variant that cannot be timed meaningfully here."""
    return {
        "eager": eager_alignment,
        "torch.compile": compiled_alignment(),
        "triton (fused)": triton_alignment if device.type == "cuda" else None,
        "C++ (CPU)": cpu_alignment if device.type == "cpu" and HAS_EXTENSION else None,
    }


def floor_bytes(batch: int, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE, channels: int = CHANNELS) -> int:
    """Bytes that must move at least: inputs read once, outputs written once (float32)."""
    maps = batch * height * width
    return 4 * (channels * maps + maps + batch) + 4 * (1 + channels * maps)


def copy_bandwidth(device: torch.device, mib: int = 512, repeats: int = 5) -> float:
    """Measured read+write bandwidth of a large copy into a preallocated tensor, bytes/s (the attainable peak)."""
    x = torch.empty(mib * 2**20 // 4, device=device, dtype=torch.float32).fill_(1.0)
    y = torch.empty_like(x).fill_(0.0)

    def copy():
        y.copy_(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    timing = measure(copy, repeats=repeats, warmup=1)
    return 2 * x.numel() * 4 / timing.median_s


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated during one call above what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def check_equal(loss_fn: Callable, reference: Tuple[torch.Tensor, torch.Tensor], inputs, rtol: float = 1e-5) -> str:
    """``loss_fn`` gives eager's loss and input gradient; returns the measured differences."""
    loss, grad = forward_backward(loss_fn, inputs)
    loss_diff = abs(loss.item() - reference[0].item()) / max(abs(reference[0].item()), 1e-30)
    grad_diff = ((grad - reference[1]).abs().max() / reference[1].abs().max().clamp_min(1e-30)).item()
    if loss_diff > rtol or grad_diff > rtol:
        raise AssertionError(f"variant differs from eager: loss {loss_diff:.2e}, input gradient {grad_diff:.2e}")
    return f"loss diff {loss_diff:.1e}, grad diff {grad_diff:.1e}"


def annotate(timing: Timing, batch: int, bandwidth: float, memory: Optional[int], check: str) -> Timing:
    achieved = floor_bytes(batch) / timing.median_s
    timing.extra.update({
        "floor GB/s": f"{achieved / 1e9:.1f}",
        "of copy bw": f"{100 * achieved / bandwidth:.1f}%",
    })
    if memory is not None:
        timing.extra["peak MiB"] = f"{memory / 2**20:.0f}"
    if check:
        timing.extra["check"] = check
    return timing


def compare(quick: bool = False) -> Tuple[str, List[Comparison]]:
    """Eager vs torch.compile vs Triton, forward + backward, batch 32 and 128 (quick: 32)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats = 3 if quick else 7
    bandwidth = copy_bandwidth(device)
    comparisons = []
    fns = variants(device)
    for batch in (32,) if quick else (32, 128):
        inputs = make_inputs(batch, str(device))
        reference = forward_backward(eager_alignment, inputs)
        timings = []
        for name, fn in fns.items():
            if fn is None:
                continue
            start = time.perf_counter()
            check = "" if fn is eager_alignment else check_equal(fn, reference, inputs)  # compiles on first call
            if name == "torch.compile":
                check += f", first call {time.perf_counter() - start:.0f} s"
            timing = measure(lambda: forward_backward(fn, inputs), repeats=repeats, name=name)
            memory = peak_memory(lambda: forward_backward(fn, inputs), device)
            timings.append(annotate(timing, batch, bandwidth, memory, check))
        note = f"floor {floor_bytes(batch) / 2**20:.0f} MiB, copy bw {bandwidth / 1e9:.1f} GB/s"
        if fns["triton (fused)"] is None:
            note += "; triton: GPU only (CPU runs the interpreter)"
        comparisons.append(Comparison(f"batch {batch}, {IMAGE_SIZE}x{IMAGE_SIZE}, {device.type}",
                                      timings[0], timings[1:], note))
    return f"Fused loss path (`ops`): eager vs torch.compile vs Triton; {TARGETS}", comparisons
