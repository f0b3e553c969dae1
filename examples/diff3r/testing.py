"""Tiny configurations for tests and smoke runs: a 16-px dataset of a few scenes, a
narrow encoder and a short TTO, so that one training step takes well under a second."""

from __future__ import annotations

from pathlib import Path

from .data import generate_dataset

__all__ = ["TINY_MODEL", "TINY_SIZE", "tiny_dataset", "tiny_overrides"]

TINY_SIZE = 16
TINY_MODEL = {"feature_channels": 8, "hidden_channels": 8, "depth_candidates": 8}


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
