"""Spatial IT benchmark of Linsley, Rodriguez et al. 2023 (port of ``neural_harmonizer.evaluation.neural_benchmark``).

The Arcaro et al. (2020) recordings give, for each of a few natural images, a map of each IT
channel's response over a grid of image positions. A model layer's (images, h, w, C) activations
are brought to the same grid (:func:`resizing_activity`); each grid position of each image is a
sample, channels are features and recording channels are targets. :func:`score_features`
fits a PLS readout leaving one image out at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from harmonizer_fast.spec import ArrayLike, check_rank, shape_of
from harmonizer_fast.neural.features import LayerSpec, LayerTaps
from harmonizer_fast.neural.layer_scores import score_every_layer
from harmonizer_fast.neural.metrics import CORRELATIONS, REDUCERS, _lookup, as_tensor, brain_score, ceiling_score, spearmanr_sim
from harmonizer_fast.neural.data import Neural_dataset

__all__ = [
    "resizing_activity",
    "score_features",
    "score_model",
    "extract_activations",
    "neural_benchmark_score",
    "NeuralBenchmarkResult",
    "GRID_SIZES",
]

#: Grid of the spatial maps of each monkey (its recordings' x and y sides).
GRID_SIZES = {"george": 17, "red": 9}


def _block_mean(x: torch.Tensor, axis: int, grid_size: int) -> torch.Tensor:
    """Mean over the index blocks ``[int(i * n / g), int((i + 1) * n / g))`` along ``axis``."""
    n = x.shape[axis]
    bounds = torch.tensor([int(i * n / float(grid_size)) for i in range(grid_size + 1)])
    zero = torch.zeros_like(x.narrow(axis, 0, 1))
    cumulative = torch.cat([zero, x.cumsum(axis)], axis)
    sums = cumulative.index_select(axis, bounds[1:]) - cumulative.index_select(axis, bounds[:-1])
    shape = [1] * x.ndim
    shape[axis] = grid_size
    return sums / (bounds[1:] - bounds[:-1]).to(x.dtype).reshape(shape)


def _linear_resize(x: torch.Tensor, axis: int, grid_size: int) -> torch.Tensor:
    """TensorFlow-style (half-pixel, no antialias) linear interpolation along ``axis``."""
    moved = x.movedim(axis, -1)
    flat = moved.reshape(-1, 1, moved.shape[-1])
    out = F.interpolate(flat, size=grid_size, mode="linear", align_corners=False)
    return out.reshape(*moved.shape[:-1], grid_size).movedim(-1, axis)


def resizing_activity(
    activity_array: ArrayLike, grid_size: int = 17, reference_bug_compat: bool = False
) -> torch.Tensor:
    """Bring (images, h, w, C) activations to a ``grid_size`` x ``grid_size`` grid, then min-max each image.

    Along a spatial axis longer than the grid, grid cell ``i`` is the mean over the index range
    ``[int(i * n / g), int((i + 1) * n / g))``; along an axis no longer than the grid the map is
    resized bilinearly (TensorFlow half-pixel centres, no antialias). Each image is then scaled to
    [0, 1] over all its values at once: ``x = (x - min) / (max - min)`` (a constant image stays 0).
    Input is NHWC like the reference; the result is a float64 tensor (images, g, g, C).

    Notes
    -----
    Reference bugs fixed: its upsampling branch resizes 3-channel slices ``ac:ac+3`` for
    ``ac in range(C - 3)``, so the last channel stays zero (and with ``C <= 3`` every channel is
    zero, after which the min-max gives NaN); it assumed 14 images and square maps; a constant
    image gave NaN. ``reference_bug_compat=True`` zeroes the channels the reference left at zero
    (deep layers with maps no larger than the grid, e.g. 7x7 or 14x14 on George's 17x17, went through
    that branch, so published layer scores include the zero channel).
    """
    act = as_tensor(activity_array, "activity_array", torch.float64)
    check_rank(act, 4, "activity_array", "images x h x w x channels (NHWC)")
    if grid_size < 1:
        raise ValueError(f"`grid_size` must be >= 1, got {grid_size}")
    out = act
    for axis in (1, 2):
        resample = _block_mean if out.shape[axis] > grid_size else _linear_resize
        out = resample(out, axis, grid_size)
    if reference_bug_compat and act.shape[1] <= grid_size:
        out = out.clone()
        out[..., max(act.shape[-1] - 1, 0):] = 0.0
        if act.shape[-1] <= 3:
            out.zero_()
    flat = out.reshape(out.shape[0], -1)
    flat = flat - flat.min(1, keepdim=True).values
    peak = flat.max(1, keepdim=True).values
    flat = torch.where(peak > 0, flat / torch.where(peak > 0, peak, torch.ones_like(peak)), flat)
    return flat.reshape(out.shape)


def score_features(
    X_features: ArrayLike,
    Y: ArrayLike,
    grid_size: Optional[int] = 17,
    reducer: str = "median",
    correlation_fn: str = "pearson",
    progress: bool = False,
) -> Tuple[List[float], List[float], List[float]]:
    """Leave-one-image-out PLS score of grid features against spatial neural maps.

    ``X_features`` is (images, g, g, C) (from :func:`resizing_activity`), ``Y`` is
    (images, g, g, neurons). For each held-out image, the other images' ``(n - 1) g^2`` grid
    positions train :func:`brain_score` (channels -> neurons), the held-out image's ``g^2``
    positions test it. Besides the score, the predicted map (mean over neurons of the predictions)
    is compared with the measured map (mean over neurons) with :func:`spearmanr_sim` at reducers
    1 and 4.

    Returns ``[mean, std]`` over folds (population std) of the brain score, of the reducer-4
    Spearman similarity and of the reducer-1 one. ``grid_size=None`` takes it from ``Y``.
    The reference assumed exactly 14 images; any number >= 2 works here.
    """
    x = as_tensor(X_features, "X_features", torch.float64)
    y = as_tensor(Y, "Y", torch.float64)
    check_rank(x, 4, "X_features", "images x g x g x channels")
    check_rank(y, 4, "Y", "images x g x g x neurons")
    g = y.shape[1] if grid_size is None else grid_size
    if x.shape[:3] != (x.shape[0], g, g) or y.shape[:3] != x.shape[:3]:
        raise ValueError(
            f"X_features {shape_of(x)} and Y {shape_of(y)} must share (images, {g}, {g}) leading axes"
        )
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"leave-one-image-out needs at least 2 images, got X_features {shape_of(x)}")
    scores, sims4, sims1 = [], [], []
    for out in tqdm(range(n), desc="images", disable=not progress, leave=False):
        rest = [j for j in range(n) if j != out]
        score, _, y_pred = brain_score(
            x[rest].reshape(len(rest) * g * g, -1),
            y[rest].reshape(len(rest) * g * g, -1),
            x[out].reshape(g * g, -1),
            y[out].reshape(g * g, -1),
            reducer=reducer,
            correlation_fn=correlation_fn,
        )
        measured = y[out].mean(2).reshape(1, g, g)
        predicted = y_pred.reshape(g, g, -1).mean(2).reshape(1, g, g)
        sims = spearmanr_sim(predicted, measured, reducers=(1, 4))
        scores.append(score)
        sims4.append(sims[4][0])
        sims1.append(sims[1][0])

    def mean_std(values: List[float]) -> List[float]:
        return [float(np.mean(values)), float(np.std(values))]

    return mean_std(scores), mean_std(sims4), mean_std(sims1)


def _group_channels(activity: torch.Tensor) -> torch.Tensor:
    """Average consecutive channels in groups of 3 (else 4) when there are more than 600."""
    c = activity.shape[-1]
    if c <= 600:
        return activity
    for group in (3, 4):
        if c % group == 0:
            return activity.reshape(*activity.shape[:-1], c // group, group).mean(-1)
    raise ValueError(
        f"activity_array {shape_of(activity)} has {c} > 600 channels, not divisible by 3 or 4: "
        "cannot group them (reduce the channels before scoring)"
    )


def score_model(
    activity_array: ArrayLike,
    Y: ArrayLike,
    grid_size: Optional[int] = 17,
    correlation_fn: str = "pearson",
    reducer: str = "median",
    reference_bug_compat: bool = False,
    progress: bool = False,
) -> Tuple[List[float], List[float]]:
    """Score one layer's (images, h, w, C) activations against (images, g, g, neurons) maps.

    More than 600 channels are first averaged in consecutive groups of 3 (or 4 when C is not a
    multiple of 3), then :func:`resizing_activity` and :func:`score_features`. Returns the
    ``[mean, std]`` brain score and the ``[mean, std]`` reducer-4 Spearman map similarity.
    The reference ignored ``correlation_fn`` and ``reducer`` here; they are passed on.
    """
    act = as_tensor(activity_array, "activity_array")
    check_rank(act, 4, "activity_array", "images x h x w x channels (NHWC)")
    g = as_tensor(Y, "Y").shape[1] if grid_size is None else grid_size
    features = resizing_activity(_group_channels(act), grid_size=g, reference_bug_compat=reference_bug_compat)
    final_score, sims4, _ = score_features(
        features, Y, grid_size=g, reducer=reducer, correlation_fn=correlation_fn, progress=progress
    )
    return final_score, sims4


def _to_spatial(output: object, name: str) -> torch.Tensor:
    """A layer output as an NCHW tensor: tuples give their first tensor; (N, L, D) token sequences
    drop the leading extra tokens (class, registers) and fold the square patch grid."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"layer {name!r} returned {type(output).__name__}, not a tensor")
    if output.ndim == 4:
        return output
    if output.ndim == 3:
        n, length, dim = output.shape
        side = math.isqrt(length)
        extra = length - side * side
        if side == 0 or extra > 16:
            raise ValueError(f"layer {name!r} output {shape_of(output)} is not a square grid of tokens")
        return output[:, extra:].reshape(n, side, side, dim).permute(0, 3, 1, 2)
    raise ValueError(f"layer {name!r} output {shape_of(output)} is neither NCHW nor (N, tokens, dim)")


