r"""Seeded simulated recordings with a planted model and a known noise ceiling.

Both simulators draw responses from a hidden linear-nonlinear model of given features,
:math:`s = f(X W + b)`, standardised to unit variance per neuron, plus Gaussian trial noise
whose variance is set so that the **reliability** of the averaged response (the fraction of its
variance that is signal) is the planted :math:`\rho`:

.. math:: \rho = \frac{1}{1 + \sigma^2 / R} \quad\Rightarrow\quad \sigma^2 = R\,\frac{1 - \rho}{\rho}

for an average over ``R`` repetitions (image level) or ``R`` time samples (spatial). The
correlation of the noiseless signal with the averaged response is then :math:`\sqrt{\rho}`: the
best score any readout can reach. The split-half Spearman-Brown ceiling estimates :math:`\rho`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple, Union

import numpy as np

from harmonizer_fast.neural.assemblies import NeuralAssembly
from harmonizer_fast.neural.neural_benchmark import resizing_activity

__all__ = ["simulate_image_level", "simulate_spatial_dataset", "SimulatedImageLevel", "SimulatedSpatialDataset", "NONLINEARITIES"]

#: Output nonlinearity of the hidden model, by name.
NONLINEARITIES: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
    "softplus": lambda x: np.logaddexp(0.0, x),
}


def draw_reliabilities(reliability: Union[float, Tuple[float, float]], n: int, rng: np.random.Generator) -> np.ndarray:
    lo, hi = (reliability, reliability) if np.isscalar(reliability) else reliability
    if not 0 < lo <= hi < 1:
        raise ValueError(f"`reliability` must be in (0, 1) (or a (low, high) range inside it), got {reliability}")
    return rng.uniform(lo, hi, size=n)


def noisy_trials(signal: np.ndarray, rho: np.ndarray, n_repetitions: int, rng: np.random.Generator) -> np.ndarray:
    """(images, neuroids, repetitions) trials: ``signal`` plus Gaussian noise whose per-neuroid
    variance ``r (1 - rho) / rho`` makes the mean of ``r`` trials reach reliability ``rho``."""
    noise_sd = np.sqrt(n_repetitions * (1 - rho) / rho)
    return signal[:, :, None] + noise_sd[None, :, None] * rng.normal(size=signal.shape + (n_repetitions,))


def planted_signal(features: np.ndarray, n_neurons: int, nonlinearity: str, rng: np.random.Generator) -> np.ndarray:
    """f(X W + b) of (samples, d) features, each neuron standardised to zero mean, unit variance."""
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"`nonlinearity` must be one of {sorted(NONLINEARITIES)}, got {nonlinearity!r}")
    weights = rng.normal(size=(features.shape[1], n_neurons)) / np.sqrt(features.shape[1])
    drive = features @ weights + rng.normal(size=n_neurons)
    signal = NONLINEARITIES[nonlinearity](drive)
    signal = signal - signal.mean(0)
    return signal / signal.std(0)


class _PlantedReliability:
    reliability: np.ndarray

    @property
    def best_correlation(self) -> np.ndarray:
        """sqrt(reliability): correlation of the noiseless signal with the averaged response."""
        return np.sqrt(self.reliability)


@dataclass
class SimulatedImageLevel(_PlantedReliability):
    """Output of :func:`simulate_image_level`."""

    features: np.ndarray  # (images, n_features): the features the neurons are a function of
    assembly: NeuralAssembly  # (images, neuroids, repetitions) noisy responses
    signal: np.ndarray  # (images, neuroids) noiseless responses
    reliability: np.ndarray  # (neuroids,) planted reliability of the repetition mean (the ceiling)


def simulate_image_level(
    n_images: int = 400,
    n_neuroids: int = 40,
    n_repetitions: int = 10,
    n_objects: int = 8,
    n_features: int = 20,
    reliability: Union[float, Tuple[float, float]] = (0.5, 0.9),
    nonlinearity: str = "identity",
    object_strength: float = 1.0,
    seed: int = 0,
) -> SimulatedImageLevel:
    """Images x neuroids x repetitions responses with object labels from a planted LN model.

    Features are per-object means (scaled by ``object_strength``) plus per-image Gaussian
    variation, so neurons respond more alike within an object (why splits are stratified).
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n_images) % n_objects
    rng.shuffle(labels)
    features = object_strength * rng.normal(size=(n_objects, n_features))[labels] + rng.normal(size=(n_images, n_features))
    signal = planted_signal(features, n_neuroids, nonlinearity, rng)
    rho = draw_reliabilities(reliability, n_neuroids, rng)
    trials = noisy_trials(signal, rho, n_repetitions, rng)
    assembly = NeuralAssembly(
        trials,
        image_ids=np.array([f"img{i:05d}" for i in range(n_images)]),
        object_labels=np.array([f"object{k}" for k in labels]),
        neuroid_ids=np.array([f"site{j:03d}" for j in range(n_neuroids)]),
    )
    return SimulatedImageLevel(features, assembly, signal, rho)


