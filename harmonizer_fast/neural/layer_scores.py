"""Score every layer of a model and pick the best one: the loop the spatial IT benchmark
(:func:`harmonizer_fast.neural.neural_benchmark.neural_benchmark_score`) and the model-zoo sweeps
(:mod:`harmonizer_fast.zoo.sweep`) share.

A layer that cannot be scored (its scorer raises ``ValueError``: e.g. a non-spatial output for a
spatial benchmark) is recorded with its error in ``failed``, never silently dropped. The best
layer is the one with the highest *selection* value (NaN never wins, the first on ties); what
that value is decides whether the choice is biased: the score being reported (the 2023 paper's
rule), a score on disjoint data, or Brain-Score's PCA score.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Generic, Optional, Sequence, TypeVar

from tqdm.auto import tqdm

__all__ = ["LayerScores", "score_every_layer"]

Result = TypeVar("Result")


@dataclass
class LayerScores(Generic[Result]):
    """Outcome of :func:`score_every_layer`, layers in the order they were given."""

    results: Dict[str, Result] = field(default_factory=dict)
    failed: Dict[str, str] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)
    best: Optional[str] = None


def score_every_layer(
    layers: Sequence[str],
    score_layer: Callable[[str], Result],
    selection: Callable[[Result], float],
    desc: str = "layers",
    progress: bool = False,
) -> LayerScores[Result]:
    """``score_layer(layer)`` for every layer (timed), then the best by ``selection(result)``.

    ``best`` is None only when no layer could be scored; when every selection value is NaN it is
    the first scored layer.
    """
    scores: LayerScores[Result] = LayerScores()
    for layer in tqdm(list(layers), desc=desc, disable=not progress, leave=False):
        begin = time.perf_counter()
        try:
            result = score_layer(layer)
        except ValueError as err:
            scores.failed[layer] = str(err)
            continue
        scores.results[layer] = result
        scores.seconds[layer] = time.perf_counter() - begin
    ranked = [(float(selection(r)), -i, name) for i, (name, r) in enumerate(scores.results.items())]
    finite = [entry for entry in ranked if math.isfinite(entry[0])]
    if finite:
        scores.best = max(finite)[2]
    elif ranked:
        scores.best = ranked[0][2]
    return scores
