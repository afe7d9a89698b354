"""Alignment of a model's explanations with ClickMe human maps (``harmonization.evaluation``).

:func:`evaluate_clickme` explains each validation image for its true label, compares the
explanation with the human ClickMe map (Spearman, Dice, IoU from
:mod:`harmonizer_fast.evaluation.metrics`) and reports the paper's alignment score, the
mean Spearman correlation divided by the human ceiling.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from harmonizer_fast.spec import ArrayLike, check_finite, check_rank, one_hot, shape_of
from harmonizer_fast.evaluation.metrics import HUMAN_SPEARMAN_CEILING, alignment_metrics

__all__ = ["Saliency", "evaluate_clickme"]

Explainer = Callable[[torch.Tensor, torch.Tensor], ArrayLike]
Batch = Tuple[ArrayLike, ArrayLike, ArrayLike]


def _model_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    """Where the model lives and the float dtype its inputs should have (float32 by default)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def _one_hot_labels(labels: torch.Tensor, num_classes: int, batch: int) -> torch.Tensor:
    """(N, classes) one-hot (or soft) rows as given, or (N,) integer classes made one-hot."""
    if labels.ndim == 1 and not labels.is_floating_point():
        if labels.shape[0] != batch:
            raise ValueError(f"`labels` has {labels.shape[0]} entries for a batch of {batch} images")
        return one_hot(labels, num_classes)
    if labels.ndim != 2 or tuple(labels.shape) != (batch, num_classes):
        raise ValueError(
            f"`labels` must be one-hot rows of shape ({batch}, {num_classes}) matching the model "
            f"output, or ({batch},) integer classes; got shape {shape_of(labels)}"
        )
    return labels


