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

**Streaming and layer choice.** Every layer output of a batch is folded into that layer's
store right away (:class:`harmonizer_fast.neural.features.LayerFeatureStore`: full flattened
features, in memory within ``memory_budget_gib``, else spooled to one file per layer); a
layer's reported score is the score of its full features. The layer is chosen by the
``layer_choice`` rule (the table's ``choice_rule`` column): Brain-Score's PCA-1000 choice
(``pca``, components fitted on ``--pca-images`` or on the benchmark's own stimuli) or the
bias-free ``disjoint`` one (chosen on one half of the images, reported on the other). The
spatial benchmarks halve the recording *sites* instead (14 stimuli are too few to halve): the
layer is chosen on the selection sites, scored and ceiled on the others. ``image-level-objects``
(:mod:`harmonizer_fast.zoo.object_benchmark`) and ``clickme``
(:mod:`harmonizer_fast.zoo.clickme_benchmark`) are registered here too.

**Simulated stimuli.** The simulators plant responses on hidden features, not on images, so the
stimuli are rendered from those features (:func:`render_stimuli`): each hidden feature (or each
channel of a hidden spatial map) scales its own fixed random colour grating, the gratings are
summed and squashed into 0..255. A network sees the hidden features through texture, colour and
position, as it would see a real stimulus.
"""
from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from harmonizer_fast.spec import check_positive_int
from harmonizer_fast.neural.features import LayerFeatureAccumulator, LayerFeatureStore
from harmonizer_fast.zoo.clickme_benchmark import load_clickme_benchmark
from harmonizer_fast.zoo.object_benchmark import load_object_benchmark

#: Name of the benchmark's own stimuli among its image streams.
STIMULI = "stimuli"
#: Name of the images the principal components of the PCA layer choice are fitted on.
PCA_IMAGES = "pca-images"
#: Layer-choice rules of the image-level benchmarks.
LAYER_CHOICES = {
    "pca": "Brain-Score's: every layer reduced to its principal components (fitted on separate "
           "images), the best by its score on the benchmark; the chosen layer is reported with its full features",
    "disjoint": "bias-free: the images are halved; the layer is chosen on one half (full features) "
                "and reported on the other",
}


__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "LAYER_CHOICES",
    "LayerResult",
    "LayerSink",
    "READOUT_OPTIONS",
    "configured_readout",
    "load_image_folder",
    "ImageLevelBenchmark",
    "SpatialBenchmark",
    "get_benchmark",
    "register_benchmark",
    "render_stimuli",
]


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


class _FullFeatureSink:
    """Per-layer full features of an image-level benchmark: the stimuli's (memory-bounded, see
    :class:`~harmonizer_fast.neural.features.LayerFeatureStore`) and, for the PCA layer choice,
    those of the separate PCA images."""

    def __init__(self, layers: Sequence[str], streams: Dict[str, int], memory_budget: float,
                 spool_dir: Optional[str]) -> None:
        self.stores = {name: LayerFeatureStore(layers, n, memory_budget, spool_dir) for name, n in streams.items()}

    def update(self, outputs: Mapping[str, torch.Tensor], stream: str = STIMULI) -> None:
        self.stores[stream].update(dict(outputs))

    def finish(self) -> Dict[str, "_StoredLayer"]:
        layers = self.stores[STIMULI].layers
        return {name: _StoredLayer(name, self.stores) for name in layers}

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


@dataclass
class _StoredLayer:
    """Handle on one layer's stored features (loaded only when the layer is scored)."""

    layer: str
    stores: Dict[str, LayerFeatureStore]

    def features(self, stream: str = STIMULI) -> np.ndarray:
        return self.stores[stream].features(self.layer)

    def discard(self) -> None:
        for store in self.stores.values():
            store.discard(self.layer)


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


#: score_image_level arguments the benchmark sets itself.
_NOT_SCORING_OPTIONS = {"features", "assembly", "readout", "object_labels", "progress"}
#: Options each readout takes (``--bench-option BENCH:alphas=(0.1,1,10)``), with their defaults'
#: source: :class:`~harmonizer_fast.neural.pls.PLSRegression` (25 components, ``scale=False``),
#: :class:`~harmonizer_fast.neural.ridge.RidgeCV` / :func:`~harmonizer_fast.neural.features.gram_ridge_predict`.
READOUT_OPTIONS = {"pls": ("pls_components", "tol", "max_iter"), "ridge": ("alphas",), "gram_ridge": ("alphas",)}


def configured_readout(readout: str, options: Mapping[str, object]) -> str:
    """Name of ``readout`` with ``options`` in :data:`~harmonizer_fast.neural.image_level.READOUTS`
    (registered on first use; without options the readout's own name)."""
    from harmonizer_fast.neural.image_level import READOUTS, register_readout

    if not options:
        return readout
    allowed = READOUT_OPTIONS.get(readout, ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"readout {readout!r} takes options {list(allowed)}, got {unknown}")
    if "alphas" in options:
        alphas = options["alphas"]
        values = list(alphas) if isinstance(alphas, (list, tuple)) else [alphas]
        if not values or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) and a > 0
                                 for a in values):
            raise ValueError(f"`alphas` must be positive finite numbers, got {alphas!r}")
        options = {**options, "alphas": tuple(float(a) for a in values)}
    for key in ("pls_components", "max_iter"):
        if key in options:
            check_positive_int(options[key], key)
    if "tol" in options and not (isinstance(options["tol"], (int, float)) and options["tol"] > 0):
        raise ValueError(f"`tol` must be a positive number, got {options['tol']!r}")
    name = f"{readout}({', '.join(f'{k}={v!r}' for k, v in sorted(options.items()))})"
    if name not in READOUTS:
        register_readout(name, _make_readout(readout, dict(options)))
    return name


