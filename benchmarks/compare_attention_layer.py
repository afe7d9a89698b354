"""One attention layer of a harmonized step, alone: where a ViT's second-order cost lies.

The harmonized step runs, per attention layer, the forward, the saliency pass (the input
gradient of q, k, v with ``create_graph=True``) and the backward of a loss of both. This times that
flow for the closed-form attention of ``fast_double_backward`` (its C++ slice kernels, the
default on the CPU, and its torch formulas, the fallback elsewhere) and for native math attention,
against the plain step's work (the fused flash forward and backward), on the shapes of one
ViT-Tiny and one ViT-B/16 layer (batch 8, 197 tokens), on separate q, k, v tensors and in timm's
layout (q, k, v views of one projection, the output transposed back: where the mode's strided
kernels and unbind save the copies). Before every run a 64 MB buffer is written, so no operand
starts in L2, as inside a real step.

    python -m benchmarks.compare_attention_layer [--repeats 15] [--batch 8]
"""
from __future__ import annotations

import argparse
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks._timing import Comparison, format_table, measure
from harmonizer_fast.training import attention_double_backward
from harmonizer_fast.training.attention_double_backward import scaled_dot_product_attention_fast_double_backward
from harmonizer_fast.training.double_backward import fast_double_backward

#: (label, heads, tokens, head dim): one layer of each model at 224 px
SHAPES = (("vit_tiny_patch16_224 layer", 3, 197, 64), ("vit_base_patch16_224 layer", 12, 197, 64))
_EVICT = torch.zeros(16 * 2**20)  # 64 MB


def _math_attention(q, k, v):
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v)


def _harmonized_flow(attention: Callable, q, k, v, grad_out, slice_kernels: bool = True) -> Callable[[], None]:
    """Forward, the saliency pass, and the backward of a loss of the output and the saliency;
    ``slice_kernels=False``: the closed form's torch formulas (as on a GPU or without the
    extension) for the whole flow."""

    def run():
        kernels = attention_double_backward._C
        if not slice_kernels:
            attention_double_backward._C = None
        try:
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            out = attention(*leaves)
            saliency = torch.autograd.grad(out, leaves, grad_out, create_graph=True)
            (sum(g.square().sum() for g in saliency) + out.square().sum()).backward()
        finally:
            attention_double_backward._C = kernels

    return run


def _plain_flow(q, k, v, grad_out) -> Callable[[], None]:
    def run():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        F.scaled_dot_product_attention(*leaves).backward(grad_out)

    return run


def _timm_layout(attention: Callable) -> Callable:
    """``attention`` as timm's Attention calls it: q, k, v views of one (B, N, 3 C) projection
    (``unbind`` of a permuted reshape), the output transposed back to (B, N, C)."""

    def run(qkv, heads: int):
        b, n, three_c = qkv.shape
        q, k, v = qkv.reshape(b, n, 3, heads, three_c // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
        return attention(q, k, v).transpose(1, 2).reshape(b, n, three_c // 3)

    return run


def _timm_flow(qkv, heads: int, grad_out, harmonized: bool) -> Callable[[], None]:
    """The plain step's flow (flash attention) or the harmonized one under
    ``fast_double_backward`` in timm's layout; the saliency is taken wrt the projection."""

    def run():
        leaf = qkv.detach().requires_grad_(True)
        if not harmonized:
            _timm_layout(F.scaled_dot_product_attention)(leaf, heads).backward(grad_out)
            return
        with fast_double_backward():
            out = _timm_layout(F.scaled_dot_product_attention)(leaf, heads)
            (saliency,) = torch.autograd.grad(out, leaf, grad_out, create_graph=True)
        (saliency.square().sum() + out.square().sum()).backward()

    return run


def compare(quick: bool = False, repeats: Optional[int] = None, batch: int = 8) -> Tuple[str, List[Comparison]]:
    """The ratio table (``benchmarks.run_all`` protocol); ``quick``: 3 repeats instead of 15."""
    repeats = repeats or (3 if quick else 15)
    comparisons = []
    gen = torch.Generator().manual_seed(0)
    for label, heads, tokens, dim in SHAPES:
        q, k, v, grad_out = (torch.randn(batch, heads, tokens, dim, generator=gen) for _ in range(4))
        timed = lambda name, fn: measure(fn, repeats=repeats, warmup=2, name=name, setup=lambda: _EVICT.add_(1.0))
        base = timed("plain step's attention (flash forward + backward)", _plain_flow(q, k, v, grad_out))
        fast = timed("harmonized, closed form (Trainer)",
                     _harmonized_flow(scaled_dot_product_attention_fast_double_backward, q, k, v, grad_out))
        formulas = timed("harmonized, closed form, torch formulas",
                         _harmonized_flow(scaled_dot_product_attention_fast_double_backward, q, k, v, grad_out,
                                          slice_kernels=False))
        native = timed("harmonized, native math attention", _harmonized_flow(_math_attention, q, k, v, grad_out))
        comparisons.append(Comparison(f"{label} b{batch}", base, [fast, formulas, native],
                                      note="speed-up < 1: cost over the plain step's attention"))
        qkv, grad_tokens = torch.randn(batch, tokens, 3 * heads * dim, generator=gen), grad_out.transpose(1, 2)
        grad_tokens = grad_tokens.reshape(batch, tokens, heads * dim)
        base = timed("plain step's attention (flash forward + backward)", _timm_flow(qkv, heads, grad_tokens, False))
        fast = timed("harmonized, closed form (Trainer)", _timm_flow(qkv, heads, grad_tokens, True))
        comparisons.append(Comparison(f"{label} b{batch}, timm layout (q, k, v views of one projection)", base,
                                      [fast], note="speed-up < 1: cost over the plain step's attention"))
    title = f"One attention layer: harmonized flow vs the plain step's (CPU, {torch.get_num_threads()} threads)"
    return title, comparisons


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    title, comparisons = compare(args.quick, None if args.quick else args.repeats, args.batch)
    print(format_table(comparisons, title))


if __name__ == "__main__":
    main()
