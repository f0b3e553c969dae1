"""Camera conventions of the Diff3R data (torch side).

Conventions, shared by the generator, the chunk files and the loader:

- **Axes.** OpenCV camera axes: x right, y down, z forward.
- **Extrinsics.** ``w2c`` maps world points to camera points, ``c2w`` is its
  inverse; both are ``[..., 4, 4]`` with last row ``0 0 0 1``. Samples handed to
  models carry camera-to-world matrices (pixelSplat / MVSplat convention).
- **Intrinsics.** Normalized intrinsics are ``[[fx/W, 0, cx/W], [0, fy/H, cy/H],
  [0, 0, 1]]``; pixel intrinsics are the same with rows 0 and 1 scaled by W and
  H. Continuous image coordinates have their origin at the top-left *corner*
  of the top-left pixel, so pixel ``(row i, column j)`` has its center at
  ``(j + 0.5, i + 0.5)`` and a point projecting to ``(u, v)`` falls in pixel
  ``(floor(v), floor(u))``.
- **Depth.** ``depths`` are z-depths (the camera-space z of the surface point
  seen through the pixel center), not distances along the ray.
- **RE10K camera row.** ``[fx, fy, cx, cy, 0, 0, w2c[0, :4], w2c[1, :4], w2c[2, :4]]``
  with normalized intrinsics (18 numbers).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "cameras_to_matrices",
    "covisibility",
    "intrinsics_matrix",
    "invert_rigid",
    "matrices_to_cameras",
    "normalized_to_pixel_intrinsics",
    "pixel_rays",
    "pixel_to_normalized_intrinsics",
    "project_points",
    "unproject_depth",
    "zdepth_to_distance",
]


def intrinsics_matrix(fx: Tensor, fy: Tensor, cx: Tensor, cy: Tensor) -> Tensor:
    """Build ``[..., 3, 3]`` intrinsics from focal lengths and principal point ``[...]``."""
    zeros = torch.zeros_like(fx)
    ones = torch.ones_like(fx)
    rows = [
        torch.stack([fx, zeros, cx], dim=-1),
        torch.stack([zeros, fy, cy], dim=-1),
        torch.stack([zeros, zeros, ones], dim=-1),
    ]
    return torch.stack(rows, dim=-2)


def _check_square(name: str, m: Tensor, n: int) -> None:
    if m.dim() < 2 or m.shape[-2:] != (n, n):
        raise ValueError(f"{name}: expected shape [..., {n}, {n}], got {list(m.shape)}")


def normalized_to_pixel_intrinsics(intrinsics: Tensor, height: int, width: int) -> Tensor:
    """Scale normalized intrinsics ``[..., 3, 3]`` to pixel units for an ``height x width`` image."""
    _check_square("intrinsics", intrinsics, 3)
    scale = intrinsics.new_tensor([float(width), float(height), 1.0]).unsqueeze(-1)
    return intrinsics * scale


def pixel_to_normalized_intrinsics(intrinsics: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`normalized_to_pixel_intrinsics`."""
    _check_square("intrinsics", intrinsics, 3)
    scale = intrinsics.new_tensor([1.0 / width, 1.0 / height, 1.0]).unsqueeze(-1)
    return intrinsics * scale


def invert_rigid(transform: Tensor) -> Tensor:
    """Invert rigid transforms ``[..., 4, 4]`` (``[R t; 0 1]`` -> ``[R^T -R^T t; 0 1]``)."""
    _check_square("transform", transform, 4)
    rot = transform[..., :3, :3]
    trans = transform[..., :3, 3:]
    rot_t = rot.transpose(-1, -2)
    out = torch.zeros_like(transform)
    out[..., :3, :3] = rot_t
    out[..., :3, 3:] = -rot_t @ trans
    out[..., 3, 3] = 1
    return out


def cameras_to_matrices(cameras: Tensor) -> tuple[Tensor, Tensor]:
    """Split RE10K camera rows ``[..., 18]`` into normalized intrinsics ``[..., 3, 3]``
    and world-to-camera matrices ``[..., 4, 4]`` (same dtype as ``cameras``)."""
    if cameras.shape[-1] != 18:
        raise ValueError(f"cameras: expected last dimension 18, got shape {list(cameras.shape)}")
    fx, fy, cx, cy = cameras[..., 0], cameras[..., 1], cameras[..., 2], cameras[..., 3]
    intrinsics = intrinsics_matrix(fx, fy, cx, cy)
    w2c = torch.zeros(*cameras.shape[:-1], 4, 4, dtype=cameras.dtype, device=cameras.device)
    w2c[..., :3, :] = cameras[..., 6:].reshape(*cameras.shape[:-1], 3, 4)
    w2c[..., 3, 3] = 1
    return intrinsics, w2c


