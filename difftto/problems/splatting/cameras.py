"""Cameras in gsplat's conventions: world-to-camera ``viewmats [B, C, 4, 4]`` (OpenCV
axes: x right, y down, z forward) and pixel-unit intrinsics ``Ks [B, C, 3, 3]``
(``fx, fy`` on the diagonal, principal point ``cx, cy`` in the last column; the
centre of pixel ``(i, j)`` is at ``(j + 0.5, i + 0.5)``)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_cameras", "camera_centers", "look_at", "intrinsics"]


def check_cameras(viewmats: Tensor, Ks: Tensor, batch: int | None = None) -> tuple[int, int]:
    """Validates camera tensors and returns ``(B, C)``.

    Raises ``ValueError`` naming the argument, the shape received and the one expected
    (``viewmats [B, C, 4, 4]``, ``Ks [B, C, 3, 3]``, ``B`` equal to ``batch`` when given),
    and ``TypeError`` for non-tensors or non-float dtypes.
    """
    for name, t, tail in (("viewmats", viewmats, (4, 4)), ("Ks", Ks, (3, 3))):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor [B, C, {tail[0]}, {tail[1]}], "
                            f"got {type(t).__name__}")
        if t.dim() != 4 or tuple(t.shape[2:]) != tail:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected [B, C, {tail[0]}, {tail[1]}]"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if viewmats.shape[:2] != Ks.shape[:2]:
        raise ValueError(
            f"viewmats {tuple(viewmats.shape)} and Ks {tuple(Ks.shape)} disagree on [B, C]"
        )
    B, C = viewmats.shape[:2]
    if batch is not None and B != batch:
        raise ValueError(
            f"viewmats has batch size B = {B} (shape {tuple(viewmats.shape)}), but the Gaussians "
            f"have B = {batch}; expected viewmats [{batch}, C, 4, 4]"
        )
    if C < 1:
        raise ValueError(f"viewmats has shape {tuple(viewmats.shape)}: at least one camera needed")
    return B, C


def camera_centers(viewmats: Tensor) -> Tensor:
    """Camera centres in world coordinates ``[..., 3]`` (``-Rᵀ t``; exact for rigid
    ``viewmats = [R | t]``, differentiable)."""
    R = viewmats[..., :3, :3]
    t = viewmats[..., :3, 3:]
    return -(R.transpose(-1, -2) @ t).squeeze(-1)


def look_at(eye: Tensor, target: Tensor, up: Tensor | None = None) -> Tensor:
    """World-to-camera matrices ``[..., 4, 4]`` for cameras at ``eye [..., 3]`` looking at
    ``target [..., 3]`` (OpenCV axes; ``up`` defaults to world ``-y``)."""
    eye, target = torch.broadcast_tensors(eye, target)
    if up is None:
        up = torch.tensor([0.0, -1.0, 0.0], dtype=eye.dtype, device=eye.device)
    up = up.expand_as(eye)
    z = torch.nn.functional.normalize(target - eye, dim=-1)
    x = torch.nn.functional.normalize(torch.linalg.cross(-up, z, dim=-1), dim=-1)
    y = torch.linalg.cross(z, x, dim=-1)
    R = torch.stack([x, y, z], dim=-2)  # rows: camera axes in world coordinates
    t = -(R @ eye.unsqueeze(-1)).squeeze(-1)
    top = torch.cat([R, t.unsqueeze(-1)], dim=-1)
    bottom = torch.zeros(*top.shape[:-2], 1, 4, dtype=eye.dtype, device=eye.device)
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def intrinsics(
    fx: float, fy: float, cx: float, cy: float, *, dtype=None, device=None
) -> Tensor:
    """A ``[3, 3]`` pixel-unit intrinsics matrix."""
    return torch.tensor(
        [[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=dtype, device=device
    )
