"""Tiny configurations for tests and smoke runs: a 16-px dataset of a few scenes, a
narrow encoder and a short TTO, so that one training step takes well under a second."""

from __future__ import annotations

from pathlib import Path

import torch

from .data import generate_dataset

__all__ = ["TINY_MODEL", "TINY_POSE_FREE", "TINY_POSE_FREE_TTO", "TINY_SIZE", "random_pose_free_inputs",
           "tiny_dataset", "tiny_overrides", "tiny_pose_free_batch", "tiny_pose_free_overrides"]

TINY_SIZE = 16
TINY_MODEL = {"feature_channels": 8, "hidden_channels": 8, "depth_candidates": 8}
# The pose-free model's narrow widths and a short TTO of its groups (tto.* of a built layer).
TINY_POSE_FREE = {"feature_channels": 8, "hidden_channels": 8}
TINY_POSE_FREE_TTO = {"inner": "adam", "steps": 4, "pcg_rtol": 1e-3, "pcg_max_iter": 8,
                      "lr": {"means": 3e-3, "log_scales": 5e-2, "quats": 1e-2, "opacities": 5e-2,
                             "colors": 2.5e-2}}


def tiny_dataset(root: str | Path) -> Path:
    """Generate (once) 3 train and 2 test scenes of 6 views at 16×16 px under ``root``."""
    return generate_dataset(root, 3, 2, views_per_scene=6, image_size=TINY_SIZE, seed=0)


def tiny_overrides(root: str | Path, out_dir: str | Path, mode: str = "diff3r") -> list[str]:
    """Hydra overrides for a tiny training run of ``mode`` on :func:`tiny_dataset` data."""
    return [
        f"mode={mode}",
        f"data.root={root}",
        f"data.image_size={TINY_SIZE}",
        "data.gap=[2,4]",
        "data.num_target_views=1",
        *[f"model.{k}={v}" for k, v in TINY_MODEL.items()],
        "tto.steps=3",
        "tto.pcg_max_iter=5",
        "batch_size=1",
        "steps=1",
        "log_every=1",
        "checkpoint_every=1",
        "threads=1",
        "progress=false",
        f"out_dir={out_dir}",
    ]


def tiny_pose_free_overrides(root: str | Path, out_dir: str | Path, mode: str = "diff3r") -> list[str]:
    """:func:`tiny_overrides` for ``model=pose_free`` with :data:`TINY_POSE_FREE`."""
    base = [o for o in tiny_overrides(root, out_dir, mode) if not o.startswith("model.")]
    return base + ["model=pose_free", *[f"model.{k}={v}" for k, v in TINY_POSE_FREE.items()]]


def tiny_pose_free_batch(root: str | Path, load_depth: bool = False) -> dict:
    """The first training example of :func:`tiny_dataset` data as a batch of one, in the
    first context view's frame (what the pose-free model sees); with ``load_depth``, with
    its context depths."""
    from torch.utils.data import default_collate

    from . import pose_free
    from .data import RE10KDataset

    ds = RE10KDataset(root, "train", TINY_SIZE, num_target_views=1, near=1.0, far=15.0,
                      load_depth=load_depth)
    return pose_free.first_view_frame(default_collate([ds[0]]))


def random_pose_free_inputs(B: int, V: int, H: int = 12, W: int = 12, seed: int = 0):
    """``(images [B, V, 3, H, W] uniform in [0, 1), normalized intrinsics [B, V, 3, 3]
    (focal 1, principal point at the centre), near 1, far 10)``: the pose-free model's
    inputs for shape and gradient tests that need no scene."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(B, V, 3, H, W, generator=g)
    K = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]]).expand(B, V, 3, 3)
    return images, K, torch.full((B, V), 1.0), torch.full((B, V), 10.0)
