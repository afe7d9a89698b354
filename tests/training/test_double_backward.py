"""Conv2dFunction / BatchNormFunction / LayerNormFunction equal F.conv2d / F.batch_norm /
F.layer_norm to second order; the mode routes exactly the calls it should."""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from harmonizer_fast.training import norm_double_backward
from tests.training._kernels import KERNEL_PATHS, kernel_path
from harmonizer_fast.training.double_backward import (
    Conv2dFunction,
    batch_norm_fast_double_backward,
    conv2d_fast_double_backward,
    fast_double_backward,
    layer_norm_fast_double_backward,
)

# The GPU script runs this file with HF_TEST_DEVICE=cuda (cuDNN kernels); CI runs it on the CPU.
DEVICE = torch.device(os.environ.get("HF_TEST_DEVICE", "cpu"))


def _randn(*shape, gen, requires_grad=True):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(requires_grad)


def _second_order(layer, x, w, b):
    """Output, input gradient and the gradients wrt every leaf of a loss of that input gradient:
    the harmonizer's double backward in miniature (cubic terms make every derivative non-trivial)."""
    out = layer(x, w, b)
    weights = torch.cos(torch.arange(out.numel(), dtype=out.dtype, device=out.device)).view_as(out)
    (gx,) = torch.autograd.grad((out * weights).sum() + (out**3).sum(), x, create_graph=True)
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    second = torch.autograd.grad(gx.square().sum() + (gx * x).sum() + (out**2).sum(), leaves)
    return out, gx, second


def _assert_all_close(actual, expected):
    for a, e in zip(actual, expected):
        if isinstance(a, (tuple, list)):
            _assert_all_close(a, e)
        else:
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


CASES = [  # (in, out, kernel, stride, padding, dilation, groups, bias, H, W)
    (3, 5, 3, 1, 1, 1, 1, True, 9, 8),
    (4, 6, 3, 2, 1, 1, 1, False, 11, 9),   # stride 2 on odd sides: the input gradient is cropped
    (6, 6, 5, 2, 2, 1, 6, True, 10, 13),   # depthwise
    (6, 4, 3, 1, 2, 2, 2, True, 9, 9),     # grouped + dilated
    (2, 3, (3, 1), (1, 2), (1, 0), 1, 1, True, 7, 6),  # rectangular kernel, per-axis stride/padding
    (3, 8, 7, 2, 3, 1, 1, False, 15, 15),  # ResNet stem shape
    (3, 5, 4, 4, 0, 1, 1, True, 12, 8),    # patchify (ViT patch embedding, ConvNeXt stem): a matmul
    (3, 5, (4, 8), (4, 8), 0, 1, 1, False, 13, 16),  # rectangular patches not tiling the input: native
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_second_order_matches_native_conv2d(case):
    cin, cout, k, s, p, d, g, with_bias, h, wd = case
    kh, kw = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(len(str(case)))
    x = _randn(2, cin, h, wd, gen=gen)
    w = _randn(cout, cin // g, kh, kw, gen=gen)
    b = _randn(cout, gen=gen) if with_bias else None
    native = lambda x, w, b: F.conv2d(x, w, b, s, p, d, g)
    fast = lambda x, w, b: conv2d_fast_double_backward(x, w, b, s, p, d, g)
    expected = _second_order(native, x, w, b)
    actual = _second_order(fast, x, w, b)
    assert actual[0].grad_fn.name().startswith("Conv2dFunction")
    _assert_all_close(actual, expected)


def test_weight_gradients_inside_a_graph_building_backward_stay_differentiable():
    # A gradient penalty on the weight gradient needs d(dL/dW)/dW: the rare fallback path.
    gen = torch.Generator().manual_seed(1)
    x, w, b = _randn(2, 3, 8, 8, gen=gen), _randn(4, 3, 3, 3, gen=gen), _randn(4, gen=gen)

    def penalty(conv):
        out = conv(x, w, b)
        gx, gw, gb = torch.autograd.grad(out.square().sum(), (x, w, b), create_graph=True)
        return torch.autograd.grad(gx.square().sum() + gw.square().sum() + gb.square().sum(), (x, w, b))

    expected = penalty(lambda x, w, b: F.conv2d(x, w, b, 1, 1))
    actual = penalty(lambda x, w, b: Conv2dFunction.apply(x, w, b, ([1, 1], [1, 1], [1, 1], 1)))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_mode_routes_modules_and_functional_calls_and_leaves_the_rest_native():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding="same", groups=4))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with fast_double_backward():
        first = model[0](x)
        second = model[2](first)
        functional = F.conv2d(x, model[0].weight, stride=2)
        with torch.no_grad():
            no_grad = model[0](x)
    assert first.grad_fn.name().startswith("Conv2dFunction")
    assert functional.grad_fn.name().startswith("Conv2dFunction")
    assert not second.grad_fn.name().startswith("Conv2dFunction")  # string padding: native
    assert no_grad.grad_fn is None
    assert not model[0](x).grad_fn.name().startswith("Conv2dFunction")  # outside the block
    torch.testing.assert_close(first, model[0](x))


