"""Image-level neural recordings: images x neuroids x repetitions, with image ids and object labels.

Reads Brain-Score style assemblies from a local netCDF file (optional ``xarray`` extra:
``pip install harmonizer_fast[xarray]``) or takes plain numpy arrays. Nothing is downloaded.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

__all__ = ["NeuralAssembly", "load_netcdf_assembly"]


@dataclass
class NeuralAssembly:
    """Responses of ``neuroids`` to ``images``, one value per repetition.

    Attributes
    ----------
    responses
        (images, neuroids, repetitions) float array.
    image_ids, object_labels
        (images,) identifiers and object category of each image (splits are stratified by object).
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
        if not np.isfinite(self.responses).all():
            raise ValueError(f"`responses` {self.responses.shape} contains NaN or inf")
        n_images, n_neuroids, _ = self.responses.shape
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
        return self.responses.shape[2]

    def mean_responses(self) -> np.ndarray:
        """(images, neuroids) mean over repetitions: the regression target."""
        return self.responses.mean(axis=2)

    def select_images(self, image_ids: Sequence) -> "NeuralAssembly":
        """The assembly restricted to (and ordered like) ``image_ids``, e.g. the order features were computed in."""
        position = {v: i for i, v in enumerate(self.image_ids.tolist())}
        missing = [v for v in image_ids if v not in position]
        if missing:
            raise KeyError(f"{len(missing)} image ids not in the assembly, e.g. {missing[:3]}")
        idx = np.array([position[v] for v in image_ids])
        return NeuralAssembly(self.responses[idx], self.image_ids[idx], self.object_labels[idx], self.neuroid_ids)


def load_netcdf_assembly(
    path: Union[str, Path],
    time_bin: Optional[int] = None,
    object_coord: str = "object_name",
) -> NeuralAssembly:
    """Read a Brain-Score neural assembly saved as netCDF (needs the ``xarray`` extra).

    Layout: a data array with dims ``presentation`` x ``neuroid`` (x ``time_bin``), coordinates
    ``image_id``, ``object_name`` (``object_coord``) and optionally ``repetition`` on presentation,
    and ``neuroid_id`` on neuroid. Presentations of the same image become its repetitions (ordered
    by ``repetition`` when present). ``time_bin``: index of the bin to keep; ``None`` averages all
    bins. Images with more repetitions than the least-repeated image are truncated to that count
    (with a warning), so every image has the same number.
    """
    try:
        import xarray as xr
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("reading netCDF assemblies needs xarray: pip install 'harmonizer_fast[xarray]'") from err
    with xr.open_dataarray(Path(path)) as da:
        da = da.load()
    for dim in ("presentation", "neuroid"):
        if dim not in da.dims:
            raise ValueError(f"{path}: expected dims presentation x neuroid (x time_bin), got {da.dims}")
    for coord in ("image_id", object_coord):
        if coord not in da.coords:
            raise ValueError(f"{path}: presentation coordinate {coord!r} missing (have {sorted(da.coords)})")
    if "time_bin" in da.dims:
        da = da.mean("time_bin") if time_bin is None else da.isel(time_bin=time_bin)
    da = da.transpose("presentation", "neuroid")
    values = np.asarray(da.values, dtype=np.float64)
    image_of = np.asarray(da["image_id"].values)
    objects = np.asarray(da[object_coord].values)
    repetition = np.asarray(da["repetition"].values) if "repetition" in da.coords else np.arange(len(image_of))
    neuroid_ids = np.asarray(da["neuroid_id"].values) if "neuroid_id" in da.coords else np.arange(values.shape[1])

    image_ids, first = np.unique(image_of, return_index=True)
    order = np.argsort(first)  # keep the file's image order
    image_ids, first = image_ids[order], first[order]
    rows = [np.flatnonzero(image_of == img) for img in image_ids]
    rows = [r[np.argsort(repetition[r], kind="stable")] for r in rows]
    counts = np.array([len(r) for r in rows])
    n_rep = int(counts.min())
    if (counts != n_rep).any():
        warnings.warn(
            f"{path}: images have {counts.min()}..{counts.max()} repetitions; keeping the first {n_rep} of each",
            stacklevel=2,
        )
    responses = np.stack([values[r[:n_rep]].T for r in rows])  # images, neuroids, repetitions
    return NeuralAssembly(responses, image_ids, objects[first], neuroid_ids)
