"""weight_decay_loss (a closed-form autograd Function) equals autograd of sum(p ** 2) / 2."""
import pytest
import torch
import torch.nn as nn

from harmonizer_fast.training.weight_decay import decayed_parameters, weight_decay_loss


def _net(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    return net.to(dtype)


def _autograd_decay(net):
    return sum(p.square().sum() / 2 for _, p in decayed_parameters(net))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_value_and_gradient_equal_autograd(dtype):
    net = _net(dtype)
    params = [p for _, p in decayed_parameters(net)]
    assert len(params) == 4  # the batch norm's weight and bias are not decayed
    value = weight_decay_loss(net)
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert value.grad_fn.name().startswith("_HalfSquaredNorm")
    expected = _autograd_decay(net)
    torch.testing.assert_close(value.double(), expected.double(), rtol=1e-7 if dtype == torch.float32 else 1e-12, atol=0)
    upstream = torch.tensor(0.37)
    grads = torch.autograd.grad(value, params, upstream)
    want = torch.autograd.grad(expected, params, upstream.to(dtype))
    for g, w in zip(grads, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g, w, rtol=1e-15 if dtype == torch.float64 else 1e-6, atol=0)
    # only the parameters that require a gradient receive one
    params[0].requires_grad_(False)
    value = weight_decay_loss(net)
    assert len(torch.autograd.grad(value, params[1:])) == 3


def test_low_precision_parameters_accumulate_in_float32():
    net = _net(torch.bfloat16)
    value = weight_decay_loss(net)
    expected = sum(p.float().square().sum() / 2 for _, p in decayed_parameters(net))
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=0)
    value.backward()
    assert all(p.grad.dtype == torch.bfloat16 for _, p in decayed_parameters(net))


def test_no_decayed_parameter_gives_zero():
    assert weight_decay_loss(nn.LayerNorm(3)).item() == 0.0


def test_mixed_dtype_parameters_each_get_their_own_gradient():
    # the backward multiplies each dtype's parameters in one multi-tensor call
    net = _net(torch.float32)
    net[3].double()
    value = weight_decay_loss(net)
    assert value.dtype == torch.float64
    upstream = torch.tensor(0.5, dtype=torch.float64)
    params = [p for _, p in decayed_parameters(net)]
    for p, g in zip(params, torch.autograd.grad(value, params, upstream)):
        assert g.dtype == p.dtype
        torch.testing.assert_close(g, p.detach() * 0.5, rtol=0, atol=0)
