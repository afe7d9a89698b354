"""Shared helpers of the fused-op tests: tolerances, inputs, and a reference comparison."""
from __future__ import annotations

import torch

from harmonizer_fast.ops import interpreter_enabled

#: Where the fused ops run: CPU under the Triton interpreter (CI), else the GPU
#: (``TRITON_INTERPRET=0`` on a CUDA machine, as benchmarks/gpu_check.sh runs them).
DEVICE = torch.device("cpu") if interpreter_enabled() or not torch.cuda.is_available() else torch.device("cuda")

#: (rtol, atol as a fraction of the reference's largest magnitude) per dtype. float16/bfloat16
#: inputs are computed in float32 by both paths; only values cast back to the input
#: dtype (pyramid levels, input gradients) carry the half-precision rounding.
TOLERANCES = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32, what: str = ""):
    """``actual`` equals ``expected`` within the dtype's relative tolerance (absolute only near zero)."""
    rtol, atol_fraction = TOLERANCES[dtype]
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), what
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.detach().float(), expected.detach().float(), rtol=rtol, atol=atol_fraction * scale + 1e-30,
        msg=lambda m: f"{what}: {m}",
    )


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, seed: int) -> torch.Tensor:
    """Random normal weights on :data:`DEVICE` (drawn on the CPU, so the same everywhere)."""
    return torch.randn(shape, generator=generator(seed)).to(DEVICE)


def make_input(shape, dtype=torch.float32, seed=0, contiguous=True, requires_grad=True) -> torch.Tensor:
    """A random normal tensor; non-contiguous variants are a transposed copy viewed back."""
    g = generator(seed)
    if contiguous:
        x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    else:
        # Same logical shape, last two axes stored transposed (strides (.., 1, H)).
        x = torch.randn((*shape[:-2], shape[-1], shape[-2]), generator=g).to(DEVICE, dtype).transpose(-1, -2)
        assert not x.is_contiguous()
    return x.requires_grad_(requires_grad)
