"""How each reference Keras model's weights map onto its PyTorch twin, layer by layer.

:class:`KerasWalker` pairs the file's weight-holding layers **in file order** (Keras 2
``load_weights`` pairs layers by position, not by name) with the PyTorch state entries, checks
every count and shape as it goes, and records what was written; one ``convert_<arch>`` function
per architecture lists the Keras layer order as the reference's model builds it. The registry
that names them and the public entry points are in :mod:`harmonizer_fast.models.keras_convert`.

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
"""
from __future__ import annotations

from typing import List, Optional, Set, Tuple

import numpy as np
import torch
import torch.nn as nn

from harmonizer_fast.models.keras_h5 import KerasLayer, KerasWeights

__all__ = [
    "KerasWalker", "convert_convnext", "convert_efficientnet", "convert_levit", "convert_maxvit", "convert_resnet50v2",
    "convert_vgg", "convert_vit",
]


class KerasWalker:
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

def convert_vit(w: KerasWalker, model: nn.Module) -> None:
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


def convert_vgg(w: KerasWalker, model: nn.Module) -> None:
    """keras.applications ``VGG16`` -> timm ``VGG``."""
    for index, module in enumerate(model.features):
        if isinstance(module, nn.Conv2d):
            w.conv(f"features.{index}", bias=True)
    w.dense_as_conv("pre_logits.fc1", tuple(model.pre_logits.fc1.kernel_size))
    kernel, bias = w.take("pre_logits.fc2", 2)
    w.put("pre_logits.fc2.weight", kernel.T[:, :, None, None])
    w.put("pre_logits.fc2.bias", bias)
    w.dense("head.fc")


def convert_resnet50v2(w: KerasWalker, model: nn.Module) -> None:
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


def convert_efficientnet(w: KerasWalker, model: nn.Module) -> None:
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


def convert_convnext(w: KerasWalker, model: nn.Module) -> None:
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


def _levit_linear_bn(w: KerasWalker, prefix: str) -> None:
    (kernel,) = w.take(f"{prefix}.linear", 1)
    w.put(f"{prefix}.linear.weight", kernel.T)


def _levit_biases(w: KerasWalker, prefix: str) -> None:
    (table,) = w.take(f"{prefix}.attention_biases", 1)
    w.put(f"{prefix}.attention_biases", table.T)


def _levit_mlp(w: KerasWalker, prefix: str) -> None:
    _levit_linear_bn(w, f"{prefix}.ln1")
    w.batch_norm(f"{prefix}.ln1.bn")
    _levit_linear_bn(w, f"{prefix}.ln2")
    w.batch_norm(f"{prefix}.ln2.bn")


def convert_levit(w: KerasWalker, model: nn.Module) -> None:
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


def _maxvit_attention(w: KerasWalker, prefix: str) -> None:
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


def convert_maxvit(w: KerasWalker, model: nn.Module) -> None:
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
