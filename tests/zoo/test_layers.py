"""Layer discovery and one-pass extraction, checked against hand-run forward passes."""
import pytest
import timm
import torch
from torch import nn

from harmonizer_fast.zoo.layers import LayerExtractor, discover_layers, top_level_blocks


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False).eval()


class TinyNet(nn.Module):
    """torchvision-style layout: a feature Sequential, a parameter-free pool, a Linear classifier."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(6, 5)

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))


def _manual_resnet_stages(model, x):
    with torch.no_grad():
        stem = model.act1(model.bn1(model.conv1(x)))
        l1 = model.layer1(model.maxpool(stem))
        l2 = model.layer2(l1)
        l3 = model.layer3(l2)
        l4 = model.layer4(l3)
    return {"act1": stem, "layer1": l1, "layer2": l2, "layer3": l3, "layer4": l4}


def test_timm_layers_come_from_feature_info(resnet):
    assert discover_layers(resnet) == ["act1", "layer1", "layer2", "layer3", "layer4"]


def test_forward_intermediates_outputs_match_manual_stages(resnet):
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    extractor = LayerExtractor(resnet)
    assert extractor.method == "forward_intermediates"
    got = extractor(x)
    expected = _manual_resnet_stages(resnet, x)
    assert list(got) == list(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_selection_in_any_order_keeps_the_requested_order(resnet):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    got = LayerExtractor(resnet, ["layer3", "act1"])(x)
    expected = _manual_resnet_stages(resnet, x)
    assert list(got) == ["layer3", "act1"]
    torch.testing.assert_close(got["layer3"], expected["layer3"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["act1"], expected["act1"], rtol=1e-5, atol=1e-6)


def test_layers_outside_the_pyramid_use_hooks_in_one_pass(resnet):
    calls = []
    handle = resnet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        extractor = LayerExtractor(resnet, ["layer1.0", "layer2", "fc"])
        assert extractor.method == "hooks"
        got = extractor(x)
    finally:
        handle.remove()
    assert len(calls) == 1
    expected = _manual_resnet_stages(resnet, x)
    torch.testing.assert_close(got["layer2"], expected["layer2"], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(got["fc"], resnet(x), rtol=1e-5, atol=1e-6)
        first_block = resnet.layer1[0](resnet.maxpool(expected["act1"]))
    torch.testing.assert_close(got["layer1.0"], first_block, rtol=1e-5, atol=1e-6)


def test_plain_module_uses_top_level_blocks_and_skips_the_classifier():
    torch.manual_seed(0)
    net = TinyNet().eval()
    # ReLUs have no parameters, the pool and flatten neither; the final Linear is the classifier.
    assert top_level_blocks(net) == ["features.0", "features.2"]
    assert discover_layers(net) == ["features.0", "features.2"]
    x = torch.randn(3, 3, 9, 9, generator=torch.Generator().manual_seed(4))
    got = LayerExtractor(net)(x)
    with torch.no_grad():
        conv0 = net.features[0](x)
        conv2 = net.features[2](net.features[1](conv0))
    torch.testing.assert_close(got["features.0"], conv0)
    torch.testing.assert_close(got["features.2"], conv2)


def test_vit_tokens_come_back_as_maps():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()
    extractor = LayerExtractor(vit)
    assert extractor.layers == ["blocks.0", "blocks.1"]
    out = extractor(torch.randn(1, 3, 32, 32))
    assert out["blocks.1"].shape == (1, 192, 2, 2)


def test_bad_arguments_name_the_problem(resnet):
    with pytest.raises(ValueError, match="unknown modules"):
        LayerExtractor(resnet, ["layer9"])
    with pytest.raises(ValueError, match="empty"):
        LayerExtractor(resnet, [])
    with pytest.raises(ValueError, match="duplicates"):
        LayerExtractor(resnet, ["layer1", "layer1"])
    with pytest.raises(TypeError, match="nn.Module"):
        discover_layers("resnet18")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        LayerExtractor(resnet)(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="no candidate layers"):
        discover_layers(nn.ReLU())


def test_pyramid_labels_that_are_no_module_are_read_by_position():
    # timm's Twins names its stages `block.0`.. in feature_info; the modules are `blocks.0`..
    torch.manual_seed(0)
    twins = timm.create_model("twins_svt_small", pretrained=False, img_size=64, depths=(1, 1, 1, 1)).eval()
    assert discover_layers(twins) == ["block.0", "block.1", "block.2", "block.3"]
    x = torch.randn(2, 3, 64, 64)
    got = LayerExtractor(twins)(x)
    with torch.no_grad():
        expected = twins.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
    for label, want in zip(["block.0", "block.1", "block.2", "block.3"], expected):
        torch.testing.assert_close(got[label], want)
    mixed = LayerExtractor(twins, ["block.2", "patch_embeds.0"])  # a pyramid label and a hooked module
    out = mixed(x)
    torch.testing.assert_close(out["block.2"], expected[2])
    assert out["patch_embeds.0"].shape[0] == 2


def test_pyramid_entries_sharing_a_module_get_unique_labels():
    # CoaT's feature_info names `parallel_blocks` three times (three outputs of one module list)
    torch.manual_seed(0)
    coat = timm.create_model("coat_tiny", pretrained=False, img_size=64).eval()
    labels = discover_layers(coat)
    assert labels == ["serial_blocks1", "parallel_blocks#1", "parallel_blocks#2", "parallel_blocks#3"]
    out = LayerExtractor(coat, labels[2:])(torch.randn(2, 3, 64, 64))
    assert [v.shape[-1] for v in out.values()] == [4, 2]  # strides 16 and 32 at 64 px
