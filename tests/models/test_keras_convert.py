"""The reference's Keras models converted to timm give the Keras logits.

Fixtures (``tests/fixtures/keras``) were written by the real Keras libraries
(``scripts/keras_fixtures/make_fixtures.py``): shrunk architectures with random weights (random
BatchNorm statistics too), saved as the published files are, with the Keras logits of a fixed
batch. TensorFlow is not needed here.
"""
import json
import os
import shutil
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch

from harmonizer_fast import cli, models
from harmonizer_fast.models import create_model, load_weights, model_preprocess
from harmonizer_fast.models.keras_convert import (
    CONVERTER_VERSION,
    KERAS_ARCHITECTURES,
    convert_keras_file,
    keras_architecture,
)
from harmonizer_fast.models.resnetv2_keras import KerasResNetV2

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "keras"
TOLERANCE = 1e-4  # max |logit diff|, float32
# where the reference reads a whole saved model, the fixture is that file (with Adam state for ResNet50)
H5_FILE = {name: f"{name}.h5" for name in KERAS_ARCHITECTURES}
H5_FILE["ResNet50"] = "ResNet50_optimizer.h5"


def fixture(name: str):
    data = np.load(FIXTURES / f"{name}.npz")
    return data["images"], data["logits"], json.loads(str(data["config"]))


