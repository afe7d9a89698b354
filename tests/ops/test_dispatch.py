"""The backend resolver and the router of harmonizer_fast.ops."""
import warnings

import pytest
import torch

import harmonizer_fast.ops as ops
from harmonizer_fast.ops import _dispatch
from harmonizer_fast.training import alignment_loss, pyramidal_representation


@pytest.fixture
def fresh_state(monkeypatch):
    """Isolate the module's one-time state (import check, warning) from other tests."""
    monkeypatch.setattr(_dispatch, "_triton_error", None)
    monkeypatch.setattr(_dispatch, "_triton_checked", False)
    monkeypatch.setattr(_dispatch, "_warned_fallback", False)
    return monkeypatch


def test_explicit_backends_on_cpu():
    x = torch.zeros(2, 3)
    assert ops.resolve_backend("torch", x) == "torch"
    assert ops.resolve_backend("auto", x) == "torch"  # auto uses Triton only for CUDA tensors
    if ops.interpreter_enabled():  # TRITON_INTERPRET=1 (tests/conftest.py)
        assert ops.resolve_backend("triton", x) == "triton"
    else:
        with pytest.raises(RuntimeError, match="CUDA tensors"):
            ops.resolve_backend("triton", x)
    with pytest.raises(ValueError, match="backend"):
        ops.resolve_backend("cuda", x)
    with pytest.raises(ValueError, match="backend"):
        pyramidal_representation(torch.zeros(1, 4, 4), 1, backend="fast")


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.resolve_backend("triton", torch.zeros(2))


def test_triton_rejects_float64_and_auto_uses_torch_for_it(fresh_state):
    with pytest.raises(TypeError, match="float64"):
        ops.resolve_backend("triton", torch.zeros(2, dtype=torch.float64))
    fresh_state.setattr(_dispatch, "_device_of", lambda tensors: torch.device("cuda"))
    assert ops.resolve_backend("auto", torch.zeros(2, dtype=torch.float64)) == "torch"
    assert ops.resolve_backend("auto", torch.zeros(2, dtype=torch.float16)) == "triton"


def test_auto_falls_back_with_one_warning_when_triton_is_missing(fresh_state):
    fresh_state.setattr(_dispatch, "_device_of", lambda tensors: torch.device("cuda"))
    fresh_state.setattr(_dispatch, "_triton_checked", True)
    fresh_state.setattr(_dispatch, "_triton_error", "ImportError: no module named triton")
    with pytest.warns(RuntimeWarning, match="no module named triton") as record:
        assert ops.resolve_backend("auto", torch.zeros(2)) == "torch"
        assert ops.resolve_backend("auto", torch.zeros(2)) == "torch"
    assert len(record) == 1
    with pytest.raises(RuntimeError, match="no module named triton"):
        ops.resolve_backend("triton", torch.zeros(2))


def test_auto_falls_back_once_when_a_kernel_fails(fresh_state):
    def broken(*args):
        raise RuntimeError("PTX compilation failed")

    def reference(*args):
        return "reference"

    fresh_state.setattr(_dispatch, "_device_of", lambda tensors: torch.device("cuda"))
    with pytest.raises(RuntimeError, match="PTX"):
        ops.route("triton", broken, reference, torch.zeros(2))
    with pytest.warns(RuntimeWarning, match="PTX compilation failed") as record:
        assert ops.route("auto", broken, reference, torch.zeros(2)) == "reference"
        assert ops.route("auto", broken, reference, torch.zeros(2)) == "reference"  # not retried, not re-warned
    assert len(record) == 1


def test_unsupported_call_silently_uses_torch_under_auto(fresh_state):
    def unsupported(*args):
        raise ops.FusedUnsupported("no gradient for `true_heatmaps`")

    fresh_state.setattr(_dispatch, "_device_of", lambda tensors: torch.device("cuda"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.route("auto", unsupported, lambda *args: "reference", torch.zeros(2)) == "reference"
    with pytest.raises(ValueError, match="true_heatmaps"):
        ops.route("triton", unsupported, lambda *args: "reference", torch.zeros(2))


def test_auto_on_cpu_serves_gradients_the_fused_op_does_not_give():
    saliency = torch.rand(2, 7, 7, requires_grad=True)
    human = torch.rand(2, 7, 7, requires_grad=True)
    loss = alignment_loss(saliency, human, torch.ones(2), backend="auto")
    grads = torch.autograd.grad(loss, (saliency, human))
    assert all(torch.isfinite(g).all() for g in grads)


def _poisoned_fused_ops(monkeypatch):
    """Make every fused entry point raise, and report which ones were reached."""
    reached = []
    from harmonizer_fast.training import harmonization as harmonization_module
    import harmonizer_fast.training.pyramid as pyramid_module

    def poison(name):
        def fused(*args):
            reached.append(name)
            raise AssertionError(f"backend='torch' reached the fused op {name}")
        return fused

    fake_alignment = type("FakeAlignment", (), {
        name: staticmethod(poison(name))
        for name in ("fused_alignment_loss", "fused_pyramidal_mse_with_tokens", "fused_harmonization_term")
    })
    fake_saliency = type("FakeSaliency", (), {"fused_saliency_standardize_cut": staticmethod(poison("saliency"))})
    fake_pyramid = type("FakePyramid", (), {"fused_pyramid": staticmethod(poison("pyramid"))})
    monkeypatch.setattr(harmonization_module, "_fused_alignment", fake_alignment)
    monkeypatch.setattr(harmonization_module, "_fused_saliency", fake_saliency)
    monkeypatch.setattr(pyramid_module.ops, "pyramid", fake_pyramid)
    return reached


def _public_calls():
    """Every public function (and module) that takes ``backend``, called once with it."""
    from harmonizer_fast.training import (
        HarmonizerLoss, harmonizer_loss, harmonizer_loss_components, pyramidal_mse_with_tokens,
        saliency_standardize_cut,
    )

    torch.manual_seed(0)
    maps, other, tokens = torch.rand(2, 8, 8), torch.rand(2, 8, 8), torch.ones(2)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 64, 5))
    images, labels = torch.rand(2, 3, 8, 8), torch.eye(5)[:2]
    return {
        "pyramidal_representation": lambda b: pyramidal_representation(maps, 2, backend=b),
        "pyramidal_mse_with_tokens": lambda b: pyramidal_mse_with_tokens(maps, other, tokens, backend=b),
        "saliency_standardize_cut": lambda b: saliency_standardize_cut(torch.rand(2, 3, 8, 8), backend=b),
        "alignment_loss": lambda b: alignment_loss(maps, other, tokens, backend=b),
        "harmonizer_loss_components": lambda b: harmonizer_loss_components(model, images, tokens, labels, maps, backend=b),
        "harmonizer_loss": lambda b: harmonizer_loss(model, images, tokens, labels, maps, backend=b),
        "HarmonizerLoss": lambda b: HarmonizerLoss(backend=b)(model, images, tokens, labels, maps),
    }


@pytest.mark.parametrize("name", sorted(_public_calls()))
def test_backend_torch_never_reaches_a_fused_op_even_on_cuda(fresh_state, name):
    """With the device query saying CUDA, "torch" runs the reference; "auto" does reach the op."""
    reached = _poisoned_fused_ops(fresh_state)
    fresh_state.setattr(_dispatch, "_device_of", lambda tensors: torch.device("cuda"))
    call = _public_calls()[name]
    call("torch")
    assert reached == []
    # the same call under "triton" must reach a fused op: otherwise this test could not fail
    with pytest.raises(AssertionError, match="reached the fused op"):
        call("triton")
    assert reached
