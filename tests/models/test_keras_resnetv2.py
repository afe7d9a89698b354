"""The Keras ResNet50V2 twin as a timm model: create_model, forward_intermediates, the sweep's layer reader."""
import pytest
import timm
import torch

import harmonizer_fast.models  # noqa: F401  (registers resnet50v2_keras)
from harmonizer_fast.models.resnetv2_keras import KerasResNetV2
from harmonizer_fast.zoo.layers import LayerExtractor, discover_layers


def small_model() -> KerasResNetV2:
    torch.manual_seed(0)
    model = timm.create_model("resnet50v2_keras", layers=(2, 2, 3, 2), widths=(4, 8, 8, 16), num_classes=5).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model


def test_forward_intermediates_are_the_stem_and_the_stack_outputs():
    model = small_model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        assert [tuple(f.shape[1:]) for f in feats] == [(64, 32, 32), (16, 8, 8), (32, 4, 4), (32, 2, 2), (64, 2, 2)]
        assert [info["reduction"] for info in model.feature_info] == [2, 8, 16, 32, 32]
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(model.forward_head(final), model(x))
        only = model.forward_intermediates(x, indices=[1, 4], intermediates_only=True, norm=True)
        torch.testing.assert_close(only[0], feats[1])
        torch.testing.assert_close(only[1], model.norm(feats[4]))
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_sweep_layer_reader_uses_forward_intermediates_and_matches_hooks():
    model = small_model()
    names = discover_layers(model)
    assert names == ["conv1", "stages.0", "stages.1", "stages.2", "stages.3"]
    x = torch.randn(1, 3, 64, 64)
    extractor = LayerExtractor(model)
    assert extractor.method == "forward_intermediates"
    fast = extractor(x)
    hooked = {}
    handles = [dict(model.named_modules())[n].register_forward_hook(
        lambda _m, _i, out, n=n: hooked.__setitem__(n, out)) for n in names]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    for name in names:
        torch.testing.assert_close(fast[name], hooked[name])


def test_invalid_architecture_arguments_are_rejected():
    with pytest.raises(ValueError, match="at least 2 blocks"):
        KerasResNetV2(layers=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="same non-zero length"):
        KerasResNetV2(layers=(2, 2), widths=(8,))
