"""The backend resolver and dispatcher of harmonizer_fast.ops."""
import types
import warnings

import pytest
import torch

import harmonizer_fast.ops as ops
from harmonizer_fast.training import alignment_loss, pyramidal_representation


@pytest.fixture
def fresh_state(monkeypatch):
    """Isolate the module's one-time state (import check, warning) from other tests."""
    monkeypatch.setattr(ops, "_triton_error", None)
    monkeypatch.setattr(ops, "_triton_checked", False)
    monkeypatch.setattr(ops, "_warned_fallback", False)
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
    fresh_state.setattr(ops, "_device_of", lambda tensors: torch.device("cuda"))
    assert ops.resolve_backend("auto", torch.zeros(2, dtype=torch.float64)) == "torch"
    assert ops.resolve_backend("auto", torch.zeros(2, dtype=torch.float16)) == "triton"


def test_auto_falls_back_with_one_warning_when_triton_is_missing(fresh_state):
    fresh_state.setattr(ops, "_device_of", lambda tensors: torch.device("cuda"))
    fresh_state.setattr(ops, "_triton_checked", True)
    fresh_state.setattr(ops, "_triton_error", "ImportError: no module named triton")
    with pytest.warns(RuntimeWarning, match="no module named triton") as record:
        assert ops.resolve_backend("auto", torch.zeros(2)) == "torch"
        assert ops.resolve_backend("auto", torch.zeros(2)) == "torch"
    assert len(record) == 1
    with pytest.raises(RuntimeError, match="no module named triton"):
        ops.resolve_backend("triton", torch.zeros(2))


def test_auto_falls_back_once_when_a_kernel_fails(fresh_state):
    def broken(*args):
        raise RuntimeError("PTX compilation failed")

    fresh_state.setattr(ops, "_device_of", lambda tensors: torch.device("cuda"))
    fresh_state.setattr(ops, "op_module", lambda name: types.SimpleNamespace(run=broken))
    with pytest.raises(RuntimeError, match="PTX"):
        ops.dispatch("triton", "pyramid", "run", torch.zeros(2))
    with pytest.warns(RuntimeWarning, match="PTX compilation failed") as record:
        assert ops.dispatch("auto", "pyramid", "run", torch.zeros(2)) is None
        assert ops.dispatch("auto", "pyramid", "run", torch.zeros(2)) is None  # not retried, not re-warned
    assert len(record) == 1


def test_unsupported_call_silently_uses_torch_under_auto(fresh_state):
    def unsupported(*args):
        raise ops.FusedUnsupported("no gradient for `true_heatmaps`")

    fresh_state.setattr(ops, "_device_of", lambda tensors: torch.device("cuda"))
    fresh_state.setattr(ops, "op_module", lambda name: types.SimpleNamespace(run=unsupported))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.dispatch("auto", "alignment_loss", "run", torch.zeros(2)) is None
    with pytest.raises(ValueError, match="true_heatmaps"):
        ops.dispatch("triton", "alignment_loss", "run", torch.zeros(2))


def test_auto_on_cpu_serves_gradients_the_fused_op_does_not_give():
    saliency = torch.rand(2, 7, 7, requires_grad=True)
    human = torch.rand(2, 7, 7, requires_grad=True)
    loss = alignment_loss(saliency, human, torch.ones(2), backend="auto")
    grads = torch.autograd.grad(loss, (saliency, human))
    assert all(torch.isfinite(g).all() for g in grads)
