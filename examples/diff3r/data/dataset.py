"""A map-style dataset of context/target views over RE10K-style chunks.

Works on the generator's output and on real RealEstate10K chunks alike
(``root/<split>/index.json`` + ``*.torch``). A sample is a dict::

    key                  str
    context_images       float32 [Vc, 3, H, W] in [0, 1]
    context_extrinsics   float32 [Vc, 4, 4] camera-to-world (OpenCV axes)
    context_intrinsics   float32 [Vc, 3, 3] normalized (row 0 / W, row 1 / H)
    context_near         float32 [Vc]
    context_far          float32 [Vc]
    context_index        int64   [Vc] frame indices in the scene
    context_depths       float32 [Vc, H, W] z-depth (only with load_depth=True
                                 and chunks that store depth)
    target_*             the same for the Vt target views
    scale                float32 [] factor the translations were multiplied by
                                 (make_baseline_1), 1 otherwise

Images are resized (antialiased bilinear) so that they cover ``image_size`` and
then center-cropped, with the intrinsics adjusted exactly (MVSplat's shim).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .chunks import ChunkFormatError, decode_scene, load_chunk, read_index
from .sampler import BoundedViewSampler, read_evaluation_index, validate_evaluation_entry

__all__ = ["RE10KDataset", "rescale_and_crop"]

RE10K_NEAR, RE10K_FAR = 1.0, 100.0


def rescale_and_crop(
    images: Tensor,
    intrinsics: Tensor,
    size: tuple[int, int],
    depths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Resize ``images [V, 3, H, W]`` so they cover ``size = (h, w)``, then center-crop.

    ``intrinsics [V, 3, 3]`` are normalized and adjusted exactly: with the resized
    size ``(Hs, Ws)`` and crop offsets ``(top, left)``, ``fx' = fx Ws / w`` and
    ``cx' = (cx Ws - left) / w`` (likewise for y). ``depths [V, H, W]`` follow with
    nearest-neighbor resampling (approximate at depth edges when resized).
    Returns the new images, intrinsics and depths."""
    h_out, w_out = int(size[0]), int(size[1])
    height, width = images.shape[-2:]
    scale = max(h_out / height, w_out / width)
    h_s = max(h_out, round(height * scale))
    w_s = max(w_out, round(width * scale))
    if (h_s, w_s) != (height, width):
        images = F.interpolate(images, size=(h_s, w_s), mode="bilinear", align_corners=False, antialias=True).clamp_(
            0, 1
        )
        if depths is not None:
            depths = F.interpolate(depths[:, None], size=(h_s, w_s), mode="nearest-exact")[:, 0]
    top = (h_s - h_out) // 2
    left = (w_s - w_out) // 2
    images = images[..., top : top + h_out, left : left + w_out].contiguous()
    if depths is not None:
        depths = depths[..., top : top + h_out, left : left + w_out].contiguous()
    intrinsics = intrinsics.clone()
    intrinsics[..., 0, 0] = intrinsics[..., 0, 0] * w_s / w_out
    intrinsics[..., 1, 1] = intrinsics[..., 1, 1] * h_s / h_out
    intrinsics[..., 0, 2] = (intrinsics[..., 0, 2] * w_s - left) / w_out
    intrinsics[..., 1, 2] = (intrinsics[..., 1, 2] * h_s - top) / h_out
    return images, intrinsics, depths