def _make_readout(readout: str, options: Dict[str, object]):
    if readout == "pls":
        from harmonizer_fast.neural.pls import PLSRegression

        components = int(options.pop("pls_components", 25))

        def fit_predict(features, targets, train, test):
            n_components = min(components, features.shape[1], len(train) - 1)
            pls = PLSRegression(n_components, scale=False, **options).fit(features[train], targets[train])
            return np.asarray(pls.predict(features[test]))
    elif readout == "ridge":
        from harmonizer_fast.neural.ridge import RidgeCV

        def fit_predict(features, targets, train, test):
            return np.asarray(RidgeCV(**options).fit(features[train], targets[train]).predict(features[test]))
    else:
        from harmonizer_fast.neural.features import gram_ridge_predict

        def fit_predict(gram, targets, train, test):
            return gram_ridge_predict(gram, targets, train, test, **options)
    return fit_predict


class ImageLevelBenchmark:
    """Image-level scoring of (images, neuroids, repetitions) recordings (see the module docstring).

    Parameters
    ----------
    name : str
    images : (n, 3, H, W) uint8 tensor, in the assembly's image order
    assembly : :class:`harmonizer_fast.neural.assemblies.NeuralAssembly`
    layer_choice : ``'pca'`` (default, Brain-Score's rule) or ``'disjoint'`` (:data:`LAYER_CHOICES`)
    pca_images : (m, 3, H, W) uint8 images the principal components are fitted on (Brain-Score:
        1,000 ImageNet validation images); None fits them on a seeded sample of
        ``min(n_components, n)`` of the benchmark's own stimuli (no neural data involved)
    n_components : principal components per layer for the PCA choice (Brain-Score: 1,000);
        a layer with no more features than that is used as it is, as Brain-Score does
    readout : name in :data:`harmonizer_fast.neural.image_level.READOUTS` (``'pls'`` by default);
        its options (:data:`READOUT_OPTIONS`: ``pls_components``, ``tol``, ``max_iter`` for PLS,
        ``alphas`` for the ridges) are taken from ``**scoring``
    selection_splits : cross-validation splits of the selection half (``'disjoint'`` only)
    memory_budget_gib : stored full features kept in memory up to this size, spooled to files
        under ``spool_dir`` beyond it (:class:`~harmonizer_fast.neural.features.LayerFeatureStore`)
    seed : seeds the simulator (for ``image-level-sim``), the halving and the PCA sample
    **scoring : passed on to :func:`~harmonizer_fast.neural.image_level.score_image_level`
        (``n_splits``, ``test_size``, ``ceiling_convention``, ...); what is not given takes
        its defaults, i.e. Brain-Score's protocol
    """

    def __init__(self, name: str, images: torch.Tensor, assembly, layer_choice: str = "pca",
                 pca_images: Optional[torch.Tensor] = None, n_components: int = 1000, readout: str = "pls",
                 selection_splits: int = 3, memory_budget_gib: float = 2.0, spool_dir: Optional[str] = None,
                 seed: int = 0, **scoring) -> None:
        from harmonizer_fast.neural.image_level import READOUTS, score_image_level, stratified_splits

        if readout not in READOUTS:
            raise ValueError(f"`readout` must be one of {sorted(READOUTS)}, got {readout!r}")
        readout_options = {k: scoring.pop(k) for k in list(scoring) if k in READOUT_OPTIONS.get(readout, ())}
        readout = configured_readout(readout, readout_options)
        accepted = set(inspect.signature(score_image_level).parameters) - _NOT_SCORING_OPTIONS
        unknown = sorted(set(scoring) - accepted)
        if unknown:
            raise ValueError(f"unknown image-level options {unknown}; score_image_level takes {sorted(accepted)}, "
                             f"the benchmark also layer_choice, pca_images, n_components, readout, selection_splits, "
                             f"memory_budget_gib, spool_dir, seed, and the readout's options {READOUT_OPTIONS}")
        if layer_choice not in LAYER_CHOICES:
            raise ValueError(f"`layer_choice` must be one of {sorted(LAYER_CHOICES)}, got {layer_choice!r}")
        check_positive_int(n_components, "n_components")
        check_positive_int(selection_splits, "selection_splits")
        if not (isinstance(memory_budget_gib, (int, float)) and not isinstance(memory_budget_gib, bool)
                and memory_budget_gib >= 0):
            raise ValueError(f"`memory_budget_gib` must be a number >= 0, got {memory_budget_gib!r}")
        if images.ndim != 4 or images.shape[0] != assembly.n_images:
            raise ValueError(
                f"`images` must be ({assembly.n_images}, 3, H, W) for the assembly's images, got {tuple(images.shape)}"
            )
        if pca_images is not None and (pca_images.ndim != 4 or pca_images.shape[0] < 2):
            raise ValueError(f"`pca_images` must be (m >= 2, 3, H, W), got {tuple(pca_images.shape)}")
        self.name, self.images, self.assembly = name, images, assembly
        self.layer_choice, self.pca_images, self.n_components = layer_choice, pca_images, int(n_components)
        self.readout, self.selection_splits, self.scoring = readout, int(selection_splits), dict(scoring)
        self._ceilings: Dict[str, object] = {}
        self.memory_budget, self.spool_dir, self.seed = float(memory_budget_gib) * 2**30, spool_dir, seed
        n = assembly.n_images
        rng = np.random.default_rng(seed)
        self.pca_sample = np.sort(rng.permutation(n)[: min(self.n_components, n)])
        (selection, report), = stratified_splits(assembly.object_labels, n_splits=1, test_size=0.5, seed=seed)
        self.selection_images, self.report_images = selection, report
        self._halves = {
            "all": (np.arange(n), assembly),
            "selection": (selection, self._subset(selection)),
            "report": (report, self._subset(report)),
        }

    @property
    def choice_rule(self) -> str:
        """How this benchmark chooses a model's layer, as the table records it."""
        if self.layer_choice == "disjoint":
            return "disjoint-halves"
        source = "pca-images" if self.pca_images is not None else "own-stimuli"
        return f"pca{self.n_components}-{source}"

    def image_streams(self) -> List[Tuple[str, torch.Tensor]]:
        """The image sets to stream through the model, in order."""
        streams = [(STIMULI, self.images)]
        if self.layer_choice == "pca" and self.pca_images is not None:
            streams.insert(0, (PCA_IMAGES, self.pca_images))
        return streams

    def _subset(self, index: np.ndarray):
        return self.assembly.select_images(self.assembly.image_ids[index].tolist())

    def make_sink(self, layers: Sequence[str]) -> _FullFeatureSink:
        streams = {name: images.shape[0] for name, images in self.image_streams()}
        return _FullFeatureSink(layers, streams, self.memory_budget, self.spool_dir)

    def _score(self, half: str, features: np.ndarray, n_splits: Optional[int] = None):
        from harmonizer_fast.neural.image_level import BRAINSCORE_SEED, assembly_ceiling, score_image_level

        index, assembly = self._halves[half]
        rows = features if half == "all" else features[index]
        if self.readout.startswith("gram_ridge"):
            rows = rows @ rows.T
        options = dict(self.scoring)
        if n_splits is not None:
            options["n_splits"] = n_splits
        if half not in self._ceilings:  # one ceiling per half, shared by every layer
            self._ceilings[half] = assembly_ceiling(
                assembly, options.get("n_ceiling_splits", 10), options.get("seed", BRAINSCORE_SEED))
        return score_image_level(rows, assembly, readout=self.readout, ceiling=self._ceilings[half], **options)

    def _choice_features(self, stored: "_StoredLayer", features: np.ndarray) -> np.ndarray:
        from harmonizer_fast.neural.features import layer_pca

        reference = stored.features(PCA_IMAGES) if self.pca_images is not None else features[self.pca_sample]
        pca = layer_pca(reference, self.n_components)
        del reference
        return features if pca is None else pca.transform(features)

    def score_layer(self, stored: "_StoredLayer") -> LayerResult:
        """Score one layer's full features (exactly, through their n x n embedding when wider
        than the image count) and give its choice score under this benchmark's rule."""
        from harmonizer_fast.neural.features import exact_embedding

        try:
            features = stored.features()
            width = int(features.shape[1])
            choice = self._choice_features(stored, features) if self.layer_choice == "pca" else None
            embedded = exact_embedding(features)
            del features
        finally:
            stored.discard()
        if choice is not None:
            selection = self._score("all", choice)
            report = self._score("all", embedded)
        else:
            selection = self._score("selection", embedded, self.selection_splits)
            report = self._score("report", embedded)
        return LayerResult(report.score, report.score_sem, report.ceiling, report.ceiled_score,
                           selection.score, width, self.choice_rule)


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

    #: The layer is chosen on half of the recording sites and reported on the other half.
    choice_rule = "disjoint-sites"

    def image_streams(self) -> List[Tuple[str, torch.Tensor]]:
        return [(STIMULI, self.images)]

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
        return LayerResult(score, spread, self._ceiling, ceiled, selection, int(shape[-1]), self.choice_rule)


