"""pytest-benchmark timings of one second-order pass through single layers, native autograd vs
``harmonizer_fast.training.double_backward`` (``pytest benchmarks/test_bench_double_backward.py``).

Each case: forward, the input gradient with ``create_graph=True`` (the saliency), then the
backward of a loss of that gradient into the input and every parameter: what the harmonized
step does per layer. Shapes are ResNet/EfficientNet/ConvNeXt/ViT-Tiny layers at batch 8, 224 px input.
Whole-step ratios are in ``compare_train_overhead.py`` and ``RESULTS.md``.
"""
import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from harmonizer_fast.training.double_backward import fast_double_backward


def _vit_tiny_attention() -> nn.Module:
    """timm's attention of ViT-Tiny (qkv and output projections included), fused path."""
    from timm.layers import Attention

    attention = Attention(192, num_heads=3, qkv_bias=True)
    attention.fused_attn = True
    return attention

LAYERS = {
    "conv3x3 64ch 56px": (lambda: nn.Conv2d(64, 64, 3, padding=1, bias=False), (8, 64, 56, 56)),
    "depthwise5x5 240ch 28px": (lambda: nn.Conv2d(240, 240, 5, padding=2, groups=240, bias=False), (8, 240, 28, 28)),
    "batchnorm 64ch 56px": (lambda: nn.BatchNorm2d(64), (8, 64, 56, 56)),
    "layernorm 8x3136x64": (lambda: nn.LayerNorm(64), (8, 3136, 64)),
    "patch embedding 16x16 192ch 224px": (lambda: nn.Conv2d(3, 192, 16, 16), (8, 3, 224, 224)),
    "vit-tiny attention 8x197x192": (_vit_tiny_attention, (8, 197, 192)),
    "gelu 8x197x768": (nn.GELU, (8, 197, 768)),
}


def second_order_pass(layer: nn.Module, x: torch.Tensor, fast: bool) -> torch.Tensor:
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    # the native reference runs attention in the math kernel (the fused ones have no double backward)
    with fast_double_backward() if fast else sdpa_kernel([SDPBackend.MATH]):
        out = layer(x)
        (saliency,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    saliency.square().sum().backward()
    return x.grad


@pytest.mark.parametrize("fast", [False, True], ids=["native", "fast"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_second_order_layer(benchmark, name, fast):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = make().train()
    x = torch.randn(shape)
    expected = second_order_pass(layer, x, fast=False)
    torch.testing.assert_close(second_order_pass(layer, x, fast=True), expected, rtol=1e-3, atol=1e-4)
    grad = benchmark(second_order_pass, layer, x, fast)
    assert torch.isfinite(grad).all()
