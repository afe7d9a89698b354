"""Automatic layer discovery and one-pass multi-layer feature extraction.

A sweep scores every candidate layer of a model; the candidates are found here, in this order:

1. **timm feature pyramid.** A model with ``feature_info`` (every timm backbone) exposes its
   stage outputs by module name (``layer1``..``layer4`` for a ResNet, ``blocks.0``.. for an
   EfficientNet, ``stages.0``.. for a ConvNeXt, one entry per block for a ViT). When the model also
   has ``forward_intermediates`` those outputs are taken from it: it returns them as NCHW maps
   (ViT tokens are folded back onto their patch grid, prefix tokens dropped).
2. **Top-level blocks.** Any other ``nn.Module``: its direct children that hold parameters, with a
   ``Sequential``/``ModuleList`` child expanded one level into its blocks (so ``features.0``,
   ``features.1``, ... of a torchvision VGG/MobileNet). A trailing ``nn.Linear`` is the classifier
   and is skipped. Single ops inside blocks are never candidates. Outputs are taken by forward
   hooks.

Either way, :class:`LayerExtractor` runs **one** forward pass per image batch and returns every
selected layer's output from it (through :class:`harmonizer_fast.neural.features.LayerTaps`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from harmonizer_fast.neural.features import LayerTaps

__all__ = ["discover_layers", "LayerExtractor", "top_level_blocks", "feature_info_layers"]


def feature_info_layers(model: nn.Module) -> List[str]:
    """Labels of a timm model's ``feature_info`` entries in pyramid order (empty when it has none):
    each entry's module name, with ``#`` and its pyramid index appended where several entries name
    the same module (CrossViT's two branches, CoaT's parallel blocks). A label need not be a module
    of the model (HRNet's ``stem``, Twins' and MViTv2's ``block.0`` for ``blocks.0``):
    :class:`LayerExtractor` reads the pyramid through ``forward_intermediates`` by position."""
    info = getattr(model, "feature_info", None)
    if not info:
        return []
    names = []
    for entry in info:
        module = entry.get("module") if isinstance(entry, dict) else None
        if not module:
            return []
        names.append(str(module))
    repeated = {name for name in names if names.count(name) > 1}
    return [f"{name}#{i}" if name in repeated else name for i, name in enumerate(names)]


def top_level_blocks(model: nn.Module) -> List[str]:
    """Direct children with parameters, containers expanded one level, classifier skipped."""
    names: List[str] = []
    children = list(model.named_children())
    for position, (name, child) in enumerate(children):
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
            names += [f"{name}.{sub}" for sub, block in child.named_children() if _has_parameters(block)]
        elif _has_parameters(child):
            is_last = position == len(children) - 1
            if is_last and isinstance(child, nn.Linear):
                continue
            names.append(name)
    return names


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def discover_layers(model: nn.Module) -> List[str]:
    """Candidate layers of ``model``, shallow to deep (see the module docstring for the rule).

    Raises ``ValueError`` when the model has neither a feature pyramid nor parameterised children.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    pyramid = feature_info_layers(model)
    modules = dict(model.named_modules())
    # pyramid labels that are no module can only be read through forward_intermediates
    readable = hasattr(model, "forward_intermediates") or all(label in modules for label in pyramid)
    names = (pyramid if readable else []) or top_level_blocks(model)
    if not names:
        raise ValueError(
            f"no candidate layers found in {type(model).__name__}: it has no timm `feature_info` and "
            "no top-level child with parameters; pass the layer names explicitly (`layers=`)"
        )
    return names


class LayerExtractor:
    """Return the outputs of several layers from a single forward pass.

    Parameters
    ----------
    model : nn.Module
        Put in eval mode by the extractor; gradients are never recorded.
    layers : sequence of str, optional
        Module names (as in ``model.named_modules()``); default :func:`discover_layers`.

    Attributes
    ----------
    layers : list of str
        The selected layers in forward order of the candidate list.
    method : str
        ``"forward_intermediates"`` when every selected layer is in the timm feature pyramid and
        the model has ``forward_intermediates``, else ``"hooks"`` (plus ``forward_intermediates``
        for selected pyramid labels that are no module).
    """

    def __init__(self, model: nn.Module, layers: Optional[Sequence[str]] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model.eval()
        candidates = discover_layers(model) if layers is None else list(layers)
        if not candidates:
            raise ValueError("`layers` is empty; give at least one module name or None for all")
        modules = dict(model.named_modules())
        pyramid = feature_info_layers(model) if hasattr(model, "forward_intermediates") else []
        unknown = [name for name in candidates if name not in modules and name not in pyramid]
        if unknown:
            hint = ", ".join(discover_layers(model)[:12])
            raise ValueError(f"`layers` names unknown modules {unknown}; candidates are: {hint}")
        if len(set(candidates)) != len(candidates):
            raise ValueError(f"`layers` has duplicates: {candidates}")
        self.layers: List[str] = candidates
        if pyramid and all(n in pyramid for n in candidates):
            # timm returns intermediates in depth order whatever order `indices` has, so the taps
            # get sorted indices and the outputs are matched back to names by index.
            self.method = "forward_intermediates"
            indices = [pyramid.index(n) for n in candidates]
            self._taps = LayerTaps(model, sorted(indices))
            self._keys = [str(i) for i in indices]
        else:
            # A selection reaching outside the pyramid is read with hooks (one forward pass);
            # only pyramid labels that are no module (HRNet's `stem`) need forward_intermediates
            # too, a second pass.
            self.method = "hooks"
            taps = [name if name in modules else pyramid.index(name) for name in candidates]
            self._taps = LayerTaps(model, taps)
            self._keys = [str(tap) for tap in taps]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Map layer name -> output tensor (batch first) for one image batch (N, 3, H, W)."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(f"`images` must be a (N, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
        with self._taps as taps:
            outputs = taps(images)
        result = {}
        for name, key in zip(self.layers, self._keys):
            out = outputs[key]
            if isinstance(out, (tuple, list)):
                out = out[0]
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"layer {name!r} returned {type(out).__name__}, not a tensor")
            result[name] = out
        return result
