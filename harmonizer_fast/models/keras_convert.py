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

Layout changes (Keras -> PyTorch):

- ``Conv2D`` kernel ``(kh, kw, in, out)`` -> ``(out, in, kh, kw)``; ``DepthwiseConv2D``
  ``(kh, kw, C, 1)`` -> ``(C, 1, kh, kw)``; ``Dense`` ``(in, out)`` -> ``(out, in)``;
  BatchNorm ``gamma, beta, moving_mean, moving_variance`` -> ``weight, bias, running_mean,
  running_var``; LayerNorm ``gamma, beta`` -> ``weight, bias``.
- ViT-B16: the separate ``query``, ``key``, ``value`` kernels are concatenated into ``qkv``.
- VGG16: Keras flattens the last 7x7 map in (h, w, c) order, so ``fc1``'s
  ``(7*7*C, F)`` kernel becomes timm's 7x7 conv ``(F, C, 7, 7)`` by a reshape to
  ``(7, 7, C, F)`` and a transpose; ``fc2`` becomes a 1x1 conv.
- LeViT128: kecam puts a stage's downsampling (attention + MLP) at the end of the previous
  stack; its position biases ``(key positions, heads)`` become ``(heads, key positions)``.
- MaxViT-Tiny: kecam's relative-position table ``(heads, (2w-1)**2)`` becomes timm's
  ``(heads, 2w-1, 2w-1)`` **flipped on both axes** (kecam indexes the offset ``q - k``, timm
  ``k - q``).

The PyTorch twins (timm names, registered on import of this module with the reference's
preprocessing ``x / 255`` then ImageNet mean/std in their ``pretrained_cfg``) are in
:data:`KERAS_ARCHITECTURES`. The PyTorch models return logits; a Keras head with a softmax
(VGG16, ResNet50V2, EfficientNetB0 as ``keras.applications`` builds them) is compared before it.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from harmonizer_fast.common.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from harmonizer_fast.models import resnetv2_keras  # noqa: F401  (registers resnet50v2_keras with timm)
from harmonizer_fast.models.keras_h5 import KerasLayer, KerasWeights, PathLike, read_keras_h5

#: Version written into converted files' metadata; bump when a mapping rule changes.
CONVERTER_VERSION = "1"

__all__ = [
    "CONVERTER_VERSION", "KERAS_ARCHITECTURES", "KerasArchitecture", "convert_keras_file", "convert_keras_weights",
    "keras_architecture", "keras_to_timm",
]


