"""Drop-in for timm models beyond the benchmark five: on one small random-weight model of each
family of layers the fast double backward covers (or must leave native), float64, 64 px, the
harmonizer loss's parameter gradients equal native autograd's and the routes that should run did.

``scripts/survey_double_backward.py`` runs the same comparison on 105 timm architectures
(2026-12-01: every gradient within 1.2e-12 of the model's largest; the ten whose
squeeze-excitation gates are ``nn.Hardsigmoid``, MobileNetV3, GhostNet(V2), RepGhostNet, LCNet,
FBNetV3, HardCoReNAS, RDNet and VoVNet-eSE, only against the reference below: PyTorch cannot
differentiate ``hardsigmoid_backward``, so natively they stop, and they train only through the
route). Their native reference replaces the gate by the same function written with ``relu6``."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.training._routes import count_route_calls, harmonizer_gradients, with_relu6_gates

timm = pytest.importorskip("timm")

# model: (what it covers, routes that must run)
MODELS = {
    "mobilenetv3_small_100": ("hard-sigmoid SE gates, hard swish, depthwise convolutions", {"hardsigmoid", "batch_norm"}),
    "efficientnet_b0": ("SiLU, sigmoid SE gates, strided depthwise convolutions", {"batch_norm"}),
    "swin_tiny_patch4_window7_224": ("windowed attention with a relative-position bias (unfused)", {"softmax", "layer_norm", "gelu"}),
    "eva02_tiny_patch14_224": ("rotary position embedding, SwiGLU MLP", {"attention", "layer_norm"}),
    "xcit_nano_12_p16_224": ("cross-covariance attention, class attention, convolutional patch mixing", {"softmax", "batch_norm", "gelu"}),
}


@pytest.fixture
def one_thread():
    # tiny float64 models are hundreds of small ops: one thread runs them several times faster
    # than two (and far faster than two on a busy machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(MODELS))
def test_timm_model_matches_native_gradients(name, monkeypatch, one_thread):
    _, expected_routes = MODELS[name]
    kwargs = {} if name.startswith(("mobilenet", "efficientnet")) else {"img_size": 64}
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).double().train()
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(2, 3, 64, 64, generator=gen, dtype=torch.float64), torch.tensor([1.0, 0.5], dtype=torch.float64),
             F.one_hot(torch.tensor([1, 3]), 5).double(), torch.rand(2, 64, 64, generator=gen, dtype=torch.float64))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = count_route_calls(monkeypatch)
    fast_loss, fast = harmonizer_gradients(model, state, batch, fast=True)
    used = {route for route, count in calls.items() if count}
    assert expected_routes <= used, f"routes that ran: {dict(calls)}"
    has_gates = any(isinstance(m, nn.Hardsigmoid) for m in model.modules())
    if has_gates:
        with pytest.raises(RuntimeError, match="hardsigmoid_backward is not implemented"):
            harmonizer_gradients(model, state, batch, fast=False)
        with_relu6_gates(model)
    native_loss, native = harmonizer_gradients(model, state, batch, fast=False)
    torch.testing.assert_close(fast_loss, native_loss, rtol=1e-12, atol=0)
    assert fast.keys() == native.keys()
    top = max(g.abs().max().item() for g in native.values())
    for param, grad in native.items():  # biases whose true gradient is 0 carry ~1e-15 * top of rounding
        torch.testing.assert_close(fast[param], grad, rtol=1e-9, atol=1e-12 * top, msg=lambda m: f"{param}: {m}")
