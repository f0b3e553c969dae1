"""Choosing context and target views.

- :class:`BoundedViewSampler` (training): two context views ``gap`` frames apart,
  ``gap`` drawn from ``[min_gap, max_gap]`` (optionally widened from an initial
  range over warm-up steps), targets drawn between them, as in MVSplat's
  bounded sampler.
- Evaluation index: JSON ``{key: {"context": [i, j], "target": [a, b, c]}}``;
  :func:`choose_evaluation_views` picks the views of one scene so that the two
  context views overlap (measured with exact depth) and the targets lie between.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .cameras import covisibility
from .chunks import ChunkFormatError

__all__ = [
    "BoundedViewSampler",
    "choose_evaluation_views",
    "pair_overlap",
    "read_evaluation_index",
    "validate_evaluation_entry",
    "write_evaluation_index",
]


@dataclass
class BoundedViewSampler:
    """Context views ``gap`` frames apart, targets between them.

    ``gap`` is uniform in ``[min_gap, max_gap]`` (clipped to ``num_views - 1``, and
    raised to what ``num_context_views`` distinct views and the target margin need);
    during the first ``warmup_steps`` steps the range is interpolated linearly from
    ``[initial_min_gap, initial_max_gap]``. Targets are drawn (with replacement)
    from ``[left + min_distance_to_context, right - min_distance_to_context]``.
    With more than two context views the extra ones are drawn (distinct) between
    the outer two. Returned indices are sorted."""

    num_context_views: int = 2
    num_target_views: int = 3
    min_gap: int = 3
    max_gap: int = 10
    min_distance_to_context: int = 0
    warmup_steps: int = 0
    initial_min_gap: int | None = None
    initial_max_gap: int | None = None

    def __post_init__(self) -> None:
        if self.num_context_views < 1 or self.num_target_views < 1:
            raise ValueError(
                f"num_context_views / num_target_views: expected >= 1, got "
                f"{self.num_context_views} / {self.num_target_views}"
            )
        if not 1 <= self.min_gap <= self.max_gap:
            raise ValueError(f"min_gap, max_gap: expected 1 <= min_gap <= max_gap, got {self.min_gap}, {self.max_gap}")

    def gap_range(self, step: int = 0) -> tuple[int, int]:
        """The ``[min_gap, max_gap]`` in force at training ``step``."""
        if self.warmup_steps <= 0 or step >= self.warmup_steps:
            return self.min_gap, self.max_gap
        f = step / self.warmup_steps
        lo0 = self.min_gap if self.initial_min_gap is None else self.initial_min_gap
        hi0 = self.max_gap if self.initial_max_gap is None else self.initial_max_gap
        lo = round(lo0 + f * (self.min_gap - lo0))
        hi = round(hi0 + f * (self.max_gap - hi0))
        return lo, max(lo, hi)

    def sample(self, num_views: int, rng: np.random.Generator, step: int = 0) -> tuple[list[int], list[int]]:
        """Context and target indices for a scene of ``num_views`` frames."""
        need = max(2 * self.min_distance_to_context, self.num_context_views - 1, 1)
        if num_views <= need:
            raise ValueError(f"num_views: a scene needs more than {need} views for this sampler, got {num_views}")
        lo, hi = self.gap_range(step)
        hi = min(max(hi, need), num_views - 1)
        lo = min(max(lo, need), hi)
        gap = int(rng.integers(lo, hi + 1))
        left = int(rng.integers(0, num_views - gap))
        right = left + gap
        context = [left, right] if self.num_context_views >= 2 else [left]
        if self.num_context_views > 2:
            extra = rng.choice(np.arange(left + 1, right), self.num_context_views - 2, replace=False)
            context = sorted(context + [int(x) for x in extra])
        t_lo = left + self.min_distance_to_context
        t_hi = right - self.min_distance_to_context
        target = sorted(int(x) for x in rng.integers(t_lo, t_hi + 1, size=self.num_target_views))
        return context, target


def pair_overlap(depths: Tensor, intrinsics_px: Tensor, c2w: Tensor, i: int, j: int) -> float:
    """Overlap of views ``i`` and ``j``: the smaller of the fractions of each view's
    pixels that the other view sees (exact depth ``[V, H, W]``, pixel intrinsics
    ``[V, 3, 3]``, camera-to-world ``[V, 4, 4]``)."""
    d = depths.double()
    k = intrinsics_px.double()
    t = c2w.double()
    a = covisibility(d[i], k[i], t[i], d[j], k[j], t[j]).double().mean()
    b = covisibility(d[j], k[j], t[j], d[i], k[i], t[i]).double().mean()
    return float(torch.minimum(a, b))


def choose_evaluation_views(
    depths: Tensor,
    intrinsics_px: Tensor,
    c2w: Tensor,
    rng: np.random.Generator,
    num_target_views: int = 3,
    min_gap: int | None = None,
    max_gap: int | None = None,
    min_overlap: float = 0.5,
    max_overlap: float = 0.9,
) -> tuple[dict[str, list[int]], float]:
    """Pick ``{"context": [i, j], "target": [...]}`` for one scene and return it
    with the context overlap (see :func:`pair_overlap`).

    Candidates are the gaps in ``[min_gap, max_gap]`` (default: ``num_target_views
    + 1`` to ``V - 1``), each at a random start; one with overlap in
    ``[min_overlap, max_overlap]`` is drawn at random, otherwise the candidate
    closest to that interval is taken. Targets are spread evenly strictly between
    the context views."""
    num_views = depths.shape[0]
    lo = num_target_views + 1 if min_gap is None else min_gap
    hi = num_views - 1 if max_gap is None else min(max_gap, num_views - 1)
    if lo > hi:
        raise ValueError(
            f"gap range [{lo}, {hi}] is empty for a scene of {num_views} views and {num_target_views} targets"
        )
    candidates = []
    for gap in range(lo, hi + 1):
        left = int(rng.integers(0, num_views - gap))
        overlap = pair_overlap(depths, intrinsics_px, c2w, left, left + gap)
        miss = max(min_overlap - overlap, overlap - max_overlap, 0.0)
        candidates.append((miss, gap, left, overlap))
    good = [c for c in candidates if c[0] == 0.0]
    if good:
        _, gap, left, overlap = good[int(rng.integers(len(good)))]
    else:
        _, gap, left, overlap = min(candidates)
    right = left + gap
    inner = np.linspace(left, right, num_target_views + 2)[1:-1]
    target = [int(round(x)) for x in inner]
    return {"context": [left, right], "target": target}, overlap


def validate_evaluation_entry(
    entry: object, num_views: int, key: str = "?", path: str | os.PathLike | None = None
) -> tuple[list[int], list[int]]:
    """Check one evaluation-index entry against a scene of ``num_views`` views and
    return ``(context, target)``. Raises :class:`ChunkFormatError` naming the file and key."""
    where = f"{path if path is not None else '<evaluation index>'}: scene {key!r}"
    if not isinstance(entry, dict) or "context" not in entry or "target" not in entry:
        raise ChunkFormatError(f"{where}: expected {{'context': [...], 'target': [...]}}, got {entry!r}")
    out = []
    for name in ("context", "target"):
        views = entry[name]
        if not isinstance(views, list) or not views or not all(isinstance(v, int) for v in views):
            raise ChunkFormatError(f"{where}: field {name!r} is {views!r}, expected a list of ints")
        bad = [v for v in views if not 0 <= v < num_views]
        if bad:
            raise ChunkFormatError(f"{where}: field {name!r} has indices {bad} outside [0, {num_views})")
        out.append(list(views))
    return out[0], out[1]


def read_evaluation_index(path: str | os.PathLike) -> dict[str, dict[str, list[int]]]:
    """Read an evaluation index JSON ``{key: {"context": [...], "target": [...]}}``
    (pixelSplat / MVSplat assets store ``null`` for skipped scenes; those are dropped)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ChunkFormatError(f"{path}: evaluation index does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ChunkFormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ChunkFormatError(f"{path}: expected a JSON object keyed by scene")
    return {k: v for k, v in data.items() if v is not None}


def write_evaluation_index(path: str | os.PathLike, index: dict[str, dict[str, list[int]]]) -> None:
    """Write an evaluation index JSON, keys sorted."""
    Path(path).write_text(json.dumps(dict(sorted(index.items())), indent=1) + "\n")
