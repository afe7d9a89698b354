"""timm's own pretrained weights, from the Hugging Face cache or a local timm-format file.

Two ways to get weights into a timm architecture, both through timm's loading code, so that
the model's ``pretrained_cfg`` (input size, interpolation, crop, mean/std) describes the weights
it holds and :func:`stimulus_transform` can prepare images the way those weights expect:

* a **pretrained name or tag** (``"resnet50"``, ``"resnet50.a1_in1k"``): timm's published weights,
  read from the Hugging Face cache (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``) and
  downloaded only when the machine can (``HF_HUB_OFFLINE=1`` forbids it: then weights that are
  not cached raise :class:`WeightsNotAvailableError` naming the model and how to get them);
* a **local file** (``.safetensors`` or a ``torch.save`` state dict, including checkpoints that
  hold it under ``"state_dict"`` or ``"model"``), loaded by timm through
  ``pretrained_cfg_overlay=dict(file=...)``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import constants, try_to_load_from_cache
from safetensors.torch import load_file
from timm.data import resolve_model_data_config

__all__ = [
    "WeightsNotAvailableError",
    "check_pretrained_available",
    "create_pretrained",
    "is_offline",
    "pretrained_source",
    "pretrained_tag_name",
    "stimulus_transform",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Files timm looks for in a Hugging Face model repository, in its order of preference.
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class WeightsNotAvailableError(FileNotFoundError):
    """Pretrained weights that are neither cached nor allowed to be downloaded."""


def is_offline() -> bool:
    """True when downloads are forbidden: ``HF_HUB_OFFLINE`` (as Hugging Face reads it)."""

    return bool(constants.is_offline_mode()) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def pretrained_source(name: str) -> Tuple[str, str]:
    """``(kind, location)`` of the published weights of a timm name or ``arch.tag``.

    ``kind`` is ``"hf-hub"`` (location: the repository id) or ``"url"``. Raises ``ValueError``
    for an unknown architecture or a tag timm does not publish.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"`name` must be a non-empty str, got {name!r}")
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm architecture {arch!r} (from {name!r})")
    tags = timm.list_pretrained(f"{arch}.*") or timm.list_pretrained(arch)
    if "." in name and name not in tags:
        raise ValueError(f"timm has no pretrained weights {name!r}; published tags of {arch!r}: {tags or 'none'}")
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ValueError(f"timm publishes no pretrained weights for {name!r}; pass a local weights file instead")
    if cfg.hf_hub_id:
        return "hf-hub", cfg.hf_hub_id
    return "url", cfg.url


def pretrained_tag_name(name: str) -> str:
    """Full ``arch.tag`` of the weights timm loads for ``name`` (its default tag when untagged),
    as timm's ``results-imagenet.csv`` names them."""
    pretrained_source(name)
    cfg = timm.models.get_pretrained_cfg(name)
    arch = name.split(".")[0]
    return f"{arch}.{cfg.tag}" if cfg.tag else arch


def _how_to_get(name: str, repo: str) -> str:
    return (
        f"on a machine with internet run `hf download {repo}` (or `python -c \"import timm; "
        f"timm.create_model('{name}', pretrained=True)\"`) and copy its Hugging Face cache "
        f"(~/.cache/huggingface/hub) here or point HF_HUB_CACHE at it, or pass a local weights file "
        f"(`--weights PATH`; in a sweep `--weights LABEL=PATH`)"
    )


