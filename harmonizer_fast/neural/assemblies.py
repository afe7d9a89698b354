"""Image-level neural recordings: images x neuroids x repetitions, with image ids and object labels.

Reads Brain-Score assemblies from a local netCDF file (optional ``xarray`` extra:
``pip install harmonizer_fast[xarray]``) or takes plain numpy arrays. Nothing is downloaded.

Images may have different numbers of repetitions (as in Brain-Score's MajajHong2015 files): the
last axis then has one slot per repetition value and an image's missing repetitions are NaN
across all neuroids. The regression target is the mean of the repetitions an image has.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from harmonizer_fast.neural.stimuli import StimulusSet, load_stimulus_set

__all__ = ["NeuralAssembly", "load_netcdf_assembly", "DEFAULT_TIME_RANGE"]

#: Time window (ms) of Brain-Score's MajajHong2015 benchmarks: the bins inside it are averaged.
DEFAULT_TIME_RANGE = (70.0, 170.0)


@dataclass
class NeuralAssembly:
    """Responses of ``neuroids`` to ``images``, one value per repetition.

    Attributes
    ----------
    responses
        (images, neuroids, repetitions) float array. A repetition an image does not have is NaN
        for every neuroid (uneven repetition counts); no other NaN or inf is allowed.
    image_ids, object_labels
        (images,) identifiers (Brain-Score's ``stimulus_id``) and object category of each image
        (splits are stratified by object).
    neuroid_ids
        (neuroids,) identifiers.
    """

    responses: np.ndarray
    image_ids: np.ndarray
    object_labels: np.ndarray
    neuroid_ids: np.ndarray

    def __post_init__(self) -> None:
        self.responses = np.asarray(self.responses, dtype=np.float64)
        if self.responses.ndim == 2:
            self.responses = self.responses[:, :, None]
        if self.responses.ndim != 3:
            raise ValueError(
                f"`responses` must be (images, neuroids, repetitions), got shape {self.responses.shape}"
            )
        n_images, n_neuroids, _ = self.responses.shape
        nan = np.isnan(self.responses)
        missing = nan.all(axis=1)  # (images, repetitions): repetition slots an image lacks
        if np.isinf(self.responses).any() or (nan & ~missing[:, None, :]).any():
            raise ValueError(
                f"`responses` {self.responses.shape} contains inf, or NaN that is not a whole missing repetition "
                "(NaN for every neuroid of one image's repetition)"
            )
        if n_neuroids and missing.all(axis=1).any():
            empty = int(np.flatnonzero(missing.all(axis=1))[0])
            raise ValueError(f"`responses` {self.responses.shape}: image {empty} has no repetition (all NaN)")
        self.image_ids = np.asarray(self.image_ids)
        self.object_labels = np.asarray(self.object_labels)
        self.neuroid_ids = np.asarray(self.neuroid_ids)
        for name, values, n in (
            ("image_ids", self.image_ids, n_images),
            ("object_labels", self.object_labels, n_images),
            ("neuroid_ids", self.neuroid_ids, n_neuroids),
        ):
            if values.shape != (n,):
                raise ValueError(f"`{name}` must have shape ({n},) for responses {self.responses.shape}, got {values.shape}")
        if len(np.unique(self.image_ids)) != n_images:
            raise ValueError("`image_ids` must be unique (one row per image; repetitions go on the last axis)")

    @classmethod
    def from_arrays(
        cls,
        responses: np.ndarray,
        object_labels: Optional[Sequence] = None,
        image_ids: Optional[Sequence] = None,
        neuroid_ids: Optional[Sequence] = None,
    ) -> "NeuralAssembly":
        """Build from numpy arrays; ids default to ``0..n-1`` and labels to one object for all images."""
        responses = np.asarray(responses, dtype=np.float64)
        n_images, n_neuroids = responses.shape[0], responses.shape[1] if responses.ndim > 1 else 0
        return cls(
            responses,
            np.arange(n_images) if image_ids is None else image_ids,
            np.zeros(n_images, dtype=np.int64) if object_labels is None else object_labels,
            np.arange(n_neuroids) if neuroid_ids is None else neuroid_ids,
        )

    @property
    def n_images(self) -> int:
        return self.responses.shape[0]

    @property
    def n_neuroids(self) -> int:
        return self.responses.shape[1]

    @property
    def n_repetitions(self) -> int:
        """Repetition slots (the most repetitions of any image)."""
        return self.responses.shape[2]

    @property
    def repetition_counts(self) -> np.ndarray:
        """(images,) number of repetitions each image has."""
        return (~np.isnan(self.responses[:, 0, :])).sum(axis=1) if self.n_neuroids else np.zeros(self.n_images, int)

    def mean_responses(self) -> np.ndarray:
        """(images, neuroids) mean over each image's repetitions: the regression target."""
        present = ~np.isnan(self.responses)
        return np.where(present, self.responses, 0.0).sum(axis=2) / present.sum(axis=2)

    def select_images(self, image_ids: Sequence) -> "NeuralAssembly":
        """The assembly restricted to (and ordered like) ``image_ids``, e.g. the order features were computed in."""
        position = {v: i for i, v in enumerate(self.image_ids.tolist())}
        missing = [v for v in image_ids if v not in position]
        if missing:
            raise KeyError(f"{len(missing)} image ids not in the assembly, e.g. {missing[:3]}")
        idx = np.array([position[v] for v in image_ids])
        return NeuralAssembly(self.responses[idx], self.image_ids[idx], self.object_labels[idx], self.neuroid_ids)


def _open_netcdf(path: Path):
    """The file's data array, loaded; unreadable files raise ``ValueError`` naming the file."""
    import xarray as xr  # optional: the `xarray` extra (netCDF assemblies only)

    if not path.is_file():
        raise FileNotFoundError(f"assembly file {path} not found")
    if path.stat().st_size == 0:
        raise ValueError(f"assembly file {path} is empty (0 bytes)")
    try:
        with xr.open_dataarray(path) as da:
            return da.load()
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise ValueError(
            f"assembly file {path} is not a readable netCDF assembly (truncated, corrupt or another format): {err}"
        ) from err


def _unique_per_image(image_of: np.ndarray, values: np.ndarray, image_ids: np.ndarray, what: str, path: Path) -> np.ndarray:
    """One value per image from per-presentation ``values``; two different values raise ``ValueError``."""
    out = []
    for img in image_ids:
        found = np.unique(values[image_of == img].astype(str))
        if len(found) != 1:
            raise ValueError(f"{path}: image {str(img)!r} is listed with {len(found)} {what}s: {found.tolist()}")
        out.append(values[image_of == img][0])
    return np.asarray(out)


def _select_time(da, path: Path, time_bin: Optional[int], time_range: Optional[Tuple[float, float]]):
    has_dim = "time_bin" in da.dims
    has_times = "time_bin_start" in da.coords and "time_bin_end" in da.coords
    if time_bin is not None and time_range is not None:
        raise ValueError(f"give `time_bin` or `time_range`, not both (got {time_bin!r} and {time_range!r})")
    if time_bin is not None:
        if not has_dim:
            raise ValueError(f"`time_bin`={time_bin!r} given, but {path} has no time_bin dimension (dims {da.dims})")
        n = da.sizes["time_bin"]
        if not (isinstance(time_bin, (int, np.integer)) and -n <= time_bin < n):
            raise ValueError(f"`time_bin` must be an int index in [0, {n}) for {path}, got {time_bin!r}")
        return da.isel(time_bin=int(time_bin))
    if not has_times:
        if time_range is not None:
            raise ValueError(f"`time_range`={time_range!r} given, but {path} has no time_bin_start/time_bin_end coordinates")
        return da.mean("time_bin") if has_dim else da  # no times recorded: every bin counts
    window = DEFAULT_TIME_RANGE if time_range is None else tuple(float(t) for t in time_range)
    if len(window) != 2 or not window[0] < window[1]:
        raise ValueError(f"`time_range` must be (start_ms, end_ms) with start < end, got {time_range!r}")
    starts = np.atleast_1d(np.asarray(da["time_bin_start"].values, dtype=np.float64))
    ends = np.atleast_1d(np.asarray(da["time_bin_end"].values, dtype=np.float64))
    inside = (starts >= window[0]) & (ends <= window[1])
    if not inside.any():
        bins = [(float(a), float(b)) for a, b in zip(starts, ends)]
        raise ValueError(
            f"{path}: no time bin lies inside {window[0]:g}-{window[1]:g} ms "
            f"({'the default, MajajHong2015' if time_range is None else 'time_range'}); its bins are {bins[:10]}. "
            "Pass time_range=(start, end) or time_bin=index."
        )
    if not has_dim:
        return da
    return da.isel(time_bin=np.flatnonzero(inside)).mean("time_bin")


def load_netcdf_assembly(
    path: Union[str, Path],
    time_bin: Optional[int] = None,
    object_coord: str = "object_name",
    time_range: Optional[Tuple[float, float]] = None,
    region: Optional[str] = None,
    stimulus_set=None,
) -> NeuralAssembly:
    """Read a Brain-Score neural assembly saved as netCDF (needs the ``xarray`` extra).

    Layout (brainio, both generations): a data array with dims ``presentation`` x ``neuroid``
    (x ``time_bin``); presentations carry ``stimulus_id`` (Brain-Score 2.x) or ``image_id``
    (older files), optionally ``repetition`` and ``object_name`` (``object_coord``); neuroids carry
    ``neuroid_id`` and optionally ``region``; time bins ``time_bin_start``/``time_bin_end`` (ms).

    * Presentations of the same stimulus are its repetitions. Slots follow the sorted distinct
      ``repetition`` values (Brain-Score halves those values for its ceiling); without the
      coordinate, the order of presentations numbers them. Images may have different counts:
      none is dropped (see :class:`NeuralAssembly`).
    * Time: ``time_bin`` keeps one bin by index; otherwise the bins inside ``time_range`` (ms;
      default :data:`DEFAULT_TIME_RANGE`, 70-170 ms as MajajHong2015) are averaged. A file
      without bin times averages all its bins (``time_range`` is then an error).
    * ``region`` (e.g. ``'IT'``) keeps those neuroids; a file holding several regions needs it.
    * Object labels come from the ``object_coord`` presentation coordinate, or else from
      ``stimulus_set`` (a :class:`~harmonizer_fast.neural.stimuli.StimulusSet` or the path of
      its CSV), as brainio merges the stimulus set's metadata in. An image listed with two
      different labels raises ``ValueError``.

    Unreadable, empty or truncated files raise ``ValueError`` naming the file.
    """
    try:
        import xarray  # noqa: F401  (optional: the `xarray` extra; a clear message when it is absent)
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("reading netCDF assemblies needs xarray: pip install 'harmonizer_fast[xarray]'") from err
    path = Path(path)
    da = _open_netcdf(path)
    for dim in ("presentation", "neuroid"):
        if dim not in da.dims:
            raise ValueError(f"{path}: expected dims presentation x neuroid (x time_bin), got {da.dims}")
    extra = set(da.dims) - {"presentation", "neuroid", "time_bin"}
    if extra:
        raise ValueError(f"{path}: unexpected dims {sorted(extra)} (expected presentation x neuroid (x time_bin))")
    id_coord = next((c for c in ("stimulus_id", "image_id") if c in da.coords), None)
    if id_coord is None:
        raise ValueError(f"{path}: presentation coordinate 'stimulus_id' (or 'image_id') missing (have {sorted(da.coords)})")
    if region is not None:
        if "region" not in da.coords:
            raise ValueError(f"`region`={region!r} given, but {path} has no neuroid coordinate 'region'")
        regions = np.asarray(da["region"].values).astype(str)
        if not (regions == region).any():
            raise ValueError(f"{path}: no neuroid in region {region!r}; regions are {sorted(set(regions))}")
        da = da.isel(neuroid=np.flatnonzero(regions == region))
    elif "region" in da.coords and len(set(np.asarray(da["region"].values).astype(str))) > 1:
        raise ValueError(
            f"{path} holds neuroids of several regions {sorted(set(np.asarray(da['region'].values).astype(str)))}: "
            "pass region=... (e.g. 'IT')"
        )
    da = _select_time(da, path, time_bin, time_range)
    da = da.transpose("presentation", "neuroid")
    values = np.asarray(da.values, dtype=np.float64)
    image_of = np.asarray(da[id_coord].values)
    neuroid_ids = np.asarray(da["neuroid_id"].values) if "neuroid_id" in da.coords else np.arange(values.shape[1])

    image_ids, first = np.unique(image_of, return_index=True)
    order = np.argsort(first)  # keep the file's image order
    image_ids = image_ids[order]
    if object_coord in da.coords:
        objects = _unique_per_image(image_of, np.asarray(da[object_coord].values), image_ids, object_coord, path)
    elif stimulus_set is not None:
        if not isinstance(stimulus_set, StimulusSet):
            stimulus_set = load_stimulus_set(stimulus_set)
        objects = stimulus_set.metadata(object_coord, image_ids)
    else:
        raise ValueError(
            f"{path}: presentation coordinate {object_coord!r} missing (have {sorted(da.coords)}); "
            "pass stimulus_set=<the stimulus set CSV> to take it from there"
        )

    rows = {img: np.flatnonzero(image_of == img) for img in image_ids}
    if "repetition" in da.coords:
        repetition = np.asarray(da["repetition"].values)
    else:  # number each image's presentations in file order
        repetition = np.empty(len(image_of), dtype=np.int64)
        for r in rows.values():
            repetition[r] = np.arange(len(r))
    slots, slot_of = np.unique(repetition, return_inverse=True)
    slot_of = slot_of.reshape(-1)
    if len(slots) * len(image_ids) > 4 * len(image_of):
        raise ValueError(
            f"{path}: {len(slots)} distinct repetition values for {len(image_of)} presentations of {len(image_ids)} "
            "images; 'repetition' must number each image's presentations (0, 1, 2, ...), not all presentations"
        )
    responses = np.full((len(image_ids), values.shape[1], len(slots)), np.nan)
    for i, img in enumerate(image_ids):
        r = rows[img]
        taken = slot_of[r]
        if len(np.unique(taken)) != len(taken):
            dup = slots[np.argmax(np.bincount(taken))]
            raise ValueError(f"{path}: image {str(img)!r} has repetition {dup.item()!r} more than once")
        responses[i][:, taken] = values[r].T
    return NeuralAssembly(responses, image_ids, objects, neuroid_ids)
