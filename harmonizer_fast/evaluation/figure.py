"""Figures of images, human maps and model saliency side by side (matplotlib, PNG)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch

from harmonizer_fast._io import atomic_open


def _to_numpy(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


def agg_pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (every figure here is written to a file)."""
    # lazy: matplotlib.pyplot is the costliest import left out of CLI start-up (measured, benchmarks/RESULTS.md);
    # the backend is chosen before pyplot loads
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # lazy, as above: after the backend is chosen

    return plt


def save_figure_atomically(fig, path: Union[str, os.PathLike], dpi: int = 110) -> Path:
    """``fig.savefig`` as PNG through :func:`harmonizer_fast._io.atomic_open`."""
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def plot_alignment(
    images,
    heatmaps,
    saliency: Dict[str, object],
    path: Union[str, os.PathLike],
    scores: Optional[Dict[str, Sequence[float]]] = None,
    titles: Optional[Sequence[str]] = None,
    max_images: int = 8,
) -> Path:
    """One row per image: the image, its human map, then each model's saliency map.

    Args:
        images: (N, 3, H, W) 0..255 (as ClickMe batches hold them).
        heatmaps: (N, H, W) human maps.
        saliency: column name -> (N, H, W) maps (e.g. ``{"before": ..., "after": ...}``).
        path: PNG to write (atomically).
        scores: column name -> per-image Spearman correlations shown under each map.
        titles: per-image row labels (e.g. class names).
        max_images: rows drawn at most.
    """
    plt = agg_pyplot()
    images = _to_numpy(images)
    heatmaps = _to_numpy(heatmaps)
    maps = {name: _to_numpy(m) for name, m in saliency.items()}
    n = min(len(images), max_images)
    columns = 2 + len(maps)
    fig, axes = plt.subplots(n, columns, figsize=(2.2 * columns, 2.2 * n), squeeze=False)
    for row in range(n):
        picture = np.clip(images[row].transpose(1, 2, 0), 0, 255).astype(np.uint8)
        panels = [("image", picture, None), ("human map", heatmaps[row], "jet")]
        panels += [(name, m[row], "jet") for name, m in maps.items()]
        for col, (name, data, cmap) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(data, cmap=cmap)
            ax.set_xticks([])
            ax.set_yticks([])
            label = name if row == 0 else ""
            if scores is not None and name in scores:
                label = (label + "\n" if label else "") + f"rho = {scores[name][row]:.2f}"
            ax.set_title(label, fontsize=8)
        if titles is not None:
            axes[row, 0].set_ylabel(titles[row], fontsize=8)
    fig.tight_layout()
    try:
        return save_figure_atomically(fig, path)
    finally:
        plt.close(fig)
