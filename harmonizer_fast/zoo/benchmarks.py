r"""Benchmarks a sweep can score on, by name (:data:`BENCHMARKS`), and how each one streams and scores.

=====================  ==========================================================================
name                   what
=====================  ==========================================================================
``image-level``        Brain-Score style recordings from local files: a netCDF assembly
                       (``path``) and a folder of stimuli named ``<image_id>.<ext>``
                       (``stimuli_dir``); scored by
                       :func:`harmonizer_fast.neural.image_level.score_image_level`.
``image-level-sim``    The same scoring on :func:`harmonizer_fast.neural.simulate.simulate_image_level`
                       responses, with rendered stimuli (below); default 3,200 images, 168 sites.
``spatial``            The 2023 spatial-map benchmark on the Arcaro (2020) recordings in a local
                       folder (``path``), scored by
                       :func:`harmonizer_fast.neural.neural_benchmark.score_model`.
``spatial-sim``        The same scoring on
                       :func:`harmonizer_fast.neural.simulate.simulate_spatial_dataset` maps.
=====================  ==========================================================================

**Streaming.** Every layer output of a batch is folded into that layer's
:class:`harmonizer_fast.neural.features.LayerFeatureAccumulator` right away: image-level
benchmarks keep flattened features, randomly projected to ``projection_dim`` (default 256) when
wider; spatial benchmarks keep the NHWC maps of their few stimuli as they are.

**No selection bias.** Each layer gets a *selection* score and a *report* score on disjoint data,
and the model's layer is the best by selection score:

* image level: the images are halved, stratified by object
  (:func:`~harmonizer_fast.neural.image_level.stratified_splits` with one 50 % split): selection
  images and report images. Each half is scored with its own cross-validation splits, and the
  report half also gives the ceiling. No report image is seen while choosing the layer.
* spatial: with 14 stimuli, halving the images would leave a 6-image leave-one-out fit, so the
  recording *sites* are halved instead (seeded): the layer is chosen on the selection sites,
  scored (and ceiled) on the others.

**Simulated stimuli.** The simulators plant responses on hidden features, not on images, so the
stimuli are rendered from those features (:func:`render_stimuli`): each hidden feature (or each
channel of a hidden spatial map) scales its own fixed random colour grating, the gratings are
summed and squashed into 0..255. A network sees the hidden features through texture, colour and
position, as it would see a real stimulus.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from harmonizer_fast.neural.features import LayerFeatureAccumulator
from harmonizer_fast.zoo.clickme_benchmark import load_clickme_benchmark
from harmonizer_fast.zoo.object_benchmark import load_object_benchmark

__all__ = [
    "BENCHMARKS",
    "LayerResult",
    "ImageLevelBenchmark",
    "SpatialBenchmark",
    "get_benchmark",
    "register_benchmark",
    "render_stimuli",
]


@dataclass
class LayerResult:
    """Scores of one layer: report score (with its spread over splits), ceiling, ceiled score,
    selection score (disjoint data) and the number of features the readout saw."""

    score: float
    score_error: float
    ceiling: float
    ceiled_score: float
    selection_score: float
    n_features: int


def render_stimuli(amplitudes: np.ndarray, size: int, seed: int = 0) -> torch.Tensor:
    r"""Render (n, h, w, K) amplitude maps as (n, 3, size, size) uint8 images.

    Each of the K channels gets a fixed random grating :math:`T_k` (orientation, spatial
    frequency, phase and RGB colour drawn from ``seed``); the image is
    :math:`255\,\sigma\big(\sum_k \tilde A_k \odot T_k / \sqrt{K}\big)`, with :math:`\tilde A_k`
    the amplitude map resized bilinearly to ``size`` (a constant map for h = w = 1).
    """
    amplitudes = np.asarray(amplitudes, dtype=np.float32)
    if amplitudes.ndim != 4:
        raise ValueError(f"`amplitudes` must be (n, h, w, K), got shape {amplitudes.shape}")
    if size < 2:
        raise ValueError(f"`size` must be >= 2, got {size}")
    n, _, _, k = amplitudes.shape
    rng = np.random.default_rng(seed)
    theta = rng.uniform(0, np.pi, k)
    freq = rng.uniform(2.0, size / 4.0, k)
    phase = rng.uniform(0, 2 * np.pi, k)
    colour = rng.normal(size=(k, 3))
    axis = np.linspace(0.0, 1.0, size, endpoint=False)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    wave = np.cos(2 * np.pi * freq[:, None, None] * (np.cos(theta)[:, None, None] * xx + np.sin(theta)[:, None, None] * yy)
                  + phase[:, None, None])
    carriers = torch.from_numpy((wave[:, None] * colour[:, :, None, None]).astype(np.float32))  # K, 3, S, S
    maps = torch.from_numpy(amplitudes).permute(0, 3, 1, 2)
    maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
    images = torch.einsum("nkyx,kcyx->ncyx", maps, carriers) / math.sqrt(k)
    return (255.0 * torch.sigmoid(images)).round().to(torch.uint8)


class _FlatSink:
    """Per-layer flattened (projected) features of an image-level benchmark."""

    def __init__(self, layers: Sequence[str], projection_dim: Optional[int], seed: int) -> None:
        self.accumulators = {
            name: LayerFeatureAccumulator(projection_dim, "sparse", seed + i) for i, name in enumerate(layers)
        }

    def update(self, outputs: Dict[str, torch.Tensor]) -> None:
        for name, out in outputs.items():
            self.accumulators[name].update(out)

    def finish(self) -> Dict[str, LayerFeatureAccumulator]:
        return self.accumulators


class _MapSink:
    """Per-layer NHWC maps of a spatial benchmark (kept exactly: a handful of stimuli)."""

    def __init__(self, layers: Sequence[str]) -> None:
        self.accumulators = {name: LayerFeatureAccumulator(None) for name in layers}
        self.shapes: Dict[str, Tuple[int, ...]] = {}

    def update(self, outputs: Dict[str, torch.Tensor]) -> None:
        for name, out in outputs.items():
            if out.ndim != 4:
                self.shapes[name] = tuple(out.shape[1:])
                continue  # not a spatial map: reported when the layer is scored
            nhwc = out.permute(0, 2, 3, 1)
            self.shapes[name] = tuple(nhwc.shape[1:])
            self.accumulators[name].update(nhwc)

    def finish(self) -> Dict[str, Tuple[LayerFeatureAccumulator, Tuple[int, ...]]]:
        return {name: (acc, self.shapes.get(name, ())) for name, acc in self.accumulators.items()}


class ImageLevelBenchmark:
    """Image-level scoring of (images, neuroids, repetitions) recordings (see the module docstring).

    Parameters
    ----------
    name : str
    images : (n, 3, H, W) uint8 tensor, in the assembly's image order
    assembly : :class:`harmonizer_fast.neural.assemblies.NeuralAssembly`
    readout : name in :data:`harmonizer_fast.neural.image_level.READOUTS` (``'pls'``, 25
        components, default as in the paper; ``'ridge'``; ``'gram_ridge'`` fits on the Gram
        matrix of the stored features)
    projection_dim : features kept per layer (random projection above it; None keeps all)
    n_splits, test_size : cross-validation of the report half (Brain-Score: 10 splits of 90/10)
    selection_splits : cross-validation splits of the selection half (it only ranks layers)
    ceiling_convention : see :data:`~harmonizer_fast.neural.image_level.CEILING_CONVENTIONS`
    seed : seeds the halving, the splits and the projections
    """

    def __init__(self, name: str, images: torch.Tensor, assembly, readout: str = "pls",
                 projection_dim: Optional[int] = 256, n_splits: int = 10, selection_splits: int = 3,
                 test_size: float = 0.1, ceiling_convention: str = "r/c", seed: int = 0) -> None:
        from harmonizer_fast.neural.image_level import READOUTS, stratified_splits

        if readout not in READOUTS:
            raise ValueError(f"`readout` must be one of {sorted(READOUTS)}, got {readout!r}")
        if images.ndim != 4 or images.shape[0] != assembly.n_images:
            raise ValueError(
                f"`images` must be ({assembly.n_images}, 3, H, W) for the assembly's images, got {tuple(images.shape)}"
            )
        self.name, self.images, self.assembly = name, images, assembly
        self.readout, self.projection_dim, self.n_splits = readout, projection_dim, n_splits
        self.selection_splits = selection_splits
        self.test_size, self.ceiling_convention, self.seed = test_size, ceiling_convention, seed
        (selection, report), = stratified_splits(assembly.object_labels, n_splits=1, test_size=0.5, seed=seed)
        self.selection_images, self.report_images = selection, report
        self._halves = {
            "selection": (selection, self._subset(selection)),
            "report": (report, self._subset(report)),
        }

    def _subset(self, index: np.ndarray):
        return self.assembly.select_images(self.assembly.image_ids[index].tolist())

    def make_sink(self, layers: Sequence[str]) -> _FlatSink:
        return _FlatSink(layers, self.projection_dim, self.seed)

    def _score_half(self, half: str, accumulator: LayerFeatureAccumulator, gram: Optional[np.ndarray]):
        from harmonizer_fast.neural.image_level import score_image_level

        index, assembly = self._halves[half]
        if gram is not None:
            features = gram[np.ix_(index, index)]
        else:
            features = accumulator.features().numpy()[index]
        n_splits = self.n_splits if half == "report" else self.selection_splits
        return score_image_level(features, assembly, readout=self.readout, n_splits=n_splits,
                                 test_size=self.test_size, seed=self.seed,
                                 ceiling_convention=self.ceiling_convention)

    def score_layer(self, accumulator: LayerFeatureAccumulator) -> LayerResult:
        gram = accumulator.gram() if self.readout == "gram_ridge" else None
        selection = self._score_half("selection", accumulator, gram)
        report = self._score_half("report", accumulator, gram)
        return LayerResult(report.score, report.score_sem, report.ceiling, report.ceiled_score,
                           selection.score, accumulator.width)


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
        from harmonizer_fast.neural.metrics import ceiling_score

        return ceiling_score(recordings[..., self.report_sites], *self.time_window)

    def make_sink(self, layers: Sequence[str]) -> _MapSink:
        return _MapSink(layers)

    def score_layer(self, stored: Tuple[LayerFeatureAccumulator, Tuple[int, ...]]) -> LayerResult:
        from harmonizer_fast.neural.image_level import CEILING_CONVENTIONS
        from harmonizer_fast.neural.neural_benchmark import score_model

        accumulator, shape = stored
        if len(shape) != 3 or accumulator.n_images == 0:
            raise ValueError(f"the spatial benchmark needs (N, C, H, W) maps, the layer gave (N, {shape})")
        activity = accumulator.features().reshape(accumulator.n_images, *shape)
        (selection, _), _ = score_model(activity, self.responses[..., self.selection_sites], grid_size=None)
        (score, spread), _ = score_model(activity, self.responses[..., self.report_sites], grid_size=None)
        ceiled = CEILING_CONVENTIONS["r/c"](score, self._ceiling)
        return LayerResult(score, spread, self._ceiling, ceiled, selection, int(shape[-1]))


# --------------------------------------------------------------------------- loaders


def _image_level_sim(n_images: int = 3200, n_neuroids: int = 168, n_repetitions: int = 8, n_objects: int = 8,
                     n_features: int = 24, reliability: Tuple[float, float] = (0.5, 0.9),
                     image_size: int = 64, seed: int = 0, **scoring) -> ImageLevelBenchmark:
    from harmonizer_fast.neural.simulate import simulate_image_level

    sim = simulate_image_level(n_images=n_images, n_neuroids=n_neuroids, n_repetitions=n_repetitions,
                               n_objects=n_objects, n_features=n_features, reliability=tuple(reliability),
                               nonlinearity="softplus", seed=seed)
    images = render_stimuli(sim.features[:, None, None, :], image_size, seed=seed)
    return ImageLevelBenchmark("image-level-sim", images, sim.assembly, seed=seed, **scoring)


def _image_level(path: str, stimuli_dir: str, time_bin: Optional[int] = None, object_coord: str = "object_name",
                 seed: int = 0, **scoring) -> ImageLevelBenchmark:
    from harmonizer_fast.neural.assemblies import load_netcdf_assembly
    from harmonizer_fast.neural.data import _load_image

    assembly = load_netcdf_assembly(path, time_bin=time_bin, object_coord=object_coord)
    files = {os.path.splitext(f)[0]: os.path.join(stimuli_dir, f) for f in sorted(os.listdir(stimuli_dir))}
    missing = [str(i) for i in assembly.image_ids if str(i) not in files]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} stimuli of {path} are not in {stimuli_dir} (expected <image_id>.<ext>), e.g. {missing[:3]}"
        )
    from pathlib import Path

    images = torch.stack([_load_image(Path(files[str(i)])) for i in assembly.image_ids])
    return ImageLevelBenchmark("image-level", images, assembly, seed=seed, **scoring)


def _spatial_sim(n_images: int = 14, grid_size: int = 9, n_channels: int = 12, n_neurons: int = 16,
                 image_size: int = 96, reliability: float = 0.8, seed: int = 0) -> SpatialBenchmark:
    from harmonizer_fast.neural.simulate import simulate_spatial_dataset

    sim = simulate_spatial_dataset(n_images=n_images, grid_size=grid_size, activity_size=2 * grid_size,
                                   n_channels=n_channels, n_neurons=n_neurons, reliability=reliability,
                                   nonlinearity="softplus", seed=seed)
    images = render_stimuli(sim.activity, image_size, seed=seed)
    recordings = np.transpose(sim.image_rf, (4, 0, 1, 2, 3))
    return SpatialBenchmark("spatial-sim", images, sim.responses, recordings, sim.time_window, seed=seed)


def _spatial(path: Optional[str] = None, stimuli: str = "george_central_it", time_a: int = 130, time_b: int = 170,
             seed: int = 0) -> SpatialBenchmark:
    from harmonizer_fast.neural.data import Neural_dataset

    dataset = Neural_dataset(path)
    images, _, responses = dataset.load_data(stimuli=stimuli, time_a=time_a, time_b=time_b)
    return SpatialBenchmark("spatial", images, responses.numpy(), dataset.raw_recordings(stimuli),
                            (time_a, time_b), seed=seed)


#: Benchmark name -> loader(**options) returning an object with ``images``, ``make_sink(layers)``
#: and ``score_layer(stored) -> LayerResult``. Every loader takes ``seed``.
BENCHMARKS: Dict[str, Callable[..., object]] = {
    "image-level": _image_level,
    "image-level-sim": _image_level_sim,
    "spatial": _spatial,
    "spatial-sim": _spatial_sim,
}
BENCHMARKS.update({"clickme": load_clickme_benchmark, "image-level-objects": load_object_benchmark})


def register_benchmark(name: str, loader: Callable[..., object]) -> None:
    """Make ``loader(**options)`` available to sweeps as ``name``."""
    BENCHMARKS[name] = loader


@lru_cache(maxsize=4)
def _cached(name: str, options: Tuple[Tuple[str, object], ...]):
    return BENCHMARKS[name](**dict(options))


def get_benchmark(name: str, **options) -> object:
    """Load (once per process and options) the benchmark registered as ``name``."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; registered: {sorted(BENCHMARKS)}")
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))
    return _cached(name, frozen)