class _Walker:
    """Pairs the file's layers (in order) with PyTorch state entries and records what was used."""

    def __init__(self, keras: KerasWeights, model: nn.Module, architecture: str) -> None:
        self.keras = keras
        self.architecture = architecture
        self.state = model.state_dict()
        self.filled: Set[str] = set()
        self.position = 0
        self.layer: Optional[KerasLayer] = None

    # -- errors -------------------------------------------------------------------------------------
    def _fail(self, problem: str) -> None:
        where = (f"layer #{self.position - 1} {self.layer.name!r} (shapes {self.layer.shapes()})"
                 if self.layer is not None else "the start of the file")
        raise ValueError(f"{self.keras.path!r} does not fit the {self.architecture} architecture at {where}: {problem}")

    # -- reading ------------------------------------------------------------------------------------
    def take(self, target: str, count: int) -> List[np.ndarray]:
        """The next file layer's tensors; it must hold exactly ``count`` of them."""
        if self.position >= len(self.keras.layers):
            self.layer = None
            raise ValueError(
                f"{self.keras.path!r} does not fit the {self.architecture} architecture: the file ends after "
                f"{len(self.keras.layers)} layers with weights, but {target!r} still needs {count} tensors "
                "(truncated file or smaller architecture)"
            )
        self.layer = self.keras.layers[self.position]
        self.position += 1
        if len(self.layer.weights) != count:
            self._fail(f"{target!r} expects {count} tensors, the layer holds {len(self.layer.weights)}")
        return [value for _, value in self.layer.weights]

    def put(self, key: str, value: np.ndarray) -> None:
        if key not in self.state:
            self._fail(f"the PyTorch model has no entry {key!r}")
        if key in self.filled:
            self._fail(f"{key!r} would be written twice")
        target = self.state[key]
        if tuple(value.shape) != tuple(target.shape):
            self._fail(f"{key!r} needs shape {tuple(target.shape)}, the file gives {tuple(value.shape)}")
        with torch.no_grad():
            target.copy_(torch.from_numpy(np.array(value, order="C")).to(target.dtype))
        self.filled.add(key)

    # -- Keras layer kinds -------------------------------------------------------------------------
    def conv(self, prefix: str, bias: bool) -> None:
        values = self.take(prefix, 2 if bias else 1)
        if values[0].ndim != 4:
            self._fail(f"{prefix!r} expects a 4-D Conv2D kernel")
        self.put(f"{prefix}.weight", values[0].transpose(3, 2, 0, 1))
        if bias:
            self.put(f"{prefix}.bias", values[1])

    def depthwise(self, prefix: str, bias: bool) -> None:
        values = self.take(prefix, 2 if bias else 1)
        if values[0].ndim != 4 or values[0].shape[3] != 1:
            self._fail(f"{prefix!r} expects a (kh, kw, C, 1) DepthwiseConv2D kernel")
        self.put(f"{prefix}.weight", values[0].transpose(2, 3, 0, 1))
        if bias:
            self.put(f"{prefix}.bias", values[1])

    def dense(self, prefix: str, bias: bool = True) -> None:
        values = self.take(prefix, 2 if bias else 1)
        if values[0].ndim != 2:
            self._fail(f"{prefix!r} expects a 2-D Dense kernel")
        self.put(f"{prefix}.weight", values[0].T)
        if bias:
            self.put(f"{prefix}.bias", values[1])

    def dense_as_conv(self, prefix: str, kernel_hw: Tuple[int, int]) -> None:
        """A Dense layer after Keras' (h, w, c) Flatten, as a conv with a ``kernel_hw`` kernel."""
        kernel, bias = self.take(prefix, 2)
        kh, kw = kernel_hw
        if kernel.ndim != 2 or kernel.shape[0] % (kh * kw):
            self._fail(f"{prefix!r} expects a ({kh}*{kw}*C, F) Dense kernel")
        channels = kernel.shape[0] // (kh * kw)
        self.put(f"{prefix}.weight", kernel.reshape(kh, kw, channels, kernel.shape[1]).transpose(3, 2, 0, 1))
        self.put(f"{prefix}.bias", bias)

    def batch_norm(self, prefix: str) -> None:
        gamma, beta, mean, variance = self.take(prefix, 4)
        self.put(f"{prefix}.weight", gamma)
        self.put(f"{prefix}.bias", beta)
        self.put(f"{prefix}.running_mean", mean)
        self.put(f"{prefix}.running_var", variance)
        if f"{prefix}.num_batches_tracked" in self.state:
            self.put(f"{prefix}.num_batches_tracked", np.zeros((), dtype=np.int64))

    def layer_norm(self, prefix: str) -> None:
        gamma, beta = self.take(prefix, 2)
        self.put(f"{prefix}.weight", gamma)
        self.put(f"{prefix}.bias", beta)

    def finish(self) -> None:
        if self.position < len(self.keras.layers):
            self.layer = self.keras.layers[self.position]
            self.position += 1
            self._fail("the PyTorch model is complete but the file has more layers (another architecture?)")
        missing = [key for key in self.state if key not in self.filled]
        if missing:
            raise ValueError(
                f"{self.keras.path!r}: the file ended but {len(missing)} PyTorch entries of {self.architecture} "
                f"were not written, the first {missing[0]!r}"
            )


# ------------------------------------------------------------------------------------------------
# One converter per architecture: the Keras layer order, as the reference's model lists it.
# ------------------------------------------------------------------------------------------------

