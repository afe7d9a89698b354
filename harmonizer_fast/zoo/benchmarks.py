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
(:mod:`harmonizer_fast.zoo.clickme_benchmark`) are registered here too. The
benchmark classes are in :mod:`harmonizer_fast.zoo.image_level_benchmark` and
:mod:`harmonizer_fast.zoo.spatial_benchmark`, the contract they meet in
:mod:`harmonizer_fast.zoo.benchmark_protocol`; this module holds the loaders and the registry.

**Simulated stimuli.** The simulators plant responses on hidden features, not on images, so the
stimuli are rendered from those features (:func:`render_stimuli`): each hidden feature (or each
channel of a hidden spatial map) scales its own fixed random colour grating, the gratings are
summed and squashed into 0..255. A network sees the hidden features through texture, colour and
position, as it would see a real stimulus.
"""
from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from harmonizer_fast.neural.assemblies import load_netcdf_assembly
from harmonizer_fast.neural.data import Neural_dataset, _load_image
from harmonizer_fast.neural.simulate import simulate_image_level, simulate_spatial_dataset
from harmonizer_fast.neural.stimuli import brainscore_load_image, load_stimulus_set, place_on_screen
from harmonizer_fast.spec import check_positive_int
from harmonizer_fast.zoo.benchmark_protocol import PCA_IMAGES, STIMULI, Benchmark, LayerResult, LayerSink
from harmonizer_fast.zoo.clickme_benchmark import load_clickme_benchmark
from harmonizer_fast.zoo.image_level_benchmark import (
    LAYER_CHOICES,
    READOUT_OPTIONS,
    ImageLevelBenchmark,
    configured_readout,
)
from harmonizer_fast.zoo.object_benchmark import load_object_benchmark
from harmonizer_fast.zoo.spatial_benchmark import SpatialBenchmark

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "LAYER_CHOICES",
    "LayerResult",
    "LayerSink",
    "PCA_IMAGES",
    "STIMULI",
    "READOUT_OPTIONS",
    "configured_readout",
    "load_image_folder",
    "ImageLevelBenchmark",
    "SpatialBenchmark",
    "get_benchmark",
    "register_benchmark",
    "render_stimuli",
]


#: Bytes of resized float32 amplitude maps rendered at once by :func:`render_stimuli`: images are
#: rendered in blocks of this size, so memory does not grow with the image count (3,200 images of
#: 24 channels at 224 px were 15.4 GB of maps in one piece, a 20 GiB peak before a sweep began).
RENDER_BLOCK_BYTES = 256 * 2**20


def render_stimuli(amplitudes: np.ndarray, size: int, seed: int = 0) -> torch.Tensor:
    r"""Render (n, h, w, K) amplitude maps as (n, 3, size, size) uint8 images.

    Each of the K channels gets a fixed random grating :math:`T_k` (orientation, spatial
    frequency, phase and RGB colour drawn from ``seed``); the image is
    :math:`255\,\sigma\big(\sum_k \tilde A_k \odot T_k / \sqrt{K}\big)`, with :math:`\tilde A_k`
    the amplitude map resized bilinearly to ``size`` (a constant map for h = w = 1). Images are
    rendered in blocks of :data:`RENDER_BLOCK_BYTES` of resized maps (each image on its own: the
    same pixels whatever the block).
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
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    block = max(1, RENDER_BLOCK_BYTES // (4 * k * size * size))
    for start in range(0, n, block):
        maps = torch.from_numpy(amplitudes[start:start + block]).permute(0, 3, 1, 2)
        maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
        images = torch.einsum("nkyx,kcyx->ncyx", maps, carriers) / math.sqrt(k)
        out[start:start + block] = (255.0 * torch.sigmoid(images)).round().to(torch.uint8)
    return out


# --------------------------------------------------------------------------- loaders


def _image_level_sim(n_images: int = 3200, n_neuroids: int = 168, n_repetitions: int = 8, n_objects: int = 8,
                     n_features: int = 24, reliability: Tuple[float, float] = (0.5, 0.9),
                     image_size: int = 64, pca_images: Optional[str] = None, seed: int = 0,
                     **scoring) -> ImageLevelBenchmark:
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
