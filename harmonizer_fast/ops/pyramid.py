"""Fused Gaussian pyramid: 5x5 binomial, stride 2, TensorFlow 'SAME' zero padding, and its adjoint.

Reference: :func:`harmonizer_fast.training.pyramid.pyramidal_representation` (geometry from
:func:`~harmonizer_fast.training.pyramid.same_padding`, taps from
:data:`~harmonizer_fast.training.pyramid.BINOMIAL_1D`). One level is

.. math:: D(x)_{ij} = \\sum_{a, b = 0}^{4} k_a k_b\\, x_{2i + a - p_t,\\; 2j + b - p_l}

with :math:`k = [1, 4, 6, 4, 1] / 16` (passed to the kernels as compile-time constants) and
zero outside the map. Its adjoint (the
transpose, used by every backward pass) gathers, for each fine pixel ``p``, the coarse
pixels ``i = (p + p_t - a) / 2`` that are integers inside the coarse map:

.. math:: D^\\top(g)_{pq} = \\sum_{a, b} k_a k_b\\, g_{(p + p_t - a)/2,\\; (q + p_l - b)/2}.

Both kernels run over a flat (map, pixel) index, so small levels of a large batch still
fill the device (and the interpreter runs one program per level). The downsampling
optionally emits per-block token-weighted sums of squares (the loss never re-reads a
level); the adjoint optionally adds ``coef * w[b] * addend`` so that a backward step
``g_l + D^T(g_{l+1})`` (or a level's loss gradient) is one launch.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from harmonizer_fast.spec import BINOMIAL_1D, PYRAMID_KERNEL_SIZE as KERNEL_SIZE, PYRAMID_STRIDE as STRIDE, check_rank, check_tensor, same_padding
from harmonizer_fast.ops._dispatch import guard_second_order
from harmonizer_fast.ops._launch import block_size, num_warps

def _normalized_taps() -> Tuple[float, float, float]:
    """The symmetric 1-D taps ``b / sum(b)`` as (outer, inner, centre); their outer product is the 5x5 kernel."""
    total = sum(BINOMIAL_1D)
    k0, k1, k2, k3, k4 = (v / total for v in BINOMIAL_1D)
    if KERNEL_SIZE != 5 or (k0, k1) != (k4, k3):
        raise AssertionError("the fused pyramid kernels assume a symmetric 5-tap kernel")
    return k0, k1, k2


TAPS = _normalized_taps()


@triton.jit
def _five_taps(row_ptr, row_ok, o0, o1, o2, o3, o4, m0, m1, m2, m3, m4,
               K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr):
    """Binomial-weighted sum of one row's five column taps (zero where masked)."""
    t0 = tl.load(row_ptr + o0, mask=row_ok & m0, other=0.0).to(tl.float32)
    t1 = tl.load(row_ptr + o1, mask=row_ok & m1, other=0.0).to(tl.float32)
    t2 = tl.load(row_ptr + o2, mask=row_ok & m2, other=0.0).to(tl.float32)
    t3 = tl.load(row_ptr + o3, mask=row_ok & m3, other=0.0).to(tl.float32)
    t4 = tl.load(row_ptr + o4, mask=row_ok & m4, other=0.0).to(tl.float32)
    return K0 * (t0 + t4) + K1 * (t1 + t3) + K2 * t2


