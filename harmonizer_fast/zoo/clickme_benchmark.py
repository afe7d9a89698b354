r"""The ``clickme`` sweep benchmark: human alignment of each model's saliency (Fel et al. 2022).

Unlike the IT benchmarks, ClickMe alignment scores a whole model, not a layer: each validation
image is explained for its own label with the reference's explainer
(:class:`harmonizer_fast.evaluation.Saliency`, the max over colour channels of
:math:`|\partial\,\mathrm{logit}_y / \partial x|`), and the map is compared with the human
ClickMe map by :func:`harmonizer_fast.evaluation.evaluate_clickme` (Spearman, Dice and IoU at
the top 10 %). A model's unit therefore gives three rows of the sweep table:

===============  ==========================================================================
``layer``        row
===============  ==========================================================================
``spearman``     ``score`` = mean Spearman :math:`\bar\rho`, ``score_error`` its standard
                 error over images, ``ceiling`` = 0.65753 (human inter-rater Spearman),
                 ``ceiled_score`` = :math:`\bar\rho / 0.65753`, the paper's alignment score.
                 This is the model's row (``selected``) in ``models.csv`` and in the figures.
``dice``         mean Dice of the top-10 % masks (no ceiling: NaN), not selected.
``iou``          mean IoU of the top-10 % masks (no ceiling: NaN), not selected.
===============  ==========================================================================

There is no layer to choose, so there is no selection bias to avoid: ``selection_score`` is the
mean Spearman too. ``n_features`` holds the number of images scored; ``extraction_s`` the
seconds the batched saliency and metrics took (``layer_method`` = ``"saliency"``).

Options (``--bench-option clickme:KEY=VALUE``):

* ``path``: local ClickMe validation shards (a folder of ``val-*.tfrecords`` or the reference's
  ``clickme_val_*`` files, or one shard), or ``"sample"`` for the bundled sample
  (:mod:`harmonizer_fast.sample_data`: synthetic maps, for the demo only). Nothing downloads.
* ``limit``: score only the first ``limit`` records (0: all).
* ``batch_size``: images per saliency pass (default 32).

Images are ClickMe's 224 x 224 (the resolution the human maps are drawn at, and the one the
paper scores every model at: they are not resized to the model's own input size, so the saliency
and the human map share their pixels), normalised with the model's own mean/std (its
``pretrained_cfg``, which timm's data config reads; the Lite models' ``(x - 127) / 128``).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from harmonizer_fast.common import ClickMeRecords
from harmonizer_fast.evaluation import HUMAN_SPEARMAN_CEILING, Saliency, evaluate_clickme
from harmonizer_fast.models import model_preprocess
from harmonizer_fast.zoo.results import COLUMNS, SweepRow
from harmonizer_fast.sample_data import sample_shards

__all__ = ["CLICKME_LAYER_METHOD", "CLICKME_METRICS", "ClickMeBenchmark", "load_clickme_benchmark", "run_model_level_unit", "ModelScores"]

#: ``layer_method`` of ClickMe rows (marks a whole-model benchmark in the table).
CLICKME_LAYER_METHOD = "saliency"
#: The table's ``layer`` labels of a ClickMe unit, in row order (the first one is the model's row).
CLICKME_METRICS: Tuple[str, ...] = ("spearman", "dice", "iou")


class ModelScores(dict):
    """Per-image metric lists of one model (``{"spearman": [...], "dice": [...], "iou": [...]}``)
    with the seconds the batched saliency took (``seconds``)."""

    seconds: float = float("nan")


class ClickMeBenchmark:
    """Model-level benchmark on ClickMe validation records (see the module docstring).

    Parameters
    ----------
    records : :class:`harmonizer_fast.common.ClickMeRecords`
    limit : score only the first ``limit`` records (0 or None: all)
    batch_size : images per saliency pass
    name : the benchmark's name in the table
    """

    #: Marks a benchmark that scores a model as a whole (the sweep then skips layer extraction).
    scores_whole_model = True

    def __init__(self, records: ClickMeRecords, limit: Optional[int] = None, batch_size: int = 32,
                 name: str = "clickme") -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise ValueError(f"`limit` must be a non-negative integer (0: all records), got {limit!r}")
        self.records, self.batch_size, self.name = records, batch_size, name
        self.n_images = len(records) if not limit else min(int(limit), len(records))

    def batches(self) -> Iterator[tuple]:
        """``(images 0..255, heatmaps, one-hot labels)`` batches of the scored records, in order."""
        for start in range(0, self.n_images, self.batch_size):
            batch = self.records.get_batch(range(start, min(start + self.batch_size, self.n_images)))
            yield batch.images, batch.heatmaps, batch.labels

    def score_model(self, model: torch.nn.Module,
                    preprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                    progress: bool = False) -> ModelScores:
        """Per-image Spearman, Dice and IoU of ``model``'s saliency against the human maps
        (``preprocess``: 0..255 images -> model input; default the model's own mean/std)."""
        preprocess = preprocess if preprocess is not None else model_preprocess(model)
        start = time.perf_counter()
        scores = evaluate_clickme(model, explainer=Saliency(model, batch_size=self.batch_size),
                                  clickme_val_dataset=self.batches(), preprocess_inputs=preprocess,
                                  progress=progress)
        result = ModelScores({k: list(scores[k]) for k in CLICKME_METRICS})
        result.seconds = time.perf_counter() - start
        return result


def load_clickme_benchmark(path: Optional[str] = None, limit: int = 0, batch_size: int = 32,
                           seed: int = 0) -> ClickMeBenchmark:
    """Registry loader of ``clickme`` (``seed`` is accepted like every loader's; nothing is random)."""
    if path is None:
        raise ValueError(
            "the clickme benchmark needs local ClickMe validation shards: "
            "--bench-option clickme:path=DIR (val-*.tfrecords), or clickme:path=sample for the bundled sample"
        )
    if str(path) == "sample":
        paths = sample_shards("val")
    else:
        paths = path
    return ClickMeBenchmark(ClickMeRecords(paths, progress=False), limit=limit or None, batch_size=batch_size)


def _mean_and_sem(values: List[float]) -> Tuple[float, float]:
    # A NaN (scipy's Spearman of a constant saliency map, warned about) propagates, as in
    # evaluate_clickme's alignment score: the row shows it rather than a mean over fewer images.
    array = np.asarray(values, dtype=np.float64)
    sem = float(array.std(ddof=1) / math.sqrt(array.size)) if array.size > 1 else float("nan")
    return float(array.mean()), sem


def run_model_level_unit(unit, benchmark: ClickMeBenchmark, model: torch.nn.Module) -> List[SweepRow]:
    """The rows of one (model, ``clickme``) sweep unit (row layout in the module docstring).

    ``unit`` is the sweep's :class:`~harmonizer_fast.zoo.sweep.SweepUnit` (label, top-1,
    harmonized flag, progress).
    """
    scores = benchmark.score_model(model, progress=unit.progress)
    # A table that names each row's layer-choice rule gets this benchmark's: there is no layer.
    rule = {"choice_rule": "whole-model"} if "choice_rule" in COLUMNS else {}
    rows = []
    for index, metric in enumerate(CLICKME_METRICS):
        mean, sem = _mean_and_sem(scores[metric])
        ceiling = HUMAN_SPEARMAN_CEILING if metric == "spearman" else float("nan")
        rows.append(SweepRow(
            model=unit.model.label, benchmark=unit.benchmark, layer=metric, layer_index=index,
            score=mean, score_error=sem, ceiling=ceiling, ceiled_score=mean / ceiling,
            selection_score=mean, selected=index == 0, n_features=benchmark.n_images,
            imagenet_top1=unit.top1, harmonized=unit.model.is_harmonized,
            extraction_s=scores.seconds, readout_s=0.0, layer_method=CLICKME_LAYER_METHOD, **rule,
        ))
    return rows
