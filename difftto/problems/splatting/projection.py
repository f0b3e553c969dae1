"""EWA projection of 3D Gaussians to 2D, in gsplat's numerical conventions.

For each scene ``b``, camera ``c`` and Gaussian ``n``:

- camera-space mean ``t = R μ + T``; depth ``z = t_z``;
- 2-D mean ``(fx t_x / z + cx, fy t_y / z + cy)``;
- 2-D covariance ``Σ' = J W Σ Wᵀ Jᵀ + 0.3 I`` (the 0.3 px² dilation), where the
  perspective Jacobian ``J`` uses ``t_x / z`` and ``t_y / z`` clamped to 1.3× the
  field of view, as gsplat does, so that Gaussians far off-screen stay bounded;
- conic ``Σ'⁻¹`` stored as ``(a, b, c)`` = ``(inv00, inv01, inv11)``;
- radius ``ceil(extend · sqrt(Σ'_ii))`` per axis with ``extend = 3.33`` (gsplat's
  "3σ" footprint), or, when opacities are given, the opacity-aware
  ``min(3.33, sqrt(2 ln(255 · opacity)))`` of gsplat's CUDA kernel: outside that box
  every pixel's alpha is below 1/255, so the tile binning never drops a pixel that
  the alpha threshold would keep.

A Gaussian is *valid* for a camera when ``near_plane < z < far_plane``, its
footprint box overlaps the image, and (with opacities) ``opacity ≥ 1/255``; invalid
entries get radius 0 and finite placeholder values (their inputs are replaced
before any division, so no NaN reaches values or gradients).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Projection", "project_gaussians", "ALPHA_THRESHOLD", "FOOTPRINT_SIGMAS"]

#: Pixels with alpha below this are skipped (gsplat's ``ALPHA_THRESHOLD``).
ALPHA_THRESHOLD = 1.0 / 255.0
#: Footprint half-width in standard deviations (gsplat's 3.33, "3σ").
FOOTPRINT_SIGMAS = 3.33


class Projection(NamedTuple):
    """Projected Gaussians, one entry per (scene, camera, Gaussian).

    Attributes:
        means2d: ``[B, C, N, 2]`` pixel coordinates.
        covars2d: ``[B, C, N, 2, 2]`` dilated 2-D covariances.
        conics: ``[B, C, N, 3]`` inverse covariance ``(inv00, inv01, inv11)``.
        depths: ``[B, C, N]`` camera-space z.
        radii: ``[B, C, N, 2]`` int32 footprint half-widths in pixels (0 = culled).
        valid: ``[B, C, N]`` bool, ``radii > 0``.
    """

    means2d: Tensor
    covars2d: Tensor
    conics: Tensor
    depths: Tensor
    radii: Tensor
    valid: Tensor


def project_gaussians(
    means: Tensor,
    covariance_factors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    opacities: Tensor | None = None,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
) -> Projection:
    """EWA-projects Gaussians into every camera.

    Args:
        means: ``[B, N, 3]`` world means.
        covariance_factors: ``[B, N, 3, 3]`` factors ``M`` with covariance ``M Mᵀ``
            (``Gaussians.covariance_factors()``); working with ``M`` keeps ``Σ'`` PSD.
        viewmats: ``[B, C, 4, 4]`` world-to-camera.
        Ks: ``[B, C, 3, 3]`` pixel intrinsics.
        width, height: image size in pixels.
        opacities: optional ``[B, N]`` activated opacities for the opacity-aware radius.
        eps2d: dilation added to the 2-D covariance diagonal (px²).
        near_plane, far_plane: depth range of valid Gaussians.

    Returns:
        a :class:`Projection`. Differentiable in means2d/covars2d/conics/depths w.r.t.
        means, factors, viewmats and Ks (reverse, forward and higher order).
    """
    R = viewmats[..., :3, :3].unsqueeze(2)  # [B, C, 1, 3, 3]
    T = viewmats[..., :3, 3].unsqueeze(2)  # [B, C, 1, 3]
    means_c = (R @ means.unsqueeze(1).unsqueeze(-1)).squeeze(-1) + T  # [B, C, N, 3]
    factors_c = R @ covariance_factors.unsqueeze(1)  # [B, C, N, 3, 3]
    depths = means_c[..., 2]

    with torch.no_grad():
        in_range = (depths.detach() > near_plane) & (depths.detach() < far_plane)
    # Replace the camera-space means of culled Gaussians by a point on the optical axis
    # *before* dividing by z: a masked-out branch that produced inf would still put
    # 0 · inf = NaN into the gradient.
    safe_point = torch.tensor([0.0, 0.0, 1.0], dtype=means_c.dtype, device=means_c.device)
    mc = torch.where(in_range.unsqueeze(-1), means_c, safe_point)
    x, y, z = mc.unbind(-1)

    fx = Ks[..., 0, 0].unsqueeze(-1)  # [B, C, 1]
    fy = Ks[..., 1, 1].unsqueeze(-1)
    cx = Ks[..., 0, 2].unsqueeze(-1)
    cy = Ks[..., 1, 2].unsqueeze(-1)
    rz = 1.0 / z
    u = x * rz
    v = y * rz
    means2d = torch.stack([fx * u + cx, fy * v + cy], dim=-1)

    # gsplat clamps the Jacobian's x/z, y/z to 1.3× the field of view (not the mean).
    lim_x_pos = (width - cx) / fx + 0.3 * (0.5 * width / fx)
    lim_x_neg = cx / fx + 0.3 * (0.5 * width / fx)
    lim_y_pos = (height - cy) / fy + 0.3 * (0.5 * height / fy)
    lim_y_neg = cy / fy + 0.3 * (0.5 * height / fy)
    u_c = torch.minimum(torch.maximum(u, -lim_x_neg), lim_x_pos)
    v_c = torch.minimum(torch.maximum(v, -lim_y_neg), lim_y_pos)
    zero = torch.zeros_like(z)
    jac = torch.stack(
        [fx * rz, zero, -fx * u_c * rz, zero, fy * rz, -fy * v_c * rz], dim=-1
    ).unflatten(-1, (2, 3))  # [B, C, N, 2, 3]
    jm = jac @ factors_c  # [B, C, N, 2, 3]
    covars2d = jm @ jm.transpose(-1, -2)
    eye = torch.eye(2, dtype=covars2d.dtype, device=covars2d.device)
    covars2d = covars2d + eps2d * eye

    a = covars2d[..., 0, 0]
    b = 0.5 * (covars2d[..., 0, 1] + covars2d[..., 1, 0])
    c = covars2d[..., 1, 1]
    # Normalize before the determinant: for huge (but finite) covariances a·c
    # overflows float32 while the conic itself is tiny and well defined.
    s = torch.maximum(a, c).detach().clamp_min(1e-30)
    an, bn, cn = a / s, b / s, c / s
    det_n = (an * cn - bn * bn).clamp_min(1e-12)
    conics = torch.stack([cn, -bn, an], dim=-1) / (det_n * s).unsqueeze(-1)

    with torch.no_grad():
        extend = torch.full_like(a, FOOTPRINT_SIGMAS)
        valid = in_range & torch.isfinite(a) & torch.isfinite(c)
        if opacities is not None:
            op = opacities.detach().unsqueeze(1).expand_as(a)
            valid &= op >= ALPHA_THRESHOLD
            ratio = (op / ALPHA_THRESHOLD).clamp_min(1.0)
            extend = torch.minimum(extend, torch.sqrt(2.0 * torch.log(ratio)))
        rx = torch.ceil(extend * torch.sqrt(a.detach().clamp_min(0.0)))
        ry = torch.ceil(extend * torch.sqrt(c.detach().clamp_min(0.0)))
        m2 = means2d.detach()
        valid &= (rx > 0) | (ry > 0)
        valid &= (m2[..., 0] + rx > 0) & (m2[..., 0] - rx < width)
        valid &= (m2[..., 1] + ry > 0) & (m2[..., 1] - ry < height)
        # Radii stay in int32 range; the tile binning clamps footprints to the image.
        big = float(2**30)
        radii = torch.stack([rx.clamp(max=big), ry.clamp(max=big)], dim=-1)
        radii = torch.where(valid.unsqueeze(-1), radii, 0.0).to(torch.int32)

    return Projection(means2d, covars2d, conics, depths, radii, valid)
