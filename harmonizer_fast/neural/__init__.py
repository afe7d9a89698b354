"""IT-cortex scoring (port of ``neural_harmonizer``): the spatial Arcaro benchmark, image-level
scoring with Brain-Score's protocol, files and stimulus pipeline, memory-bounded layer features,
a simulator with a known ceiling, and the PLS / ridge readouts."""
from harmonizer_fast.neural.assemblies import NeuralAssembly, load_netcdf_assembly
from harmonizer_fast.neural.data import Neural_dataset, download_arcaro2020
from harmonizer_fast.neural.features import (
    LayerFeatureAccumulator,
    LayerTaps,
    extract_layer_grams,
    gram_ridge_predict,
)
from harmonizer_fast.neural.image_level import (
    READOUTS,
    ImageLevelScore,
    score_image_level,
    split_half_ceiling,
    stratified_splits,
)
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
from harmonizer_fast.neural.pls import PLSRegression
from harmonizer_fast.neural.ridge import RidgeCV, pearson_per_target
from harmonizer_fast.neural.simulate import simulate_image_level, simulate_spatial_dataset
from harmonizer_fast.neural.stimuli import (
    StimulusSet,
    brainscore_preprocess,
    load_stimulus_set,
    place_on_screen,
    preprocessing_from_data_config,
)

__all__ = [
    "PLSRegression",
    "RidgeCV",
    "pearson_per_target",
    "NeuralAssembly",
    "load_netcdf_assembly",
    "Neural_dataset",
    "download_arcaro2020",
    "LayerFeatureAccumulator",
    "LayerTaps",
    "extract_layer_grams",
    "gram_ridge_predict",
    "READOUTS",
    "ImageLevelScore",
    "score_image_level",
    "split_half_ceiling",
    "stratified_splits",
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
    "simulate_image_level",
    "simulate_spatial_dataset",
    "StimulusSet",
    "load_stimulus_set",
    "place_on_screen",
    "brainscore_preprocess",
    "preprocessing_from_data_config",
]