@dataclass
class SimulatedSpatialDataset(_PlantedReliability):
    """Output of :func:`simulate_spatial_dataset` (Arcaro-like spatial maps)."""

    activity: np.ndarray  # (images, h, w, C) NHWC model activations the neurons are a function of
    image_rf: np.ndarray  # (x, y, time, neurons, images): the Arcaro .mat ``imageRF`` layout
    responses: np.ndarray  # (images, g, g, neurons): window mean, spatial axes reversed (= load_data's y)
    signal: np.ndarray  # (images, g, g, neurons) noiseless maps
    reliability: np.ndarray  # (channels,) planted reliability of the window mean at each position
    time_window: Tuple[int, int]


def simulate_spatial_dataset(
    n_images: int = 6,
    grid_size: int = 17,
    activity_size: int = 34,
    n_channels: int = 12,
    n_neurons: int = 8,
    n_time: int = 60,
    time_window: Tuple[int, int] = (20, 40),
    reliability: Union[float, Tuple[float, float]] = 0.8,
    nonlinearity: str = "identity",
    channels_per_site: int = 1,
    seed: int = 0,
) -> SimulatedSpatialDataset:
    """Spatial response maps in the Arcaro layout from a planted LN model of grid features.

    The hidden model reads :func:`resizing_activity` of ``activity`` (what the benchmark feeds its
    readout), so a readout on the same activity can reach :math:`\\sqrt{\\rho}`. Outside
    ``time_window`` the recordings are noise only. The stored ``image_rf`` has its spatial axes
    reversed, as in the real files (``Neural_dataset`` reverses them back).

    ``channels_per_site > 1`` records each of the ``n_neurons`` planted maps on that many channels
    with independent noise (channels ordered site by site): two channels of a site then correlate
    at about :math:`\rho` over positions, which is what :func:`ceiling_score` looks for.
    """
    rng = np.random.default_rng(seed)
    a, b = time_window
    if not 0 <= a < b <= n_time:
        raise ValueError(f"`time_window` must satisfy 0 <= a < b <= n_time={n_time}, got {time_window}")
    activity = rng.normal(size=(n_images, activity_size, activity_size, n_channels))
    grid = resizing_activity(activity, grid_size).numpy()
    signal = planted_signal(grid.reshape(-1, n_channels), n_neurons, nonlinearity, rng)
    if channels_per_site < 1:
        raise ValueError(f"`channels_per_site` must be >= 1, got {channels_per_site}")
    signal = np.repeat(signal.reshape(n_images, grid_size, grid_size, n_neurons), channels_per_site, axis=-1)
    rho = np.repeat(draw_reliabilities(reliability, n_neurons, rng), channels_per_site)
    noise_sd = np.sqrt((b - a) * (1 - rho) / rho)
    noise = noise_sd * rng.normal(size=(n_images, grid_size, grid_size, n_time, signal.shape[-1]))
    recordings = noise
    recordings[:, :, :, a:b] += signal[:, :, :, None, :]
    responses = recordings[:, :, :, a:b].mean(3)
    image_rf = np.transpose(recordings[:, ::-1, ::-1], (1, 2, 3, 4, 0)).copy()
    return SimulatedSpatialDataset(activity, image_rf, responses, signal, rho, (a, b))
