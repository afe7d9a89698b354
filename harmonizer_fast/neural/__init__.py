"""IT-cortex scoring (port of ``neural_harmonizer``): the spatial Arcaro benchmark, image-level
Brain-Score style scoring, memory-bounded layer features and a simulator with a known ceiling."""
from harmonizer_fast.neural.data import Neural_dataset, download_arcaro2020
from harmonizer_fast.neural.metrics import (
    brain_score,
    ceiling_score,
    highest_off_diagonal,
    pearson_correlation,
    spearmanr_sim,
    tf_pearson_loss,
)
from harmonizer_fast.neural.neural_benchmark import (
    NeuralBenchmarkResult,
    extract_activations,
    neural_benchmark_score,
    resizing_activity,
    score_features,
    score_model,
)

__all__ = [
    "Neural_dataset",
    "download_arcaro2020",
    "brain_score",
    "ceiling_score",
    "highest_off_diagonal",
    "pearson_correlation",
    "spearmanr_sim",
    "tf_pearson_loss",
    "NeuralBenchmarkResult",
    "extract_activations",
    "neural_benchmark_score",
    "resizing_activity",
    "score_features",
    "score_model",
]
