"""The image-level benchmark: Brain-Score's protocol on (images, neuroids, repetitions) recordings.

:class:`ImageLevelBenchmark` keeps every layer's full flattened features of its stimuli (and,
for the PCA layer choice, of the separate PCA images) in a memory-bounded
:class:`~harmonizer_fast.neural.features.LayerFeatureStore`, scores a layer with
:func:`harmonizer_fast.neural.image_level.score_image_level` on its full features (exactly,
through their n x n embedding), and ranks layers by the :data:`LAYER_CHOICES` rule it was
given. Readout options (:data:`READOUT_OPTIONS`) register a configured readout
(:func:`configured_readout`). The loaders that build it from files or simulations are in
:mod:`harmonizer_fast.zoo.benchmarks`.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from harmonizer_fast.neural.features import LayerFeatureStore, exact_embedding, gram_ridge_predict, layer_pca
from harmonizer_fast.neural.image_level import (
    BRAINSCORE_SEED,
    READOUTS,
    assembly_ceiling,
    register_readout,
    score_image_level,
    stratified_splits,
)
from harmonizer_fast.neural.pls import PLSRegression
from harmonizer_fast.neural.ridge import RidgeCV
from harmonizer_fast.spec import check_positive_int
from harmonizer_fast.zoo.benchmark_protocol import PCA_IMAGES, STIMULI, LayerResult

__all__ = ["LAYER_CHOICES", "READOUT_OPTIONS", "ImageLevelBenchmark", "configured_readout"]

#: Layer-choice rules of the image-level benchmarks.
LAYER_CHOICES = {
    "pca": "Brain-Score's: every layer reduced to its principal components (fitted on separate "
           "images), the best by its score on the benchmark; the chosen layer is reported with its full features",
    "disjoint": "bias-free: the images are halved; the layer is chosen on one half (full features) "
                "and reported on the other",
}



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


#: score_image_level arguments the benchmark sets itself.
_NOT_SCORING_OPTIONS = {"features", "assembly", "readout", "object_labels", "progress"}
#: Options each readout takes (``--bench-option BENCH:alphas=(0.1,1,10)``), with their defaults'
#: source: :class:`~harmonizer_fast.neural.pls.PLSRegression` (25 components, ``scale=False``),
#: :class:`~harmonizer_fast.neural.ridge.RidgeCV` / :func:`~harmonizer_fast.neural.features.gram_ridge_predict`.
READOUT_OPTIONS = {"pls": ("pls_components", "tol", "max_iter"), "ridge": ("alphas",), "gram_ridge": ("alphas",)}


def configured_readout(readout: str, options: Mapping[str, object]) -> str:
    """Name of ``readout`` with ``options`` in :data:`~harmonizer_fast.neural.image_level.READOUTS`
    (registered on first use; without options the readout's own name)."""
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
        components = int(options.pop("pls_components", 25))

        def fit_predict(features, targets, train, test):
            n_components = min(components, features.shape[1], len(train) - 1)
            pls = PLSRegression(n_components, scale=False, **options).fit(features[train], targets[train])
            return np.asarray(pls.predict(features[test]))
    elif readout == "ridge":
        def fit_predict(features, targets, train, test):
            return np.asarray(RidgeCV(**options).fit(features[train], targets[train]).predict(features[test]))
    else:
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
        reference = stored.features(PCA_IMAGES) if self.pca_images is not None else features[self.pca_sample]
        pca = layer_pca(reference, self.n_components)
        del reference
        return features if pca is None else pca.transform(features)

    def score_layer(self, stored: "_StoredLayer") -> LayerResult:
        """Score one layer's full features (exactly, through their n x n embedding when wider
        than the image count) and give its choice score under this benchmark's rule."""
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
