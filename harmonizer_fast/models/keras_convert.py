"""Strict converters from the reference's Keras models (``.h5``) to their PyTorch twins.

One converter per architecture of :data:`KERAS_ARCHITECTURES`. Each walks the file's
weight-holding layers **in file order** (Keras 2 ``load_weights`` pairs layers by position, not
by name) and the PyTorch module in the same order, and checks as it goes:

- every tensor of the file is used exactly once (a left-over layer or tensor is an error);
- every parameter and persistent buffer of the PyTorch model is written exactly once
  (``num_batches_tracked`` of each BatchNorm is set to 0: Keras has no such counter);
- every shape matches after the layout change.

A file of another architecture, a truncated file or an unknown layout raises ``ValueError``
naming the file and the first layer that does not fit.

The layer-by-layer mapping and its layout changes are in :mod:`harmonizer_fast.models.keras_mapping`.

The PyTorch twins (timm names, registered on import of this module with the reference's
preprocessing ``x / 255`` then ImageNet mean/std in their ``pretrained_cfg``) are in
:data:`KERAS_ARCHITECTURES`. The PyTorch models return logits; a Keras head with a softmax
(VGG16, ResNet50V2, EfficientNetB0 as ``keras.applications`` builds them) is compared before it.
"""
from __future__ import annotations

from typing import Callable, Dict

import timm
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from harmonizer_fast.models import resnetv2_keras  # noqa: F401  (registers resnet50v2_keras with timm)
from harmonizer_fast.models.keras_h5 import KerasWeights, PathLike, read_keras_h5
from harmonizer_fast.models.keras_mapping import (  # the per-architecture mapping rules
    KerasWalker,
    convert_convnext,
    convert_efficientnet,
    convert_levit,
    convert_maxvit,
    convert_resnet50v2,
    convert_vgg,
    convert_vit,
)
from harmonizer_fast.spec import IMAGENET_MEAN, IMAGENET_STD

#: Version written into converted files' metadata; bump when a mapping rule changes.
CONVERTER_VERSION = "1"

__all__ = [
    "CONVERTER_VERSION", "KERAS_ARCHITECTURES", "KerasArchitecture", "convert_keras_file", "convert_keras_weights",
    "keras_architecture", "keras_to_timm",
]


# ------------------------------------------------------------------------------------------------
# Registry: reference name -> (timm twin, converter, how the reference reads the file).
# ------------------------------------------------------------------------------------------------

class KerasArchitecture:
    """A reference model: its timm twin and the converter of its Keras file.

    Attributes:
        reference: the reference's name (``load_<reference>``).
        timm_name: the registered timm architecture (ImageNet mean/std in its pretrained config).
        base: the timm architecture the twin builds, with ``base_kwargs``.
        keras_source: how the reference builds and reads the Keras model.
        convert: fills a model of ``timm_name`` (or a narrower one) from a :class:`KerasWeights`.
    """

    def __init__(self, reference: str, timm_name: str, base: str, base_kwargs: dict, keras_source: str,
                 convert: Callable[[KerasWalker, nn.Module], None]) -> None:
        self.reference, self.timm_name, self.base = reference, timm_name, base
        self.base_kwargs, self.keras_source, self.convert = base_kwargs, keras_source, convert


KERAS_ARCHITECTURES: Dict[str, KerasArchitecture] = {a.reference: a for a in [
    KerasArchitecture("ViT_B16", "vit_base_patch16_224_keras", "vit_base_patch16_224", {},
                      "vit_keras.vit.vit_b16(image_size=224, activation='linear', pretrained=False, "
                      "include_top=True, pretrained_top=False) + load_weights", convert_vit),
    KerasArchitecture("VGG16", "vgg16_keras", "vgg16", {}, "tf.keras.models.load_model (keras.applications.VGG16)",
                      convert_vgg),
    KerasArchitecture("ResNet50", "resnet50v2_keras", "resnet50v2_keras", {},
                      "tf.keras.models.load_model (keras.applications.ResNet50V2)", convert_resnet50v2),
    KerasArchitecture("EfficientNetB0", "tf_efficientnet_b0_keras", "tf_efficientnet_b0", {},
                      "tf.keras.models.load_model (efficientnet.tfkeras.EfficientNetB0)", convert_efficientnet),
    KerasArchitecture("tiny_ConvNeXT", "convnext_tiny_keras", "convnext_tiny", {},
                      "keras_cv_attention_models ConvNeXtTiny(pretrained=None) + load_weights", convert_convnext),
    KerasArchitecture("tiny_MaxViT", "maxvit_tiny_tf_224_keras", "maxvit_tiny_tf_224", {},
                      "keras_cv_attention_models MaxViT_Tiny(pretrained=None) + load_weights", convert_maxvit),
    KerasArchitecture("LeViT_small", "levit_128_keras", "levit_128", {"distilled": False},
                      "keras_cv_attention_models LeViT128(use_distillation=False, pretrained=None) + load_weights",
                      convert_levit),
]}


