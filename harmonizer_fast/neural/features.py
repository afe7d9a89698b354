r"""Memory-bounded layer features for scoring every layer of a model.

Scoring all layers naively keeps an images x features array for every layer at once (ViT-B/16:
12 blocks x 151,296 features x 3,200 images x 4 bytes = 23 GB). Here the images stream through
the model once, in batches; each layer keeps only

* its features, flattened and, when wider than ``projection_dim``, randomly projected to
  ``projection_dim`` dimensions (seeded), so at most ``n x min(d, projection_dim)`` values, and
* at the end its ``n x n`` Gram matrix :math:`K = Z Z^\top`, all a dual (kernel) ridge readout
  needs (:func:`gram_ridge_predict`).

The random projection :math:`P` (``projection_dim x d``) preserves inner products in
expectation, :math:`E[\langle Px, Py\rangle] = \langle x, y\rangle` (Johnson-Lindenstrauss).
``'sparse'`` (default) is a count sketch: every input feature is added, with a random sign, to
one random output coordinate (``2 d`` stored integers, one pass over the features per batch);
the inner-product error has the same variance as a Gaussian projection's,
:math:`(\lVert x\rVert^2\lVert y\rVert^2 + \langle x, y\rangle^2)/k` at most. ``'gaussian'`` is a dense
:math:`N(0, 1/k)` matrix (``k d`` entries, use it for moderate ``d`` only).
With ``projection_dim=None`` features are kept exactly (memory ``n x d`` per layer).
The Gram-matrix algebra (exact embedding, dual ridge, PCA layer reduction) is in
:mod:`harmonizer_fast.neural.gram`.
"""
from __future__ import annotations

import difflib
import math
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union
import shutil
import tempfile

import numpy as np
import torch
from tqdm.auto import tqdm

from harmonizer_fast._memory import release_freed_memory
from harmonizer_fast.neural.gram import (  # noqa: F401  (public names of this module too)
    GramPCA,
    exact_embedding,
    gram_embedding,
    gram_ridge_predict,
    layer_pca,
)
from harmonizer_fast.spec import shape_of

__all__ = [
    "LayerTaps",
    "LayerFeatureAccumulator",
    "extract_layer_grams",
    "gram_ridge_predict",
    "gram_embedding",
    "PROJECTIONS",
    "LayerFeatureStore",
    "exact_embedding",
    "layer_pca",
    "GramPCA",
]

LayerSpec = Union[str, int]