def test_channels_last_and_a_timm_model_match_native_gradients():
    timm = pytest.importorskip("timm")
    from harmonizer_fast.training.loss import harmonizer_loss_components

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=10).double().train()
    model = model.to(DEVICE, memory_format=torch.channels_last)
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64).to(DEVICE).contiguous(memory_format=torch.channels_last)
    heatmaps = torch.rand(2, 40, 40, dtype=torch.float64).to(DEVICE)
    labels = F.one_hot(torch.tensor([1, 7]), 10).double().to(DEVICE)
    tokens = torch.ones(2, dtype=torch.float64, device=DEVICE)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def grads(fast):
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        with fast_double_backward() if fast else torch.enable_grad():
            out = harmonizer_loss_components(model, x, tokens, labels, heatmaps)
        out.loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, e in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


def test_bf16_autocast_runs_in_the_autocast_dtype():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        native = conv(x)
        with fast_double_backward():
            fast = conv(x)
            (gx,) = torch.autograd.grad(fast.float().square().sum(), x, create_graph=True)
    assert fast.dtype == native.dtype == torch.bfloat16
    torch.testing.assert_close(fast, native)
    gx.square().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.dtype == torch.float32


def _affine_inputs(shape, affine_shape, affine, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1).to(DEVICE).requires_grad_(True)
    affine_shape = affine_shape if isinstance(affine_shape, tuple) else (affine_shape,)
    w, b = _randn(*affine_shape, gen=gen, requires_grad=affine), _randn(*affine_shape, gen=gen, requires_grad=affine)
    return x, w, b


@pytest.mark.parametrize("shape,affine", [((3, 4, 5, 6), True), ((2, 3, 1, 7), True), ((5, 3), True), ((4, 2, 3, 3), False)])
def test_batch_norm_second_order_matches_native(shape, affine):
    x, w, b = _affine_inputs(shape, shape[1], affine, seed=len(shape))
    results = {}
    for name, batch_norm in (("native", F.batch_norm), ("fast", batch_norm_fast_double_backward)):
        running = [torch.zeros(shape[1], dtype=torch.float64, device=DEVICE),
                   torch.ones(shape[1], dtype=torch.float64, device=DEVICE)]
        layer = lambda x, w, b: batch_norm(x, *running, w, b, True, 0.1, 1e-3)
        results[name] = (*_second_order(layer, x, w, b), running)
    assert results["fast"][0].grad_fn.name().startswith("BatchNormFunction")
    _assert_all_close(results["fast"], results["native"])  # incl. the running statistics


@pytest.fixture(params=KERNEL_PATHS)
def layer_norm_kernel(request, monkeypatch):
    return kernel_path(request.param, monkeypatch, norm_double_backward, "layer_norm_double_backward")


@pytest.mark.parametrize("shape,normalized,affine", [((3, 5, 7), (7,), True), ((2, 3, 4, 5), (4, 5), True),
                                                     ((6,), (6,), True), ((4, 8), (8,), False)])
def test_layer_norm_second_order_matches_native(shape, normalized, affine, layer_norm_kernel):
    x, w, b = _affine_inputs(shape, normalized, affine, seed=len(shape) + 10)
    expected = _second_order(lambda x, w, b: F.layer_norm(x, normalized, w, b, 1e-5), x, w, b)
    actual = _second_order(lambda x, w, b: layer_norm_fast_double_backward(x, normalized, w, b, 1e-5), x, w, b)
    assert actual[0].grad_fn.name().startswith("LayerNormFunction")
    _assert_all_close(actual, expected)
    if layer_norm_kernel is not None and DEVICE.type == "cpu":
        assert layer_norm_kernel.calls == 1


