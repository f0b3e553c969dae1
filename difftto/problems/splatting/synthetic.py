"""Seeded synthetic scenes for tests and benchmarks.

:func:`pixel_aligned_scene` mimics what a feed-forward 3DGS model predicts: one
Gaussian per pixel of each of ``V`` source views, placed on the ray through the pixel
centre at the depth of a smooth surface, with a scale of about one pixel footprint.
That is the workload of Diff3R's test-time optimization (e.g. 2 views × 64² pixels =
8192 Gaussians rendered at 64×64).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .cameras import camera_centers, intrinsics, look_at

__all__ = ["DEGENERATE_CASES", "degenerate_scene", "orbit_cameras", "pixel_aligned_scene", "random_scene"]


def orbit_cameras(
    num: int,
    width: int,
    height: int,
    *,
    radius: float = 4.0,
    spread: float = 0.35,
    focal: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """``num`` cameras on an arc of ``±spread`` rad around the origin, looking at it.

    Returns ``(viewmats [num, 4, 4], Ks [num, 3, 3])``; focal defaults to ``width``
    (a ~53° horizontal field of view).
    """
    f = float(width) if focal is None else focal
    ang = torch.linspace(-spread, spread, num, dtype=dtype) if num > 1 else torch.zeros(1, dtype=dtype)
    eye = torch.stack([radius * torch.sin(ang), 0.15 * radius * torch.cos(3 * ang),
                       -radius * torch.cos(ang)], dim=-1)
    viewmats = look_at(eye, torch.zeros_like(eye))
    Ks = intrinsics(f, f, width / 2.0, height / 2.0, dtype=dtype).expand(num, 3, 3).clone()
    return viewmats, Ks


def pixel_aligned_scene(
    batch: int,
    source_views: int,
    width: int,
    height: int,
    *,
    render_views: int | None = None,
    scale_px: float = 0.8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """A batch of scenes with ``source_views · width · height`` pixel-aligned Gaussians.

    Returns ``(theta, viewmats [B, C, 4, 4], Ks [B, C, 3, 3])`` where ``theta`` holds the
    raw groups (``means, log_scales, quats, opacities, colors``) and the cameras are
    ``render_views`` (default: ``source_views``) cameras on the same arc.
    """
    gen = torch.Generator().manual_seed(seed)
    C = source_views if render_views is None else render_views
    src_v, src_k = orbit_cameras(source_views, width, height, dtype=dtype)
    out_v, out_k = orbit_cameras(C, width, height, dtype=dtype)
    thetas = []
    for _ in range(batch):
        ys, xs = torch.meshgrid(
            torch.arange(height, dtype=dtype) + 0.5, torch.arange(width, dtype=dtype) + 0.5,
            indexing="ij",
        )
        jitter = lambda: (torch.rand(source_views, height, width, generator=gen,  # noqa: E731
                                     dtype=dtype) - 0.5)
        f = src_k[:, 0, 0].view(-1, 1, 1)
        rays = torch.stack(
            [(xs + jitter() - width / 2) / f, (ys + jitter() - height / 2) / f,
             torch.ones(source_views, height, width, dtype=dtype)], dim=-1
        )  # camera space, z = 1
        # A smooth, bumpy surface: depth varies by about ±15 %.
        phase = torch.rand(2, generator=gen, dtype=dtype) * 6.28
        depth = 4.0 * (1.0 + 0.1 * torch.sin(3 * rays[..., 0] + phase[0])
                       * torch.cos(2 * rays[..., 1] + phase[1]))  # z-depth (rays have z = 1)
        pts_c = rays * depth.unsqueeze(-1)
        R = src_v[:, :3, :3]
        centers = camera_centers(src_v)
        pts_w = torch.einsum("vji,vhwj->vhwi", R, pts_c) + centers.view(-1, 1, 1, 3)
        means = pts_w.reshape(-1, 3)
        n = means.shape[0]
        footprint = (depth / f).reshape(-1, 1)
        log_scales = torch.log(scale_px * footprint) + 0.25 * torch.randn(
            n, 3, generator=gen, dtype=dtype)
        quats = torch.randn(n, 4, generator=gen, dtype=dtype)
        opacities = 1.5 + 0.5 * torch.randn(n, generator=gen, dtype=dtype)
        # Smooth colours: low-frequency functions of position plus noise.
        freq = torch.randn(3, 3, generator=gen, dtype=dtype) * 2.0
        colors = 0.5 + 0.35 * torch.sin(means @ freq) + 0.05 * torch.randn(
            n, 3, generator=gen, dtype=dtype)
        thetas.append(dict(means=means, log_scales=log_scales, quats=quats,
                           opacities=opacities, colors=colors.clamp(0, 1)))
    theta = {k: torch.stack([t[k] for t in thetas]) for k in thetas[0]}
    viewmats = out_v.unsqueeze(0).expand(batch, C, 4, 4).contiguous()
    Ks = out_k.unsqueeze(0).expand(batch, C, 3, 3).contiguous()
    return theta, viewmats, Ks


def random_scene(
    batch: int,
    num: int,
    views: int,
    width: int,
    height: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    scale_px: float = 2.0,
    sh_degree: int | None = None,
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """``num`` Gaussians scattered in the unit ball around the origin, seen by ``views``
    orbit cameras; scales of about ``scale_px`` pixels. Small scenes for tests.

    Returns ``(theta, viewmats [B, C, 4, 4], Ks [B, C, 3, 3])``; ``theta`` has ``sh``
    ``[B, N, (sh_degree+1)², 3]`` instead of ``colors`` when ``sh_degree`` is given.
    """
    gen = torch.Generator().manual_seed(seed)
    v, k = orbit_cameras(views, width, height, dtype=dtype)
    f = float(k[0, 0, 0])
    means = (torch.rand(batch, num, 3, generator=gen, dtype=dtype) * 2 - 1) * 0.8
    theta = dict(
        means=means,
        log_scales=math.log(scale_px * 4.0 / f)
        + 0.3 * torch.randn(batch, num, 3, generator=gen, dtype=dtype),
        quats=torch.randn(batch, num, 4, generator=gen, dtype=dtype),
        opacities=0.5 + torch.randn(batch, num, generator=gen, dtype=dtype),
    )
    if sh_degree is None:
        theta["colors"] = torch.rand(batch, num, 3, generator=gen, dtype=dtype)
    else:
        theta["sh"] = 0.5 * torch.randn(batch, num, (sh_degree + 1) ** 2, 3, generator=gen,
                                        dtype=dtype)
    viewmats = v.unsqueeze(0).expand(batch, views, 4, 4).contiguous()
    Ks = k.unsqueeze(0).expand(batch, views, 3, 3).contiguous()
    return theta, viewmats, Ks


DEGENERATE_CASES = ("zero_scales", "huge_scales", "bound_scales", "zero_quats", "huge_quats", "behind_camera",
                    "on_camera_plane", "far_offscreen", "transparent", "needles", "opaque")


def degenerate_scene(B: int, N: int, C: int, W: int, H: int, case: str | None = None, *, seed: int = 0,
                     dtype: torch.dtype = torch.float64, count: int | None = None):
    """``random_scene(B, N, C, W, H)`` with its first ``count`` Gaussians (default N // 4,
    at least 1) made degenerate as ``case`` (one of :data:`DEGENERATE_CASES`, or ``None``
    for none): the edge cases every rasterizer backend must survive. Returns
    ``(theta, viewmats, Ks)`` with ``theta`` holding fresh tensors."""
    theta, V, K = random_scene(B, N, C, W, H, seed=seed, dtype=dtype)
    theta = {k: v.clone() for k, v in theta.items()}
    eye = torch.linalg.inv(V[0, 0])[:3, 3]
    k = max(N // 4, 1) if count is None else count
    if case is None:
        pass
    elif case == "zero_scales":
        theta["log_scales"][:, :k] = -1e3
    elif case == "huge_scales":
        theta["log_scales"][:, :k] = 1e3
    elif case == "bound_scales":  # exactly on the clamp of the log-scales (round: well conditioned)
        theta["log_scales"][:, :k] = 15.0
    elif case == "zero_quats":
        theta["quats"][:, :k] = 0.0
    elif case == "huge_quats":
        theta["quats"][:, :k] = theta["quats"][:, :k] * 1e30
    elif case == "behind_camera":
        theta["means"][:, :k] = 2 * eye
    elif case == "on_camera_plane":
        theta["means"][:, :k] = eye + torch.tensor([0.3, 0.2, 0.0], dtype=dtype)
    elif case == "far_offscreen":  # in front, far to the side: the clamped u, v of the Jacobian
        theta["means"][:, :k] = torch.tensor([1e6, -1e6, 0.0], dtype=dtype)
    elif case == "transparent":
        theta["opacities"][:, :k] = -50.0
    elif case == "needles":  # one huge axis, two vanishing ones: the normalized determinant is clamped
        theta["log_scales"][:, :k] = torch.tensor([15.0, -1e3, -1e3], dtype=dtype)
    elif case == "opaque":  # every Gaussian: alpha clamped at 0.999 and early termination
        theta["opacities"] = theta["opacities"] + 8.0
        theta["log_scales"] = theta["log_scales"] + 1.0
    else:
        raise ValueError(f"case must be one of {DEGENERATE_CASES} or None, got {case!r}")
    return theta, V, K
