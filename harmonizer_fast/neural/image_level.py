r"""Image-level neural predictivity (Brain-Score style): each image is one sample.

By default this is brainscore-vision 2.4.2's neural benchmark protocol (``MajajHong2015public.IT-pls``
and its siblings), so the same assembly and features give Brain-Score's numbers. For model
features ``X`` (images x features) and an assembly (images x neuroids x repetitions):

1. the target ``Y`` (images x neuroids) is the mean of each image's repetitions (all it has);
2. the images are put in Brain-Score's order (sorted by stimulus id, the order its repetition
   averaging leaves them) and split by scikit-learn's
   ``StratifiedShuffleSplit(n_splits=10, train_size=0.9, random_state=1)`` stratified on the
   object label (:func:`stratified_splits`);
3. a readout (:data:`READOUTS`; default PLS with 25 components, ``scale=False``, scikit-learn's
   ``tol=1e-6`` and ``max_iter=500``) is fitted on the train images and predicts the test images;
4. Pearson ``r`` per neuroid over the test images, median over neuroids (NaN skipped), then the mean
   over splits; the error is Brain-Score's: ``std(ddof=0) / sqrt(n_splits)`` of the split medians.

The ceiling (:func:`split_half_ceiling`) is Brain-Score's internal consistency: scikit-learn's
``ShuffleSplit(n_splits=10, train_size=0.5, random_state=1)`` over the distinct repetitions (an odd
count gives halves of ``floor(R/2)`` and ``ceil(R/2)``; none is dropped), the mean of each half for
every image (of the repetitions it has), Pearson :math:`r_h` per neuroid over images,
Spearman-Brown :math:`c = 2 r_h / (1 + r_h)`, the median over neuroids for each halving, then the
mean over halvings.

:math:`c` estimates the reliability of the repetition-averaged response: the fraction of its
variance that is stimulus-driven. A perfect model (the noiseless response) therefore reaches
:math:`r = \sqrt{c}`. The ceiled score is chosen with ``ceiling_convention``
(:data:`CEILING_CONVENTIONS`):

* ``'r^2/c'`` (default; alias ``'r**2/c'``): explained over explainable variance, a perfect model
  scores 1. Brain-Score's since early 2026 (2.4.x, ``benchmark_helpers/neural_common.py``,
  ``explained_variance``), which carries the raw error over unchanged;
* ``'(r/c)^2'`` (alias ``'(r/c)**2'``): Brain-Score's from mid-2019 until early 2026, the one in
  force when Linsley, Rodriguez et al. (2023) was written;
* ``'r/c'``: Brain-Score's before mid-2019, and the division neural_harmonizer's spatial benchmark
  uses (a perfect model scores :math:`1/\sqrt{c} \ge 1`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit
from tqdm.auto import tqdm

from harmonizer_fast.neural.assemblies import NeuralAssembly
from harmonizer_fast.neural.gram import gram_ridge_predict
from harmonizer_fast.neural.pls import PLSRegression
from harmonizer_fast.neural.ridge import RidgeCV, pearson_per_target

__all__ = [
    "stratified_splits",
    "split_half_ceiling",
    "score_image_level",
    "assembly_ceiling",
    "Ceiling",
    "ImageLevelScore",
    "READOUTS",
    "CEILING_CONVENTIONS",
    "BRAINSCORE_SEED",
    "PLS_COMPONENTS",
    "register_readout",
]

#: Readout fits on ``features[train]`` and predicts ``features[test]``.
Readout = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
RIDGE_ALPHAS = np.logspace(-3, 7, 11)
#: ``random_state`` of Brain-Score's cross-validation and split-half ceiling.
BRAINSCORE_SEED = 1
#: Brain-Score's PLS readout: 25 components, no scaling, scikit-learn's tolerance and iterations.
PLS_COMPONENTS = 25
PLS_TOL = 1e-6
PLS_MAX_ITER = 500


def _pls_readout(features: np.ndarray, targets: np.ndarray, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    # Fewer components only where 25 cannot be fitted (tiny data; Brain-Score would fail there).
    n_components = min(PLS_COMPONENTS, features.shape[1], len(train) - 1)
    pls = PLSRegression(n_components, scale=False, tol=PLS_TOL, max_iter=PLS_MAX_ITER)
    return np.asarray(pls.fit(features[train], targets[train]).predict(features[test]))


def _ridge_readout(features: np.ndarray, targets: np.ndarray, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    ridge = RidgeCV(alphas=RIDGE_ALPHAS).fit(features[train], targets[train])
    return np.asarray(ridge.predict(features[test]))


def _gram_ridge_readout(gram: np.ndarray, targets: np.ndarray, train: np.ndarray, test: np.ndarray) -> np.ndarray:
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


#: Ceiled score from the raw score ``r`` and the ceiling ``c`` (history in the module docstring).
CEILING_CONVENTIONS: Dict[str, Callable[[float, float], float]] = {
    "r^2/c": lambda r, c: r * r / c,
    "(r/c)^2": lambda r, c: (r / c) ** 2,
    "r/c": lambda r, c: r / c,
}
_CONVENTION_ALIASES = {"r**2/c": "r^2/c", "(r/c)**2": "(r/c)^2"}


def _convention(name: str) -> str:
    name = _CONVENTION_ALIASES.get(name, name)
    if name not in CEILING_CONVENTIONS:
        raise ValueError(
            f"`ceiling_convention` must be one of {sorted(CEILING_CONVENTIONS) + sorted(_CONVENTION_ALIASES)}, got {name!r}"
        )
    return name


def stratified_splits(
    labels: Sequence, n_splits: int = 10, test_size: float = 0.1, seed: int = BRAINSCORE_SEED
) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Brain-Score's cross-validation splits of images with object ``labels`` (in the given order).

    scikit-learn's ``StratifiedShuffleSplit(n_splits, train_size=1 - test_size,
    random_state=seed)``, as Brain-Score's ``Split`` builds it (``train_size=0.9``, test the
    rest). Returns sorted (train, test) index arrays. Every object needs at least two images.
    """
    labels = np.asarray(labels)
    if not 0 < test_size < 1:
        raise ValueError(f"`test_size` must be in (0, 1), got {test_size}")
    if not isinstance(n_splits, (int, np.integer)) or n_splits < 1:
        raise ValueError(f"`n_splits` must be an int >= 1, got {n_splits!r}")
    classes, counts = np.unique(labels.astype(str), return_counts=True)
    if (counts < 2).any():
        raise ValueError(f"every object needs >= 2 images for stratified splits; {classes[counts < 2][:5].tolist()} have 1")
    n_train = int(np.floor((1 - test_size) * len(labels)))
    if n_train < len(classes) or len(labels) - n_train < len(classes):
        raise ValueError(
            f"test_size={test_size} of {len(labels)} images cannot hold every one of the {len(classes)} objects "
            "in both train and test"
        )
    splitter = StratifiedShuffleSplit(n_splits=n_splits, train_size=1 - test_size, random_state=seed)
    return [(np.sort(train), np.sort(test)) for train, test in splitter.split(np.zeros(len(labels)), labels)]


