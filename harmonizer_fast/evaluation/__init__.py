"""Human-alignment evaluation (``harmonization.evaluation`` in the reference)."""
from harmonizer_fast.evaluation.clickme import Saliency, evaluate_clickme
from harmonizer_fast.evaluation.metrics import (
    EPSILON,
    HUMAN_SPEARMAN_CEILING,
    alignment_metrics,
    dice,
    intersection_over_union,
    spearman_correlation,
)

__all__ = [
    "EPSILON",
    "HUMAN_SPEARMAN_CEILING",
    "Saliency",
    "alignment_metrics",
    "dice",
    "evaluate_clickme",
    "intersection_over_union",
    "spearman_correlation",
]