def _convert_vit(w: _Walker, model: nn.Module) -> None:
    """vit_keras ``vit_b16`` -> timm ``VisionTransformer``."""
    w.conv("patch_embed.proj", bias=True)
    (cls,) = w.take("cls_token", 1)
    w.put("cls_token", cls)
    (pos,) = w.take("pos_embed", 1)
    w.put("pos_embed", pos)
    for i in range(len(model.blocks)):
        p = f"blocks.{i}"
        (qk, qb, kk, kb, vk, vb, ok, ob, f1k, f1b, f2k, f2b, n1g, n1b, n2g, n2b) = w.take(p, 16)
        w.put(f"{p}.attn.qkv.weight", np.concatenate([qk.T, kk.T, vk.T], axis=0))
        w.put(f"{p}.attn.qkv.bias", np.concatenate([qb, kb, vb]))
        w.put(f"{p}.attn.proj.weight", ok.T)
        w.put(f"{p}.attn.proj.bias", ob)
        w.put(f"{p}.mlp.fc1.weight", f1k.T)
        w.put(f"{p}.mlp.fc1.bias", f1b)
        w.put(f"{p}.mlp.fc2.weight", f2k.T)
        w.put(f"{p}.mlp.fc2.bias", f2b)
        w.put(f"{p}.norm1.weight", n1g)
        w.put(f"{p}.norm1.bias", n1b)
        w.put(f"{p}.norm2.weight", n2g)
        w.put(f"{p}.norm2.bias", n2b)
    w.layer_norm("norm")
    w.dense("head")


def _convert_vgg(w: _Walker, model: nn.Module) -> None:
    """keras.applications ``VGG16`` -> timm ``VGG``."""
    for index, module in enumerate(model.features):
        if isinstance(module, nn.Conv2d):
            w.conv(f"features.{index}", bias=True)
    w.dense_as_conv("pre_logits.fc1", tuple(model.pre_logits.fc1.kernel_size))
    kernel, bias = w.take("pre_logits.fc2", 2)
    w.put("pre_logits.fc2.weight", kernel.T[:, :, None, None])
    w.put("pre_logits.fc2.bias", bias)
    w.dense("head.fc")


def _convert_resnet50v2(w: _Walker, model: nn.Module) -> None:
    """keras.applications ``ResNet50V2`` -> :class:`~harmonizer_fast.models.resnetv2_keras.KerasResNetV2`."""
    w.conv("conv1", bias=True)
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage):
            p = f"stages.{s}.{b}"
            w.batch_norm(f"{p}.preact_bn")
            w.conv(f"{p}.conv1", bias=False)
            w.batch_norm(f"{p}.bn1")
            w.conv(f"{p}.conv2", bias=False)
            w.batch_norm(f"{p}.bn2")
            if block.conv0 is not None:  # Keras builds the shortcut conv after the 3x3 branch
                w.conv(f"{p}.conv0", bias=True)
            w.conv(f"{p}.conv3", bias=True)
    w.batch_norm("norm.bn")
    w.dense("head.fc")


def _convert_efficientnet(w: _Walker, model: nn.Module) -> None:
    """efficientnet (qubvel) ``EfficientNetB0`` -> timm ``tf_efficientnet_b0``."""
    w.conv("conv_stem", bias=False)
    w.batch_norm("bn1")
    for s, stage in enumerate(model.blocks):
        for b, block in enumerate(stage):
            p = f"blocks.{s}.{b}"
            kind = type(block).__name__
            if kind == "DepthwiseSeparableConv":
                w.depthwise(f"{p}.conv_dw", bias=False)
                w.batch_norm(f"{p}.bn1")
                w.conv(f"{p}.se.conv_reduce", bias=True)
                w.conv(f"{p}.se.conv_expand", bias=True)
                w.conv(f"{p}.conv_pw", bias=False)
                w.batch_norm(f"{p}.bn2")
            elif kind == "InvertedResidual":
                w.conv(f"{p}.conv_pw", bias=False)
                w.batch_norm(f"{p}.bn1")
                w.depthwise(f"{p}.conv_dw", bias=False)
                w.batch_norm(f"{p}.bn2")
                w.conv(f"{p}.se.conv_reduce", bias=True)
                w.conv(f"{p}.se.conv_expand", bias=True)
                w.conv(f"{p}.conv_pwl", bias=False)
                w.batch_norm(f"{p}.bn3")
            else:
                raise TypeError(f"unexpected EfficientNet block {kind} at {p}")
    w.conv("conv_head", bias=False)
    w.batch_norm("bn2")
    w.dense("classifier")