# --------------------------------------------------------------------------- loaders


def _image_level_sim(n_images: int = 3200, n_neuroids: int = 168, n_repetitions: int = 8, n_objects: int = 8,
                     n_features: int = 24, reliability: Tuple[float, float] = (0.5, 0.9),
                     image_size: int = 64, pca_images: Optional[str] = None, seed: int = 0,
                     **scoring) -> ImageLevelBenchmark:
    from harmonizer_fast.neural.simulate import simulate_image_level

    for name, value in (("n_images", n_images), ("n_neuroids", n_neuroids), ("n_repetitions", n_repetitions),
                        ("n_objects", n_objects), ("n_features", n_features), ("image_size", image_size)):
        check_positive_int(value, name)
    sim = simulate_image_level(n_images=n_images, n_neuroids=n_neuroids, n_repetitions=n_repetitions,
                               n_objects=n_objects, n_features=n_features, reliability=tuple(reliability),
                               nonlinearity="softplus", seed=seed)
    images = render_stimuli(sim.features[:, None, None, :], image_size, seed=seed)
    return ImageLevelBenchmark("image-level-sim", images, sim.assembly, seed=seed,
                               pca_images=load_image_folder(pca_images) if pca_images else None, **scoring)


def load_image_folder(folder: str) -> torch.Tensor:
    """Every image file of ``folder`` (sorted by name), RGB, resized to 224 x 224, as uint8 NCHW
    (the ``pca_images`` of the PCA layer choice; Brain-Score uses 1,000 ImageNet validation images)."""
    from pathlib import Path

    from harmonizer_fast.neural.data import _load_image

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"`pca_images` folder {folder!r} does not exist")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(f"`pca_images` folder {folder!r} holds {len(files)} images ({sorted(_IMAGE_SUFFIXES)}); need >= 2")
    return torch.stack([_load_image(p) for p in files])


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def _image_level(path: str, stimuli_dir: Optional[str] = None, stimulus_set: Optional[str] = None,
                 stimuli: Optional[str] = None, region: Optional[str] = None,
                 time_range: Optional[Tuple[float, float]] = None, time_bin: Optional[int] = None,
                 stimulus_degrees: float = 8.0, model_degrees: float = 8.0, object_coord: str = "object_name",
                 pca_images: Optional[str] = None, seed: int = 0, **scoring) -> ImageLevelBenchmark:
    """Recordings from local files: a netCDF assembly (``path``) with either Brain-Score's stimulus
    set (``stimulus_set`` CSV, images in the ``stimuli`` folder or zip) or a folder of
    ``<image_id>.<ext>`` files (``stimuli_dir``, read as the Arcaro stimuli are: RGB, 224 px).

    Stimulus-set stimuli go through Brain-Score's model-independent steps here: RGB as its ``load_image``, then
    placed on the model's field of view (``model_degrees``, 8 by default, against the benchmark's
    ``stimulus_degrees``: grey padding or a central crop, :func:`~harmonizer_fast.neural.stimuli.place_on_screen`);
    each model then resizes them to its own input size and normalises them with its own mean/std.
    """
    from pathlib import Path

    from harmonizer_fast.neural.assemblies import load_netcdf_assembly
    from harmonizer_fast.neural.data import _load_image
    from harmonizer_fast.neural.stimuli import brainscore_load_image, load_stimulus_set, place_on_screen

    if (stimulus_set is None) == (stimuli_dir is None):
        raise ValueError("image-level needs exactly one of `stimulus_set` (Brain-Score's CSV, with `stimuli`) "
                         f"or `stimuli_dir` (<image_id>.<ext> files), got stimulus_set={stimulus_set!r}, "
                         f"stimuli_dir={stimuli_dir!r}")
    if stimulus_set is not None:
        stimulus_table = load_stimulus_set(stimulus_set, stimuli)
        assembly = load_netcdf_assembly(path, time_bin=time_bin, object_coord=object_coord,
                                        time_range=tuple(time_range) if time_range is not None else None,
                                        region=region, stimulus_set=stimulus_table)
        opened = [stimulus_table.open(i) for i in assembly.image_ids]
    else:
        assembly = load_netcdf_assembly(path, time_bin=time_bin, object_coord=object_coord,
                                        time_range=tuple(time_range) if time_range is not None else None,
                                        region=region)
        files = {os.path.splitext(f)[0]: os.path.join(stimuli_dir, f) for f in sorted(os.listdir(stimuli_dir))}
        missing = [str(i) for i in assembly.image_ids if str(i) not in files]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} stimuli of {path} are not in {stimuli_dir} (expected <image_id>.<ext>), e.g. {missing[:3]}"
            )
        # the folder layout keeps its loader: RGB, resized to 224 px as the Arcaro stimuli are
        images = torch.stack([_load_image(Path(files[str(i)])) for i in assembly.image_ids])
        return ImageLevelBenchmark("image-level", images, assembly, seed=seed,
                                   pca_images=load_image_folder(pca_images) if pca_images else None, **scoring)
    placed = [place_on_screen(brainscore_load_image(image), model_degrees, stimulus_degrees) for image in opened]
    sizes = sorted({image.size for image in placed})
    if len(sizes) > 1:
        raise ValueError(f"the stimuli of {path} come in {len(sizes)} sizes ({sizes[:3]}...): the sweep streams them "
                         "as one batch array, so they must share one size")
    images = torch.stack([torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
                          for image in placed])
    return ImageLevelBenchmark("image-level", images, assembly, seed=seed,
                               pca_images=load_image_folder(pca_images) if pca_images else None, **scoring)


