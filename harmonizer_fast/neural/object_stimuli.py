r"""Offline object-recognition stimuli and simulated IT-like neurons with a known answer.

Object-recognition recording sets (e.g. Majaj, Hong et al. 2015) show one object per image at a
varied position, size and rotation on an unrelated background, so that identity, not layout,
is what stays constant. :func:`render_object_stimuli` builds such a set from the photographs
``skimage.data`` ships (no download): eight objects (a cat, a coffee cup, a rocket, an astronaut,
the cameraman, a horse silhouette, the scikit-image logo, a colour wheel) are cut out of their
photographs (alpha masks: the horse's silhouette, the logo's ink, the colour wheel's disc, an
ellipse around the others) and composited by one affine warp each onto a crop of one of nine
texture photographs (bricks, grass, gravel, the moon, the Hubble deep field, a stained tissue,
a retina, coins, a printed page), grey ones tinted with two random colours.

:func:`simulate_readout_neurons` makes the neurons: a **noisy linear readout of a deep layer of
a held-out network** (a network that is not among the models being scored). The layer's
output is average-pooled to a 2 x 2 grid, each feature is standardised, and the trial responses
follow the package's planted linear-nonlinear model
(:mod:`harmonizer_fast.neural.simulate`): :math:`s = \mathrm{softplus}(F W + b)` per neuron,
standardised, plus trial noise set to a planted reliability :math:`\rho`.

What the answer is, by construction: a model predicts these neurons as well as its features
span the held-out network's deep features. Trained networks' deep layers share the held-out
network's object-level features, their early layers (edges, colour, texture) and untrained
networks do not; so the per-layer scores of trained models rise into deep layers, and trained
models score above untrained ones by far more than the split-to-split error.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from harmonizer_fast.neural.assemblies import NeuralAssembly
from harmonizer_fast.neural.features import LayerTaps
from harmonizer_fast.neural.simulate import draw_reliabilities, noisy_trials, planted_signal

__all__ = ["OBJECT_NAMES", "ObjectStimuli", "render_object_stimuli", "simulate_readout_neurons",
           "object_features", "ReadoutNeurons"]

#: Side of the RGBA sprite every object is cut into (before warping).
SPRITE_SIZE = 128
#: Side of the texture crops backgrounds are sampled from.
TEXTURE_SIZE = 256


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return image[..., :3].astype(np.float32) / 255.0


def _ellipse(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    r = ((yy + 0.5 - h / 2) / (h / 2)) ** 2 + ((xx + 0.5 - w / 2) / (w / 2)) ** 2
    return np.clip((1.0 - r) * 6.0, 0.0, 1.0)  # soft edge over the outer ~8 % of the radius


def _object_sources() -> List[Tuple[str, np.ndarray, np.ndarray]]:
    """(name, RGB float image, alpha) of every object, cropped to its bounding box."""
    import skimage.data as data  # optional: scikit-image (the `test` extra), needed only for these stimuli

    def boxed(name: str, image: np.ndarray, box: Tuple[int, int, int, int]):
        y0, y1, x0, x1 = box
        crop = _rgb(image)[y0:y1, x0:x1]
        return name, crop, _ellipse(*crop.shape[:2])

    horse = ~data.horse()  # True on the horse
    coat = np.empty(horse.shape + (3,), np.float32)
    coat[:] = (0.45, 0.28, 0.12)
    coat *= 0.8 + 0.4 * np.linspace(0, 1, horse.shape[1], dtype=np.float32)[None, :, None]
    logo = _rgb(data.logo())
    wheel = _rgb(data.colorwheel())
    wy, wx = np.mgrid[0:wheel.shape[0], 0:wheel.shape[1]]
    wheel_alpha = (np.hypot(wy - wheel.shape[0] / 2, wx - wheel.shape[1] / 2) < 0.48 * wheel.shape[0]).astype(np.float32)
    return [
        boxed("cat", data.chelsea(), (10, 300, 60, 400)),
        boxed("cup", data.coffee(), (20, 390, 90, 520)),
        boxed("rocket", data.rocket(), (20, 427, 250, 400)),
        boxed("astronaut", data.astronaut(), (0, 512, 110, 430)),
        boxed("cameraman", data.camera(), (40, 470, 110, 360)),
        ("horse", coat, horse.astype(np.float32)),
        ("logo", logo, (logo.min(-1) < 0.8).astype(np.float32)),
        ("colorwheel", wheel, wheel_alpha),
    ]


#: The objects of :func:`render_object_stimuli`, in label order.
OBJECT_NAMES: Tuple[str, ...] = ("cat", "cup", "rocket", "astronaut", "cameraman", "horse", "logo", "colorwheel")


def _texture_sources() -> List[Tuple[np.ndarray, bool]]:
    """(RGB float image, is_grey) of every background texture."""
    import skimage.data as data  # optional: scikit-image (the `test` extra), needed only for these stimuli

    images = [data.brick(), data.grass(), data.gravel(), data.moon(), data.hubble_deep_field(),
              data.immunohistochemistry(), data.retina(), data.coins(), data.page()]
    return [(_rgb(im), im.ndim == 2) for im in images]


def _square(image: np.ndarray, alpha: Optional[np.ndarray], side: int) -> torch.Tensor:
    """Letterbox an (h, w, 3) image (and alpha) into a (3 or 4, side, side) tensor."""
    h, w = image.shape[:2]
    channels = image if alpha is None else np.concatenate([image, alpha[..., None]], axis=-1)
    tensor = torch.from_numpy(np.ascontiguousarray(channels)).permute(2, 0, 1)[None]
    scale = side / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    tensor = F.interpolate(tensor, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    out = torch.zeros(tensor.shape[0], side, side)
    top, left = (side - nh) // 2, (side - nw) // 2
    out[:, top:top + nh, left:left + nw] = tensor
    return out


#: Number of background textures.
N_TEXTURES = 9


@lru_cache(maxsize=1)
def _source_stacks() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(8, 4, S, S) RGBA sprites, (9, 3, T, T) textures and their is-grey flags, built once per
    process (decoding and resizing the photographs costs more than rendering a few hundred images)."""
    textures = _texture_sources()
    if len(textures) != N_TEXTURES:
        raise AssertionError(f"{len(textures)} textures, N_TEXTURES says {N_TEXTURES}")
    sprites = torch.stack([_square(im, alpha, SPRITE_SIZE) for _, im, alpha in _object_sources()])
    texture_stack = torch.stack([_square(im, None, TEXTURE_SIZE) for im, _ in textures])
    return sprites, texture_stack, torch.tensor([g for _, g in textures])


