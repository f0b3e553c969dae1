"""Reading and writing RealEstate10K-style chunks (the pixelSplat / MVSplat format).

A chunk file is ``torch.save`` of a list of scene dicts::

    key         str
    url         str
    timestamps  int64 [V]
    cameras     float32 [V, 18]   fx fy cx cy (normalized by W / H), 0, 0,
                                   world-to-camera 3x4 row-major, OpenCV axes
    images      list of V uint8 tensors holding encoded PNG or JPEG bytes

The generator adds optional keys that real RE10K chunks lack and the loader
never requires: ``depths`` (float16 [V, H, W], z-depth) and ``sources`` (the
names of the texture sources used). Each split folder has an ``index.json``
mapping scene key -> chunk file name.

Every malformed input raises :class:`ChunkFormatError` naming the file, and the
scene key and field where it applies.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .cameras import cameras_to_matrices, invert_rigid, normalized_to_pixel_intrinsics

__all__ = [
    "ChunkFormatError",
    "SceneViews",
    "decode_image",
    "decode_scene",
    "encode_image",
    "load_chunk",
    "load_scene",
    "read_index",
    "validate_scene",
    "write_chunk",
    "write_index",
]

REQUIRED_FIELDS = ("key", "url", "timestamps", "cameras", "images")


class ChunkFormatError(ValueError):
    """A chunk file, index file or scene entry does not follow the RE10K format."""


def encode_image(image: np.ndarray | Tensor, fmt: str = "PNG") -> Tensor:
    """Encode ``image`` (uint8 ``[H, W, 3]``, or float in [0, 1] ``[H, W, 3]``) as a
    uint8 tensor of PNG (default) or JPEG bytes."""
    arr = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image: expected shape [H, W, 3], got {list(arr.shape)}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    if fmt.upper() == "PNG":
        Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    elif fmt.upper() in ("JPEG", "JPG"):
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    else:
        raise ValueError(f"fmt: expected 'PNG' or 'JPEG', got {fmt!r}")
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def decode_image(data: Tensor | bytes) -> np.ndarray:
    """Decode encoded image bytes to uint8 ``[H, W, 3]`` (RGB)."""
    raw = data.numpy().tobytes() if isinstance(data, Tensor) else bytes(data)
    with Image.open(io.BytesIO(raw)) as img:
        return np.asarray(img.convert("RGB"))


def _where(path: str | os.PathLike | None, key: str | None = None) -> str:
    out = str(path) if path is not None else "<in-memory chunk>"
    if key is not None:
        out += f": scene {key!r}"
    return out


def validate_scene(scene: object, path: str | os.PathLike | None = None, index: int = 0) -> None:
    """Check one scene dict of a chunk (types, shapes, counts, finite cameras,
    rotations). Raises :class:`ChunkFormatError` naming ``path``, key and field."""
    if not isinstance(scene, dict):
        raise ChunkFormatError(f"{_where(path)}: entry {index} is a {type(scene).__name__}, expected a dict")
    missing = [f for f in REQUIRED_FIELDS if f not in scene]
    key = scene.get("key") if isinstance(scene.get("key"), str) else f"<entry {index}>"
    if missing:
        raise ChunkFormatError(f"{_where(path, key)}: missing field(s) {missing}")
    where = _where(path, key)
    if not isinstance(scene["key"], str):
        raise ChunkFormatError(f"{where}: field 'key' is {type(scene['key']).__name__}, expected str")
    cams = scene["cameras"]
    if not isinstance(cams, Tensor) or cams.dim() != 2 or cams.shape[1] != 18:
        shape = list(cams.shape) if isinstance(cams, Tensor) else type(cams).__name__
        raise ChunkFormatError(f"{where}: field 'cameras' is {shape}, expected a tensor [V, 18]")
    if not cams.dtype.is_floating_point:
        raise ChunkFormatError(f"{where}: field 'cameras' has dtype {cams.dtype}, expected float")
    num_views = cams.shape[0]
    if num_views == 0:
        raise ChunkFormatError(f"{where}: field 'cameras' has no views")
    if not torch.isfinite(cams).all():
        raise ChunkFormatError(f"{where}: field 'cameras' holds non-finite values")
    if (cams[:, :2] <= 0).any():
        raise ChunkFormatError(
            f"{where}: field 'cameras' columns 0-1 (fx, fy) must be > 0, got min {cams[:, :2].min().item():.4g}"
        )
    rot = cams[:, 6:].reshape(-1, 3, 4)[:, :, :3].double()
    err = (rot @ rot.transpose(-1, -2) - torch.eye(3, dtype=torch.float64)).abs().amax(dim=(1, 2))
    det = torch.linalg.det(rot)
    bad = (err > 1e-2) | ((det - 1).abs() > 1e-2)
    if bad.any():
        view = int(torch.nonzero(bad)[0])
        raise ChunkFormatError(
            f"{where}: field 'cameras' row {view} does not hold a rotation in columns 6-8, "
            f"10-12, 14-16 (|RR^T - I| = {err[view].item():.3g}, det = {det[view].item():.3g}); "
            "expected fx fy cx cy 0 0 followed by a 3x4 world-to-camera matrix"
        )
    ts = scene["timestamps"]
    if not isinstance(ts, Tensor) or ts.shape != (num_views,):
        shape = list(ts.shape) if isinstance(ts, Tensor) else type(ts).__name__
        raise ChunkFormatError(f"{where}: field 'timestamps' is {shape}, expected a tensor [{num_views}] "
                               f"(one per row of 'cameras', which has {num_views} rows)")
    images = scene["images"]
    if not isinstance(images, (list, tuple)) or len(images) != num_views:
        got = len(images) if isinstance(images, (list, tuple)) else type(images).__name__
        raise ChunkFormatError(
            f"{where}: field 'images' has {got} entries, expected a list of {num_views} (one per camera row)"
        )
    for i, img in enumerate(images):
        if not isinstance(img, Tensor) or img.dtype != torch.uint8 or img.dim() != 1:
            desc = f"{img.dtype} {list(img.shape)}" if isinstance(img, Tensor) else type(img)
            raise ChunkFormatError(
                f"{where}: field 'images'[{i}] is {desc}, expected a 1-D uint8 tensor of encoded image bytes"
            )
    depths = scene.get("depths")
    if depths is not None and (not isinstance(depths, Tensor) or depths.dim() != 3 or depths.shape[0] != num_views):
        shape = list(depths.shape) if isinstance(depths, Tensor) else type(depths).__name__
        raise ChunkFormatError(f"{where}: field 'depths' is {shape}, expected [{num_views}, H, W]")


def load_chunk(path: str | os.PathLike, validate: bool = True) -> list[dict]:
    """Load the scene list of chunk file ``path`` (``torch.load`` with
    ``weights_only=True``), validating every scene (see :func:`validate_scene`)."""
    path = Path(path)
    if not path.is_file():
        raise ChunkFormatError(f"{path}: chunk file does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated / corrupt archives raise many exception types
        raise ChunkFormatError(
            f"{path}: cannot read chunk with torch.load ({type(exc).__name__}: {exc}); "
            "expected a torch.save'd list of scene dicts"
        ) from exc
    if not isinstance(data, list):
        raise ChunkFormatError(f"{path}: holds a {type(data).__name__}, expected a list of scenes")
    if validate:
        for i, scene in enumerate(data):
            validate_scene(scene, path, i)
    return data


def write_chunk(path: str | os.PathLike, scenes: list[dict]) -> None:
    """Validate ``scenes`` and ``torch.save`` them to ``path`` (atomically: written to
    a temporary file in the same folder, then renamed)."""
    path = Path(path)
    for i, scene in enumerate(scenes):
        validate_scene(scene, path, i)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(list(scenes), tmp)
    os.replace(tmp, path)


def read_index(path: str | os.PathLike) -> dict[str, str]:
    """Read an ``index.json`` (scene key -> chunk file name)."""
    path = Path(path)
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ChunkFormatError(f"{path}: index file does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ChunkFormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(index, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in index.items()):
        raise ChunkFormatError(f"{path}: expected a JSON object {{scene key: chunk file name}}")
    return index


def write_index(path: str | os.PathLike, index: dict[str, str]) -> None:
    """Write ``index.json`` (scene key -> chunk file name), keys sorted."""
    Path(path).write_text(json.dumps(dict(sorted(index.items())), indent=1) + "\n")


@dataclass
class SceneViews:
    """One decoded scene.

    ``images`` float32 ``[V, 3, H, W]`` in [0, 1]; ``intrinsics`` normalized
    ``[V, 3, 3]``; ``intrinsics_px`` in pixels ``[V, 3, 3]``; ``w2c`` and ``c2w``
    ``[V, 4, 4]`` (float32, OpenCV axes); ``timestamps`` int64 ``[V]``;
    ``depths`` float32 z-depth ``[V, H, W]`` or None."""

    key: str
    url: str
    timestamps: Tensor
    images: Tensor
    intrinsics: Tensor
    intrinsics_px: Tensor
    w2c: Tensor
    c2w: Tensor
    depths: Tensor | None = None

    @property
    def num_views(self) -> int:
        return self.images.shape[0]


def decode_scene(
    scene: dict,
    path: str | os.PathLike | None = None,
    views: list[int] | None = None,
    load_depth: bool = True,
) -> SceneViews:
    """Decode the images and cameras of ``scene`` (a validated chunk entry), for
    the view indices ``views`` (all by default). Undecodable or inconsistently
    sized images raise :class:`ChunkFormatError` naming ``path``, key and view."""
    key = scene["key"]
    where = _where(path, key)
    num_views = scene["cameras"].shape[0]
    views = list(range(num_views)) if views is None else [int(v) for v in views]
    for v in views:
        if not 0 <= v < num_views:
            raise IndexError(f"{where}: view index {v} out of range [0, {num_views})")
    arrays = []
    for v in views:
        try:
            arr = decode_image(scene["images"][v])
        except Exception as exc:
            raise ChunkFormatError(
                f"{where}: field 'images'[{v}] cannot be decoded ({type(exc).__name__}: {exc})"
            ) from exc
        if arrays and arr.shape != arrays[0].shape:
            raise ChunkFormatError(
                f"{where}: field 'images'[{v}] is {arr.shape[1]}x{arr.shape[0]}, but view "
                f"{views[0]} is {arrays[0].shape[1]}x{arrays[0].shape[0]}"
            )
        arrays.append(arr)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
    height, width = images.shape[-2:]
    cams = scene["cameras"][views].to(torch.float32)
    intrinsics, w2c = cameras_to_matrices(cams)
    depths = None
    if load_depth and scene.get("depths") is not None:
        depths = scene["depths"][views].to(torch.float32)
        if depths.shape[-2:] != (height, width):
            raise ChunkFormatError(
                f"{where}: field 'depths' is {list(depths.shape[-2:])} per view, images are {[height, width]}"
            )
    return SceneViews(
        key=key,
        url=str(scene["url"]),
        timestamps=scene["timestamps"][views].to(torch.int64),
        images=images,
        intrinsics=intrinsics,
        intrinsics_px=normalized_to_pixel_intrinsics(intrinsics, height, width),
        w2c=w2c,
        c2w=invert_rigid(w2c.double()).float(),
        depths=depths,
    )


def load_scene(
    split_root: str | os.PathLike, key: str, views: list[int] | None = None, load_depth: bool = True
) -> SceneViews:
    """Load scene ``key`` of a split folder (``index.json`` + chunk files) and decode it."""
    split_root = Path(split_root)
    index = read_index(split_root / "index.json")
    if key not in index:
        raise KeyError(f"{split_root / 'index.json'}: no scene {key!r}")
    path = split_root / index[key]
    for scene in load_chunk(path):
        if scene["key"] == key:
            return decode_scene(scene, path, views, load_depth)
    raise ChunkFormatError(f"{path}: index.json lists scene {key!r} but the chunk lacks it")