@triton.jit
def _downsample_kernel(
    x_ptr, out_ptr, weight_ptr, sq_ptr,
    total, H, W, Ho, Wo, s_b, s_h, s_w, pad_top, pad_left,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    BLOCK: tl.constexpr, WITH_SQ: tl.constexpr,
):
    """One pyramid level over a flat block of (map, pixel) outputs; optionally the block's
    token-weighted sum of squares ``sum w[b] * out^2``."""
    blk = tl.program_id(0)
    idx = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    b = idx // (Ho * Wo)
    pixel = idx % (Ho * Wo)
    top = 2 * (pixel // Wo) - pad_top
    left = 2 * (pixel % Wo) - pad_left
    # Column offsets and masks of the five taps, shared by the five rows.
    o0 = left * s_w
    o1 = o0 + s_w
    o2 = o1 + s_w
    o3 = o2 + s_w
    o4 = o3 + s_w
    m0 = (left >= 0) & (left < W)
    m1 = (left >= -1) & (left < W - 1)
    m2 = (left >= -2) & (left < W - 2)
    m3 = (left >= -3) & (left < W - 3)
    m4 = (left >= -4) & (left < W - 4)
    base = x_ptr + b * s_b
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for a in tl.static_range(5):
        row = top + a
        taps = _five_taps(base + row * s_h, mask & (row >= 0) & (row < H),
                          o0, o1, o2, o3, o4, m0, m1, m2, m3, m4, K0, K1, K2)
        acc += (K0 * (a % 4 == 0) + K1 * (a % 2 == 1) + K2 * (a == 2)) * taps  # row tap, compile-time
    tl.store(out_ptr + idx, acc, mask=mask)
    if WITH_SQ:
        weight = tl.load(weight_ptr + b, mask=mask, other=0.0)
        tl.store(sq_ptr + blk, tl.sum(weight * acc * acc, axis=0))


@triton.jit
def _downsample_adjoint_kernel(
    up_ptr, add_ptr, weight_ptr, coef, out_ptr,
    total, H, W, Ho, Wo, pad_top, pad_left,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    BLOCK: tl.constexpr, HAS_ADD: tl.constexpr, HAS_WEIGHT: tl.constexpr,
):
    """``coef * w[b] * addend + D^T(up)`` over a flat block of fine (map, pixel) outputs (contiguous)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    b = idx // (H * W)
    pixel = idx % (H * W)
    row_num = pixel // W + pad_top
    col_num = pixel % W + pad_left
    # Tap c reaches coarse column (q + pad_left - c) / 2 when that is an integer in range.
    c0 = col_num
    c1 = col_num - 1
    c2 = col_num - 2
    c3 = col_num - 3
    c4 = col_num - 4
    m0 = (c0 >= 0) & ((c0 & 1) == 0) & (c0 < 2 * Wo)
    m1 = (c1 >= 0) & ((c1 & 1) == 0) & (c1 < 2 * Wo)
    m2 = (c2 >= 0) & ((c2 & 1) == 0) & (c2 < 2 * Wo)
    m3 = (c3 >= 0) & ((c3 & 1) == 0) & (c3 < 2 * Wo)
    m4 = (c4 >= 0) & ((c4 & 1) == 0) & (c4 < 2 * Wo)
    base = up_ptr + b * Ho * Wo
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for a in tl.static_range(5):
        r2 = row_num - a
        row_ok = mask & (r2 >= 0) & ((r2 & 1) == 0) & (r2 < 2 * Ho)
        taps = _five_taps(base + (r2 // 2) * Wo, row_ok,
                          c0 // 2, c1 // 2, c2 // 2, c3 // 2, c4 // 2, m0, m1, m2, m3, m4, K0, K1, K2)
        acc += (K0 * (a % 4 == 0) + K1 * (a % 2 == 1) + K2 * (a == 2)) * taps  # row tap, compile-time
    if HAS_ADD:
        addend = tl.load(add_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            addend = addend * (coef * tl.load(weight_ptr + b, mask=mask, other=0.0).to(tl.float32))
        acc += addend
    tl.store(out_ptr + idx, acc, mask=mask)


def level_shape(height: int, width: int) -> Tuple[int, int]:
    return -(-height // STRIDE), -(-width // STRIDE)


def downsample(
    maps: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One level on (B, H, W) maps (any strides) -> float32 (B, Ho, Wo).

    With ``weights`` (B,) float32, also returns ``sum_b weights[b] * ||out_b||^2`` (a
    0-d tensor, from per-block partial sums), else ``None``.
    """
    batch, height, width = maps.shape
    ho, wo = level_shape(height, width)
    total = batch * ho * wo
    block = block_size(total)
    n_blocks = triton.cdiv(total, block)
    out = torch.empty((batch, ho, wo), device=maps.device, dtype=torch.float32)
    with_sq = weights is not None
    partials = torch.zeros((n_blocks,), device=maps.device, dtype=torch.float32)
    if total > 0:
        _downsample_kernel[(n_blocks,)](
            maps, out, weights if with_sq else out, partials,
            total, height, width, ho, wo, *maps.stride(), same_padding(height)[0], same_padding(width)[0],
            *TAPS, BLOCK=block, WITH_SQ=with_sq, num_warps=num_warps(block),
        )
    return out, (partials.sum() if with_sq else None)


def downsample_adjoint(
    upstream: torch.Tensor,
    fine_shape: Sequence[int],
    addend: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    coef: float = 1.0,
) -> torch.Tensor:
    """``coef * weights[b] * addend + D^T(upstream)``: (B, Ho, Wo) -> float32 (B, H, W).

    ``addend`` (B, H, W) is optional; ``weights`` (B,) scales it per map (with ``coef``).
    """
    batch, height, width = fine_shape
    ho, wo = upstream.shape[-2:]
    upstream = upstream.contiguous()
    total = batch * height * width
    block = block_size(total)
    out = torch.empty((batch, height, width), device=upstream.device, dtype=torch.float32)
    has_add = addend is not None
    addend = addend.contiguous() if has_add else out
    has_weight = weights is not None
    if total > 0:
        _downsample_adjoint_kernel[(triton.cdiv(total, block),)](
            upstream, addend, weights if has_weight else out, float(coef), out,
            total, height, width, ho, wo, same_padding(height)[0], same_padding(width)[0],
            *TAPS, BLOCK=block, HAS_ADD=has_add, HAS_WEIGHT=has_weight, num_warps=num_warps(block),
        )
    return out


class PyramidFunction(torch.autograd.Function):
    """(B, H, W) maps -> float32 levels 1..num_levels (level 0 is the input itself)."""

    @staticmethod
    def forward(ctx, maps: torch.Tensor, num_levels: int):
        ctx.set_materialize_grads(False)
        levels: List[torch.Tensor] = []
        current = maps
        for _ in range(num_levels):
            current, _ = downsample(current)
            levels.append(current)
        ctx.shapes = [tuple(maps.shape)] + [tuple(level.shape) for level in levels]
        ctx.input_dtype = maps.dtype
        ctx.save_for_backward(maps)
        return tuple(levels)

    @staticmethod
    def backward(ctx, *grads):
        (maps,) = ctx.saved_tensors
        shapes = ctx.shapes
        acc: Optional[torch.Tensor] = None
        for level in range(len(grads), 0, -1):
            grad = grads[level - 1]
            if acc is not None:
                acc = downsample_adjoint(acc, shapes[level], addend=grad)
            elif grad is not None:
                acc = grad
        if acc is None:
            return None, None
        grad = downsample_adjoint(acc, shapes[0]).to(ctx.input_dtype)
        return guard_second_order("pyramid", grad, maps, *grads), None


def pyramid(image: torch.Tensor, num_levels: int) -> List[torch.Tensor]:
    """Fused :func:`~harmonizer_fast.training.pyramid.pyramidal_representation`.

    Args:
        image: (N, C, H, W) or (N, H, W) float32/float16/bfloat16 tensor, any strides.
        num_levels: number of downsamplings.

    Returns:
        ``num_levels + 1`` tensors with the input's rank and dtype (levels computed in float32).
    """
    check_tensor(image, "image")
    check_rank(image, (3, 4), "image", "(N, C, H, W) or (N, H, W)")
    if not isinstance(num_levels, int) or num_levels < 0:
        raise ValueError(f"`num_levels` must be a non-negative int, got {num_levels!r}")
    return fused_pyramid(image, num_levels)


def fused_pyramid(image: torch.Tensor, num_levels: int) -> List[torch.Tensor]:
    """:func:`pyramid` on inputs the caller has validated (the route of the public function)."""
    lead = image.shape[:-2]
    maps = image.reshape(-1, *image.shape[-2:])
    levels = PyramidFunction.apply(maps, num_levels) if num_levels else ()
    return [image] + [level.reshape(*lead, *level.shape[-2:]).to(image.dtype) for level in levels]