@dataclass
class ObjectStimuli:
    """Output of :func:`render_object_stimuli`."""

    images: torch.Tensor  # (n, 3, size, size) uint8
    labels: np.ndarray  # (n,) object index into OBJECT_NAMES
    scale: np.ndarray  # (n,) object side / image side
    rotation: np.ndarray  # (n,) radians
    position: np.ndarray  # (n, 2) object centre (x, y) in [-1, 1] image coordinates
    background: np.ndarray  # (n,) texture index

    @property
    def object_names(self) -> np.ndarray:
        return np.asarray(OBJECT_NAMES)[self.labels]


def render_object_stimuli(n_images: int = 800, size: int = 112, scale_range: Tuple[float, float] = (0.45, 0.9),
                          max_rotation_deg: float = 45.0, seed: int = 0, chunk: int = 64) -> ObjectStimuli:
    r"""``n_images`` composites of one object on one background (see the module docstring).

    Objects are balanced (image ``i`` shows object ``i mod 8`` before a seeded shuffle). Per
    image, drawn from ``seed``: the object's side :math:`s` (a fraction of the image side, from
    ``scale_range``), its rotation :math:`\theta` (uniform within :math:`\pm` ``max_rotation_deg``),
    its centre :math:`c` (uniform over positions that keep the centre inside the middle
    :math:`1 - s/2` of the image), the background texture, its zoom (0.3-0.8 of the texture),
    offset and, for grey textures, two tint colours. The object sprite is sampled at
    :math:`q = R(-\theta)(p - c)/s` for every output position :math:`p` (``grid_sample``,
    bilinear) and alpha-composited on the background.
    """
    if not isinstance(n_images, int) or n_images < len(OBJECT_NAMES):
        raise ValueError(f"`n_images` must be an integer >= {len(OBJECT_NAMES)} (one per object), got {n_images!r}")
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"`size` must be an integer >= 16, got {size!r}")
    lo, hi = scale_range
    if not 0 < lo <= hi <= 1.5:
        raise ValueError(f"`scale_range` must satisfy 0 < low <= high <= 1.5, got {scale_range}")
    rng = np.random.default_rng(seed)
    labels = np.arange(n_images) % len(OBJECT_NAMES)
    rng.shuffle(labels)
    scale = rng.uniform(lo, hi, n_images)
    rotation = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, n_images))
    position = rng.uniform(-1, 1, (n_images, 2)) * (1 - scale[:, None] / 2)
    background = rng.integers(0, N_TEXTURES, n_images)
    zoom = rng.uniform(0.3, 0.8, n_images)
    offset = rng.uniform(-1, 1, (n_images, 2)) * (1 - zoom[:, None])
    tints = rng.uniform(0, 1, (n_images, 2, 3)).astype(np.float32)
    flip = rng.random(n_images) < 0.5

    sprites, texture_stack, grey = _source_stacks()

    cos, sin = np.cos(rotation), np.sin(rotation)
    sign = np.where(flip, -1.0, 1.0)
    # q = A p + t with A = R(-theta) / s (mirrored for flipped objects), t = -A c.
    a = np.stack([np.stack([sign * cos, sign * sin], -1), np.stack([-sin, cos], -1)], 1) / scale[:, None, None]
    t = -np.einsum("nij,nj->ni", a, position)
    object_theta = torch.from_numpy(np.concatenate([a, t[:, :, None]], axis=2).astype(np.float32))
    background_theta = torch.zeros(n_images, 2, 3)
    background_theta[:, 0, 0] = background_theta[:, 1, 1] = torch.from_numpy(zoom.astype(np.float32))
    background_theta[:, :, 2] = torch.from_numpy(offset.astype(np.float32))

    out = []
    for first in range(0, n_images, chunk):
        part = slice(first, min(first + chunk, n_images))
        m = part.stop - part.start
        grid = F.affine_grid(object_theta[part], [m, 4, size, size], align_corners=False)
        obj = F.grid_sample(sprites[torch.from_numpy(labels[part])], grid, align_corners=False)
        grid = F.affine_grid(background_theta[part], [m, 3, size, size], align_corners=False)
        index = torch.from_numpy(background[part])
        bg = F.grid_sample(texture_stack[index], grid, align_corners=False)
        tint = torch.from_numpy(tints[part])
        lum = bg[:, :1]
        tinted = lum * tint[:, 0, :, None, None] + (1 - lum) * tint[:, 1, :, None, None]
        bg = torch.where(grey[index][:, None, None, None], tinted, bg)
        alpha = obj[:, 3:].clamp(0, 1)
        out.append((255 * (alpha * obj[:, :3] + (1 - alpha) * bg)).clamp(0, 255).round().to(torch.uint8))
    return ObjectStimuli(torch.cat(out), labels, scale, rotation, position, background)