def matrices_to_cameras(intrinsics: Tensor, w2c: Tensor) -> Tensor:
    """Pack normalized intrinsics ``[..., 3, 3]`` and world-to-camera ``[..., 4, 4]``
    (or ``[..., 3, 4]``) into RE10K camera rows ``[..., 18]`` (dtype of ``intrinsics``)."""
    _check_square("intrinsics", intrinsics, 3)
    if w2c.shape[-2:] not in ((4, 4), (3, 4)):
        raise ValueError(f"w2c: expected shape [..., 4, 4] or [..., 3, 4], got {list(w2c.shape)}")
    batch = intrinsics.shape[:-2]
    head = torch.stack(
        [
            intrinsics[..., 0, 0],
            intrinsics[..., 1, 1],
            intrinsics[..., 0, 2],
            intrinsics[..., 1, 2],
            torch.zeros_like(intrinsics[..., 0, 0]),
            torch.zeros_like(intrinsics[..., 0, 0]),
        ],
        dim=-1,
    )
    tail = w2c[..., :3, :].reshape(*batch, 12).to(intrinsics.dtype)
    return torch.cat([head, tail], dim=-1)


def project_points(points: Tensor, w2c: Tensor, intrinsics_px: Tensor) -> tuple[Tensor, Tensor]:
    """Project world points ``[..., N, 3]`` with ``w2c [..., 4, 4]`` and pixel
    intrinsics ``[..., 3, 3]``. Returns continuous pixel coordinates ``(u, v)``
    ``[..., N, 2]`` (see the module docstring) and camera z-depth ``[..., N]``."""
    cam = points @ w2c[..., :3, :3].transpose(-1, -2) + w2c[..., None, :3, 3]
    z = cam[..., 2]
    hom = cam @ intrinsics_px.transpose(-1, -2)
    uv = hom[..., :2] / hom[..., 2:3]
    return uv, z


def pixel_rays(intrinsics_px: Tensor, c2w: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Rays through the pixel centers. ``intrinsics_px [..., 3, 3]``, ``c2w [..., 4, 4]``.

    Returns origins ``[..., H, W, 3]`` and directions ``[..., H, W, 3]`` scaled so
    that their camera-space z is 1 (so ``origin + z_depth * direction`` is the
    surface point)."""
    dtype, device = c2w.dtype, c2w.device
    v, u = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device) + 0.5,
        torch.arange(width, dtype=dtype, device=device) + 0.5,
        indexing="ij",
    )
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1)  # [H, W, 3]
    k_inv = torch.linalg.inv(intrinsics_px.to(dtype))
    cam_dirs = pix @ k_inv[..., None, :, :].transpose(-1, -2)  # [..., H, W, 3]
    dirs = cam_dirs @ c2w[..., None, :3, :3].transpose(-1, -2)
    origins = c2w[..., None, None, :3, 3].expand_as(dirs)
    return origins, dirs


def unproject_depth(depth: Tensor, intrinsics_px: Tensor, c2w: Tensor) -> Tensor:
    """World points ``[..., H, W, 3]`` of z-depth maps ``[..., H, W]`` at the pixel centers."""
    height, width = depth.shape[-2:]
    origins, dirs = pixel_rays(intrinsics_px, c2w.to(depth.dtype), height, width)
    return origins + depth[..., None] * dirs


def zdepth_to_distance(depth: Tensor, intrinsics_px: Tensor) -> Tensor:
    """Convert z-depth ``[..., H, W]`` to distance along the pixel-center ray."""
    height, width = depth.shape[-2:]
    eye = torch.eye(4, dtype=depth.dtype, device=depth.device)
    _, dirs = pixel_rays(intrinsics_px.to(depth.dtype), eye, height, width)
    return depth * dirs.norm(dim=-1)


def covisibility(
    depth_a: Tensor,
    intrinsics_a_px: Tensor,
    c2w_a: Tensor,
    depth_b: Tensor,
    intrinsics_b_px: Tensor,
    c2w_b: Tensor,
    rel_tol: float = 0.02,
) -> Tensor:
    """Boolean map ``[H, W]``: which pixels of view A are seen by view B.

    A pixel of A is covisible when its surface point projects inside B's image
    with positive depth and is not occluded there (its z in B is at most the
    depth B stores at the nearest pixel, times ``1 + rel_tol``)."""
    points = unproject_depth(depth_a, intrinsics_a_px, c2w_a)  # [H, W, 3]
    height_b, width_b = depth_b.shape[-2:]
    w2c_b = invert_rigid(c2w_b.to(points.dtype))
    uv, z = project_points(points.reshape(-1, 3), w2c_b, intrinsics_b_px.to(points.dtype))
    col = torch.floor(uv[:, 0]).long()
    row = torch.floor(uv[:, 1]).long()
    inside = (z > 0) & (col >= 0) & (col < width_b) & (row >= 0) & (row < height_b)
    depth_at = depth_b[row.clamp(0, height_b - 1), col.clamp(0, width_b - 1)].to(z.dtype)
    visible = inside & (z <= depth_at * (1 + rel_tol))
    return visible.reshape(depth_a.shape[-2:])