def _half_means(responses: np.ndarray, halves: np.ndarray) -> np.ndarray:
    """(halves, images, neuroids) mean of each image's repetitions in each half.

    ``halves``: (n_halves, repetitions) 0/1 membership. One matrix product over all halvings: the
    sums of present repetitions, divided by their counts.
    """
    present = ~np.isnan(responses[:, 0, :])  # (images, repetitions)
    filled = np.where(np.isnan(responses), 0.0, responses)
    n_images, n_neuroids, n_rep = responses.shape
    sums = filled.reshape(n_images * n_neuroids, n_rep) @ halves.T  # (images * neuroids, halves)
    counts = present.astype(np.float64) @ halves.T  # (images, halves)
    if (counts == 0).any():
        image, half = np.argwhere(counts == 0)[0]
        raise ValueError(
            f"image {image} has no repetition in half {half} of the split-half ceiling "
            f"(it has {int(present[image].sum())} of {n_rep} repetition slots); Brain-Score cannot halve it either"
        )
    return (sums.reshape(n_images, n_neuroids, -1) / counts[:, None, :]).transpose(2, 0, 1)


def _halving_consistencies(responses: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """(n_splits, neuroids) Spearman-Brown corrected split-half correlations."""
    n_rep = responses.shape[2]
    halvings = list(ShuffleSplit(n_splits=n_splits, train_size=0.5, random_state=seed).split(np.zeros(n_rep)))
    membership = np.zeros((2 * n_splits, n_rep))
    for k, (first, second) in enumerate(halvings):
        membership[2 * k, first] = 1.0
        membership[2 * k + 1, second] = 1.0
    means = _half_means(responses, membership)
    r = np.stack([np.asarray(pearson_per_target(means[2 * k], means[2 * k + 1]), dtype=np.float64)
                  for k in range(n_splits)])
    return 2 * r / (1 + r)


def split_half_ceiling(
    responses: np.ndarray, n_splits: int = 10, seed: int = BRAINSCORE_SEED
) -> Tuple[float, np.ndarray]:
    """Brain-Score's split-half ceiling of (images, neuroids, repetitions) responses (NaN: missing
    repetitions, see :class:`~harmonizer_fast.neural.assemblies.NeuralAssembly`).

    Returns the mean over ``n_splits`` halvings of the median over neuroids, and the per-neuroid
    mean over halvings (procedure in the module docstring).
    """
    ceiling, per_neuroid, _ = _ceiling(responses, n_splits, seed)
    return ceiling, per_neuroid


class Ceiling(NamedTuple):
    """A split-half ceiling: the value, its per-neuroid means and its per-halving medians."""

    value: float
    per_neuroid: np.ndarray
    splits: np.ndarray


def assembly_ceiling(assembly: "NeuralAssembly", n_ceiling_splits: int = 10, seed: int = BRAINSCORE_SEED) -> Ceiling:
    """The ceiling :func:`score_image_level` computes for ``assembly``, for reuse across the many
    feature sets (layers) scored on the same assembly: pass it as ``ceiling=``."""
    return Ceiling(*_ceiling(assembly.responses, n_ceiling_splits, seed))


def _ceiling(responses: np.ndarray, n_splits: int, seed: int) -> Tuple[float, np.ndarray, np.ndarray]:
    responses = np.asarray(responses, dtype=np.float64)
    if responses.ndim != 3 or responses.shape[2] < 2:
        raise ValueError(f"`responses` must be (images, neuroids, repetitions >= 2), got shape {responses.shape}")
    if not isinstance(n_splits, (int, np.integer)) or n_splits < 1:
        raise ValueError(f"`n_splits` must be an int >= 1, got {n_splits!r}")
    corrected = _halving_consistencies(responses, n_splits, seed)
    with np.errstate(invalid="ignore"):
        per_halving = np.array([np.nanmedian(c) if np.isfinite(c).any() else np.nan for c in corrected])
    if np.isnan(per_halving).all():
        raise ValueError("every neuroid's split-half correlation is undefined (constant responses)")
    finite = corrected[:, np.isfinite(corrected).any(0)]
    per_neuroid = np.full(corrected.shape[1], np.nan)
    per_neuroid[np.isfinite(corrected).any(0)] = np.nanmean(finite, axis=0)
    return float(np.nanmean(per_halving)), per_neuroid, per_halving


def _brainscore_error(values: np.ndarray) -> float:
    """Brain-Score's ``standard_error_of_the_mean``: xarray's std (ddof=0, NaN skipped) / sqrt(n)."""
    return float(np.nanstd(values) / np.sqrt(len(values)))


@dataclass
class ImageLevelScore:
    """Result of :func:`score_image_level`."""

    score: float  # mean over splits of the median-over-neuroids Pearson r (Brain-Score's raw score)
    score_sem: float  # Brain-Score's error of it: std(ddof=0) over splits / sqrt(n_splits)
    split_scores: np.ndarray  # (n_splits,)
    per_neuroid: np.ndarray  # (neuroids,) mean r over splits
    ceiling: float
    ceiling_per_neuroid: np.ndarray
    ceiled_score: float
    ceiled_score_sem: float  # the error propagated through the convention (first order); Brain-Score reports score_sem
    ceiling_convention: str
    readout: str
    ceiling_sem: float = float("nan")  # Brain-Score's error of the ceiling (over halvings)
    ceiling_splits: np.ndarray = field(default_factory=lambda: np.empty(0))  # (n_ceiling_splits,) per-halving medians


def _brainscore_order(assembly: NeuralAssembly) -> np.ndarray:
    """Positions of the images sorted by id: the order Brain-Score's repetition averaging leaves."""
    ids = assembly.image_ids
    return np.argsort(ids.astype(str) if ids.dtype == object else ids, kind="stable")


def score_image_level(
    features: Union[np.ndarray, "object"],
    assembly: Union[NeuralAssembly, np.ndarray],
    readout: str = "pls",
    n_splits: int = 10,
    test_size: float = 0.1,
    seed: int = BRAINSCORE_SEED,
    ceiling_convention: str = "r^2/c",
    n_ceiling_splits: int = 10,
    object_labels: Optional[Sequence] = None,
    progress: bool = False,
    ceiling: Optional[Ceiling] = None,
) -> ImageLevelScore:
    """Cross-validated predictivity of ``assembly`` from ``features`` (images in the same order).

    ``features``: (images, features) array or tensor, or for ``readout='gram_ridge'`` an
    (images, images) Gram matrix. ``assembly``: a :class:`NeuralAssembly` or an
    (images, neuroids, repetitions) array (then pass ``object_labels``, else all images are one
    object). The defaults are Brain-Score 2.4.2's protocol (module docstring); the result does
    not depend on the order the images come in. ``seed`` is the ``random_state`` of both the
    splits and the halvings (Brain-Score: 1). ``ceiling``: the :func:`assembly_ceiling` of this
    assembly with these ``n_ceiling_splits`` and ``seed``, computed once by a caller that scores
    many layers (default: computed here).
    """
    if readout not in READOUTS:
        raise ValueError(f"`readout` must be one of {sorted(READOUTS)}, got {readout!r}")
    ceiling_convention = _convention(ceiling_convention)
    if not isinstance(assembly, NeuralAssembly):
        assembly = NeuralAssembly.from_arrays(assembly, object_labels=object_labels)
    x = features.detach().cpu().numpy() if hasattr(features, "detach") else np.asarray(features)
    if x.ndim != 2 or x.shape[0] != assembly.n_images:
        raise ValueError(
            f"`features` must be ({assembly.n_images}, n_features) (one row per assembly image), got shape {x.shape}"
        )
    if readout == "gram_ridge" and x.shape[1] != x.shape[0]:
        raise ValueError(f"readout 'gram_ridge' needs a square (images, images) Gram matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"`features` {x.shape} contains {int((~np.isfinite(x)).sum())} NaN or inf values")
    if ceiling is not None and (not isinstance(ceiling, Ceiling) or ceiling.per_neuroid.shape != (assembly.n_neuroids,)):
        raise ValueError(f"`ceiling` must be the assembly_ceiling() of this assembly ({assembly.n_neuroids} neuroids), "
                         f"got {type(ceiling).__name__}")
    targets = assembly.mean_responses()
    order = _brainscore_order(assembly)
    fit_predict = READOUTS[readout]
    split_scores, per_split = [], []
    for train, test in tqdm(
        stratified_splits(assembly.object_labels[order], n_splits, test_size, seed), desc=f"{readout} splits",
        disable=not progress, leave=False,
    ):
        train, test = order[train], order[test]
        r = np.asarray(pearson_per_target(targets[test], fit_predict(x, targets, train, test)), dtype=np.float64)
        if np.isnan(r).all():
            raise ValueError("every neuroid's test correlation is undefined (constant predictions or responses)")
        split_scores.append(float(np.nanmedian(r)))
        per_split.append(r)
    split_scores = np.array(split_scores)
    score = float(split_scores.mean())
    sem = _brainscore_error(split_scores)
    if ceiling is None:
        ceiling = assembly_ceiling(assembly, n_ceiling_splits, seed)
    ceiling, ceiling_per_neuroid, ceiling_splits = ceiling
    ceil_fn = CEILING_CONVENTIONS[ceiling_convention]
    ceiled = ceil_fn(score, ceiling)
    # First-order propagation: d(ceiled)/dr * sem.
    step = 1e-6
    slope = (ceil_fn(score + step, ceiling) - ceil_fn(score - step, ceiling)) / (2 * step)
    with np.errstate(invalid="ignore"):
        per_neuroid = np.nanmean(per_split, axis=0)
    return ImageLevelScore(
        score=score,
        score_sem=sem,
        split_scores=split_scores,
        per_neuroid=per_neuroid,
        ceiling=ceiling,
        ceiling_per_neuroid=ceiling_per_neuroid,
        ceiled_score=float(ceiled),
        ceiled_score_sem=float(abs(slope) * sem),
        ceiling_convention=ceiling_convention,
        readout=readout,
        ceiling_sem=_brainscore_error(ceiling_splits),
        ceiling_splits=ceiling_splits,
    )