@torch.no_grad()
def extract_activations(
    model: torch.nn.Module,
    images: torch.Tensor,
    layers: Sequence[LayerSpec],
    batch_size: int = 16,
    device: Union[str, torch.device] = "cpu",
    progress: bool = False,
) -> Dict[str, torch.Tensor]:
    """Activations of named layers for NCHW ``images``, as NHWC float32 CPU tensors.

    ``layers`` holds module names (``model.get_submodule`` paths, read with forward hooks) or ints
    (indices for timm's ``model.forward_intermediates``, e.g. ViT blocks or ResNet stages). Token
    outputs (N, L, D) are folded into their square patch grid. The model runs in eval mode, once
    per batch for all layers.
    """
    check_rank(images, 4, "images", "N x C x H x W")
    chunks: Dict[str, List[torch.Tensor]] = {str(ly): [] for ly in layers}
    was_training = model.training
    model.eval().to(device)
    try:
        with LayerTaps(model, layers) as taps:
            for start in tqdm(range(0, images.shape[0], batch_size), desc="activations", disable=not progress, leave=False):
                outputs = taps(images[start : start + batch_size].to(device))
                for key, out in outputs.items():
                    chunks[key].append(_to_spatial(out, key).float().permute(0, 2, 3, 1).cpu())
    finally:
        model.train(was_training)
    return {key: torch.cat(parts) for key, parts in chunks.items()}


