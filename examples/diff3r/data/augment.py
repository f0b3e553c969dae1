"""Training-time photometric augmentation of the context views.

``exposure_jitter`` scales the brightness of one context view per scene (chosen at
random, with probability ``prob``) by a factor drawn log-uniformly from
``[low, high]``, clipped to ``[0, 1]``. Only the context views (the network's input
and the TTO layer's data) are changed; the target views stay clean, so a model
trained through the layer is rewarded for Λ that keep the test-time optimization
from copying a photometric outlier into the Gaussians. It is a design choice of
this example (off by default, ``augment.exposure_prob``), not part of the paper.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["augment_context", "exposure_jitter"]


def exposure_jitter(images: Tensor, prob: float, low: float, high: float,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Scale one random context view of each scene of ``images [B, V, 3, H, W]``.

    Returns the new images (a copy) and the factors ``[B, V]`` applied (1 where untouched)."""
    if images.dim() != 5:
        raise ValueError(f"images: expected [B, V, 3, H, W], got {list(images.shape)}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob: expected a probability in [0, 1], got {prob}")
    if not 0.0 < low <= high:
        raise ValueError(f"low, high: expected 0 < low <= high, got {low}, {high}")
    B, V = images.shape[:2]
    hit = torch.rand(B, generator=generator) < prob
    view = torch.randint(V, (B,), generator=generator)
    u = torch.rand(B, generator=generator)
    factor = torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    factors = torch.ones(B, V)
    factors[torch.arange(B)[hit], view[hit]] = factor[hit]
    f = factors.to(images)[:, :, None, None, None]
    return (images * f).clamp(0, 1), factors


def augment_context(images: Tensor, cfg: Mapping[str, Any] | None, seed: int, step: int) -> Tensor | None:
    """The context images of training ``step`` after the augmentation ``cfg``
    (``exposure_prob``, ``exposure_range``), seeded by ``(seed, step)`` so a resumed
    run sees the same ones; ``None`` when the augmentation is off."""
    if not cfg:
        return None
    prob = float(cfg.get("exposure_prob", 0.0) or 0.0)
    if prob <= 0:
        return None
    rng = cfg.get("exposure_range", (2.0 / 3.0, 1.5))
    try:
        low, high = (float(x) for x in rng)
    except (TypeError, ValueError):
        raise ValueError(f"augment.exposure_range: expected [low, high], got {rng!r}") from None
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step) + 7)
    out, _ = exposure_jitter(images, prob, low, high, gen)
    return out
