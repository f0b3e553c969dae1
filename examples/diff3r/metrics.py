"""Image metrics of the feed-forward 3DGS protocol: PSNR (clipped images), SSIM
(scikit-image, 11-px Gaussian window) and LPIPS when a backbone is at hand.

LPIPS needs pretrained weights, which cannot be downloaded here. :func:`load_lpips`
accepts a path to a saved LPIPS module (``torch.save`` of a full ``nn.Module`` or a
TorchScript file) that maps two ``[B, 3, H, W]`` images in ``[-1, 1]`` to distances;
without one it returns ``None`` and a message saying why, and the caller reports
LPIPS as unavailable (never with random weights).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["MAX_PSNR", "finite_mean", "load_lpips", "lpips_distance", "psnr", "ssim"]

#: PSNR reported for identical images (the MSE is 0) — a cap, not infinity, so means stay finite.
MAX_PSNR = 100.0


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """PSNR in dB of ``pred`` and ``target`` ``[..., 3, H, W]`` after clipping to
    ``[0, 1]``, per image (``[...]``); capped at :data:`MAX_PSNR`."""
    if pred.shape != target.shape:
        raise ValueError(f"pred, target: shapes differ, {list(pred.shape)} vs {list(target.shape)}")
    mse = (pred.clamp(0, 1) - target.clamp(0, 1)).pow(2).flatten(-3).mean(-1)
    return (-10 * torch.log10(mse.clamp_min(10 ** (-MAX_PSNR / 10)))).clamp_max(MAX_PSNR)


def ssim(pred: Tensor, target: Tensor) -> Tensor:
    """SSIM of ``[..., 3, H, W]`` images per image (``[...]``), by scikit-image's
    ``structural_similarity(win_size=11, gaussian_weights=True, data_range=1,
    channel_axis=-1)`` on clipped images; ``win_size`` shrinks to the largest odd
    size ≤ the image side when the image is smaller than 11 px."""
    from skimage.metrics import structural_similarity

    if pred.shape != target.shape:
        raise ValueError(f"pred, target: shapes differ, {list(pred.shape)} vs {list(target.shape)}")
    H, W = pred.shape[-2:]
    win = min(11, H if H % 2 else H - 1, W if W % 2 else W - 1)
    if win < 3:
        raise ValueError(f"pred: images of {H}x{W} px are too small for SSIM (need >= 3 px)")
    a = pred.detach().clamp(0, 1).reshape(-1, 3, H, W).permute(0, 2, 3, 1).cpu().double().numpy()
    b = target.detach().clamp(0, 1).reshape(-1, 3, H, W).permute(0, 2, 3, 1).cpu().double().numpy()
    values = [
        structural_similarity(x, y, win_size=win, gaussian_weights=True, data_range=1.0, channel_axis=-1)
        for x, y in zip(a, b)
    ]
    return torch.tensor(np.array(values), dtype=torch.float32).reshape(pred.shape[:-3])


def load_lpips(path: str | os.PathLike | None) -> tuple[torch.nn.Module | None, str]:
    """Load an LPIPS module from ``path``; returns ``(module or None, message)``."""
    if path is None or str(path) in ("", "None", "null"):
        return None, "LPIPS unavailable: no weights given (set lpips_checkpoint=PATH to a saved LPIPS module)"
    p = Path(path)
    if not p.is_file():
        return None, f"LPIPS unavailable: lpips_checkpoint={str(p)!r} is not a file"
    try:
        try:
            module = torch.jit.load(str(p), map_location="cpu")
        except RuntimeError:
            module = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any loading failure means "unavailable", with its reason
        return None, f"LPIPS unavailable: could not load lpips_checkpoint={str(p)!r}: {exc}"
    if not callable(module):
        return None, f"LPIPS unavailable: lpips_checkpoint={str(p)!r} holds {type(module).__name__}, not a module"
    module.eval()
    for param in getattr(module, "parameters", lambda: [])():
        param.requires_grad_(False)
    return module, f"LPIPS from {p}"


def lpips_distance(module: torch.nn.Module, pred: Tensor, target: Tensor) -> Tensor:
    """LPIPS of ``[..., 3, H, W]`` images in ``[0, 1]`` per image (``[...]``)."""
    H, W = pred.shape[-2:]
    a = pred.clamp(0, 1).reshape(-1, 3, H, W) * 2 - 1
    b = target.clamp(0, 1).reshape(-1, 3, H, W) * 2 - 1
    d = module(a, b)
    return d.reshape(pred.shape[:-3])


def finite_mean(values: list[float]) -> float:
    """Mean of finite values (NaN when none)."""
    v = [x for x in values if math.isfinite(x)]
    return float(sum(v) / len(v)) if v else float("nan")