def _spatial_sim(n_images: int = 14, grid_size: int = 9, n_channels: int = 12, n_neurons: int = 16,
                 image_size: int = 96, reliability: float = 0.8, seed: int = 0) -> SpatialBenchmark:
    from harmonizer_fast.neural.simulate import simulate_spatial_dataset

    for name, value in (("n_images", n_images), ("grid_size", grid_size), ("n_channels", n_channels),
                        ("n_neurons", n_neurons), ("image_size", image_size)):
        check_positive_int(value, name)
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


#: Benchmark name -> loader(**options) returning a :class:`Benchmark`. Every loader takes ``seed``.
BENCHMARKS: Dict[str, Callable[..., Benchmark]] = {
    "image-level": _image_level,
    "image-level-sim": _image_level_sim,
    "spatial": _spatial,
    "spatial-sim": _spatial_sim,
}
BENCHMARKS.update({"clickme": load_clickme_benchmark, "image-level-objects": load_object_benchmark})


def register_benchmark(name: str, loader: Callable[..., Benchmark]) -> None:
    """Make ``loader(**options)`` available to sweeps as ``name``."""
    BENCHMARKS[name] = loader


@lru_cache(maxsize=4)
def _cached(name: str, options: Tuple[Tuple[str, object], ...]):
    return BENCHMARKS[name](**dict(options))


def get_benchmark(name: str, **options) -> Benchmark:
    """Load (once per process and options) the benchmark registered as ``name``."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; registered: {sorted(BENCHMARKS)}")
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))
    return _cached(name, frozen)