class LayerTaps:
    """Context manager returning the outputs of named layers for a batch, in one forward pass.

    Module names (``model.get_submodule`` paths) are read with forward hooks; ints are indices for
    timm's ``model.forward_intermediates``. ``taps(batch)`` returns ``{str(layer): output}``.
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[LayerSpec]):
        self.model = model
        self.names = [ly for ly in layers if isinstance(ly, str)]
        if self.names:
            modules = dict(model.named_modules())
            unknown = [name for name in self.names if name not in modules]
            if unknown:
                hints = {name: difflib.get_close_matches(name, modules, n=3) for name in unknown}
                raise ValueError(
                    f"`layers` {unknown} are not modules of {type(model).__name__} "
                    f"(closest names: {hints}; all names: model.named_modules())"
                )
        # timm returns intermediates in depth order whatever order the indices come in.
        self.indices = sorted({int(ly) for ly in layers if not isinstance(ly, str)})
        if self.indices and not hasattr(model, "forward_intermediates"):
            raise TypeError(f"integer layers {self.indices} need a timm model with forward_intermediates()")
        self.keys = [str(ly) for ly in layers]
        self._captured: Dict[str, object] = {}
        self._handles: List[object] = []

    def __enter__(self) -> "LayerTaps":
        for name in self.names:
            module = self.model.get_submodule(name)
            self._handles.append(
                module.register_forward_hook(lambda _m, _i, out, key=name: self._captured.__setitem__(key, out))
            )
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __call__(self, batch: torch.Tensor) -> Dict[str, object]:
        self._captured.clear()
        if self.indices:
            outputs = self.model.forward_intermediates(batch, indices=self.indices, intermediates_only=True)
            self._captured.update({str(i): out for i, out in zip(self.indices, outputs)})
        if self.names:
            self.model(batch)
        missing = [k for k in self.keys if k not in self._captured]
        if missing:
            raise RuntimeError(f"layers {missing} produced no output (are they used in forward()?)")
        outputs = {k: self._captured[k] for k in self.keys}
        # Dropping our references now lets this batch's activations be freed before the next one.
        self._captured.clear()
        return outputs


def _sparse_projection(in_dim: int, out_dim: int, generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    # Count sketch: one random output coordinate and sign per input feature; one index_add pass.
    buckets = torch.randint(0, out_dim, (in_dim,), generator=generator)
    signs = (torch.randint(0, 2, (in_dim,), generator=generator) * 2 - 1).to(torch.float32)

    def project(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], out_dim, dtype=x.dtype).index_add_(1, buckets, x * signs)

    return project


def _gaussian_projection(in_dim: int, out_dim: int, generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    matrix = torch.randn(in_dim, out_dim, generator=generator) / math.sqrt(out_dim)
    return lambda x: x @ matrix


#: Random projections by name: ``factory(in_dim, out_dim, generator) -> fn(x (b, in_dim)) -> (b, out_dim)``.
PROJECTIONS = {"sparse": _sparse_projection, "gaussian": _gaussian_projection}


class LayerFeatureAccumulator:
    """Collects one layer's flattened features batch by batch, projected when wider than ``projection_dim``.

    Stores at most ``n x min(d, projection_dim)`` float32 values (plus the projection: ``2 d``
    integers for ``'sparse'``); :meth:`gram` returns the ``n x n`` float64 Gram matrix.
    """

    def __init__(self, projection_dim: Optional[int] = None, projection: str = "sparse", seed: int = 0):
        if projection not in PROJECTIONS:
            raise ValueError(f"`projection` must be one of {sorted(PROJECTIONS)}, got {projection!r}")
        if projection_dim is not None and projection_dim < 1:
            raise ValueError(f"`projection_dim` must be >= 1 or None, got {projection_dim}")
        self.projection_dim = projection_dim
        self.projection = projection
        self.seed = seed
        self.in_dim: Optional[int] = None
        self._project: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self._chunks: List[torch.Tensor] = []

    def update(self, batch: torch.Tensor) -> None:
        """Add a batch of layer outputs (b, ...) (any trailing shape, flattened)."""
        flat = batch.detach().reshape(batch.shape[0], -1).to("cpu", torch.float32)
        if self.in_dim is None:
            self.in_dim = flat.shape[1]
            if self.projection_dim is not None and self.in_dim > self.projection_dim:
                generator = torch.Generator().manual_seed(self.seed)
                self._project = PROJECTIONS[self.projection](self.in_dim, self.projection_dim, generator)
        elif flat.shape[1] != self.in_dim:
            raise ValueError(f"layer output changed size: {flat.shape[1]} features, first batch had {self.in_dim}")
        stored = self._project(flat) if self._project is not None else flat.clone()
        if not bool(torch.isfinite(stored).all()):  # a NaN would spread through every Gram entry of its row
            raise ValueError(f"layer output of images {self.n_images}..{self.n_images + flat.shape[0] - 1} holds "
                             "non-finite values (NaN or inf): the model overflowed or the images hold them")
        self._chunks.append(stored)

    @property
    def n_images(self) -> int:
        return sum(c.shape[0] for c in self._chunks)

    @property
    def width(self) -> int:
        """Stored features per image: ``min(d, projection_dim)``."""
        return self._chunks[0].shape[1] if self._chunks else 0

    @property
    def stored_values(self) -> int:
        """Number of feature values held (excluding the fixed projection)."""
        return sum(c.numel() for c in self._chunks)

    def features(self) -> torch.Tensor:
        """(n, width) stored (possibly projected) features."""
        return torch.cat(self._chunks)

    def gram(self) -> np.ndarray:
        """(n, n) float64 Gram matrix of the stored features, built block by block."""
        n = self.n_images
        gram = np.empty((n, n))
        starts = np.cumsum([0] + [c.shape[0] for c in self._chunks])
        for i, ci in enumerate(self._chunks):
            for j in range(i, len(self._chunks)):
                block = (ci.double() @ self._chunks[j].double().T).numpy()
                gram[starts[i] : starts[i + 1], starts[j] : starts[j + 1]] = block
                gram[starts[j] : starts[j + 1], starts[i] : starts[i + 1]] = block.T
        return gram


@torch.no_grad()
def extract_layer_grams(
    model: torch.nn.Module,
    images_iter: Iterable,
    layers: Sequence[LayerSpec],
    projection_dim: Optional[int] = None,
    projection: str = "sparse",
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    keep_features: bool = False,
    progress: bool = True,
) -> Dict[str, Union[np.ndarray, LayerFeatureAccumulator]]:
    """Stream image batches through ``model`` once and return each layer's (n, n) Gram matrix.

    ``images_iter`` yields NCHW tensors (or tuples whose first item is one, e.g. a DataLoader of
    (images, labels)). ``layers``: module names and/or timm ``forward_intermediates`` indices.
    Each layer's output is flattened (all of C x H x W, or tokens x dim) and fed to a
    :class:`LayerFeatureAccumulator` (layer ``i`` seeded with ``seed + i``). Only one batch of
    full-size activations exists at a time, and the heap's freed pages go back to the OS after
    every batch (:func:`harmonizer_fast._memory.release_freed_memory`; without it glibc
    fragmentation grew ViT-B/16's RSS ten times faster than the stored features). ``keep_features=True`` returns the accumulators
    instead of the Grams.
    """
    accumulators = {str(ly): LayerFeatureAccumulator(projection_dim, projection, seed + i) for i, ly in enumerate(layers)}
    was_training = model.training
    model.eval().to(device)
    batches = 0
    try:
        with LayerTaps(model, layers) as taps:
            for batch in tqdm(images_iter, desc="layer features", disable=not progress, leave=False):
                if isinstance(batch, (tuple, list)):
                    batch = batch[0]
                if not isinstance(batch, torch.Tensor) or batch.ndim != 4:
                    raise ValueError(f"images_iter must yield NCHW tensors, got {shape_of(batch)}")
                if batch.is_floating_point() and not bool(torch.isfinite(batch).all()):
                    raise ValueError(f"`images_iter` batch {batches} ({shape_of(batch)}) holds non-finite values "
                                     "(NaN or inf)")
                for key, out in taps(batch.to(device)).items():
                    try:
                        accumulators[key].update(out[0] if isinstance(out, (tuple, list)) else out)
                    except ValueError as err:
                        raise ValueError(f"layer {key!r}: {err}") from err
                batches += 1
                release_freed_memory()
    finally:
        model.train(was_training)
    if batches == 0:
        raise ValueError("`images_iter` yielded no batches: there is nothing to build Gram matrices from")
    if keep_features:
        return accumulators
    return {key: acc.gram() for key, acc in accumulators.items()}


class LayerFeatureStore:
    """Full (unprojected) flattened features of several layers for ``n_images`` images.

    Batches arrive in image order (:meth:`update`, all layers at once, as one forward pass gives
    them). When every layer's ``n_images x d`` float32 features fit in ``memory_budget`` bytes
    they stay in memory; otherwise each layer is written, batch by batch, to its own ``.npy`` file
    in a private folder under ``spool_dir`` (plain writes: the page cache holds them, not the
    process), and :meth:`features` reads one layer back at a time. So peak memory is one layer's
    features, whatever the number of layers. Use as a context manager (or call :meth:`close`) to
    delete the spool files.
    """

    def __init__(self, layers: Sequence[str], n_images: int, memory_budget: float = 2 * 2**30,
                 spool_dir: Optional[str] = None) -> None:
        if isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer)) or n_images < 1:
            raise ValueError(f"`n_images` must be a positive int, got {n_images!r}")
        if not memory_budget >= 0:
            raise ValueError(f"`memory_budget` must be >= 0 bytes, got {memory_budget!r}")
        self.layers = [str(name) for name in layers]
        self.n_images, self.memory_budget, self.spool_dir = int(n_images), float(memory_budget), spool_dir
        self.widths: Dict[str, int] = {}
        self.filled = 0
        self._arrays: Dict[str, np.ndarray] = {}
        self._files: Dict[str, object] = {}
        self._paths: Dict[str, str] = {}
        self._folder: Optional[str] = None

    @property
    def spooled(self) -> bool:
        """True when the features live in files (they did not fit in ``memory_budget``)."""
        return self._folder is not None

    def _start(self, widths: Dict[str, int]) -> None:
        self.widths = widths
        total = 4.0 * self.n_images * sum(widths.values())
        if total <= self.memory_budget:
            # Filled in place: reading a layer back costs no concatenated copy.
            self._arrays = {name: np.empty((self.n_images, widths[name]), dtype=np.float32) for name in self.layers}
            return
        parent = self.spool_dir or tempfile.gettempdir()
        free = shutil.disk_usage(parent).free
        if free < total:
            raise OSError(
                f"layer features need {total / 2**30:.1f} GiB of spool space in {parent}, only "
                f"{free / 2**30:.1f} GiB free: pass another `spool_dir`, fewer `layers` or a larger `memory_budget`"
            )
        self._folder = tempfile.mkdtemp(prefix="layer-features-", dir=parent)
        for index, name in enumerate(self.layers):
            path = os.path.join(self._folder, f"{index}.npy")
            handle = open(path, "wb")
            np.lib.format.write_array_header_1_0(
                handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                         "shape": (self.n_images, widths[name])})
            self._files[name], self._paths[name] = handle, path

    def update(self, outputs: Dict[str, torch.Tensor]) -> None:
        """Append one batch: ``outputs[layer]`` is (b, ...) for every layer, same b."""
        missing = [name for name in self.layers if name not in outputs]
        if missing:
            raise ValueError(f"batch lacks layers {missing}")
        flat = {name: outputs[name].detach().reshape(outputs[name].shape[0], -1).to("cpu", torch.float32)
                for name in self.layers}
        sizes = {f.shape[0] for f in flat.values()}
        if len(sizes) != 1:
            raise ValueError(f"layers gave different batch sizes {sorted(sizes)}")
        batch = sizes.pop()
        if self.filled + batch > self.n_images:
            raise ValueError(f"more images than announced: {self.filled + batch} > n_images={self.n_images}")
        if not self.widths:
            self._start({name: int(f.shape[1]) for name, f in flat.items()})
        for name, f in flat.items():
            if f.shape[1] != self.widths[name]:
                raise ValueError(f"layer {name!r} output changed size: {f.shape[1]} features, first batch had "
                                 f"{self.widths[name]}")
            if self.spooled:
                self._files[name].write(f.numpy().tobytes())
            else:
                self._arrays[name][self.filled:self.filled + batch] = f.numpy()
        self.filled += batch

    def features(self, layer: str) -> np.ndarray:
        """(n_images, d) float32 features of ``layer`` (read from its file when spooled)."""
        if self.filled != self.n_images:
            raise ValueError(f"only {self.filled} of n_images={self.n_images} images were stored")
        if layer not in self.widths:
            raise KeyError(f"no stored features for layer {layer!r}; stored: {list(self.widths)}")
        if not self.spooled:
            return self._arrays[layer]
        handle = self._files[layer]
        if not handle.closed:
            handle.close()
        return np.load(self._paths[layer])

    def discard(self, layer: str) -> None:
        """Free (or delete the file of) one layer's features."""
        if self.spooled and layer in self._paths:
            self._files[layer].close()
            if os.path.exists(self._paths[layer]):
                os.remove(self._paths[layer])
        self._arrays.pop(layer, None)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
        self._arrays.clear()

    def __enter__(self) -> "LayerFeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
