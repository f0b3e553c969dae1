"""PNG figures with PIL only (matplotlib is optional and not needed): image grids
with labels, scalar maps with a colormap, and simple line plots."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

__all__ = ["colorize", "image_grid", "line_plot", "to_uint8"]

# A perceptually ordered colormap (dark blue → teal → yellow), 5 anchors interpolated.
_ANCHORS = np.array([[0.27, 0.00, 0.33], [0.23, 0.32, 0.55], [0.13, 0.57, 0.55], [0.37, 0.79, 0.38],
                     [0.99, 0.91, 0.14]])


def to_uint8(image: Tensor) -> np.ndarray:
    """``[3, H, W]`` (or ``[H, W]``) in ``[0, 1]`` → ``uint8 [H, W, 3]`` (clipped)."""
    x = image.detach().float().cpu().clamp(0, 1)
    if x.dim() == 2:
        x = x[None].expand(3, -1, -1)
    return (x.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def colorize(values: Tensor, lo: float | None = None, hi: float | None = None, log: bool = False) -> Tensor:
    """Scalar map ``[H, W]`` → ``[3, H, W]`` colors in ``[0, 1]`` (``lo``/``hi``: range, default min/max)."""
    v = values.detach().float().cpu()
    if log:
        v = v.clamp_min(1e-12).log10()
        lo = None if lo is None else float(np.log10(max(lo, 1e-12)))
        hi = None if hi is None else float(np.log10(max(hi, 1e-12)))
    lo = float(v.min()) if lo is None else lo
    hi = float(v.max()) if hi is None else hi
    t = ((v - lo) / max(hi - lo, 1e-12)).clamp(0, 1).numpy() * (len(_ANCHORS) - 1)
    i = np.clip(np.floor(t).astype(int), 0, len(_ANCHORS) - 2)
    f = (t - i)[..., None]
    rgb = _ANCHORS[i] * (1 - f) + _ANCHORS[i + 1] * f
    return torch.from_numpy(rgb).permute(2, 0, 1).float()


def image_grid(rows: Sequence[Sequence[Tensor]], path: str | os.PathLike, *, col_labels: Sequence[str] = (),
               row_labels: Sequence[str] = (), scale: int = 4, pad: int = 4) -> Path:
    """Write a grid of ``[3, H, W]`` images (upscaled ``scale``×, nearest) with labels as PNG."""
    if not rows or not rows[0]:
        raise ValueError("rows: expected a non-empty list of non-empty rows of images")
    h, w = rows[0][0].shape[-2:]
    ch, cw = h * scale, w * scale
    label_h = 14 if col_labels else 0
    label_w = 8 * max((len(s) for s in row_labels), default=0) + (pad if row_labels else 0)
    ncol = max(len(r) for r in rows)
    width = label_w + ncol * (cw + pad) + pad
    height = label_h + len(rows) * (ch + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(col_labels):
        draw.text((label_w + pad + j * (cw + pad), 1), str(label), fill=(0, 0, 0))
    for i, row in enumerate(rows):
        y = label_h + pad + i * (ch + pad)
        if i < len(row_labels):
            draw.text((2, y + ch // 2 - 5), str(row_labels[i]), fill=(0, 0, 0))
        for j, img in enumerate(row):
            tile = Image.fromarray(to_uint8(img)).resize((cw, ch), Image.NEAREST)
            canvas.paste(tile, (label_w + pad + j * (cw + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike, *,
              title: str = "", xlabel: str = "", ylabel: str = "", size: tuple[int, int] = (480, 320)) -> Path:
    """Write a line plot of ``{label: (xs, ys)}`` as PNG (axes with min/max ticks, legend)."""
    width, height = size
    left, right, top, bottom = 56, 130, 24, 36
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    xs_all = [float(x) for xs, _ in series.values() for x in xs]
    ys_all = [float(y) for _, ys in series.values() for y in ys if np.isfinite(y)]
    if not xs_all or not ys_all:
        raise ValueError("series: expected at least one finite point")
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = min(ys_all), max(ys_all)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    margin = 0.05 * (y1 - y0)
    y0, y1 = y0 - margin, y1 + margin

    def px(x: float, y: float) -> tuple[float, float]:
        u = left + (x - x0) / max(x1 - x0, 1e-12) * (width - left - right)
        v = height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
        return u, v

    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for y in (y0 + margin, y1 - margin):
        _, v = px(x0, y)
        draw.text((4, v - 5), f"{y:.2f}", fill=(0, 0, 0))
    for x in sorted(set(xs_all)):
        u, _ = px(x, y0)
        draw.line([u, height - bottom, u, height - bottom + 3], fill=(0, 0, 0))
        draw.text((u - 6, height - bottom + 4), f"{x:g}", fill=(0, 0, 0))
    draw.text((left, 4), title, fill=(0, 0, 0))
    draw.text((width // 2 - 30, height - 14), xlabel, fill=(0, 0, 0))
    draw.text((4, top - 14), ylabel, fill=(0, 0, 0))
    for k, (label, (xs, ys)) in enumerate(series.items()):
        color = _COLORS[k % len(_COLORS)]
        pts = [px(float(x), float(y)) for x, y in zip(xs, ys) if np.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for u, v in pts:
            draw.ellipse([u - 2, v - 2, u + 2, v + 2], fill=color)
        ly = top + 4 + 14 * k
        draw.line([width - right + 6, ly + 5, width - right + 20, ly + 5], fill=color, width=2)
        draw.text((width - right + 24, ly), label, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
