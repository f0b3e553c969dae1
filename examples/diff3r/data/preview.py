"""Write a PNG grid of generated views and their depth (PIL only).

Each row is one scene: ``--views`` frames of its trajectory, each followed by its
inverse depth (brighter is nearer, normalized per scene). Without ``--root`` a few
scenes are generated in memory; with ``--root`` the chunks there are read
(generated or real RE10K; depth columns are left out when the chunks lack it)::

    python -m examples.diff3r.data.preview --out preview.png --scenes 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .chunks import decode_scene, load_chunk, read_index
from .generate import build_scene
from .scene import render_view

__all__ = ["preview_grid"]


def _inverse_depth_rgb(depth: np.ndarray, lo: float, hi: float) -> np.ndarray:
    inv = 1.0 / np.maximum(depth, 1e-6)
    x = np.clip((inv - 1.0 / hi) / max(1.0 / lo - 1.0 / hi, 1e-9), 0.0, 1.0)
    # a simple dark-blue -> yellow ramp
    return np.stack([x, 0.2 + 0.7 * x, 0.5 * (1 - x) + 0.1], axis=-1)


def preview_grid(scenes: list[tuple[list[np.ndarray], list[np.ndarray] | None]], zoom: int = 3) -> Image.Image:
    """Grid image from ``[(images [H, W, 3] in [0, 1], depths [H, W] or None), ...]``."""
    rows = []
    for images, depths in scenes:
        tiles = []
        if depths is not None:
            lo = min(float(d.min()) for d in depths)
            hi = max(float(d.max()) for d in depths)
        for i, img in enumerate(images):
            tiles.append(img)
            if depths is not None:
                tiles.append(_inverse_depth_rgb(depths[i], lo, hi))
            tiles.append(np.ones((img.shape[0], 2, 3)))
        rows.append(np.concatenate(tiles, axis=1))
        rows.append(np.ones((2, rows[-1].shape[1], 3)))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=1.0) for r in rows]
    grid = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).round().astype(np.uint8)
    img = Image.fromarray(grid)
    return img.resize((img.width * zoom, img.height * zoom), Image.Resampling.NEAREST)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="PNG grid of generated views and depth")
    parser.add_argument("--out", default="diff3r_data_preview.png")
    parser.add_argument("--root", default=None, help="read chunks here instead of generating")
    parser.add_argument("--split", default="train")
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--views", type=int, default=4, help="frames shown per scene")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zoom", type=int, default=3)
    args = parser.parse_args(argv)
    entries = []
    if args.root is None:
        frames = 16
        shown = np.linspace(0, frames - 1, args.views).round().astype(int)
        for i in range(args.scenes):
            scene = build_scene(args.seed, args.split, i, frames, args.image_size)
            out = [render_view(scene, scene.cameras[v]) for v in shown]
            entries.append(([o[0] for o in out], [o[1] for o in out]))
    else:
        split_root = Path(args.root) / args.split
        index = read_index(split_root / "index.json")
        for key in sorted(index)[: args.scenes]:
            path = split_root / index[key]
            scene = next(s for s in load_chunk(path) if s["key"] == key)
            count = scene["cameras"].shape[0]
            shown = np.linspace(0, count - 1, min(args.views, count)).round().astype(int)
            views = decode_scene(scene, path, shown.tolist())
            images = [im.permute(1, 2, 0).numpy() for im in views.images]
            depths = None if views.depths is None else [d.numpy() for d in views.depths]
            entries.append((images, depths))
    torch.set_num_threads(1)
    preview_grid(entries, args.zoom).save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
