"""Pose-free evaluation helpers: relative pose errors, and NoPoSplat's target-pose
alignment (each target camera optimized against the frozen Gaussians before scoring).

Conventions: world-to-camera matrices ``[..., 4, 4]`` in the first context view's
frame (``examples.diff3r.pose_free.first_view_frame``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from difftto.problems.splatting import rasterize
from difftto.problems.splatting.se3 import se3_exp

__all__ = ["AlignmentResult", "align_target_poses", "rotation_error_deg", "scale_aligned_targets",
           "translation_direction_error_deg", "relative_pose_errors"]


def rotation_error_deg(R_pred: Tensor, R_true: Tensor) -> Tensor:
    """Angle of ``R_pred R_trueᵀ`` in degrees ``[...]`` for rotations ``[..., 3, 3]``."""
    rel = R_pred @ R_true.transpose(-1, -2)
    cos = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) * 0.5).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cos))


def translation_direction_error_deg(t_pred: Tensor, t_true: Tensor, eps: float = 1e-9) -> Tensor:
    """Angle in degrees ``[...]`` between translation vectors ``[..., 3]`` (scale-free:
    a pose-free reconstruction is known up to scale)."""
    cos = (t_pred * t_true).sum(-1) / (t_pred.norm(dim=-1) * t_true.norm(dim=-1)).clamp_min(eps)
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


def relative_pose_errors(w2c_pred: Tensor, w2c_true: Tensor) -> tuple[Tensor, Tensor]:
    """Rotation and translation-direction errors (degrees, ``[B, V-1]``) of context
    views ``1..V-1`` relative to view 0, for world-to-camera ``[B, V, 4, 4]``.

    Relative poses ``T_v · T_0⁻¹`` are compared, so any common frame works."""
    def relative(T: Tensor) -> Tensor:
        return T[:, 1:] @ torch.linalg.inv(T[:, :1])

    rp, rt = relative(w2c_pred), relative(w2c_true)
    rot = rotation_error_deg(rp[..., :3, :3], rt[..., :3, :3])
    trans = translation_direction_error_deg(rp[..., :3, 3], rt[..., :3, 3])
    return rot, trans


def scale_aligned_targets(target_w2c: Tensor, context_w2c_true: Tensor, context_w2c_pred: Tensor) -> Tensor:
    """Initial target poses in the reconstruction's frame: the targets' poses relative
    to context view 0 (``target_w2c [B, T, 4, 4]``, first view's frame), translations
    scaled by the ratio of predicted to true context baselines (views ``1..V-1``)."""
    def baseline(T: Tensor) -> Tensor:
        centers = -(T[:, 1:, :3, :3].transpose(-1, -2) @ T[:, 1:, :3, 3:]).squeeze(-1)
        return centers.norm(dim=-1).sum(-1)

    scale = baseline(context_w2c_pred) / baseline(context_w2c_true).clamp_min(1e-9)  # [B]
    out = target_w2c.clone()
    out[..., :3, 3] = out[..., :3, 3] * scale[:, None, None]
    return out


@dataclass
class AlignmentResult:
    """Aligned target cameras ``viewmats [B, T, 4, 4]`` and the photometric MSE
    ``[B]`` of the target renders before and after alignment."""

    viewmats: Tensor
    mse_before: Tensor
    mse_after: Tensor


def align_target_poses(gaussians: Mapping[str, Tensor], init_viewmats: Tensor, Ks: Tensor, images: Tensor,
                       *, steps: int = 100, lr: float = 5e-3, backend: str = "auto") -> AlignmentResult:
    """NoPoSplat's protocol: optimize each target camera (a twist ``δ``, camera
    ``exp(δ) · init``) against frozen Gaussians with Adam on the photometric MSE.

    Args:
        gaussians: the Gaussian groups (detached here; extra keys such as ``pose`` ignored).
        init_viewmats: initial world-to-camera ``[B, T, 4, 4]``.
        Ks: pixel intrinsics ``[B, T, 3, 3]``.
        images: target images ``[B, T, 3, H, W]``.
        steps, lr: Adam steps and learning rate (NoPoSplat: 100 steps, 5e-3).
        backend: the rasterizer's (``"auto"``: the compiled CPU kernels on CPU, whose
            backward reaches the view matrices; ``"torch"``: the pure-PyTorch twin).

    Returns:
        :class:`AlignmentResult`; the MSE after is that of the best iterate (never worse
        than the initial cameras).
    """
    if steps < 0 or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"steps, lr: expected steps >= 0 and lr > 0, got {steps}, {lr}")
    g = {k: v.detach() for k, v in gaussians.items() if k != "pose"}
    B, T, _, H, W = images.shape
    target = images.permute(0, 1, 3, 4, 2)
    init = init_viewmats.detach()
    delta = torch.zeros(B, T, 6, dtype=init.dtype, device=init.device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr)

    def mse(d: Tensor) -> Tensor:
        colors = rasterize(g, se3_exp(d) @ init, Ks, int(W), int(H), backend=backend).colors
        return (colors - target).pow(2).mean(dim=(2, 3, 4))  # [B, T]

    with torch.enable_grad():
        best = mse(delta).detach()
        before = best.mean(1)
        best_delta = delta.detach().clone()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = mse(delta)
            with torch.no_grad():  # the loss at the current iterate: keep the best per camera
                better = loss < best
                best = torch.where(better, loss, best)
                best_delta = torch.where(better[..., None], delta, best_delta)
            loss.sum().backward()
            optimizer.step()
        with torch.no_grad():
            final = mse(delta)
            better = final < best
            best = torch.where(better, final, best)
            best_delta = torch.where(better[..., None], delta.detach(), best_delta)
    return AlignmentResult(se3_exp(best_delta) @ init, before, best.mean(1))