def shrunk_model_kwargs(name: str, cfg: dict) -> dict:
    """timm arguments of the twin that match a shrunk Keras fixture (timm-constructible ones)."""
    if name == "ViT_B16":
        return dict(img_size=cfg["image_size"], patch_size=cfg["patch_size"], depth=cfg["num_layers"],
                    embed_dim=cfg["hidden_size"], num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_dim"] / cfg["hidden_size"])
    if name == "ResNet50":
        return dict(layers=cfg["blocks"], widths=cfg["widths"])
    if name == "tiny_ConvNeXT":
        return dict(depths=cfg["num_blocks"], dims=cfg["out_channels"])
    if name == "LeViT_small":
        return dict(img_size=cfg["image_size"], embed_dim=tuple([cfg["patch_channel"]] + cfg["out_channels"][:2]),
                    num_heads=tuple(cfg["num_heads"]), depth=tuple(cfg["depthes"]), key_dim=cfg["key_dims"][0])
    raise KeyError(name)


def shrunk_model(name: str, cfg: dict) -> torch.nn.Module:
    """The PyTorch twin, narrowed like the Keras fixture."""
    if name == "VGG16":  # timm's VGG takes its layer list and a hidden-width ratio
        from timm.models.vgg import VGG

        layers = []
        for width, convs in zip(cfg["widths"], [2, 2, 3, 3, 3]):
            layers += [width] * convs + ["M"]
        return VGG(layers, num_classes=cfg["classes"], mlp_ratio=cfg["fc1"] / cfg["fc2"])
    if name == "EfficientNetB0":  # the B0 stages with fewer repeats, narrower
        from timm.models._efficientnet_builder import BN_EPS_TF_DEFAULT, decode_arch_def, round_channels
        from timm.models.efficientnet import EfficientNet

        stages = ["ds_r{}_k3_s1_e1_c16_se0.25", "ir_r{}_k3_s2_e6_c24_se0.25", "ir_r{}_k5_s2_e6_c40_se0.25",
                  "ir_r{}_k3_s2_e6_c80_se0.25", "ir_r{}_k5_s1_e6_c112_se0.25", "ir_r{}_k5_s2_e6_c192_se0.25",
                  "ir_r{}_k3_s1_e6_c320_se0.25"]
        round_chs = partial(round_channels, multiplier=cfg["width"], divisor=8)
        return EfficientNet(block_args=decode_arch_def([[s.format(r)] for s, r in zip(stages, cfg["repeats"])]),
                            num_features=round_chs(1280), stem_size=32, round_chs_fn=round_chs, act_layer=torch.nn.SiLU,
                            norm_layer=partial(torch.nn.BatchNorm2d, eps=BN_EPS_TF_DEFAULT), pad_type="same",
                            num_classes=cfg["classes"])
    if name == "tiny_MaxViT":  # maxvit_tiny_tf_224's TF settings, narrower
        from dataclasses import replace

        from timm.models.maxxvit import MaxxVit, MaxxVitCfg, _tf_cfg

        tf_cfg = _tf_cfg()
        model_cfg = MaxxVitCfg(embed_dim=tuple(cfg["out_channels"]), depths=tuple(cfg["num_blocks"]), block_type=("M",) * 4,
                               stem_width=cfg["stem_width"], stem_bias=True, head_hidden_size=cfg["out_channels"][-1],
                               conv_cfg=tf_cfg["conv_cfg"],
                               transformer_cfg=replace(tf_cfg["transformer_cfg"], dim_head=cfg["head_dimension"]))
        return MaxxVit(model_cfg, img_size=cfg["image_size"], num_classes=cfg["classes"])
    arch = KERAS_ARCHITECTURES[name].timm_name
    return timm.create_model(arch, num_classes=cfg["classes"], **shrunk_model_kwargs(name, cfg))


def torch_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        return model(models.preprocess_input(x)).numpy()


@pytest.mark.parametrize("name", sorted(KERAS_ARCHITECTURES))
def test_converted_model_gives_the_keras_logits(name):
    images, logits, cfg = fixture(name)
    model = convert_keras_file(FIXTURES / H5_FILE[name], shrunk_model(name, cfg), name).eval()
    out = torch_logits(model, images)
    assert out.shape == logits.shape
    assert np.abs(logits).max() > 0.1  # non-trivial logits
    assert np.abs(out - logits).max() <= TOLERANCE, (name, np.abs(out - logits).max())


def test_both_file_layouts_and_optimizer_state_give_the_same_weights():
    from harmonizer_fast.models.keras_h5 import read_keras_h5

    weights_only = read_keras_h5(FIXTURES / "ViT_B16.h5")
    whole_model = read_keras_h5(FIXTURES / "ViT_B16_model.h5")
    with_optimizer = read_keras_h5(FIXTURES / "ResNet50_optimizer.h5")
    assert (weights_only.layout, whole_model.layout, with_optimizer.layout) == ("weights", "model", "model")
    assert with_optimizer.has_optimizer_state and not whole_model.has_optimizer_state
    assert whole_model.model_config is not None and weights_only.model_config is None
    images, logits, cfg = fixture("ViT_B16")
    for path in ("ViT_B16.h5", "ViT_B16_model.h5"):
        model = convert_keras_file(FIXTURES / path, shrunk_model("ViT_B16", cfg), "ViT_B16").eval()
        assert np.abs(torch_logits(model, images) - logits).max() <= TOLERANCE, path


def test_loader_converts_an_h5_file_on_the_fly_with_the_reference_preprocessing():
    images, logits, cfg = fixture("ResNet50")
    model = models.load_ResNet50(weights=FIXTURES / H5_FILE["ResNet50"], num_classes=cfg["classes"],
                                 **shrunk_model_kwargs("ResNet50", cfg))
    assert isinstance(model, KerasResNetV2) and not model.training
    assert model.pretrained_cfg["mean"] == models.IMAGENET_MEAN and model.pretrained_cfg["std"] == models.IMAGENET_STD
    x = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = model(model_preprocess(model)(x)).numpy()
    assert np.abs(out - logits).max() <= TOLERANCE


@pytest.mark.parametrize("name", sorted(KERAS_ARCHITECTURES))
def test_twins_carry_the_reference_preprocessing(name):
    arch = models.MODEL_REGISTRY[name]
    assert arch == KERAS_ARCHITECTURES[name].timm_name and timm.is_model(arch)
    cfg = timm.models.get_pretrained_cfg(arch)
    assert (tuple(cfg.mean), tuple(cfg.std)) == (models.IMAGENET_MEAN, models.IMAGENET_STD)
    with pytest.raises(ValueError, match="no downloadable weights"):
        timm.create_model(arch, pretrained=True)


def test_full_size_twins_are_the_reference_architectures():
    levit = timm.create_model("levit_128_keras")
    assert type(levit).__name__ == "Levit"  # no distillation head
    effnet = timm.create_model("tf_efficientnet_b0_keras")
    assert effnet.bn1.eps == pytest.approx(1e-3)  # TensorFlow's BatchNorm epsilon ('same' padding: tf_ variant)
    assert sum(p.numel() for p in timm.create_model("resnet50v2_keras").parameters()) == 25_568_360  # Keras trainable


def test_maxvit_relative_position_table_needs_the_flip():
    """Without the flip on both axes the logits move by far more than the tolerance."""
    images, logits, cfg = fixture("tiny_MaxViT")
    model = convert_keras_file(FIXTURES / "tiny_MaxViT.h5", shrunk_model("tiny_MaxViT", cfg), "tiny_MaxViT").eval()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith("relative_position_bias_table"):
                value.copy_(value.flip(-1, -2))
    assert np.abs(torch_logits(model, images) - logits).max() > 10 * TOLERANCE


def test_file_of_another_architecture_names_the_file_and_first_layer():
    _, _, cfg = fixture("ViT_B16")
    path = FIXTURES / "tiny_ConvNeXT.h5"
    with pytest.raises(ValueError, match=r"tiny_ConvNeXT\.h5.*layer #0 'stem_conv'"):
        convert_keras_file(path, shrunk_model("ViT_B16", cfg), "ViT_B16")


def test_wider_or_deeper_model_than_the_file_is_rejected():
    _, _, cfg = fixture("ResNet50")
    deeper = KerasResNetV2(layers=[2, 2, 3, 3], widths=cfg["widths"], num_classes=cfg["classes"])
    with pytest.raises(ValueError, match="ResNet50_optimizer.h5.*(file ends|does not fit)"):
        convert_keras_file(FIXTURES / H5_FILE["ResNet50"], deeper, "ResNet50")
    shallower = KerasResNetV2(layers=[2, 2, 2, 2], widths=cfg["widths"], num_classes=cfg["classes"])
    with pytest.raises(ValueError, match="ResNet50_optimizer.h5"):
        convert_keras_file(FIXTURES / H5_FILE["ResNet50"], shallower, "ResNet50")
    wider = KerasResNetV2(layers=cfg["blocks"], widths=[16, 16, 16, 32], num_classes=cfg["classes"])
    with pytest.raises(ValueError, match=r"layer #1 'conv2_block1_preact_bn'|layer #2 'conv2_block1_1_conv'"):
        convert_keras_file(FIXTURES / H5_FILE["ResNet50"], wider, "ResNet50")


def test_left_over_file_layers_are_rejected(tmp_path):
    """A file with one layer more than the model (every tensor must be used)."""
    images, _, cfg = fixture("tiny_ConvNeXT")
    path = tmp_path / "extra.h5"
    shutil.copy(FIXTURES / "tiny_ConvNeXT.h5", path)
    with h5py.File(path, "r+") as handle:
        handle.copy(handle["predictions"], "extra_dense")
        names = [n.encode() if isinstance(n, str) else n for n in handle.attrs["layer_names"]]
        handle.attrs["layer_names"] = np.array(names + [b"extra_dense"])
        handle["extra_dense"].attrs["weight_names"] = [b"predictions/kernel:0", b"predictions/bias:0"]
    with pytest.raises(ValueError, match="'extra_dense'.*more layers"):
        convert_keras_file(path, shrunk_model("tiny_ConvNeXT", cfg), "tiny_ConvNeXT")


def test_truncated_and_unknown_files_raise_value_errors(tmp_path):
    truncated = tmp_path / "truncated.h5"
    data = (FIXTURES / "tiny_ConvNeXT.h5").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    _, _, cfg = fixture("tiny_ConvNeXT")
    with pytest.raises(ValueError, match="truncated.h5"):
        convert_keras_file(truncated, shrunk_model("tiny_ConvNeXT", cfg), "tiny_ConvNeXT")
    unknown = tmp_path / "unknown.h5"
    with h5py.File(unknown, "w") as handle:
        handle["something"] = np.zeros(3)
    with pytest.raises(ValueError, match="unknown.h5.*unknown layout"):
        convert_keras_file(unknown, shrunk_model("tiny_ConvNeXT", cfg), "tiny_ConvNeXT")
    not_h5 = tmp_path / "not.h5"
    not_h5.write_text("hello")
    with pytest.raises(ValueError, match="not a readable HDF5"):
        convert_keras_file(not_h5, shrunk_model("tiny_ConvNeXT", cfg), "tiny_ConvNeXT")
    with pytest.raises(FileNotFoundError):
        convert_keras_file(tmp_path / "missing.h5", shrunk_model("tiny_ConvNeXT", cfg), "tiny_ConvNeXT")
    with pytest.raises(ValueError, match="`name` must be one of"):
        keras_architecture("ResNet18")


def test_convert_keras_command_writes_weights_that_load_with_load_weights(tmp_path):
    images, logits, cfg = fixture("ResNet50")
    kwargs = shrunk_model_kwargs("ResNet50", cfg)
    out = tmp_path / "resnet.safetensors"
    argv = ["convert-keras", "ResNet50", str(FIXTURES / H5_FILE["ResNet50"]), str(out),
            "--num-classes", str(cfg["classes"]), "--model-kwargs", json.dumps(kwargs)]
    assert cli.main(argv) == 0
    from safetensors import safe_open

    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
    from harmonizer_fast.models.convert_cli import file_sha256

    assert metadata["source_sha256"] == file_sha256(FIXTURES / H5_FILE["ResNet50"])
    assert metadata["converter_version"] == CONVERTER_VERSION and metadata["timm_name"] == "resnet50v2_keras"
    # what --weights of train, eval-clickme and sweep do: create_model(NAME, weights=...) -> load_weights
    model = create_model("ResNet50", weights=out, num_classes=cfg["classes"], **kwargs).eval()
    x = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        assert np.abs(model(model_preprocess(model)(x)).numpy() - logits).max() <= TOLERANCE
    load_weights(KerasResNetV2(layers=cfg["blocks"], widths=cfg["widths"], num_classes=cfg["classes"]), out)
    # the CLI reports these as one-line errors (SystemExit with the message), not tracebacks
    with pytest.raises(SystemExit, match="FileExistsError: .*--overwrite"):
        cli.main(argv)
    assert cli.main(argv + ["--overwrite"]) == 0
    with pytest.raises(SystemExit, match="ValueError: .*JSON object"):
        cli.main(argv[:-2] + ["--model-kwargs", "[1]", "--overwrite"])


def test_an_interrupted_conversion_leaves_no_partial_output(tmp_path, monkeypatch):
    import harmonizer_fast._io as io_module

    _, _, cfg = fixture("tiny_ConvNeXT")
    out = tmp_path / "w" / "convnext.safetensors"
    argv = ["convert-keras", "tiny_ConvNeXT", str(FIXTURES / H5_FILE["tiny_ConvNeXT"]), str(out),
            "--num-classes", str(cfg["classes"]), "--model-kwargs", json.dumps(shrunk_model_kwargs("tiny_ConvNeXT", cfg))]

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io_module.os, "replace", disk_full)
    monkeypatch.setenv("HARMONIZER_FAST_TRACEBACK", "1")
    with pytest.raises(OSError, match="No space left"):
        cli.main(argv)
    assert not out.exists() and os.listdir(out.parent) == []  # no partial file, no temporary
    monkeypatch.undo()
    assert cli.main(argv) == 0  # and nothing blocks the rerun
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
