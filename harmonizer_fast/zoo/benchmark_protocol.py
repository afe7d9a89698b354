"""What a sweep needs of a benchmark: the :class:`Benchmark` and :class:`LayerSink` protocols and :class:`LayerResult`.

Every loader in :data:`harmonizer_fast.zoo.benchmarks.BENCHMARKS` returns a :class:`Benchmark`:
it names its image sets (:meth:`Benchmark.image_streams`), gives a fresh :class:`LayerSink` that
folds every batch of layer outputs as it streams, and scores one layer from what the sink kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Protocol, Sequence, Tuple, runtime_checkable

import torch

__all__ = ["PCA_IMAGES", "STIMULI", "Benchmark", "LayerResult", "LayerSink"]

#: Name of the benchmark's own stimuli among its image streams.
STIMULI = "stimuli"
#: Name of the images the principal components of the PCA layer choice are fitted on.
PCA_IMAGES = "pca-images"


@dataclass
class LayerResult:
    """Scores of one layer: report score (with its spread over splits), ceiling, ceiled score,
    the score the benchmark's layer-choice rule ranks layers by (``selection_score``), the
    number of features of the layer and the rule's name."""

    score: float
    score_error: float
    ceiling: float
    ceiled_score: float
    selection_score: float
    n_features: int
    choice_rule: str

@runtime_checkable
class LayerSink(Protocol):
    """Where a benchmark keeps what it needs of every layer while the images stream through."""

    def update(self, outputs: Mapping[str, torch.Tensor], stream: str = STIMULI) -> None:
        """Fold one batch of layer outputs (layer name -> (b, ...) tensor) of image set ``stream``."""

    def finish(self) -> Mapping[str, object]:
        """Layer name -> what :meth:`Benchmark.score_layer` takes, once every batch is in."""

    def close(self) -> None:
        """Release what is still held (files, memory)."""


@runtime_checkable
class Benchmark(Protocol):
    """What a sweep needs of a benchmark (every loader in :data:`BENCHMARKS` returns one)."""

    name: str
    images: torch.Tensor  # (n, 3, H, W) uint8 stimuli

    @property
    def choice_rule(self) -> str:
        """Name of the rule that chooses the model's layer (recorded in the table)."""

    def image_streams(self) -> List[Tuple[str, torch.Tensor]]:
        """(name, uint8 images) sets to stream through the model, in order (stimuli included)."""

    def make_sink(self, layers: Sequence[str]) -> LayerSink:
        """A fresh sink for these layers."""

    def score_layer(self, stored: object) -> LayerResult:
        """Score one layer from what the sink stored for it."""