def _convert_convnext(w: _Walker, model: nn.Module) -> None:
    """keras_cv_attention_models ``ConvNeXtTiny`` -> timm ``convnext_tiny``."""
    w.conv("stem.0", bias=True)
    w.layer_norm("stem.1")
    for s, stage in enumerate(model.stages):
        if s > 0:
            w.layer_norm(f"stages.{s}.downsample.0")
            w.conv(f"stages.{s}.downsample.1", bias=True)
        for b in range(len(stage.blocks)):
            p = f"stages.{s}.blocks.{b}"
            w.depthwise(f"{p}.conv_dw", bias=True)
            w.layer_norm(f"{p}.norm")
            w.dense(f"{p}.mlp.fc1")
            w.dense(f"{p}.mlp.fc2")
            (gamma,) = w.take(f"{p}.gamma", 1)
            w.put(f"{p}.gamma", gamma)
    w.layer_norm("head.norm")
    w.dense("head.fc")


def _levit_linear_bn(w: _Walker, prefix: str) -> None:
    (kernel,) = w.take(f"{prefix}.linear", 1)
    w.put(f"{prefix}.linear.weight", kernel.T)


def _levit_biases(w: _Walker, prefix: str) -> None:
    (table,) = w.take(f"{prefix}.attention_biases", 1)
    w.put(f"{prefix}.attention_biases", table.T)


def _levit_mlp(w: _Walker, prefix: str) -> None:
    _levit_linear_bn(w, f"{prefix}.ln1")
    w.batch_norm(f"{prefix}.ln1.bn")
    _levit_linear_bn(w, f"{prefix}.ln2")
    w.batch_norm(f"{prefix}.ln2.bn")


def _convert_levit(w: _Walker, model: nn.Module) -> None:
    """keras_cv_attention_models ``LeViT128`` (no distillation) -> timm ``levit_128`` (``distilled=False``)."""
    for i in range(1, 5):
        w.conv(f"stem.conv{i}.linear", bias=False)
        w.batch_norm(f"stem.conv{i}.bn")
    for s, stage in enumerate(model.stages):
        if s > 0:  # kecam: the end of the previous stack
            p = f"stages.{s}.downsample"
            a = f"{p}.attn_downsample"
            _levit_linear_bn(w, f"{a}.kv")  # Keras order: kv, q, kv_bn, q_bn
            _levit_linear_bn(w, f"{a}.q.ln")
            w.batch_norm(f"{a}.kv.bn")
            w.batch_norm(f"{a}.q.ln.bn")
            _levit_biases(w, a)
            _levit_linear_bn(w, f"{a}.proj.ln")
            w.batch_norm(f"{a}.proj.ln.bn")
            _levit_mlp(w, f"{p}.mlp")
        for b in range(len(stage.blocks)):
            p = f"stages.{s}.blocks.{b}"
            _levit_linear_bn(w, f"{p}.attn.qkv")
            w.batch_norm(f"{p}.attn.qkv.bn")
            _levit_biases(w, f"{p}.attn")
            _levit_linear_bn(w, f"{p}.attn.proj.ln")
            w.batch_norm(f"{p}.attn.proj.ln.bn")
            _levit_mlp(w, f"{p}.mlp")
    w.batch_norm("head.bn")
    w.dense("head.linear")