def check_pretrained_available(name: str, cache_dir: Optional[PathLike] = None) -> None:
    """Raise before any work when ``name``'s pretrained weights cannot be had.

    Online, nothing to check (timm downloads into the cache on first use). Offline
    (:func:`is_offline`), the weights must already be in the cache: the Hugging Face cache for
    ``hf-hub`` weights, torch hub's checkpoint folder for URL weights.
    """
    kind, location = pretrained_source(name)
    if not is_offline():
        return
    if kind == "hf-hub":
        repo, _, revision = location.partition("@")
        for filename in _HF_WEIGHT_FILES:
            found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir, revision=revision or None)
            if isinstance(found, str) and os.path.isfile(found):
                return
        cache = cache_dir or _hf_cache()
        raise WeightsNotAvailableError(
            f"pretrained weights of {name!r} (Hugging Face repo {repo}) are not in the cache {cache} and "
            f"HF_HUB_OFFLINE forbids downloading them: {_how_to_get(name, repo)}"
        )
    target = Path(cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints")) / os.path.basename(location)
    if not target.is_file():
        raise WeightsNotAvailableError(
            f"pretrained weights of {name!r} ({location}) are not in {target.parent} and HF_HUB_OFFLINE "
            f"forbids downloading them: download that file there on a machine with internet, or pass a "
            f"local weights file (`--weights PATH`; in a sweep `--weights LABEL=PATH`)"
        )


def _hf_cache() -> str:
    return constants.HF_HUB_CACHE


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """A local state dict: ``.safetensors``, or ``torch.save`` read with ``weights_only=True`` (a
    :class:`harmonizer_fast.training.Trainer` checkpoint's ``"model"`` entry is taken)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, pickle and zip errors have no common base class
        raise ValueError(f"{str(path)!r} is not a readable weights file (.safetensors, or a state dict saved "
                         f"with torch.save): {type(err).__name__}: {str(err)[:200]}") from err
    if path.suffix != ".safetensors" and isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
    return state


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    """One line on how ``given`` differs from a model's ``expected`` state dict (counts, first names)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
              if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    parts = [f"{len(items)} {what} (e.g. {items[:3]})" for what, items in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches (file vs model)", shapes))
             if items]
    return "; ".join(parts) or "keys and shapes agree"


def create_pretrained(
    name: str,
    weights_file: Optional[PathLike] = None,
    num_classes: Optional[int] = None,
    cache_dir: Optional[PathLike] = None,
    **timm_kwargs,
) -> nn.Module:
    """A timm model with weights loaded by timm, its ``pretrained_cfg`` describing them.

    Args:
        name: timm architecture or ``arch.tag`` (``"resnet50.a1_in1k"``).
        weights_file: a local timm-format file (``.safetensors`` or ``torch.save`` state dict);
            None takes timm's published weights of ``name`` (cache, or download when allowed).
        num_classes: classifier size; None keeps the pretrained one. With published weights
            and another size timm drops the classifier weights (a fresh head); with a local file
            the file's classifier is expected to have this size.
        cache_dir: Hugging Face cache to read (default ``HF_HUB_CACHE``).
        **timm_kwargs: passed to ``timm.create_model``.
    """
    kwargs = dict(timm_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if weights_file is not None:
        path = Path(weights_file)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {str(path)!r} (for {name!r}) does not exist")
        arch = name.split(".")[0]
        if not timm.is_model(arch):
            raise ValueError(f"unknown timm architecture {arch!r} (from {name!r})")
        overlay: Dict[str, object] = {"file": str(path)}
        if num_classes is not None:
            # The file's head is the model's head: tell timm so it does not discard it.
            overlay["num_classes"] = num_classes
        try:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        except Exception as err:  # timm passes on torch's, pickle's and safetensors' own errors
            given = read_state_dict(path)  # an unreadable file: a ValueError saying so, not timm's unpickling one
            if not (isinstance(err, RuntimeError) and "state_dict" in str(err)):
                raise
            # torch's message lists every key (hundreds of lines); say what does not fit in one
            expected = timm.create_model(name, pretrained=False, **kwargs).state_dict()
            raise ValueError(f"weights file {str(path)!r} does not fit {name!r}: "
                             f"{state_dict_mismatch(expected, given)}") from err
    check_pretrained_available(name, cache_dir)
    try:
        return timm.create_model(name, pretrained=True, cache_dir=cache_dir, **kwargs)
    except OSError as err:  # huggingface_hub's LocalEntryNotFoundError, connection errors
        kind, location = pretrained_source(name)
        raise WeightsNotAvailableError(
            f"could not get the pretrained weights of {name!r} ({location}): {err}. "
            + (_how_to_get(name, location) if kind == "hf-hub" else "download them on a machine with internet")
        ) from err


def stimulus_transform(model: nn.Module, image_size: Optional[int] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images (N, 3, H, W), 0..255 -> model input``, from the model's timm data config.

    The whole stimulus is resized to the config's input size (or ``image_size`` x ``image_size``)
    with its interpolation (bilinear or bicubic, antialiased as PIL resizes), then scaled to 0..1
    and normalised with its mean/std. The config's ``crop_pct`` is not applied: a neural
    benchmark's stimulus is what the animal saw, whole (as Brain-Score feeds it).
    """
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"`image_size` must be a positive int or None, got {image_size!r}")
    config = resolve_model_data_config(model)
    height, width = (image_size, image_size) if image_size is not None else tuple(config["input_size"][-2:])
    mode = "bicubic" if config.get("interpolation") == "bicubic" else "bilinear"
    mean = torch.tensor(config["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(config["std"], dtype=torch.float32).view(1, -1, 1, 1)

    def transform(images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32)
        if tuple(x.shape[-2:]) != (height, width):
            x = F.interpolate(x, size=(height, width), mode=mode, align_corners=False, antialias=True)
            if mode == "bicubic":
                x = x.clamp(0.0, 255.0)  # bicubic overshoots; PIL clips to the pixel range too
        return (x / 255.0 - mean) / std

    transform.input_size = (height, width)  # type: ignore[attr-defined]
    transform.config = config  # type: ignore[attr-defined]
    return transform
