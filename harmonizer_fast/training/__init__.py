"""Harmonized training (``harmonization.training`` in the reference)."""
from harmonizer_fast.training.loss import (
    HarmonizerLoss,
    HarmonizerLossOutput,
    alignment_loss,
    decayed_parameters,
    harmonizer_loss,
    harmonizer_loss_components,
    input_saliency,
    is_weight_decayed,
    pyramidal_mse_with_tokens,
    saliency_standardize_cut,
    smoothed_cross_entropy,
    standardize_cut,
    weight_decay_loss,
)
from harmonizer_fast.training.pyramid import pyramidal_representation
from harmonizer_fast.training.trainer import DoubleBackwardError, Trainer, TrainerConfig

__all__ = [
    "DoubleBackwardError",
    "Trainer",
    "TrainerConfig",
    "HarmonizerLoss",
    "HarmonizerLossOutput",
    "alignment_loss",
    "decayed_parameters",
    "harmonizer_loss",
    "harmonizer_loss_components",
    "input_saliency",
    "is_weight_decayed",
    "pyramidal_mse_with_tokens",
    "pyramidal_representation",
    "saliency_standardize_cut",
    "smoothed_cross_entropy",
    "standardize_cut",
    "weight_decay_loss",
]