def _maxvit_attention(w: _Walker, prefix: str) -> None:
    w.layer_norm(f"{prefix}.norm1")
    kernel, bias = w.take(f"{prefix}.attn.qkv", 2)  # a 1x1 Conv2D in kecam
    w.put(f"{prefix}.attn.qkv.weight", kernel[0, 0].T)
    w.put(f"{prefix}.attn.qkv.bias", bias)
    (table,) = w.take(f"{prefix}.attn.rel_pos", 1)
    key = f"{prefix}.attn.rel_pos.relative_position_bias_table"
    heads, side = table.shape[0], int(round(np.sqrt(table.shape[-1])))
    if table.ndim != 2 or side * side != table.shape[-1]:
        w._fail(f"{key!r} expects a (heads, (2w-1)**2) table")
    w.put(key, table.reshape(heads, side, side)[:, ::-1, ::-1])
    w.dense(f"{prefix}.attn.proj")
    w.layer_norm(f"{prefix}.norm2")
    w.dense(f"{prefix}.mlp.fc1")
    w.dense(f"{prefix}.mlp.fc2")


def _convert_maxvit(w: _Walker, model: nn.Module) -> None:
    """keras_cv_attention_models ``MaxViT_Tiny`` -> timm ``maxvit_tiny_tf_224``."""
    w.conv("stem.conv1", bias=True)
    w.batch_norm("stem.norm1")
    w.conv("stem.conv2", bias=True)
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage.blocks):
            p = f"stages.{s}.blocks.{b}"
            w.batch_norm(f"{p}.conv.pre_norm")
            w.conv(f"{p}.conv.conv1_1x1", bias=False)
            w.batch_norm(f"{p}.conv.norm1")
            w.depthwise(f"{p}.conv.conv2_kxk", bias=False)
            w.batch_norm(f"{p}.conv.norm2")
            w.conv(f"{p}.conv.se.fc1", bias=True)
            w.conv(f"{p}.conv.se.fc2", bias=True)
            if isinstance(getattr(block.conv.shortcut, "expand", None), nn.Conv2d):  # kecam builds it late
                w.conv(f"{p}.conv.shortcut.expand", bias=True)
            w.conv(f"{p}.conv.conv3_1x1", bias=True)
            _maxvit_attention(w, f"{p}.attn_block")
            _maxvit_attention(w, f"{p}.attn_grid")
    w.layer_norm("head.norm")
    w.dense("head.pre_logits.fc")
    w.dense("head.fc")


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
                 convert: Callable[[_Walker, nn.Module], None]) -> None:
        self.reference, self.timm_name, self.base = reference, timm_name, base
        self.base_kwargs, self.keras_source, self.convert = base_kwargs, keras_source, convert


KERAS_ARCHITECTURES: Dict[str, KerasArchitecture] = {a.reference: a for a in [
    KerasArchitecture("ViT_B16", "vit_base_patch16_224_keras", "vit_base_patch16_224", {},
                      "vit_keras.vit.vit_b16(image_size=224, activation='linear', pretrained=False, "
                      "include_top=True, pretrained_top=False) + load_weights", _convert_vit),
    KerasArchitecture("VGG16", "vgg16_keras", "vgg16", {}, "tf.keras.models.load_model (keras.applications.VGG16)",
                      _convert_vgg),
    KerasArchitecture("ResNet50", "resnet50v2_keras", "resnet50v2_keras", {},
                      "tf.keras.models.load_model (keras.applications.ResNet50V2)", _convert_resnet50v2),
    KerasArchitecture("EfficientNetB0", "tf_efficientnet_b0_keras", "tf_efficientnet_b0", {},
                      "tf.keras.models.load_model (efficientnet.tfkeras.EfficientNetB0)", _convert_efficientnet),
    KerasArchitecture("tiny_ConvNeXT", "convnext_tiny_keras", "convnext_tiny", {},
                      "keras_cv_attention_models ConvNeXtTiny(pretrained=None) + load_weights", _convert_convnext),
    KerasArchitecture("tiny_MaxViT", "maxvit_tiny_tf_224_keras", "maxvit_tiny_tf_224", {},
                      "keras_cv_attention_models MaxViT_Tiny(pretrained=None) + load_weights", _convert_maxvit),
    KerasArchitecture("LeViT_small", "levit_128_keras", "levit_128", {"distilled": False},
                      "keras_cv_attention_models LeViT128(use_distillation=False, pretrained=None) + load_weights",
                      _convert_levit),
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
    walker = _Walker(keras, model, f"{architecture.reference} ({type(model).__name__})")
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