class RE10KDataset(Dataset):
    """Context/target samples from ``root/<split>`` (``index.json`` + chunk files).

    Args:
        root: dataset root (a generated one, or real RE10K chunks laid out as
            ``root/train``, ``root/test``).
        split: sub-folder name.
        image_size: output ``H = W`` (int) or ``(H, W)``.
        sampler: view sampler for training-style sampling (default:
            :class:`BoundedViewSampler` with ``num_context_views`` /
            ``num_target_views``). Ignored with ``evaluation_index``.
        evaluation_index: path to (or dict of) a fixed ``{key: {"context",
            "target"}}`` index; the dataset then holds exactly the indexed scenes
            that the split has (``missing_keys`` lists the others).
        near, far: depth bounds per view; ``None`` reads ``root/meta.json``
            (written by the generator) or falls back to RE10K's 1 / 100.
        make_baseline_1: scale translations (and near/far/depths) so that the
            outer context cameras are 1 apart; scenes with a baseline below
            ``baseline_epsilon`` raise.
        load_depth: add ``*_depths`` when the chunks store depth.
        seed: with ``set_epoch``/``set_step``, makes the view choice of item ``i``
            a function of ``(seed, epoch, i)``.
        chunk_cache: number of loaded chunk files kept in memory.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        image_size: int | tuple[int, int] = 64,
        *,
        num_context_views: int = 2,
        num_target_views: int = 3,
        sampler: BoundedViewSampler | None = None,
        evaluation_index: str | os.PathLike | dict | None = None,
        near: float | None = None,
        far: float | None = None,
        make_baseline_1: bool = False,
        baseline_epsilon: float = 1e-3,
        load_depth: bool = False,
        seed: int = 0,
        chunk_cache: int = 4,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.split_root = self.root / split
        if not self.split_root.is_dir():
            raise FileNotFoundError(f"root/split: {self.split_root} is not a folder")
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size: expected an int or (H, W) > 0, got {image_size!r}")
        self.image_size = (int(size[0]), int(size[1]))
        self.index = read_index(self.split_root / "index.json")
        self.sampler = sampler or BoundedViewSampler(num_context_views, num_target_views)
        self.evaluation_index = None
        self.evaluation_path = None
        self.missing_keys: list[str] = []
        if evaluation_index is not None:
            if isinstance(evaluation_index, dict):
                ev = {k: v for k, v in evaluation_index.items() if v is not None}
            else:
                self.evaluation_path = Path(evaluation_index)
                ev = read_evaluation_index(evaluation_index)
            self.evaluation_index = ev
            self.keys = sorted(k for k in ev if k in self.index)
            self.missing_keys = sorted(k for k in ev if k not in self.index)
            if not self.keys:
                raise ChunkFormatError(
                    f"{evaluation_index if self.evaluation_path else 'evaluation_index'}: none of "
                    f"its {len(ev)} scenes is in {self.split_root / 'index.json'}"
                )
        else:
            self.keys = sorted(self.index)
        meta = {}
        meta_path = self.root / "meta.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
        self.near = float(near if near is not None else meta.get("near", RE10K_NEAR))
        self.far = float(far if far is not None else meta.get("far", RE10K_FAR))
        self.make_baseline_1 = make_baseline_1
        self.baseline_epsilon = baseline_epsilon
        self.load_depth = load_depth
        self.seed = int(seed)
        self.epoch = 0
        self.step = 0
        self._cache: OrderedDict[str, dict[str, dict]] = OrderedDict()
        self._cache_size = max(1, int(chunk_cache))

    def __len__(self) -> int:
        return len(self.keys)

    def set_epoch(self, epoch: int) -> None:
        """Change the random view choice (training sampler) for a new epoch."""
        self.epoch = int(epoch)

    def set_step(self, step: int) -> None:
        """Training step for the sampler's gap warm-up (per worker process)."""
        self.step = int(step)

    def _scene(self, key: str) -> tuple[dict, Path]:
        name = self.index[key]
        path = self.split_root / name
        if name not in self._cache:
            scenes = load_chunk(path)
            self._cache[name] = {s["key"]: s for s in scenes}
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(name)
        scenes = self._cache[name]
        if key not in scenes:
            raise ChunkFormatError(f"{path}: index.json lists scene {key!r} but the chunk lacks it")
        return scenes[key], path

    def views(self, i: int) -> tuple[list[int], list[int]]:
        """Context and target view indices of item ``i`` (current epoch)."""
        key = self.keys[i]
        scene, path = self._scene(key)
        num_views = scene["cameras"].shape[0]
        if self.evaluation_index is not None:
            return validate_evaluation_entry(self.evaluation_index[key], num_views, key, self.evaluation_path)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        try:
            return self.sampler.sample(num_views, rng, self.step)
        except ValueError as exc:
            raise ValueError(f"{path}: scene {key!r}: {exc}") from exc

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self.keys):
            raise IndexError(f"index {i} out of range for {len(self.keys)} scenes")
        key = self.keys[i]
        context, target = self.views(i)
        scene, path = self._scene(key)
        decoded = decode_scene(scene, path, context + target, load_depth=self.load_depth)
        images, intrinsics, depths = rescale_and_crop(
            decoded.images, decoded.intrinsics, self.image_size, decoded.depths
        )
        c2w = decoded.c2w.clone()
        scale = 1.0
        if self.make_baseline_1:
            a = c2w[0, :3, 3]
            b = c2w[len(context) - 1, :3, 3]
            baseline = float((a - b).norm())
            if baseline < self.baseline_epsilon:
                raise ValueError(
                    f"{path}: scene {key!r}: context baseline {baseline:.3g} < baseline_epsilon {self.baseline_epsilon}"
                )
            scale = 1.0 / baseline
            c2w[:, :3, 3] *= scale
            if depths is not None:
                depths = depths * scale
        n_c = len(context)
        sample: dict = {"key": key, "scale": torch.tensor(scale, dtype=torch.float32)}
        for prefix, sl, idx in (("context", slice(0, n_c), context), ("target", slice(n_c, None), target)):
            count = len(idx)
            sample[f"{prefix}_images"] = images[sl]
            sample[f"{prefix}_extrinsics"] = c2w[sl]
            sample[f"{prefix}_intrinsics"] = intrinsics[sl]
            sample[f"{prefix}_near"] = torch.full((count,), self.near * scale)
            sample[f"{prefix}_far"] = torch.full((count,), self.far * scale)
            sample[f"{prefix}_index"] = torch.tensor(idx, dtype=torch.int64)
            if depths is not None:
                sample[f"{prefix}_depths"] = depths[sl]
        return sample