@torch.no_grad()
def object_features(network: torch.nn.Module, images: torch.Tensor, layer: str,
                    preprocess: Callable[[torch.Tensor], torch.Tensor], grid: int = 2,
                    batch_size: int = 64) -> np.ndarray:
    """(n, C * grid^2) features: ``layer``'s output on ``images``, average-pooled to grid x grid."""
    network = network.eval()
    if layer not in dict(network.named_modules()):
        raise ValueError(f"`layer` {layer!r} is not a module of {type(network).__name__}")
    rows = []
    with LayerTaps(network, [layer]) as taps:
        for first in range(0, images.shape[0], batch_size):
            out = taps(preprocess(images[first:first + batch_size].float()))[layer]
            if out.ndim != 4:
                raise ValueError(f"`layer` {layer!r} must give (N, C, H, W) maps, got shape {tuple(out.shape)}")
            rows.append(F.adaptive_avg_pool2d(out, grid).flatten(1).double().numpy())
    return np.concatenate(rows)


@dataclass
class ReadoutNeurons:
    """Output of :func:`simulate_readout_neurons`."""

    assembly: NeuralAssembly  # (images, neuroids, repetitions)
    signal: np.ndarray  # (images, neuroids) noiseless responses
    reliability: np.ndarray  # (neuroids,) planted reliability of the repetition mean


def simulate_readout_neurons(features: np.ndarray, object_labels: Sequence, n_neuroids: int = 96,
                             n_repetitions: int = 8, reliability: Union[float, Tuple[float, float]] = (0.5, 0.9),
                             seed: int = 0) -> ReadoutNeurons:
    r"""Trial responses of neurons that read ``features`` (images x d) out linearly, plus noise.

    :math:`s = \mathrm{softplus}(Z W + b)` with :math:`Z` the features standardised per column
    (constant columns dropped), :math:`W \sim N(0, 1/d)`, then each neuron standardised; trial
    noise has variance :math:`R(1-\rho)/\rho` for a planted reliability :math:`\rho` of the
    mean over :math:`R` repetitions (as :func:`harmonizer_fast.neural.simulate.simulate_image_level`).
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"`features` must be (images >= 2, d), got shape {features.shape}")
    if not np.all(np.isfinite(features)):
        raise ValueError("`features` holds NaN or infinite values")
    labels = np.asarray(object_labels)
    if labels.shape != (features.shape[0],):
        raise ValueError(f"`object_labels` must be ({features.shape[0]},), got shape {labels.shape}")
    std = features.std(0)
    keep = std > 1e-12
    if not keep.any():
        raise ValueError("every column of `features` is constant: the neurons would have no signal")
    z = (features[:, keep] - features[:, keep].mean(0)) / std[keep]
    rng = np.random.default_rng(seed)
    signal = planted_signal(z, n_neuroids, "softplus", rng)
    rho = draw_reliabilities(reliability, n_neuroids, rng)
    trials = noisy_trials(signal, rho, n_repetitions, rng)
    n = features.shape[0]
    assembly = NeuralAssembly(trials, image_ids=np.array([f"obj{i:05d}" for i in range(n)]),
                              object_labels=labels, neuroid_ids=np.array([f"site{j:03d}" for j in range(n_neuroids)]))
    return ReadoutNeurons(assembly, signal, rho)