@dataclass
class NeuralBenchmarkResult:
    """Outcome of :func:`neural_benchmark_score`: the best layer's score, raw and ceiled."""

    ceiled_score: float
    score: float
    best_layer: str
    ceiling: float
    layer_scores: Dict[str, float]
    layer_score_std: Dict[str, float] = field(default_factory=dict)
    layer_map_similarity: Dict[str, float] = field(default_factory=dict)
    failed_layers: Dict[str, str] = field(default_factory=dict)


def _default_layers(model: torch.nn.Module) -> List[LayerSpec]:
    if hasattr(model, "feature_info") and hasattr(model, "forward_intermediates"):
        return list(range(len(model.feature_info)))
    return [name for name, _ in model.named_children()]


def neural_benchmark_score(
    model: torch.nn.Module,
    layers: Optional[Sequence[LayerSpec]] = None,
    stimuli: str = "george_central_it",
    time_a: int = 130,
    time_b: int = 170,
    grid_size: Optional[int] = None,
    correlation_fn: str = "pearson",
    reducer: str = "median",
    dataset=None,
    data_root: Optional[str] = None,
    batch_size: int = 8,
    device: Union[str, torch.device] = "cpu",
    reference_bug_compat: bool = False,
    progress: bool = True,
) -> NeuralBenchmarkResult:
    """Score a PyTorch / timm model on the spatial IT maps; the model's score is its best layer's.

    Loads ``stimuli`` (``'george_central_it'``, ``'george_posterior_it'`` or ``'red_central_it'``)
    with :class:`~harmonizer_fast.neural.data.Neural_dataset` (``dataset`` or ``data_root``), runs
    the preprocessed NCHW stimuli through ``model``, and for each layer converts the activations to
    NHWC and calls :func:`score_model`. The ceiling is :func:`ceiling_score` of the same recordings
    and window. ``layers``: module names and/or timm ``forward_intermediates`` indices (default:
    every timm feature stage/block, else the model's direct children). ``grid_size=None`` uses the
    recordings' grid (George 17, Red 9). A layer that cannot be scored is recorded in
    ``failed_layers`` with its error rather than silently dropped. The layers are scored by
    :func:`harmonizer_fast.neural.layer_scores.score_every_layer`, the loop the model-zoo sweeps
    use; the best layer is chosen on the reported score itself, as the reference (and the 2023
    paper) did, so it carries a selection bias: the sweep's ``spatial`` benchmark chooses on
    half of the recording sites and reports the other half instead.

    Reference bugs fixed: it always computed the ceiling on George's central IT whatever
    ``stimuli`` said and passed an argument ``ceiling_score`` does not take; its ``scores`` list was
    never created.
    """

    # checked before the stimuli run through the model: a bad name would otherwise fail every
    # layer after the extraction and surface only as "no layer could be scored"
    _lookup(CORRELATIONS, correlation_fn, "correlation_fn")
    _lookup(REDUCERS, reducer, "reducer")
    ds = dataset if dataset is not None else Neural_dataset(data_root)
    _, x_pre, y = ds.load_data(stimuli=stimuli, time_a=time_a, time_b=time_b)
    g = y.shape[1] if grid_size is None else grid_size
    ceiling = ceiling_score(
        ds.raw_recordings(stimuli), time_a, time_b, correlation_fn=correlation_fn,
        reference_bug_compat=reference_bug_compat,
    )
    layers = _default_layers(model) if layers is None else list(layers)
    activations = extract_activations(model, x_pre, layers, batch_size=batch_size, device=device, progress=progress)

    def score_layer(key: str) -> Tuple[Tuple[float, float], Tuple[float, float]]:
        return score_model(activations.pop(key), y, grid_size=g, correlation_fn=correlation_fn, reducer=reducer,
                           reference_bug_compat=reference_bug_compat)

    # The paper's rule (the reference's): the best layer by the very score that is reported.
    scores = score_every_layer(list(activations), score_layer, selection=lambda r: r[0][0], progress=progress)
    if not scores.results:
        raise RuntimeError(f"no layer could be scored: {scores.failed}")
    result = NeuralBenchmarkResult(float("nan"), float("nan"), scores.best, ceiling, {}, failed_layers=scores.failed)
    for key, ((score, std), (sim4, _)) in scores.results.items():
        result.layer_scores[key] = score
        result.layer_score_std[key] = std
        result.layer_map_similarity[key] = sim4
    result.score = result.layer_scores[result.best_layer]
    result.ceiled_score = result.score / ceiling
    return result
