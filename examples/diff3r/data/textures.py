"""Textures for the procedural scenes: crops of photographs that scikit-image
ships with its wheel (no download needed) and procedural patterns.

The photographs are split between the train and test splits, so held-out scenes
never show a photograph that training scenes show (procedural patterns are
shared). ``skimage.data.cat`` is the same image as ``chelsea`` and the two
``stereo_motorcycle`` frames are near duplicates, so each appears once here.
Grayscale photographs are colorized with two random colors.

Textures are float32 arrays ``[T, T, 3]`` in ``[0, 1]``.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

__all__ = [
    "PHOTOS",
    "PROCEDURAL",
    "TEST_PHOTOS",
    "TRAIN_PHOTOS",
    "load_photo",
    "photo_texture",
    "procedural_texture",
    "sample_texture",
    "split_photos",
]

# name -> (skimage.data function, is color). Only images bundled in the wheel.
PHOTOS: dict[str, tuple[str, bool]] = {
    "astronaut": ("astronaut", True),
    "coffee": ("coffee", True),
    "rocket": ("rocket", True),
    "hubble_deep_field": ("hubble_deep_field", True),
    "camera": ("camera", False),
    "brick": ("brick", False),
    "grass": ("grass", False),
    "coins": ("coins", False),
    "moon": ("moon", False),
    "chelsea": ("chelsea", True),
    "immunohistochemistry": ("immunohistochemistry", True),
    "retina": ("retina", True),
    "stereo_motorcycle": ("stereo_motorcycle", True),
    "gravel": ("gravel", False),
    "clock": ("clock", False),
    "text": ("text", False),
}

TRAIN_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "camera",
    "brick",
    "grass",
    "coins",
    "moon",
)
TEST_PHOTOS: tuple[str, ...] = (
    "chelsea",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
    "gravel",
    "clock",
    "text",
)

PROCEDURAL: tuple[str, ...] = ("checker", "stripes", "noise", "tiles", "dots")

# Central region (fraction of each side) that crops are taken from; retina has a
# black border around the fundus.
_CROP_REGION = {"retina": 0.55}


def split_photos(split: str) -> tuple[str, ...]:
    """Photographs that scenes of ``split`` ("train" or "test") may use."""
    if split == "train":
        return TRAIN_PHOTOS
    if split == "test":
        return TEST_PHOTOS
    raise ValueError(f"split: expected 'train' or 'test', got {split!r}")


@functools.cache
def load_photo(name: str) -> np.ndarray:
    """Photograph ``name`` as uint8 ``[H, W, 3]`` (grayscale ones as ``[H, W, 1]``),
    downscaled so that its longer side is at most 512 pixels."""
    if name not in PHOTOS:
        raise ValueError(f"photo: unknown name {name!r}; expected one of {sorted(PHOTOS)}")
    import skimage.data

    func, _ = PHOTOS[name]
    img = getattr(skimage.data, func)()
    if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
        img = img[0]
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"photo {name!r}: expected uint8 data, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[..., :3]
    pil = Image.fromarray(img)
    longer = max(pil.size)
    if longer > 512:
        scale = 512 / longer
        pil = pil.resize((round(pil.size[0] * scale), round(pil.size[1] * scale)), Image.Resampling.LANCZOS)
    out = np.asarray(pil)
    if out.ndim == 2:
        out = out[..., None]
    out.setflags(write=False)
    return out


def _random_color(rng: np.random.Generator, lo: float = 0.05, hi: float = 0.95) -> np.ndarray:
    return rng.uniform(lo, hi, size=3)


def photo_texture(name: str, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """A random square crop of photograph ``name`` resized to ``[size, size, 3]`` float32."""
    img = load_photo(name)
    h, w = img.shape[:2]
    region = _CROP_REGION.get(name, 1.0)
    rh, rw = int(h * region), int(w * region)
    oy, ox = (h - rh) // 2, (w - rw) // 2
    side = int(rng.uniform(0.3, 0.8) * min(rh, rw))
    side = max(side, 16)
    y0 = oy + int(rng.integers(0, rh - side + 1))
    x0 = ox + int(rng.integers(0, rw - side + 1))
    crop = img[y0 : y0 + side, x0 : x0 + side]
    pil = Image.fromarray(crop[..., 0] if crop.shape[2] == 1 else crop)
    pil = pil.resize((size, size), Image.Resampling.LANCZOS)
    arr = np.asarray(pil, dtype=np.float32) / 255.0
    if arr.ndim == 2:  # colorize grayscale photographs between two random colors
        dark = _random_color(rng, 0.0, 0.45)
        light = _random_color(rng, 0.55, 1.0)
        arr = dark + arr[..., None] * (light - dark)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr, dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a random ``cells x cells`` grid upsampled bicubically."""
    grid = rng.random((cells, cells)).astype(np.float32)
    pil = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    out = np.asarray(pil, dtype=np.float32)
    out = (out - out.min()) / max(float(out.max() - out.min()), 1e-6)
    return out


