"""End to end on small timm MaxViT and LeViT models (random weights, 32 px): the Trainer's fast
double backward gives the parameter gradients of native autograd in float64, and its attention,
softmax, GELU and normalization routes are the ones that ran (so a silent fallback fails)."""
import pytest
import torch
import torch.nn.functional as F

from tests.training._routes import count_route_calls, harmonizer_gradients

timm = pytest.importorskip("timm")
from timm.models.levit import Levit  # noqa: E402
from timm.models.maxxvit import MaxxVit, MaxxVitCfg, MaxxVitTransformerCfg  # noqa: E402


def _maxvit(fused_attn: bool) -> torch.nn.Module:
    """Two MaxViT stages (MBConv + window and grid attention with relative-position biases)."""
    cfg = MaxxVitCfg(embed_dim=(16, 32), depths=(1, 1), block_type=("M", "M"), stem_width=16,
                     transformer_cfg=MaxxVitTransformerCfg(dim_head=8, window_size=(2, 2), grid_size=(2, 2)))
    model = MaxxVit(cfg, img_size=32, num_classes=10)
    switched = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert switched  # AttentionCl reads timm's fused_attn flag
    for module in switched:
        module.fused_attn = fused_attn
    return model


def _levit() -> torch.nn.Module:
    """Two LeViT stages (attention with learned biases, attention downsampling, BatchNorm1d)."""
    return Levit(img_size=32, embed_dim=(16, 24), key_dim=4, depth=(1, 1), num_heads=(2, 2), num_classes=10)


MODELS = {
    "maxvit, fused attention (SDPA route)": (lambda: _maxvit(True), {"attention", "gelu", "layer_norm", "batch_norm"}),
    "maxvit, unfused attention (softmax route)": (lambda: _maxvit(False), {"softmax", "gelu", "layer_norm", "batch_norm"}),
    "levit": (_levit, {"softmax", "batch_norm"}),
}


@pytest.fixture
def route_calls(monkeypatch):
    """Counts the calls of each closed-form Function the mode routes to."""
    return count_route_calls(monkeypatch)


@pytest.mark.parametrize("name", list(MODELS))
def test_small_transformer_matches_native_gradients(name, route_calls):
    make, expected_routes = MODELS[name]
    torch.manual_seed(0)
    model = make().double().train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    heatmaps = torch.rand(2, 32, 32, generator=gen, dtype=torch.float64)
    labels = F.one_hot(torch.tensor([1, 7]), 10).double()
    tokens = torch.tensor([1.0, 0.5], dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = lambda fast: harmonizer_gradients(model, state, (x, tokens, labels, heatmaps), fast)

    native_loss, native = grads(False)
    assert not route_calls
    fast_loss, fast = grads(True)
    used = {route for route, count in route_calls.items() if count}
    assert expected_routes <= used, f"routes that ran: {dict(route_calls)}"
    torch.testing.assert_close(fast_loss, native_loss, rtol=1e-12, atol=0)
    assert fast.keys() == native.keys()
    for param, grad in native.items():
        torch.testing.assert_close(fast[param], grad, rtol=1e-8, atol=1e-11, msg=lambda m: f"{param}: {m}")
    # the harmonization term reached the attention parameters (a second-order gradient)
    assert any("attn" in param and fast[param].abs().sum() > 0 for param in fast)
