"""AttentionFunction / SoftmaxFunction / GeluFunction equal native autograd to second order
(masks, biases, causal, cross-attention, bf16 autocast, a timm ViT end to end); the mode
routes exactly the calls it should."""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from harmonizer_fast.training import activation_double_backward, attention_double_backward
from harmonizer_fast.training.attention_double_backward import (
    gelu_fast_double_backward,
    scaled_dot_product_attention_fast_double_backward,
    softmax_fast_double_backward,
)
from harmonizer_fast.training.double_backward import fast_double_backward
from tests.training._kernels import KERNEL_PATHS, kernel_path

DEVICE = torch.device(os.environ.get("HF_TEST_DEVICE", "cpu"))
GELU_KERNELS = ("gelu_second_order_term", "gelu_double_backward", "gelu_backward_add")


@pytest.fixture(params=["avx512 where present", "portable"])
def vector_forms(request):
    """Runs a float32 kernel test with the AVX-512 forms allowed, then with only the portable
    ones (which CPUs without AVX-512 run)."""
    from harmonizer_fast._ext import _C

    if request.param == "portable":
        if _C is None:
            pytest.skip("the C++ extension is not built")
        _C.set_avx512_allowed(False)
    yield request.param
    if _C is not None:
        _C.set_avx512_allowed(True)


def _randn(*shape, gen, requires_grad=True, scale=1.0):
    t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    return t.to(DEVICE).requires_grad_(requires_grad)


