"""JPEG decoding of ClickMe records as TensorFlow's ``decode_jpeg`` does by default (simplejpeg, PIL fallback)."""
from __future__ import annotations

import io
import os
import warnings
from typing import Optional, Union

import numpy as np
from PIL import Image

try:  # a listed dependency, but a platform without its wheel still decodes, with PIL (jpeg_backend warns)
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the installation
    simplejpeg = None

PathLike = Union[str, "os.PathLike[str]"]

_JPEG_COLORSPACES = {"RGB": ("YCbCr", "RGB"), "L": ("Gray",)}


def _decode_simplejpeg(data: bytes, mode: str, what: str) -> np.ndarray:
    """TensorFlow's ``decode_jpeg`` defaults: integer-fast IDCT, fancy (smooth) chroma upsampling."""
    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
    except ValueError as exc:
        raise ValueError(f"`{what}` is not a readable JPEG ({exc})") from exc
    if colorspace not in _JPEG_COLORSPACES[mode]:
        raise ValueError(f"`{what}` must be a {mode} JPEG, got colour space {colorspace}")
    return simplejpeg.decode_jpeg(data, colorspace="GRAY" if mode == "L" else "RGB", fastdct=True,
                                  fastupsample=False)


def _decode_pil(data: bytes, mode: str, what: str) -> np.ndarray:
    """PIL's defaults (accurate IDCT): up to a few grey levels off TensorFlow's decoding."""

    with Image.open(io.BytesIO(data)) as image:
        if image.format != "JPEG":
            raise ValueError(f"`{what}` is not a JPEG (PIL sees {image.format})")
        if image.mode != mode:
            raise ValueError(f"`{what}` must be a {mode} JPEG, got mode {image.mode}")
        array = np.array(image)  # writable copy (torch.from_numpy needs one)
    return array[:, :, None] if array.ndim == 2 else array


#: JPEG decoders, best first: ``simplejpeg`` (libjpeg-turbo with TensorFlow's default
#: flags, so decoded pixels match ``tf.io.decode_jpeg``) and PIL (fallback).
JPEG_DECODERS = {"simplejpeg": _decode_simplejpeg, "pil": _decode_pil}


def jpeg_backend() -> str:
    """Name of the JPEG decoder in use: ``"simplejpeg"`` when installed, else ``"pil"`` (warns once)."""
    global _JPEG_BACKEND
    if _JPEG_BACKEND is None:
        if simplejpeg is not None:
            _JPEG_BACKEND = "simplejpeg"
        else:
            _JPEG_BACKEND = "pil"
            warnings.warn(
                "simplejpeg is not installed: ClickMe JPEGs are decoded by PIL (accurate IDCT), which "
                "differs from TensorFlow's default fast IDCT by a few grey levels; `pip install simplejpeg` "
                "to reproduce the reference pixels",
                RuntimeWarning,
                stacklevel=2,
            )
    return _JPEG_BACKEND


_JPEG_BACKEND: Optional[str] = None


def _decode_jpeg(data: bytes, mode: str, what: str) -> np.ndarray:
    """Decode to (H, W, C) uint8 with C = 3 for ``mode="RGB"``, 1 for ``"L"``."""
    return JPEG_DECODERS[jpeg_backend()](data, mode, what)
