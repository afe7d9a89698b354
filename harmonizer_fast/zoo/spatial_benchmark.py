"""The 2023 spatial-map benchmark in a sweep: (images, g, g, sites) responses, halved by recording site.

:class:`SpatialBenchmark` keeps every layer's NHWC maps of its handful of stimuli exactly, and
scores a layer with :func:`harmonizer_fast.neural.neural_benchmark.score_model`: the layer is
chosen on the selection half of the sites and scored and ceiled on the other half (14 stimuli
are too few to halve). The loaders are in :mod:`harmonizer_fast.zoo.benchmarks`.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch

from harmonizer_fast.neural.features import LayerFeatureAccumulator
from harmonizer_fast.neural.image_level import CEILING_CONVENTIONS
from harmonizer_fast.neural.metrics import ceiling_score
from harmonizer_fast.neural.neural_benchmark import score_model
from harmonizer_fast.zoo.benchmark_protocol import STIMULI, LayerResult

__all__ = ["SpatialBenchmark"]


class _MapSink:
    """Per-layer NHWC maps of a spatial benchmark (kept exactly: a handful of stimuli)."""

    def __init__(self, layers: Sequence[str]) -> None:
        self.accumulators = {name: LayerFeatureAccumulator(None) for name in layers}
        self.shapes: Dict[str, Tuple[int, ...]] = {}

    def update(self, outputs: Mapping[str, torch.Tensor], stream: str = STIMULI) -> None:
        for name, out in outputs.items():
            if out.ndim != 4:
                self.shapes[name] = tuple(out.shape[1:])
                continue  # not a spatial map: reported when the layer is scored
            nhwc = out.permute(0, 2, 3, 1)
            self.shapes[name] = tuple(nhwc.shape[1:])
            self.accumulators[name].update(nhwc)

    def finish(self) -> Dict[str, Tuple[LayerFeatureAccumulator, Tuple[int, ...]]]:
        return {name: (acc, self.shapes.get(name, ())) for name, acc in self.accumulators.items()}

    def close(self) -> None:
        self.accumulators.clear()

class SpatialBenchmark:
    """Spatial-map scoring of (images, g, g, sites) responses (see the module docstring).

    Parameters
    ----------
    images : (n, 3, H, W) uint8 stimuli
    responses : (n, g, g, sites) window-mean maps (``Neural_dataset.load_data``'s ``y``)
    recordings : (n, x, y, time, sites) raw recordings, for the ceiling
    time_window : (a, b) of the responses, for the ceiling
    seed : seeds the halving of the sites
    """

    def __init__(self, name: str, images: torch.Tensor, responses: np.ndarray, recordings: np.ndarray,
                 time_window: Tuple[int, int], seed: int = 0) -> None:
        responses = np.asarray(responses)
        if responses.ndim != 4 or responses.shape[0] != images.shape[0]:
            raise ValueError(
                f"`responses` must be ({images.shape[0]}, g, g, sites), got shape {responses.shape}"
            )
        sites = responses.shape[-1]
        if sites < 4:
            raise ValueError(f"need >= 4 recording sites to halve them (2 per half), got responses {responses.shape}")
        order = np.random.default_rng(seed).permutation(sites)
        self.selection_sites, self.report_sites = np.sort(order[: sites // 2]), np.sort(order[sites // 2:])
        self.name, self.images, self.responses = name, images, responses
        self.time_window, self.seed = tuple(time_window), seed
        self._ceiling = self._report_ceiling(np.asarray(recordings))

    def _report_ceiling(self, recordings: np.ndarray) -> float:
        return ceiling_score(recordings[..., self.report_sites], *self.time_window)

    #: The layer is chosen on half of the recording sites and reported on the other half.
    choice_rule = "disjoint-sites"

    def image_streams(self) -> List[Tuple[str, torch.Tensor]]:
        return [(STIMULI, self.images)]

    def make_sink(self, layers: Sequence[str]) -> _MapSink:
        return _MapSink(layers)

    def score_layer(self, stored: Tuple[LayerFeatureAccumulator, Tuple[int, ...]]) -> LayerResult:
        accumulator, shape = stored
        if len(shape) != 3 or accumulator.n_images == 0:
            raise ValueError(f"the spatial benchmark needs (N, C, H, W) maps, the layer gave (N, {shape})")
        activity = accumulator.features().reshape(accumulator.n_images, *shape)
        (selection, _), _ = score_model(activity, self.responses[..., self.selection_sites], grid_size=None)
        (score, spread), _ = score_model(activity, self.responses[..., self.report_sites], grid_size=None)
        ceiled = CEILING_CONVENTIONS["r/c"](score, self._ceiling)
        return LayerResult(score, spread, self._ceiling, ceiled, selection, int(shape[-1]), self.choice_rule)