def keras_architecture(name: str) -> KerasArchitecture:
    """The entry of a reference name (``ViT_B16`` or ``load_ViT_B16``)."""
    key = name[len("load_"):] if name.startswith("load_") else name
    if key not in KERAS_ARCHITECTURES:
        raise ValueError(f"`name` must be one of {sorted(KERAS_ARCHITECTURES)}, got {name!r}")
    return KERAS_ARCHITECTURES[key]


def convert_keras_weights(keras: KerasWeights, model: nn.Module, name: str) -> nn.Module:
    """Fill ``model`` (the timm twin of reference ``name``, or a narrower one) from ``keras``.

    Raises:
        ValueError: the file does not fit (message: file, first layer that does not fit).
    """
    architecture = keras_architecture(name)
    walker = KerasWalker(keras, model, f"{architecture.reference} ({type(model).__name__})")
    architecture.convert(walker, model)
    walker.finish()
    return model


def convert_keras_file(path: PathLike, model: nn.Module, name: str) -> nn.Module:
    """:func:`convert_keras_weights` of the ``.h5`` file at ``path``."""
    return convert_keras_weights(read_keras_h5(path), model, name)


def keras_to_timm(name: str, path: PathLike, num_classes: int = 1000, **timm_kwargs) -> nn.Module:
    """The timm twin of reference ``name`` with the weights of the Keras file ``path``, in eval mode."""
    architecture = keras_architecture(name)
    model = timm.create_model(architecture.timm_name, num_classes=num_classes, **timm_kwargs)
    return convert_keras_file(path, model, name).eval()


# timm entry points of the twins that wrap an existing timm architecture: the same modules, with
# the reference's preprocessing (x / 255, ImageNet mean and std) in their pretrained config.
_REFERENCE_CFG = dict(url="", mean=IMAGENET_MEAN, std=IMAGENET_STD, license="mit")
default_cfgs = generate_default_cfgs({
    a.timm_name: dict(_REFERENCE_CFG, input_size=(3, 224, 224), crop_pct=1.0, interpolation="bilinear")
    for a in KERAS_ARCHITECTURES.values() if a.timm_name != a.base
})


def _twin(architecture: KerasArchitecture, pretrained: bool, kwargs: dict) -> nn.Module:
    if pretrained:
        raise ValueError(f"{architecture.timm_name} has no downloadable weights: convert the reference's Keras file "
                         f"(harmonizer-fast convert-keras {architecture.reference} IN.h5 OUT.safetensors)")
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    base_cfg = timm.models.get_pretrained_cfg(architecture.base)
    cfg = base_cfg.to_dict() if base_cfg is not None else {}
    cfg.update(_REFERENCE_CFG, architecture=architecture.timm_name, tag="", hf_hub_id=None)
    return timm.create_model(architecture.base, pretrained=False, pretrained_cfg_overlay=cfg,
                             **dict(architecture.base_kwargs, **kwargs))


@register_model
def vit_base_patch16_224_keras(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm ViT-B/16 as the reference's harmonized ViT_B16 (vit_keras) is preprocessed."""
    return _twin(KERAS_ARCHITECTURES["ViT_B16"], pretrained, kwargs)


@register_model
def vgg16_keras(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm VGG16 as the reference's harmonized VGG16 (keras.applications) is preprocessed."""
    return _twin(KERAS_ARCHITECTURES["VGG16"], pretrained, kwargs)


@register_model
def tf_efficientnet_b0_keras(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm tf_efficientnet_b0 ('same' padding, BatchNorm eps 1e-3), reference preprocessing."""
    return _twin(KERAS_ARCHITECTURES["EfficientNetB0"], pretrained, kwargs)


@register_model
def convnext_tiny_keras(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm ConvNeXt-T as the reference's harmonized tiny_ConvNeXT (kecam) is preprocessed."""
    return _twin(KERAS_ARCHITECTURES["tiny_ConvNeXT"], pretrained, kwargs)


@register_model
def maxvit_tiny_tf_224_keras(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm maxvit_tiny_tf_224 as the reference's harmonized tiny_MaxViT (kecam) is preprocessed."""
    return _twin(KERAS_ARCHITECTURES["tiny_MaxViT"], pretrained, kwargs)


@register_model
def levit_128_keras(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm levit_128 without distillation head, as the reference's LeViT_small (kecam LeViT128)."""
    return _twin(KERAS_ARCHITECTURES["LeViT_small"], pretrained, kwargs)
