r"""Image-level neural predictivity (Brain-Score style): each image is one sample.

For model features ``X`` (images x features) and an assembly (images x neuroids x repetitions):

1. the target is the mean response over repetitions, ``Y`` (images x neuroids);
2. ``n_splits`` splits put ``test_size`` of the images of **each object** in the test set
   (stratified by object label, seeded);
3. a readout (:data:`READOUTS`: PLS with 25 components, ``RidgeCV`` or dual ridge on a Gram
   matrix) is fitted on the train images and predicts the test images;
4. Pearson ``r`` per neuroid over the test images, median over neuroids, then the mean over splits
   with its standard error ``std(ddof=1) / sqrt(n_splits)``.

The ceiling is the split-half consistency of the repetitions: for each of ``n_ceiling_splits``
random halvings of the repetitions, Pearson ``r_h`` per neuroid between the two half means
(over images), Spearman-Brown corrected to the full number of repetitions,
:math:`c = 2 r_h / (1 + r_h)`, averaged over halvings, median over neuroids.

:math:`c` estimates the reliability of the repetition-averaged response: the fraction of its
variance that is stimulus-driven. A perfect model (the noiseless response) therefore reaches
:math:`r = \sqrt{c}`, not :math:`c`. The ceiled score is chosen with ``ceiling_convention``
(:data:`CEILING_CONVENTIONS`):

* ``'r/c'`` (default, Brain-Score's): :math:`r / c` (a perfect model scores :math:`1/\sqrt{c} \ge 1`);
* ``'(r/c)^2'``: its square;
* ``'r^2/c'``: explained variance over explainable variance (a perfect model scores 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from tqdm.auto import tqdm

from harmonizer_fast.neural.assemblies import NeuralAssembly

__all__ = [
    "stratified_splits",
    "split_half_ceiling",
    "score_image_level",
    "ImageLevelScore",
    "READOUTS",
    "CEILING_CONVENTIONS",
    "register_readout",
]

#: A readout fits on ``features[train]`` and predicts ``features[test]``.
Readout = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
RIDGE_ALPHAS = np.logspace(-3, 7, 11)


def _pls_readout(features: np.ndarray, targets: np.ndarray, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    from harmonizer_fast.neural.pls import PLSRegression

    n_components = min(25, features.shape[1], len(train) - 1)
    pls = PLSRegression(n_components, scale=False, tol=1e-4).fit(features[train], targets[train])
    return np.asarray(pls.predict(features[test]))


def _ridge_readout(features: np.ndarray, targets: np.ndarray, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    from harmonizer_fast.neural.ridge import RidgeCV

    ridge = RidgeCV(alphas=RIDGE_ALPHAS).fit(features[train], targets[train])
    return np.asarray(ridge.predict(features[test]))


def _gram_ridge_readout(gram: np.ndarray, targets: np.ndarray, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    from harmonizer_fast.neural.features import gram_ridge_predict

    return gram_ridge_predict(gram, targets, train, test, alphas=RIDGE_ALPHAS)


#: Readouts by name. ``'gram_ridge'`` expects an (images x images) Gram matrix instead of features
#: (see :func:`harmonizer_fast.neural.features.extract_layer_grams`).
READOUTS: Dict[str, Readout] = {
    "pls": _pls_readout,
    "ridge": _ridge_readout,
    "gram_ridge": _gram_ridge_readout,
}


def register_readout(name: str, readout: Readout) -> None:
    """Add a readout ``fn(features, targets, train_idx, test_idx) -> predictions`` under ``name``."""
    READOUTS[name] = readout


#: Ceiled score from the raw score ``r`` and the ceiling ``c``.
CEILING_CONVENTIONS: Dict[str, Callable[[float, float], float]] = {
    "r/c": lambda r, c: r / c,
    "(r/c)^2": lambda r, c: (r / c) ** 2,
    "r^2/c": lambda r, c: r * r / c,
}


def stratified_splits(
    labels: Sequence, n_splits: int = 10, test_size: float = 0.1, seed: int = 0
) -> List[Tuple[np.ndarray, np.ndarray]]:
    """``n_splits`` random (train, test) index splits with ``round(test_size * n_k)`` of each class
    ``k`` in test (at least one image of every class with two or more images), seeded."""
    labels = np.asarray(labels)
    if not 0 < test_size < 1:
        raise ValueError(f"`test_size` must be in (0, 1), got {test_size}")
    if n_splits < 1:
        raise ValueError(f"`n_splits` must be >= 1, got {n_splits}")
    rng = np.random.default_rng(seed)
    classes = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    splits = []
    for _ in range(n_splits):
        test = []
        for members in classes:
            n_test = min(max(int(round(test_size * len(members))), 1 if len(members) > 1 else 0), len(members) - 1)
            test.append(rng.permutation(members)[:n_test])
        test_idx = np.sort(np.concatenate(test))
        if len(test_idx) < 2:
            raise ValueError(f"test_size={test_size} of {len(labels)} images leaves fewer than 2 test images")
        splits.append((np.setdiff1d(np.arange(len(labels)), test_idx), test_idx))
    return splits


def _pearson_columns(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    from harmonizer_fast.neural.ridge import pearson_per_target

    return np.asarray(pearson_per_target(truth, pred), dtype=np.float64)


def split_half_ceiling(
    responses: np.ndarray, n_splits: int = 10, seed: int = 0
) -> Tuple[float, np.ndarray]:
    """Spearman-Brown corrected split-half reliability of (images, neuroids, repetitions) responses.

    Returns the median over neuroids and the per-neuroid values (mean over ``n_splits`` random
    halvings of the repetitions; with an odd count the extra repetition is left out of that halving).
    """
    responses = np.asarray(responses, dtype=np.float64)
    if responses.ndim != 3 or responses.shape[2] < 2:
        raise ValueError(f"`responses` must be (images, neuroids, repetitions >= 2), got shape {responses.shape}")
    rng = np.random.default_rng(seed)
    n_rep = responses.shape[2]
    half = n_rep // 2
    corrected = []
    for _ in range(n_splits):
        order = rng.permutation(n_rep)
        a = responses[:, :, order[:half]].mean(2)
        b = responses[:, :, order[half : 2 * half]].mean(2)
        r = _pearson_columns(a, b)
        corrected.append(2 * r / (1 + r))
    per_neuroid = np.mean(corrected, axis=0)
    return float(np.nanmedian(per_neuroid)), per_neuroid


@dataclass
class ImageLevelScore:
    """Result of :func:`score_image_level`."""

    score: float  # mean over splits of the median-over-neuroids Pearson r
    score_sem: float  # its standard error over splits
    split_scores: np.ndarray  # (n_splits,)
    per_neuroid: np.ndarray  # (neuroids,) mean r over splits
    ceiling: float
    ceiling_per_neuroid: np.ndarray
    ceiled_score: float
    ceiled_score_sem: float  # the sem propagated through the convention (first order)
    ceiling_convention: str
    readout: str


def score_image_level(
    features: Union[np.ndarray, "object"],
    assembly: Union[NeuralAssembly, np.ndarray],
    readout: str = "pls",
    n_splits: int = 10,
    test_size: float = 0.1,
    seed: int = 0,
    ceiling_convention: str = "r/c",
    n_ceiling_splits: int = 10,
    object_labels: Optional[Sequence] = None,
    progress: bool = False,
) -> ImageLevelScore:
    """Cross-validated predictivity of ``assembly`` from ``features`` (images in the same order).

    ``features``: (images, features) array or tensor, or for ``readout='gram_ridge'`` an
    (images, images) Gram matrix. ``assembly``: a :class:`NeuralAssembly` or an
    (images, neuroids, repetitions) array (then pass ``object_labels``, else splits are not
    stratified). See the module docstring for the procedure and the ceiling conventions.
    """
    if readout not in READOUTS:
        raise ValueError(f"`readout` must be one of {sorted(READOUTS)}, got {readout!r}")
    if ceiling_convention not in CEILING_CONVENTIONS:
        raise ValueError(f"`ceiling_convention` must be one of {sorted(CEILING_CONVENTIONS)}, got {ceiling_convention!r}")
    if not isinstance(assembly, NeuralAssembly):
        assembly = NeuralAssembly.from_arrays(assembly, object_labels=object_labels)
    x = features.detach().cpu().numpy() if hasattr(features, "detach") else np.asarray(features)
    if x.ndim != 2 or x.shape[0] != assembly.n_images:
        raise ValueError(
            f"`features` must be ({assembly.n_images}, n_features) (one row per assembly image), got shape {x.shape}"
        )
    if readout == "gram_ridge" and x.shape[1] != x.shape[0]:
        raise ValueError(f"readout 'gram_ridge' needs a square (images, images) Gram matrix, got shape {x.shape}")
    targets = assembly.mean_responses()
    fit_predict = READOUTS[readout]
    split_scores, per_split = [], []
    for train, test in tqdm(
        stratified_splits(assembly.object_labels, n_splits, test_size, seed), desc=f"{readout} splits",
        disable=not progress, leave=False,
    ):
        r = _pearson_columns(targets[test], fit_predict(x, targets, train, test))
        if np.isnan(r).all():
            raise ValueError("every neuroid's test correlation is undefined (constant predictions or responses)")
        split_scores.append(float(np.nanmedian(r)))
        per_split.append(r)
    split_scores = np.array(split_scores)
    score = float(split_scores.mean())
    sem = float(split_scores.std(ddof=1) / np.sqrt(len(split_scores))) if len(split_scores) > 1 else float("nan")
    ceiling, ceiling_per_neuroid = split_half_ceiling(assembly.responses, n_ceiling_splits, seed)
    ceil_fn = CEILING_CONVENTIONS[ceiling_convention]
    ceiled = ceil_fn(score, ceiling)
    # First-order propagation: d(ceiled)/dr * sem.
    step = 1e-6
    slope = (ceil_fn(score + step, ceiling) - ceil_fn(score - step, ceiling)) / (2 * step)
    return ImageLevelScore(
        score=score,
        score_sem=sem,
        split_scores=split_scores,
        per_neuroid=np.nanmean(per_split, axis=0),
        ceiling=ceiling,
        ceiling_per_neuroid=ceiling_per_neuroid,
        ceiled_score=float(ceiled),
        ceiled_score_sem=float(abs(slope) * sem),
        ceiling_convention=ceiling_convention,
        readout=readout,
    )
