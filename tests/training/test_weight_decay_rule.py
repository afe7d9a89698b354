"""The weight-decay rule: which parameters are decayed (module types, not only names), on the
TensorFlow fixture's network, user-defined norms and a timm ViT."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from _loss_testing import assert_matches
from _reference_net import KERAS_NAMES, build_net, reference  # noqa: F401  (reference: a pytest fixture)
from harmonizer_fast.training import decayed_parameters, is_weight_decayed, weight_decay_loss


def test_weight_decay_rule_on_the_reference_net(reference):
    net = build_net(reference)
    assert [name for name, _ in decayed_parameters(net)] == [
        "conv.weight", "conv.bias", "conv2.weight", "conv2.bias", "dense.weight", "dense.bias"]
    expected = sum(float((reference[f"var/{k}:0"].astype(np.float64) ** 2).sum()) / 2
                   for k in KERAS_NAMES if not k.startswith("bn/"))
    assert_matches(weight_decay_loss(net), expected)


class ScaleNorm(nn.Module):
    """A user-defined normalization layer: excluded by its class name."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.gain


def test_weight_decay_rule_uses_module_types_not_only_names():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), ScaleNorm(), nn.Flatten(),
        nn.Linear(4, 5), nn.LayerNorm(5),
    )
    model.add_module("lookup", nn.Embedding(3, 5))
    frozen = nn.Linear(5, 5)
    frozen.weight.requires_grad_(False)
    model.add_module("frozen", frozen)
    decayed = [name for name, _ in decayed_parameters(model)]
    # "1" (BatchNorm2d), "2" (GroupNorm), "3" (ScaleNorm), "6" (LayerNorm), "lookup" have no
    # norm/bn/embed in their names: only their module type excludes them.
    assert decayed == ["0.weight", "0.bias", "5.weight", "5.bias", "frozen.bias"]
    assert not is_weight_decayed("features.1.weight", nn.BatchNorm2d(4))
    assert is_weight_decayed("features.0.bias", nn.Conv2d(1, 1, 1))
    assert not is_weight_decayed("blocks.0.norm1.weight", None)
    # Batch-norm names count as whole components (Keras matched the scope "bn/"), not substrings.
    for name in ("bn.weight", "layer1.0.bn2.bias", "conv1_bn.weight", "bn_act.bias"):
        assert not is_weight_decayed(name, None), name
    for name in ("subnet.fc.weight", "fbnet.conv.bias"):
        assert is_weight_decayed(name, nn.Linear(1, 1)), name


def test_weight_decay_rule_on_a_timm_vit():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=16)
    decayed = {name for name, _ in decayed_parameters(vit)}
    all_names = {name for name, _ in vit.named_parameters()}
    excluded = all_names - decayed
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"} <= excluded
    assert all("norm" in name or "embed" in name or name == "cls_token" for name in excluded)
    # Attention, MLP and head weights and biases are decayed.
    assert {"blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.mlp.fc1.weight",
            "head.weight", "head.bias"} <= decayed
    assert not any("norm" in name for name in decayed)