def procedural_texture(kind: str, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """A procedural pattern ``kind`` (one of :data:`PROCEDURAL`) as ``[size, size, 3]`` float32."""
    c0, c1 = _random_color(rng), _random_color(rng)
    while np.abs(c0 - c1).sum() < 0.6:  # keep enough contrast for matching
        c1 = _random_color(rng)
    yy, xx = np.meshgrid((np.arange(size) + 0.5) / size, (np.arange(size) + 0.5) / size, indexing="ij")
    if kind == "checker":
        n = int(rng.integers(2, 7))
        mask = ((np.floor(xx * n) + np.floor(yy * n)) % 2).astype(np.float32)
    elif kind == "stripes":
        angle = rng.uniform(0, np.pi)
        freq = rng.uniform(2, 8)
        phase = xx * np.cos(angle) + yy * np.sin(angle)
        mask = 0.5 + 0.5 * np.sin(2 * np.pi * freq * phase)
    elif kind == "noise":
        mask = 0.6 * _smooth_noise(rng, size, int(rng.integers(4, 9)))
        mask = mask + 0.4 * _smooth_noise(rng, size, int(rng.integers(12, 24)))
    elif kind == "tiles":
        n = int(rng.integers(2, 6))
        line = rng.uniform(0.04, 0.12)
        fx, fy = (xx * n) % 1.0, (yy * n * 2) % 1.0
        mask = ((fx < line) | (fy < line * 2)).astype(np.float32)
    elif kind == "dots":
        n = int(rng.integers(3, 8))
        radius = rng.uniform(0.15, 0.4)
        fx, fy = (xx * n) % 1.0 - 0.5, (yy * n) % 1.0 - 0.5
        mask = (np.hypot(fx, fy) < radius).astype(np.float32)
    else:
        raise ValueError(f"kind: expected one of {PROCEDURAL}, got {kind!r}")
    # A little low-frequency variation so that no pattern is exactly periodic.
    mask = np.clip(mask + 0.25 * (_smooth_noise(rng, size, 5) - 0.5), 0.0, 1.0)
    tex = c0 + mask[..., None] * (c1 - c0)
    return np.ascontiguousarray(tex, dtype=np.float32)


def _mirror(x: np.ndarray) -> np.ndarray:
    """Mirrored repeat of texture coordinates onto [0, 1]."""
    f = np.mod(x, 2.0)
    return np.where(f > 1.0, 2.0 - f, f)


def sample_texture(texture: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear lookup of ``texture [T, T, 3]`` at texture coordinates ``u, v [N]``
    (mirrored repeat outside [0, 1]; ``v`` runs down the rows). Returns ``[N, 3]``."""
    th, tw = texture.shape[:2]
    x = _mirror(u) * (tw - 1)
    y = _mirror(v) * (th - 1)
    x0 = np.clip(np.floor(x).astype(np.int64), 0, tw - 2)
    y0 = np.clip(np.floor(y).astype(np.int64), 0, th - 2)
    ax = (x - x0)[:, None]
    ay = (y - y0)[:, None]
    top = texture[y0, x0] * (1 - ax) + texture[y0, x0 + 1] * ax
    bottom = texture[y0 + 1, x0] * (1 - ax) + texture[y0 + 1, x0 + 1] * ax
    return top * (1 - ay) + bottom * ay
