"""The C++ harmonization term (harmonizer_fast.ops.harmonization_term_cpu) against the pure-torch
reference_harmonization_term, and its routing under backend="auto" on the CPU."""
import pytest
import torch

from harmonizer_fast.ops import harmonization_term_cpu
from harmonizer_fast.training.harmonization import reference_harmonization_term, route_harmonization_term

pytestmark = pytest.mark.skipif(harmonization_term_cpu._C is None, reason="the C++ extension is not built")

#: (N, C, H, W): odd and even sides (TensorFlow 'SAME' pads them differently), one channel,
#: a 1 x 1 map (constant: zero saliency), a side of 2 and the training size
SHAPES = [(3, 3, 17, 23), (2, 1, 8, 5), (1, 3, 1, 1), (2, 3, 2, 9), (4, 3, 224, 224)]


def _inputs(shape, dtype, seed=0, tokens=None):
    gen = torch.Generator().manual_seed(seed)
    n, _, h, w = shape
    gradient = torch.randn(shape, generator=gen, dtype=dtype).requires_grad_(True)
    heatmaps = torch.rand((n, h, w), generator=gen, dtype=dtype)
    if tokens is None:
        tokens = torch.rand(n, generator=gen, dtype=dtype)
    return gradient, heatmaps, tokens


def _value_and_grad(fn, gradient, heatmaps, tokens, levels):
    loss = fn(gradient, heatmaps, tokens, levels)
    (grad,) = torch.autograd.grad(loss, gradient)
    return loss, grad


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("levels", [1, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_the_torch_reference(shape, levels, dtype):
    inputs = _inputs(shape, dtype)
    loss, grad = _value_and_grad(harmonization_term_cpu.cpu_harmonization_term, *inputs, levels)
    want_loss, want_grad = _value_and_grad(reference_harmonization_term, *inputs, levels)
    assert loss.dtype == want_loss.dtype == dtype
    assert grad.shape == want_grad.shape and grad.is_contiguous()
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(loss, want_loss, rtol=rtol, atol=0)
    scale = float(want_grad.abs().max())
    torch.testing.assert_close(grad, want_grad, rtol=rtol, atol=rtol * scale)


def test_zero_and_fractional_tokens_weight_the_maps():
    tokens = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    inputs = _inputs((3, 3, 12, 10), torch.float64, tokens=tokens)
    loss, grad = _value_and_grad(harmonization_term_cpu.cpu_harmonization_term, *inputs, 5)
    want_loss, want_grad = _value_and_grad(reference_harmonization_term, *inputs, 5)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-15)
    assert grad[0].abs().max() == 0  # a map without a human map gets no gradient


def test_constant_maps_give_zeros_not_nan():
    gradient, heatmaps, tokens = _inputs((2, 3, 9, 9), torch.float64)
    with torch.no_grad():
        gradient[0] = 0.5  # constant saliency: standardized to zeros
        heatmaps[1] = 0.3  # constant human map
    loss, grad = _value_and_grad(harmonization_term_cpu.cpu_harmonization_term, gradient, heatmaps, tokens, 5)
    want_loss, want_grad = _value_and_grad(reference_harmonization_term, gradient, heatmaps, tokens, 5)
    assert torch.isfinite(grad).all() and grad[0].abs().max() == 0
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-15)


def test_a_non_finite_input_gradient_gives_a_nan_loss_as_the_reference():
    gradient, heatmaps, tokens = _inputs((2, 3, 6, 6), torch.float32)
    with torch.no_grad():
        gradient[1, 2, 3, 4] = float("nan")
    loss = harmonization_term_cpu.cpu_harmonization_term(gradient, heatmaps, tokens, 5)
    assert torch.isnan(loss) and torch.isnan(reference_harmonization_term(gradient, heatmaps, tokens, 5))


def test_value_does_not_depend_on_the_thread_count():
    # 5 x 3 x 64 x 64 values: above the kernel's one-thread threshold (2**15), so that two
    # threads really split the maps
    inputs = _inputs((5, 3, 64, 64), torch.float32)
    saved = torch.get_num_threads()
    try:
        values = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            values.append(_value_and_grad(harmonization_term_cpu.cpu_harmonization_term, *inputs, 5))
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(values[0][0], values[1][0]) and torch.equal(values[0][1], values[1][1])


class _Counted:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def _count_kernel(monkeypatch, dtype="f32"):
    counter = _Counted(getattr(harmonization_term_cpu._C, f"harmonization_term_{dtype}"))
    monkeypatch.setattr(harmonization_term_cpu._C, f"harmonization_term_{dtype}", counter)
    return counter


def test_auto_routes_cpu_float32_to_the_kernel_and_torch_never(monkeypatch):
    counter = _count_kernel(monkeypatch)
    inputs = _inputs((2, 3, 16, 16), torch.float32)
    auto = _value_and_grad(lambda *a: route_harmonization_term("auto", *a), *inputs, 5)
    assert counter.calls == 1
    reference = _value_and_grad(lambda *a: route_harmonization_term("torch", *a), *inputs, 5)
    assert counter.calls == 1
    torch.testing.assert_close(auto[0], reference[0], rtol=2e-6, atol=0)
    torch.testing.assert_close(auto[1], reference[1], rtol=2e-6, atol=2e-6 * float(reference[1].abs().max()))


def test_human_maps_that_want_a_gradient_run_the_reference(monkeypatch):
    counter = _count_kernel(monkeypatch, "f64")
    gradient, heatmaps, tokens = _inputs((2, 3, 10, 10), torch.float64)
    heatmaps.requires_grad_(True)
    loss = route_harmonization_term("auto", gradient, heatmaps, tokens, 5)
    (grad_maps,) = torch.autograd.grad(loss, heatmaps)
    assert counter.calls == 0 and grad_maps.abs().max() > 0


def test_half_precision_and_a_missing_extension_run_the_reference(monkeypatch):
    gradient, heatmaps, tokens = _inputs((2, 3, 10, 10), torch.float32)
    assert not harmonization_term_cpu.applies(gradient.half(), heatmaps, tokens)
    assert harmonization_term_cpu.applies(gradient, heatmaps, tokens)
    monkeypatch.setattr(harmonization_term_cpu, "_C", None)
    assert not harmonization_term_cpu.applies(gradient, heatmaps, tokens)
    loss = route_harmonization_term("auto", gradient, heatmaps, tokens, 5)
    torch.testing.assert_close(loss, reference_harmonization_term(gradient, heatmaps, tokens, 5), rtol=0, atol=0)


def test_a_second_derivative_raises_instead_of_being_wrong():
    gradient, heatmaps, tokens = _inputs((2, 3, 8, 8), torch.float64)
    loss = harmonization_term_cpu.cpu_harmonization_term(gradient, heatmaps, tokens, 5)
    (grad,) = torch.autograd.grad(loss, gradient, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(grad.square().sum(), gradient)


def test_channels_last_and_mixed_dtype_inputs():
    # the Trainer's channels_last images give a channels-last input gradient; human maps may
    # come in another float dtype than the gradient (the reference converts them too)
    gradient, heatmaps, tokens = _inputs((2, 3, 12, 14), torch.float64)
    strided = gradient.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    loss, grad = _value_and_grad(harmonization_term_cpu.cpu_harmonization_term, strided, heatmaps.float(),
                                 tokens.float(), 5)
    want_loss, want_grad = _value_and_grad(reference_harmonization_term, gradient, heatmaps.float(), tokens.float(), 5)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-15)
