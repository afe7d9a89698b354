"""timm's pretrained weights from a local Hugging Face cache (never downloaded), local timm-format
files through timm's own loader, and preprocessing from each model's data config."""
import os

import pytest
import timm
import torch

from harmonizer_fast.models import create_model
from harmonizer_fast.models.pretrained import (
    WeightsNotAvailableError,
    check_pretrained_available,
    pretrained_source,
    pretrained_tag_name,
    stimulus_transform,
)

NAME = "test_resnet.r160_in1k"  # timm's tiny test model with published weights (hf-hub)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_hf_cache(cache, repo, state):
    """A Hugging Face hub cache holding ``model.safetensors`` of ``repo`` (huggingface_hub's layout:
    models--org--name/{refs/main, snapshots/<commit>/file, blobs/<hash>})."""
    from safetensors.torch import save_file

    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    (folder / "blobs").mkdir()
    blob = folder / "blobs" / "a1b2c3"
    save_file({k: v.contiguous() for k, v in state.items()}, str(blob))
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    os.symlink(os.path.relpath(blob, snapshot), snapshot / "model.safetensors")


def test_pretrained_tag_is_read_from_the_local_cache_offline(tmp_path, offline):
    torch.manual_seed(3)
    source = timm.create_model("test_resnet", pretrained=False)
    write_hf_cache(tmp_path, "timm/" + NAME, source.state_dict())
    check_pretrained_available(NAME, cache_dir=tmp_path)
    model = create_model(NAME, pretrained=True, cache_dir=tmp_path)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # The tag's pretrained config came with the weights: 160-pixel input, its mean/std.
    assert model.pretrained_cfg["tag"] == "r160_in1k" and model.pretrained_cfg["input_size"] == (3, 160, 160)


def test_offline_and_not_cached_names_the_model_and_how_to_get_it(tmp_path, offline):
    with pytest.raises(WeightsNotAvailableError, match=r"test_resnet\.r160_in1k.*hf download timm/test_resnet"):
        create_model(NAME, pretrained=True, cache_dir=tmp_path)
    with pytest.raises(WeightsNotAvailableError, match="HF_HUB_OFFLINE"):
        check_pretrained_available("resnet50.a1_in1k", cache_dir=tmp_path)


def test_unknown_names_and_tags_are_refused():
    assert pretrained_source(NAME) == ("hf-hub", "timm/" + NAME)
    assert pretrained_tag_name("test_resnet") == NAME  # the default tag
    with pytest.raises(ValueError, match="no pretrained weights 'resnet50.nope'"):
        pretrained_source("resnet50.nope")
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet50.nope", pretrained=True)
    with pytest.raises(ValueError, match="not both"):
        create_model("resnet18", pretrained=True, weights="w.pt")


@pytest.mark.parametrize("fmt", ["safetensors", "state_dict", "checkpoint"])
def test_local_file_goes_through_timm_with_the_pretrained_config(tmp_path, fmt):
    from safetensors.torch import save_file

    torch.manual_seed(4)
    source = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt")
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    elif fmt == "state_dict":
        torch.save(source.state_dict(), path)
    else:  # a training checkpoint with the weights under "model"
        torch.save({"model": source.state_dict(), "step": 7}, path)
    model = create_model(NAME, weights=path)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.pretrained_cfg["file"] == str(path) and model.pretrained_cfg["input_size"] == (3, 160, 160)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        create_model(NAME, weights=tmp_path / "missing.pt")


def test_stimulus_transform_follows_the_data_config():
    model = timm.create_model("test_resnet", pretrained=False)  # 160 px, bilinear, mean = std = 0.5
    images = torch.randint(0, 256, (2, 3, 40, 50), dtype=torch.uint8)
    x = stimulus_transform(model)(images)
    expected = torch.nn.functional.interpolate(images.float(), size=(160, 160), mode="bilinear",
                                               align_corners=False, antialias=True) / 255
    torch.testing.assert_close(x, (expected - 0.5) / 0.5)
    vit = timm.create_model("test_vit", pretrained=False)
    cfg = vit.pretrained_cfg
    y = stimulus_transform(vit, image_size=24)(images)
    assert y.shape == (2, 3, 24, 24)
    bicubic = torch.nn.functional.interpolate(images.float(), size=(24, 24), mode=cfg["interpolation"],
                                              align_corners=False, antialias=True).clamp(0, 255) / 255
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(y, (bicubic - mean) / std)
    with pytest.raises(ValueError, match="image_size"):
        stimulus_transform(model, image_size=0)