def test_layer_norm_fused_kernel_float32_transformer_shape(layer_norm_kernel):
    # ViT-sized rows (several OpenMP threads' worth), float32: as accurate as native autograd
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(4, 197, 64, generator=gen) * 2 + 0.5).to(DEVICE).requires_grad_(True)
    w, b = (torch.randn(64, generator=gen).to(DEVICE).requires_grad_(True) for _ in range(2))
    expected = _second_order(lambda x, w, b: F.layer_norm(x, (64,), w, b, 1e-6), x, w, b)
    actual = _second_order(lambda x, w, b: layer_norm_fast_double_backward(x, (64,), w, b, 1e-6), x, w, b)
    for a, e in zip(actual[2], expected[2]):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())


@pytest.mark.skipif(norm_double_backward._C is None, reason="no C++ extension")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("need,has_weight", [((g, x, w), a) for g in (0, 1) for x in (0, 1) for w in (0, 1)
                                             for a in (True, False) if (g or x or w) and (a or not w)])
def test_layer_norm_kernel_each_output_subset_matches_autograd(need, has_weight, dtype):
    # every compiled instance of the row kernel (one per wanted-output subset), with and without
    # a weight, against autograd's derivatives of the native input gradient
    need_gy, need_x, need_w = (bool(n) for n in need)
    gen = torch.Generator().manual_seed(sum(need) + 3 * has_weight)
    rows, m = 37, 48
    x = (torch.randn(rows, m, generator=gen, dtype=torch.float64) * 1.5 + 0.3).requires_grad_(True)
    gy = torch.randn(rows, m, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(m, generator=gen, dtype=torch.float64, requires_grad=True) if has_weight else None
    u = torch.randn(rows, m, generator=gen, dtype=torch.float64)
    gx, = torch.autograd.grad(F.layer_norm(x, (m,), w, None, 1e-5), x, gy, create_graph=True)
    wrt = [t for t in (gy, x, w) if t is not None]
    expected = dict(zip(("gy", "x", "w"), torch.autograd.grad(gx, wrt, u)))
    _, mean, rstd = torch.ops.aten.native_layer_norm(x.detach(), [m], w, None, 1e-5)
    cast = lambda t: None if t is None else t.detach().to(dtype)
    got = norm_double_backward._fused_layer_norm_double_backward(
        cast(gy), cast(x), cast(w), cast(mean.view(rows, 1)), cast(rstd.view(rows, 1)), cast(u),
        need_gy, need_x, need_w)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    for (name, wanted), out in zip((("gy", need_gy), ("x", need_x), ("w", need_w)), got):
        if not wanted:
            assert out is None, name
            continue
        e = expected[name]
        torch.testing.assert_close(out.double(), e, rtol=tol["rtol"], atol=tol["atol"] * e.abs().max().item(), msg=name)


@pytest.mark.parametrize("kind", ["batch_norm", "layer_norm"])
def test_norm_affine_gradients_inside_a_graph_building_backward(kind):
    x, w, b = _affine_inputs((4, 3, 5, 5), 3 if kind == "batch_norm" else (5,), True, seed=3)
    layers = {
        "batch_norm": (F.batch_norm, batch_norm_fast_double_backward, lambda f, w, b: f(x, None, None, w, b, True, 0.1, 1e-5)),
        "layer_norm": (F.layer_norm, layer_norm_fast_double_backward, lambda f, w, b: f(x, (5,), w, b, 1e-5)),
    }
    native, fast, call = layers[kind]

    def penalty(f):
        grads = torch.autograd.grad((call(f, w, b) ** 3).sum(), (x, w, b), create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), (x, w, b))

    _assert_all_close(penalty(fast), penalty(native))


def test_norm_routing_leaves_eval_mode_and_single_values_native():
    bn = nn.BatchNorm2d(3)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with fast_double_backward():
        assert nn.LayerNorm(4)(x).grad_fn.name().startswith("LayerNormFunction")
        assert bn(x).grad_fn.name().startswith("BatchNormFunction")
        bn.eval()
        assert not bn(x).grad_fn.name().startswith("BatchNormFunction")
        bn.train()
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            bn(torch.randn(1, 3, 1, 1, requires_grad=True))
