"""Keras ``ResNet50V2`` (``tf.keras.applications``) in PyTorch, registered with timm.

The reference's harmonized ResNet50 is this Keras model. timm's ``resnetv2_50`` is not it:
Keras puts the stride of a stack in its **last** block (timm: first), its identity shortcut of a
strided block is a 1x1 max-pool (a subsampling), ``conv1``, every ``_0_conv`` shortcut and
every ``_3_conv`` have biases, BatchNorm epsilon is 1.001e-5, and the stem's 3x3 max-pool
pads with **zeros** (its input is not yet ReLU'd, so zeros are not -inf).

``timm.create_model("resnet50v2_keras")`` builds it once this module is imported (importing
:mod:`harmonizer_fast.models` does); ``forward_intermediates`` returns the stem (before the
pool) and the four stack outputs, as timm's ResNets do.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from harmonizer_fast.common.preprocessing import IMAGENET_MEAN, IMAGENET_STD

#: BatchNorm epsilon of ``tf.keras.applications`` ResNets.
KERAS_RESNET_BN_EPSILON = 1.001e-5

__all__ = ["KerasPreactBottleneck", "KerasResNetV2", "KERAS_RESNET_BN_EPSILON"]


class KerasPreactBottleneck(nn.Module):
    """Keras ``block2``: pre-activation bottleneck, stride on the 3x3 conv.

    ``y = shortcut + conv3(relu(bn2(conv2(relu(bn1(conv1(p)))))))`` with
    ``p = relu(preact_bn(x))``; shortcut ``conv0(p)`` (with bias) when the width changes,
    else ``x`` subsampled by ``stride``.
    """

    def __init__(self, in_chs: int, width: int, stride: int = 1, conv_shortcut: bool = False) -> None:
        super().__init__()
        out_chs = 4 * width
        self.stride = stride
        self.preact_bn = nn.BatchNorm2d(in_chs, eps=KERAS_RESNET_BN_EPSILON)
        self.conv0 = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=True) if conv_shortcut else None
        self.conv1 = nn.Conv2d(in_chs, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=KERAS_RESNET_BN_EPSILON)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width, eps=KERAS_RESNET_BN_EPSILON)
        self.conv3 = nn.Conv2d(width, out_chs, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = F.relu(self.preact_bn(x))
        if self.conv0 is not None:
            shortcut = self.conv0(preact)
        elif self.stride > 1:  # Keras MaxPooling2D(1, strides=stride): a plain subsampling
            shortcut = x[:, :, :: self.stride, :: self.stride]
        else:
            shortcut = x
        y = F.relu(self.bn1(self.conv1(preact)))
        y = F.relu(self.bn2(self.conv2(y)))
        return shortcut + self.conv3(y)


class _ZeroPadMaxPool(nn.Module):
    """Keras ``ZeroPadding2D(1)`` + ``MaxPooling2D(3, strides=2)``: pads with zeros, not -inf."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.pad(x, (1, 1, 1, 1)), kernel_size=3, stride=2)


class KerasResNetV2(nn.Module):
    """``tf.keras.applications.ResNet50V2`` (and its narrower/shallower variants).

    Args:
        layers: blocks per stack (ResNet50V2: 3, 4, 6, 3); each at least 2, as Keras requires.
        widths: bottleneck width per stack (output channels: 4x).
        stem_width: output channels of the 7x7 stem conv (Keras: 64).
        num_classes: classifier size (0: no classifier).
        in_chans: input channels.
        global_pool: timm pooling type of the head.
        drop_rate: dropout before the classifier (Keras has none).
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths) or not layers:
            raise ValueError(f"`layers` and `widths` must have the same non-zero length, got {layers} and {widths}")
        if any(n < 2 for n in layers):
            raise ValueError(f"every Keras stack2 has at least 2 blocks, got layers={tuple(layers)}")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=True)
        self.maxpool = _ZeroPadMaxPool()
        self.feature_info = [dict(num_chs=stem_width, reduction=2, module="conv1")]
        stages: List[nn.Module] = []
        in_chs, reduction = stem_width, 4
        for index, (blocks, width) in enumerate(zip(layers, widths)):
            stride = 1 if index == len(layers) - 1 else 2
            stage = [KerasPreactBottleneck(in_chs, width, conv_shortcut=True)]
            stage += [KerasPreactBottleneck(4 * width, width) for _ in range(blocks - 2)]
            stage += [KerasPreactBottleneck(4 * width, width, stride=stride)]
            stages.append(nn.Sequential(*stage))
            in_chs = 4 * width
            # the stack's output is strided by its last block, so its reduction already includes it
            reduction *= stride
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f"stages.{index}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        # Keras post_bn + post_relu after the last stack
        self.norm = nn.Sequential(OrderedDict(
            bn=nn.BatchNorm2d(in_chs, eps=KERAS_RESNET_BN_EPSILON), act=nn.ReLU(inplace=False)))
        self.head = ClassifierHead(in_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stem output (index 0) and stack outputs (1..4), as timm's ``forward_intermediates``.

        ``norm=True`` applies ``norm`` (Keras ``post_bn`` + ReLU) to the last stack's output.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"`output_fmt` must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        intermediates: List[torch.Tensor] = []
        x = self.conv1(x)
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        stages = self.stages[:max_index] if stop_early else self.stages
        last = len(self.stages)
        for index, stage in enumerate(stages, start=1):
            x = stage(x)
            if index in take_indices:
                intermediates.append(self.norm(x) if norm and index == last else x)
        if intermediates_only:
            return intermediates
        if len(stages) == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop the stacks (and head) after the last of ``indices``."""
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        self.stages = self.stages[:max_index]
        if prune_norm or max_index < len(self.feature_info) - 1:
            self.norm = nn.Identity()  # sized for (and applied to) the last stack only
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        return self.norm(self.stages(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({
    "resnet50v2_keras": dict(
        url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=1.0,
        interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD, first_conv="conv1",
        classifier="head.fc", license="mit",
    ),
})


@register_model
def resnet50v2_keras(pretrained: bool = False, **kwargs) -> KerasResNetV2:
    """Keras ResNet50V2 (the reference's harmonized ResNet50); weights from a local file only."""
    local_file = (kwargs.get("pretrained_cfg_overlay") or {}).get("file")
    if pretrained and not local_file:
        raise ValueError("resnet50v2_keras has no downloadable weights: convert a Keras .h5 file "
                         "(harmonizer-fast convert-keras ResNet50 ...) and pass it as weights")
    return build_model_with_cfg(KerasResNetV2, "resnet50v2_keras", pretrained=pretrained, **kwargs)