def _second_order(fn, inputs, first=None):
    """Output, the gradients wrt ``first`` (default: every input that requires grad) with
    ``create_graph=True``, and the gradients wrt every input of a loss of those gradients (cubic
    terms make every derivative non-trivial)."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    first = leaves if first is None else first
    out = fn(*inputs)
    weights = torch.cos(torch.arange(out.numel(), dtype=out.dtype, device=out.device)).view_as(out)
    grads = torch.autograd.grad((out * weights).sum() + (out**3).sum(), first, create_graph=True)
    loss = sum(g.square().sum() + (g * t).sum() for g, t in zip(grads, first)) + (out**2).sum()
    return out, grads, torch.autograd.grad(loss, leaves)


def _assert_all_close(actual, expected, rtol=1e-10, atol=1e-10):
    for a, e in zip(actual, expected):
        if isinstance(a, (tuple, list)):
            _assert_all_close(a, e, rtol, atol)
        else:
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


def _native_sdpa(*args, **kwargs):
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(*args, **kwargs)


# (batch dims, L, S, E, Ev, mask kind, is_causal, scale)
ATTENTION_CASES = {
    "plain": ((2, 3), 5, 5, 4, 4, None, False, None),
    "cross, Ev != E, scale": ((2, 2), 4, 6, 3, 5, None, False, 0.7),
    "bool mask with a fully masked row": ((2, 2), 5, 6, 4, 4, "bool", False, None),
    "float mask (batch, 1, L, S)": ((2, 3), 5, 5, 4, 4, "float", False, None),
    "relative-position bias (1, H, L, S), trained": ((2, 3), 5, 5, 4, 4, "relpos", False, None),
    "causal": ((2, 2), 5, 5, 4, 4, None, True, None),
    "3-D (no head dim)": ((3,), 4, 4, 2, 3, None, False, None),
}


def _attention_inputs(case, seed):
    lead, L, S, E, Ev, mask_kind, _, _ = case
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _randn(*lead, L, E, gen=gen), _randn(*lead, S, E, gen=gen), _randn(*lead, S, Ev, gen=gen)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(lead[0], 1, L, S, generator=gen) > 0.3
        mask[0, 0, 1] = False  # one row attends to nothing: zeros, as torch's masked softmax
        mask[..., 0, 0] = True
        mask = mask.to(DEVICE)
    elif mask_kind == "float":
        mask = _randn(lead[0], 1, L, S, gen=gen, requires_grad=False)
    elif mask_kind == "relpos":
        mask = _randn(1, lead[1], L, S, gen=gen)
    return q, k, v, mask


@pytest.mark.parametrize("kept", [False, True], ids=["P' folded", "P' handed over"])
@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_attention_second_order_matches_native(name, path, kept, monkeypatch):
    attention_double_backward._find_blas()  # its one-time self-check calls the kernels too
    # the saliency backward folds P' into Q', K' unless the heap keeps freed memory
    monkeypatch.setattr(attention_double_backward, "keeps_freed_memory", lambda: kept)
    counter = kernel_path(path, monkeypatch, attention_double_backward, ("attention_forward", "attention_input_grad",
                                                                          "attention_backward"))
    case = ATTENTION_CASES[name]
    is_causal, scale = case[6], case[7]
    q, k, v, mask = _attention_inputs(case, seed=len(name))
    call = lambda sdpa: lambda q, k, v, m: sdpa(q, k, v, attn_mask=m, is_causal=is_causal, scale=scale)
    inputs = (q, k, v, mask)
    expected = _second_order(call(_native_sdpa), inputs)
    actual = _second_order(call(scaled_dot_product_attention_fast_double_backward), inputs)
    assert actual[0].grad_fn.name().startswith("AttentionFunction")
    _assert_all_close(actual, expected)
    # the saliency pass of the harmonizer: the first gradient wrt the query only
    expected = _second_order(call(_native_sdpa), inputs, first=[q])
    actual = _second_order(call(scaled_dot_product_attention_fast_double_backward), inputs, first=[q])
    _assert_all_close(actual, expected)
    if counter is not None and DEVICE.type == "cpu":
        assert counter.calls == 8  # each run: forward, saliency pass, its backward, training backward


@pytest.mark.parametrize("dim", [-1, 1])
def test_softmax_second_order_matches_native(dim):
    gen = torch.Generator().manual_seed(5)
    x = _randn(3, 4, 6, gen=gen, scale=2.0)
    expected = _second_order(lambda x: torch.softmax(x, dim), (x,))
    for route in (lambda x: softmax_fast_double_backward(x, dim),
                  lambda x: softmax_fast_double_backward(x, dim=dim, dtype=torch.float64)):
        actual = _second_order(route, (x,))
        assert actual[0].grad_fn.name().startswith("SoftmaxFunction")
        _assert_all_close(actual, expected)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_gelu_second_order_matches_native(approximate, path, monkeypatch):
    counter = kernel_path(path, monkeypatch, activation_double_backward, GELU_KERNELS)
    gen = torch.Generator().manual_seed(6)
    x = _randn(4, 7, 5, gen=gen, scale=2.0)
    expected = _second_order(lambda x: F.gelu(x, approximate=approximate), (x,))
    actual = _second_order(lambda x: gelu_fast_double_backward(x, approximate=approximate), (x,))
    assert actual[0].grad_fn.name().startswith("GeluFunction")
    _assert_all_close(actual, expected)
    if counter is not None and DEVICE.type == "cpu":
        # the closed form's pass and the training backward's (its own gradient plus the closed
        # form's x-gradient, through the stand-in); the tanh form stays in torch ops
        assert counter.calls == (2 if approximate == "none" else 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gelu_saved_term_alone_with_a_constant_output_gradient(dtype, monkeypatch, vector_forms):
    # an output gradient that needs no gradient itself: only the x-term is wanted (its own kernel)
    counter = kernel_path("fused kernel", monkeypatch, activation_double_backward, "gelu_second_order_term")
    gen = torch.Generator().manual_seed(9)
    x = (torch.randn(3, 40, generator=gen, dtype=dtype) * 3).to(DEVICE).requires_grad_(True)
    weights = torch.randn(3, 40, generator=gen, dtype=dtype).to(DEVICE)

    def second(gelu):
        (g,) = torch.autograd.grad(gelu(x), x, weights, create_graph=True)
        return torch.autograd.grad((g ** 3).sum(), x)[0]

    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(second(gelu_fast_double_backward), second(F.gelu), rtol=tol, atol=tol)
    if DEVICE.type == "cpu":
        assert counter.calls == 1


def test_gelu_fused_kernel_float32_mlp_shape(monkeypatch, vector_forms):
    # a ViT MLP's hidden activations in float32 (several threads' worth, |x| up to ~13)
    counter = kernel_path("fused kernel", monkeypatch, activation_double_backward, GELU_KERNELS)
    gen = torch.Generator().manual_seed(8)
    x = (torch.randn(2, 197, 96, generator=gen) * 3).to(DEVICE).requires_grad_(True)
    expected = _second_order(F.gelu, (x,))
    actual = _second_order(gelu_fast_double_backward, (x,))
    torch.testing.assert_close(actual[2][0], expected[2][0], rtol=1e-4, atol=1e-5 * expected[2][0].abs().max().item())
    assert counter.calls == (2 if DEVICE.type == "cpu" else 0)


def test_gelu_non_contiguous_input_stays_on_the_torch_formula(monkeypatch):
    # ConvNeXt's blocks run GELU on permuted (non-contiguous) activations: copying them for the
    # C++ pass cost more than it saved, so the torch formula runs there, with the same result
    counter = kernel_path("fused kernel", monkeypatch, activation_double_backward, GELU_KERNELS)
    gen = torch.Generator().manual_seed(10)
    base = _randn(2, 6, 5, 4, gen=gen, scale=2.0)
    permuted = lambda t: t.permute(0, 2, 3, 1)
    assert not permuted(base).is_contiguous()
    expected = _second_order(lambda x: F.gelu(permuted(x)), (base,))
    actual = _second_order(lambda x: gelu_fast_double_backward(permuted(x)), (base,))
    assert actual[0].grad_fn.name().startswith("GeluFunction")
    _assert_all_close(actual, expected)
    if counter is not None:
        assert counter.calls == 0


@pytest.mark.parametrize("inplace", [False, True])
def test_hardsigmoid_second_order_matches_its_relu6_form(inplace):
    # PyTorch cannot differentiate hardsigmoid_backward; relu6(x + 3) / 6 is the same function
    # with a native double backward (the kinks at -3 and 3 included: zero slope at both)
    gen = torch.Generator().manual_seed(11)
    x = _randn(4, 9, gen=gen, scale=3.0).detach()
    x[0, :4] = torch.tensor([-3.0, 3.0, -4.0, 5.0])
    x.requires_grad_(True)
    # torch's float64 hardsigmoid_backward multiplies by 1/6 rounded to float32 (3e-8 relative
    # off the exact slope); the route keeps that native first derivative, so the reference does too:
    # hardsigmoid's value, relu6's slope times that constant
    slope = torch.tensor(1 / 6, dtype=torch.float32).item()
    relu6_form = lambda x: F.hardsigmoid(x).detach() + (F.relu6(x + 3) - F.relu6(x + 3).detach()) * slope
    expected = _second_order(relu6_form, (x,))

    def routed(x):
        y = x * 1.0  # a non-leaf: in place is allowed on it
        out = activation_double_backward.hardsigmoid_fast_double_backward(y, inplace=inplace)
        assert (out is y) == inplace
        return out

    actual = _second_order(routed, (x,))
    _assert_all_close(actual, expected)
    y = torch.ops.aten.hardsigmoid(x)
    weights = torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)
    upstream = (weights + 3 * y**2).detach()
    (native_first,) = torch.autograd.grad(F.hardsigmoid(x), x, upstream)
    (routed_first,) = torch.autograd.grad(routed(x), x, upstream, create_graph=True)
    assert torch.equal(routed_first, native_first)
    assert routed_first.grad_fn is not None
    with pytest.raises(RuntimeError, match="hardsigmoid_backward is not implemented"):
        _second_order(F.hardsigmoid, (x,))  # why the route exists: natively it stops here


def test_mode_routes_nn_hardsigmoid():
    gate = nn.Hardsigmoid()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    with fast_double_backward():
        y = gate(x)
    assert y.grad_fn.name().startswith("HardsigmoidFunction")
    with fast_double_backward():
        assert gate(x.detach()).grad_fn is None  # no gradient needed: native


def test_attention_bias_gradient_inside_a_graph_building_backward():
    # A penalty on the bias gradient itself needs its derivative (the U_S term).
    q, k, v, bias = _attention_inputs(ATTENTION_CASES["relative-position bias (1, H, L, S), trained"], seed=9)
    call = lambda sdpa: lambda q, k, v, b: sdpa(q, k, v, attn_mask=b)
    expected = _second_order(call(_native_sdpa), (q, k, v, bias), first=[q, bias])
    actual = _second_order(call(scaled_dot_product_attention_fast_double_backward), (q, k, v, bias), first=[q, bias])
    _assert_all_close(actual, expected)


def test_mode_routes_attention_softmax_gelu_and_leaves_the_rest_native():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=gen, requires_grad=True) for _ in range(3))
    x = torch.randn(2, 5, requires_grad=True)
    with fast_double_backward():
        routed = {
            "sdpa": F.scaled_dot_product_attention(q, k, v),
            "softmax": x.softmax(-1), "torch.softmax": torch.softmax(x, 1), "F.softmax": F.softmax(x, dim=-1),
            "gelu": nn.GELU()(x), "F.gelu tanh": F.gelu(x, approximate="tanh"),
        }
        native = {
            "sdpa dropout": F.scaled_dot_product_attention(q, k, v, dropout_p=0.5),
            "sdpa grouped-query": F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True),
            "softmax implicit dim": F.softmax(x[0], _stacklevel=5),
        }
        with torch.no_grad():
            assert F.scaled_dot_product_attention(q, k, v).grad_fn is None
    for name, out in routed.items():
        assert out.grad_fn.name().split("Function")[0] in ("Attention", "Softmax", "Gelu"), name
    for name, out in native.items():
        assert "Function" not in out.grad_fn.name(), name
    torch.testing.assert_close(routed["sdpa"], F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(routed["gelu"], F.gelu(x))


def test_third_order_raises_a_clear_error():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    with fast_double_backward():
        out = F.scaled_dot_product_attention(q, k, v)
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="third-order derivatives are not supported"):
        (gk,) = torch.autograd.grad(gq.square().sum(), k, create_graph=True)
        torch.autograd.grad(gk.square().sum(), q)


def test_gelu_third_order_raises_a_clear_error():
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64, requires_grad=True)
    with fast_double_backward():
        y = F.gelu(x)
    (g,) = torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="third-order derivatives"):
        (h,) = torch.autograd.grad((g ** 3).sum() + (y ** 2).sum(), x, create_graph=True)
        torch.autograd.grad(h.sum(), x)


def test_bf16_autocast_attention_is_as_accurate_as_native():
    # Both round to bfloat16 at different places, so compare each with the float64 truth.
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=gen).to(DEVICE) for _ in range(3))
    bias = torch.randn(1, 3, 16, 16, generator=gen).to(DEVICE)
    mask = (torch.rand(16, 16, generator=gen) > 0.2).to(DEVICE)

    def run(sdpa, amp, dtype=torch.float32):
        inputs = [t.to(dtype).requires_grad_(True) for t in (q, k, v, bias)]
        q_, k_, v_, bias_ = inputs
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=amp):
            out = sdpa(q_, k_, v_, attn_mask=bias_) + sdpa(q_, k_, v_, attn_mask=mask)
            grads = torch.autograd.grad(out.float().square().sum(), (q_, k_), create_graph=True)
        second = torch.autograd.grad(sum(g.float().square().sum() for g in grads), inputs)
        return [out, *grads, *second]

    truth = run(_native_sdpa, False, torch.float64)
    native, fast = run(_native_sdpa, True), run(scaled_dot_product_attention_fast_double_backward, True)
    assert fast[0].dtype == native[0].dtype == torch.bfloat16
    for f, n, t in zip(fast, native, truth):
        error = lambda a: ((a.double() - t).norm() / t.norm()).item()
        assert error(f) < 2 * error(n) + 1e-3, (error(f), error(n))


@pytest.mark.parametrize("fused_attn", [True, False], ids=["fused (SDPA)", "unfused (softmax)"])
def test_timm_vit_matches_native_gradients(fused_attn):
    timm = pytest.importorskip("timm")
    from harmonizer_fast.training.loss import harmonizer_loss_components

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                              depth=2).double().to(DEVICE).train()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused_attn
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, device=DEVICE)
    heatmaps = torch.rand(2, 32, 32, dtype=torch.float64, device=DEVICE)
    labels = F.one_hot(torch.tensor([1, 7]), 10).double().to(DEVICE)
    tokens = torch.ones(2, dtype=torch.float64, device=DEVICE)
    routed = []

    def grads(fast):
        model.zero_grad(set_to_none=True)
        with fast_double_backward() if fast else torch.enable_grad():
            out = harmonizer_loss_components(model, x, tokens, labels, heatmaps)
        out.loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    hook = model.blocks[0].attn.register_forward_hook(lambda m, a, out: routed.append(out.grad_fn))
    fast = grads(True)
    hook.remove()
    for a, e in zip(fast, grads(False)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)
    assert routed  # the block ran under the mode


def test_attention_slice_kernels_float32_vit_shape(monkeypatch, vector_forms):
    # a ViT layer's attention in float32 (8 heads of 197 tokens: both threads' worth of slices),
    # through the C++ slice kernels and through the torch formulas
    if attention_double_backward._C is None or DEVICE.type != "cpu":
        pytest.skip("the C++ slice kernels run on the CPU with the extension")
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 4, 197, 64, generator=gen).requires_grad_(True) for _ in range(3))

    def run(path):
        counter = kernel_path(path, monkeypatch, attention_double_backward, "attention_")
        result = _second_order(lambda q, k, v: scaled_dot_product_attention_fast_double_backward(q, k, v), (q, k, v))
        monkeypatch.undo()
        return result, counter

    attention_double_backward._find_blas()
    (fast, counter), (torch_ops, _) = run("fused kernel"), run("torch ops")
    assert counter.calls == 4
    for a, e in zip(fast[1] + fast[2], torch_ops[1] + torch_ops[2]):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5 * e.abs().max().item())
    threads = torch.get_num_threads()
    try:  # one thread: no parallel region, each product on MKL's own threads
        torch.set_num_threads(1)
        one_thread, _ = run("fused kernel")
    finally:
        torch.set_num_threads(threads)
    for a, e in zip(one_thread[1] + one_thread[2], fast[1] + fast[2]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6 * e.abs().max().item())


def test_attention_without_a_usable_blas_runs_the_torch_formulas(monkeypatch):
    # no sgemm_/dgemm_ to be found (a torch built on another BLAS): the torch formulas, same numbers
    def no_library(path):
        raise OSError(f"{path}: not found")

    monkeypatch.setattr(attention_double_backward, "_BLAS_STATE", {})
    monkeypatch.setattr(attention_double_backward.ctypes, "CDLL", no_library)
    assert attention_double_backward._find_blas() is False
    assert attention_double_backward._slice_kernels(torch.ones(2, 2, 2)) is None
    test_attention_second_order_matches_native("plain", "torch ops", False, monkeypatch)


def test_attention_slice_kernels_name_a_bad_argument():
    if attention_double_backward._C is None or not attention_double_backward._find_blas():
        pytest.skip("the C++ slice kernels are not available")
    backward = attention_double_backward._C.attention_backward_f32
    q, probs, out = torch.zeros(1, 2, 5, 3).numpy(), torch.zeros(2, 5, 5).numpy(), torch.zeros(1, 2, 5, 3)

    def call(g=q, k=q, v=q, out_q=None):
        backward(g, None, q, k, v, probs, 1.0, out_q, None, None, None, False, False, False, 1)

    with pytest.raises(ValueError, match="`v` must be \\(1, 2, 5, 3\\)"):
        call(v=torch.zeros(1, 2, 4, 3).numpy())
    with pytest.raises(ValueError, match="`k` must be an array \\(outer, inner, rows, cols\\)"):
        call(k=torch.zeros(2, 5, 3).numpy())
    with pytest.raises(ValueError, match="`g` needs a unit column stride"):
        call(g=torch.zeros(1, 2, 3, 5).transpose(-1, -2).numpy())
    with pytest.raises(ValueError, match="`g` needs a unit column stride and a row stride of at least its columns"):
        call(g=torch.zeros(1, 2, 1, 3).expand(1, 2, 5, 3).numpy())
    read_only = out.numpy()
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="`out_q` is read-only"):
        call(out_q=read_only)
    call(out_q=out.numpy())  # the same call with a writeable output runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("safe", [True, False])
def test_attention_forward_softmax_edge_rows_as_torch(dtype, safe, monkeypatch, vector_forms):
    # rows with a NaN score, a +inf score, only -inf scores (masked out) and a -inf among finite
    # ones; 21 keys: a 16-wide vector block and a tail
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(3, 5, 4, generator=gen, dtype=dtype)
    k, v = (torch.randn(3, 21, 4, generator=gen, dtype=dtype) for _ in range(2))
    bias = torch.zeros(3, 5, 21, dtype=dtype)
    bias[0, 1, 2] = float("nan")
    bias[0, 2, 19] = float("nan")
    bias[1, 2, 0] = float("inf")
    bias[1, 3, 20] = float("inf")
    bias[2, 3] = float("-inf")
    bias[2, 4, 1] = float("-inf")
    bias[2, 4, 17] = float("-inf")

    def run(path):
        kernel_path(path, monkeypatch, attention_double_backward, "attention_")
        out, probs = attention_double_backward.AttentionFunction.apply(q, k, v, bias, 0.5, safe)[:2]
        monkeypatch.undo()
        return out, probs

    attention_double_backward._find_blas()
    fast, reference = run("fused kernel"), run("torch ops")
    for a, e in zip(fast, reference):
        torch.testing.assert_close(a, e, equal_nan=True, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-7)
    assert all(torch.isnan(fast[1][b, i]).all() for b, i in ((0, 1), (0, 2), (1, 2), (1, 3)))
    assert (fast[1][2, 3] == 0).all() if safe else torch.isnan(fast[1][2, 3]).all()


def test_attention_with_no_keys_runs_natively():
    # zero keys (an empty context): the route leaves the call to torch, which returns zeros
    gen = torch.Generator().manual_seed(13)
    q = _randn(2, 3, 4, gen=gen)
    k, v = _randn(2, 0, 4, gen=gen), _randn(2, 0, 5, gen=gen)
    assert scaled_dot_product_attention_fast_double_backward(q, k, v) is None
    with fast_double_backward():
        out = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == (2, 3, 5) and not out.abs().sum()


def test_attention_blas_that_disagrees_with_torch_is_not_used(monkeypatch):
    # the one-time check computes a small backward with the found GEMMs and with torch: any
    # disagreement (an ABI mismatch, say) leaves the torch formulas in charge
    if attention_double_backward._C is None:
        pytest.skip("the C++ extension is not built")
    real = attention_double_backward._slice_backward
    monkeypatch.setattr(attention_double_backward, "_BLAS_STATE", {})
    monkeypatch.setattr(attention_double_backward, "_slice_backward",
                        lambda *args: real(*args) + 1e-3)
    assert attention_double_backward._find_blas() is False
    assert attention_double_backward._slice_kernels(torch.ones(2, 2, 2)) is None
    # hand the real GEMMs back for the tests that follow (the check cleared them in C++)
    monkeypatch.setattr(attention_double_backward, "_slice_backward", real)
    monkeypatch.setattr(attention_double_backward, "_BLAS_STATE", {})
    assert attention_double_backward._find_blas() is True


def _timm_attention(qkv, heads, sdpa):
    """timm's Attention between its two projections: q, k, v as views of one (B, N, 3 C) tensor,
    the output transposed back to (B, N, C)."""
    b, n, three_c = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, heads, three_c // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return sdpa(q, k, v).transpose(1, 2).reshape(b, n, three_c // 3)


def _qkv_views_case(gen):
    # timm's layout under the mode: the kernels read q, k, v and the transposed output gradient
    # in place and write the q, k, v gradients as slices of one tensor, which the mode's unbind
    # stacks as a view
    def fast(qkv):
        with fast_double_backward():
            return _timm_attention(qkv, 2, F.scaled_dot_product_attention)

    return (_randn(2, 7, 3 * 2 * 4, gen=gen),), fast, lambda qkv: _timm_attention(qkv, 2, _native_sdpa)


def _strided_case(gen):
    # q transposed (no unit column stride: copied for the kernels), k a slice with a row stride
    # wider than its columns, v with its rows spread over a larger tensor
    call = lambda sdpa: lambda q_t, k_wide, v_spread: sdpa(q_t.transpose(-1, -2), k_wide[..., 2:6],
                                                            v_spread[:, :, ::2])
    inputs = (_randn(2, 3, 4, 5, gen=gen), _randn(2, 3, 6, 9, gen=gen), _randn(2, 3, 12, 3, gen=gen))
    return inputs, call(scaled_dot_product_attention_fast_double_backward), call(_native_sdpa)


def _windowed_5d_case(gen):
    # Hiera's layout: 5-D q, k, v (batch, heads, windows, tokens, head dim) as views of one
    # projection, the output gradient a permuted dense tensor (more leading dimensions than the
    # kernels' two: their gradient buffers are then plain contiguous ones)
    def attend(qkv, sdpa):
        q, k, v = qkv.reshape(2, 5, 2, 3, 2, 4).permute(3, 0, 4, 2, 1, 5).unbind(0)
        return sdpa(q, k, v).transpose(1, 3).reshape(2, 10, 8)

    def fast(qkv):
        with fast_double_backward():
            return attend(qkv, F.scaled_dot_product_attention)

    return (_randn(2, 10, 24, gen=gen),), fast, lambda qkv: attend(qkv, _native_sdpa)


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("case", [_qkv_views_case, _strided_case, _windowed_5d_case],
                         ids=["views of one qkv tensor", "strided", "5-D windowed views"])
def test_attention_on_strided_operands_matches_native(case, path, monkeypatch):
    attention_double_backward._find_blas()
    counter = kernel_path(path, monkeypatch, attention_double_backward, ("attention_forward", "attention_input_grad",
                                                                          "attention_backward"))
    inputs, fast, native = case(torch.Generator().manual_seed(21))
    _assert_all_close(_second_order(fast, inputs), _second_order(native, inputs))
    if counter is not None and DEVICE.type == "cpu":
        assert counter.calls == 4


def test_timm_attention_gradients_go_back_without_copies():
    # float32 on the CPU kernels: no stack and no copy of a q-, k-, v- or qkv-sized tensor in the
    # forward (the output's transpose back to (B, N, C) is a view, as after the native kernel),
    # the saliency pass, its backward or the training backward
    if attention_double_backward._C is None or not attention_double_backward._find_blas() or DEVICE.type != "cpu":
        pytest.skip("the C++ slice kernels are not available")
    x, weight = torch.randn(2, 9, 16, requires_grad=True), torch.randn(16, 3 * 2 * 8, requires_grad=True)
    with fast_double_backward(), torch.profiler.profile(record_shapes=True) as prof:
        out = _timm_attention(x @ weight, 2, F.scaled_dot_product_attention)  # the qkv projection
        (grad,) = torch.autograd.grad((out**3).sum(), x, create_graph=True)
        (grad.square().sum() + out.sum()).backward()
    part = [2, 2, 9, 8]
    copies = [(e.name, e.input_shapes) for e in prof.events()
              if e.name in ("aten::cat", "aten::stack")
              or (e.name in ("aten::copy_", "aten::clone") and e.input_shapes and e.input_shapes[0] in (
                  part, [2, 9, 2, 8], [2, 9, 3, 2, 8], [3, 2, 2, 9, 8], [2, 9, 48]))]
    assert copies == []
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


def test_stacked_layout_recognizes_slices_of_one_dense_tensor():
    stacked = attention_double_backward._stacked_layout
    qkv = torch.zeros(2, 5, 3, 4, 6).permute(2, 0, 3, 1, 4)  # timm: (3, B, H, N, d) of a (B, N, 3, H, d)
    assert stacked(qkv.unbind(0)) == 4 * 6
    assert stacked(torch.zeros(3, 4, 5).unbind(1)) == 5
    t = torch.zeros(4, 5)
    assert stacked((t, t, t)) is None  # one tensor three times: the step is 0
    assert stacked(torch.zeros(3, 4, 8)[:, :, :5].unbind(0)) is None  # gaps between rows: not dense
    assert stacked(torch.zeros(4, 5).expand(3, 4, 5).unbind(0)) is None  # overlapping
    assert stacked(torch.zeros(5, 4, 5)[::2].unbind(0)) is None  # every other slice: not dense
    assert stacked(torch.zeros(3, 4, 5).unbind(0)[::-1]) is None  # out of order
    assert stacked((torch.zeros(4, 5), torch.zeros(4, 5))) is None  # two storages
    assert stacked((qkv[0], None, qkv[2])) is None


def test_stack_grads_is_a_view_of_stacked_slices_and_a_stack_otherwise():
    q, k, v = torch.randn(2, 6, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
    buffers = attention_double_backward._grad_buffers(q, k, v)
    for b, value in zip(buffers, (1.0, 2.0, 3.0)):
        b.fill_(value)
    stacked = attention_double_backward._StackGrads.apply(0, q.shape, *buffers)
    assert stacked.data_ptr() == buffers[0].data_ptr()  # no copy
    torch.testing.assert_close(stacked, torch.stack(buffers))
    assert stacked.permute(1, 3, 0, 2, 4).is_contiguous()  # the (B, N, 3, H, d) the qkv projection made
    separate = [torch.full((2, 3), float(i)) for i in range(3)]
    torch.testing.assert_close(attention_double_backward._StackGrads.apply(1, (2, 3), *separate),
                               torch.stack(separate, 1))
    with_none = attention_double_backward._StackGrads.apply(0, (2, 3), separate[0], None, separate[2])
    torch.testing.assert_close(with_none, torch.stack([separate[0], torch.zeros(2, 3), separate[2]]))


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_unbind_route_matches_native_to_second_order(dim):
    def routed(t):
        with fast_double_backward():
            parts = t.unbind(dim)
        assert parts[0].grad_fn.name() == "_UnbindBackward"
        return parts[0] * parts[-1] ** 2  # the middle parts unused: their gradients are zeros

    t = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(routed, (t,))
    assert torch.autograd.gradgradcheck(routed, (t,))
    with fast_double_backward():
        assert torch.unbind(t.detach(), dim)[0].grad_fn is None  # nothing to differentiate: native
        assert torch.unbind(t, dim=dim)[1].grad_fn.name() == "_UnbindBackward"
        with pytest.raises(IndexError):
            t.unbind(3)  # the native error


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_attention_loss_of_the_saliency_alone_matches_native(path, monkeypatch):
    # the training backward gets no output gradient, only the closed form's gradients of the
    # stand-ins (and of P with a bias): they are the gradients of q, k, v as they are
    attention_double_backward._find_blas()
    kernel_path(path, monkeypatch, attention_double_backward, "attention_")
    gen = torch.Generator().manual_seed(23)
    q, k, v, bias = _attention_inputs(ATTENTION_CASES["relative-position bias (1, H, L, S), trained"], seed=23)
    weights = _randn(*q.shape[:-1], v.shape[-1], gen=gen, requires_grad=False)

    def grads(sdpa, with_bias):
        out = sdpa(q, k, v, attn_mask=bias if with_bias else None)
        saliency = torch.autograd.grad(out, (q, k), weights, create_graph=True)
        leaves = (q, k, v, bias) if with_bias else (q, k, v)
        return torch.autograd.grad(sum(s.square().sum() for s in saliency), leaves)

    for with_bias in (False, True):
        _assert_all_close(grads(scaled_dot_product_attention_fast_double_backward, with_bias),
                          grads(_native_sdpa, with_bias))