class Saliency:
    """Plain gradient saliency: the largest absolute input gradient over colour channels.

    .. math:: S_{n,h,w} = \\max_c \\left| \\frac{\\partial\\, \\sum_k f(x)_{n,k}\\, y_{n,k}}
              {\\partial x_{n,c,h,w}} \\right|

    with :math:`f` the model's logits and :math:`y` the one-hot labels, so each image is
    explained for its own label (the reference's default, Xplique's ``Saliency``). The
    model runs in eval mode (its mode is restored afterwards); images are processed in
    chunks of ``batch_size``. The images in a batch do not interact in eval mode, so one
    backward pass per chunk gives every image's own gradient.

    Args:
        model: a torch module mapping (N, C, H, W) images to (N, classes) logits.
        batch_size: images per forward/backward pass (bounds the memory).
    """

    def __init__(self, model: nn.Module, batch_size: int = 64):
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
        self.model = model
        self.batch_size = batch_size

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, H, W) saliency maps of (N, C, H, W) ``images`` for ``labels`` (one-hot rows)."""
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(f"`images` must be a floating point torch.Tensor, got {type(images).__name__}")
        check_rank(images, 4, "images", "N, C, H, W")
        was_training = self.model.training
        self.model.eval()
        try:
            chunks = [
                self._explain(images[start : start + self.batch_size], labels[start : start + self.batch_size])
                for start in range(0, images.shape[0], self.batch_size)
            ]
        finally:
            self.model.train(was_training)
        return torch.cat(chunks) if chunks else images.new_zeros((0,) + tuple(images.shape[2:]))

    def _explain(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(images)
            if logits.ndim != 2:
                raise ValueError(f"the model must return (N, classes) logits, got shape {shape_of(logits)}")
            targets = _one_hot_labels(labels.to(logits.device), logits.shape[1], images.shape[0])
            (gradient,) = torch.autograd.grad((logits * targets.to(logits.dtype)).sum(), images)
        return gradient.abs().amax(dim=1)


def _channel_mean(maps: torch.Tensor, name: str) -> torch.Tensor:
    """(N, H, W) maps; (N, C, H, W) maps are averaged over their channel axis (NCHW)."""
    check_rank(maps, (3, 4), name, "N, H, W or N, C, H, W")
    if not maps.is_floating_point():  # e.g. uint8 heatmaps: the reference averages in float32
        maps = maps.float()
    return maps.mean(dim=1) if maps.ndim == 4 else maps


def _as_tensor(value: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise TypeError(f"`{name}` must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


def evaluate_clickme(
    model: nn.Module,
    explainer: Optional[Explainer] = None,
    clickme_val_dataset: Optional[Iterable[Batch]] = None,
    preprocess_inputs: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    *,
    progress: bool = True,
) -> Dict[str, Union[List[float], float]]:
    """Human alignment of a model's explanations on ClickMe validation batches.

    For every batch ``(images, heatmaps, labels)``: ``images`` (N, 3, H, W) (0..255 as the
    ClickMe loader gives them) go through ``preprocess_inputs``, then ``explainer(images,
    labels)`` gives one map per image; 4-D explanations or heatmaps are averaged over
    their channel axis (axis 1, NCHW). Each explanation is compared with its human map:

    .. math:: \\text{alignment\\_score} = \\frac{\\operatorname{mean}_i \\rho_i}{0.65753}

    with :math:`\\rho_i` the Spearman correlation of image :math:`i` and 0.65753 the human
    inter-rater ceiling (:data:`HUMAN_SPEARMAN_CEILING`).

    Args:
        model: torch module returning (N, classes) logits; evaluated in eval mode on its
            own device (its mode is restored afterwards).
        explainer: ``f(images, labels) -> maps``; defaults to :class:`Saliency` (max over
            channels of the absolute input gradient of the label's logit).
        clickme_val_dataset: iterable of ``(images, heatmaps, labels)`` batches (torch
            tensors or numpy arrays; labels one-hot rows or integer classes), e.g.
            ``harmonizer_fast.common.load_clickme_val("path/to/clickme")``. Required:
            nothing is downloaded.
        preprocess_inputs: applied to each image batch first (e.g.
            ``harmonizer_fast.common.preprocess_input``); default: none.
        progress: show a tqdm progress bar.

    Returns:
        dict with per-image lists ``'spearman'``, ``'dice'``, ``'iou'`` (metrics at the
        default top 10 %) and the float ``'alignment_score'``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if clickme_val_dataset is None:
        raise ValueError(
            "`clickme_val_dataset` is required: nothing is downloaded. Pass an iterable of "
            "(images, heatmaps, labels) batches, e.g. harmonizer_fast.common.load_clickme_val("
            "'path/to/clickme' (a directory of local val-*.tfrecords shards, or their paths), batch_size=64)."
        )
    explainer = explainer if explainer is not None else Saliency(model)
    preprocess = preprocess_inputs if preprocess_inputs is not None else (lambda images: images)
    device, dtype = _model_device_dtype(model)
    metrics: Dict[str, List[float]] = {"spearman": [], "dice": [], "iou": []}
    for batch in tqdm(clickme_val_dataset, desc="ClickMe alignment", unit="batch", disable=not progress):
        if not isinstance(batch, (tuple, list)) or len(batch) != 3:
            raise ValueError("each batch of `clickme_val_dataset` must be an (images, heatmaps, labels) triple")
        images, heatmaps, labels = (_as_tensor(x, name) for x, name in zip(batch, ("images", "heatmaps", "labels")))
        # checked here, in the batch's own terms: a NaN image gave a finite (meaningless) score,
        # and a heatmap of another size surfaced as a shape clash of the metrics' arguments
        check_rank(images, 4, "images", "(N, C, H, W)")
        if images.is_floating_point():
            check_finite(images, "images")
        if heatmaps.ndim not in (3, 4) or heatmaps.shape[0] != images.shape[0] or \
                tuple(heatmaps.shape[-2:]) != tuple(images.shape[-2:]):
            raise ValueError(f"`heatmaps` must have the same shape as `images` {shape_of(images)} minus the channel "
                             f"axis, (N, H, W), or with any channel count, (N, C, H, W); got {shape_of(heatmaps)}")
        images = preprocess(images.to(device=device, dtype=dtype))
        try:
            explanations = explainer(images, labels.to(device))
        except (AssertionError, RuntimeError) as err:  # timm asserts its fixed input size, some with no message
            raise ValueError(
                f"explaining a batch of images {shape_of(images)} failed: {type(err).__name__}: {str(err) or '(no message)'}; "
                f"a model built for another input size than the ClickMe maps' {images.shape[-2]} x {images.shape[-1]}? "
                "(timm: create_model(..., img_size=...) where the architecture allows it)") from err
        saliency = _channel_mean(_as_tensor(explanations, "explanations"), "explanations")
        human = _channel_mean(heatmaps, "heatmaps")
        if tuple(saliency.shape[-2:]) != tuple(human.shape[-2:]):
            raise ValueError(
                f"the explanations are {saliency.shape[-2]} x {saliency.shape[-1]} but the ClickMe maps "
                f"{human.shape[-2]} x {human.shape[-1]}: `preprocess_inputs` (or the explainer) changed the image "
                "size; compare at the maps' size (a preprocess that keeps H x W, or an explainer that resizes "
                "its maps back)")
        for name, values in alignment_metrics(saliency, human).items():
            metrics[name] += values.tolist()
    if not metrics["spearman"]:
        raise ValueError("`clickme_val_dataset` yielded no batches")
    return {**metrics, "alignment_score": float(np.mean(metrics["spearman"]) / HUMAN_SPEARMAN_CEILING)}
