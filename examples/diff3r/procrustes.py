"""Differentiable weighted Procrustes (Kabsch): the rigid motion ``y ≈ R x + t`` that
best maps a weighted point set ``x`` onto ``y``, with a backward that stays finite on
degenerate point sets.

The rotation is the special polar factor of the weighted cross-covariance
``M = Σ w (y − ȳ)(x − x̄)ᵀ`` (``ȳ, x̄``: weighted means): with ``M = U S Vᵀ`` and
``d = det(U Vᵀ)``, ``R = U diag(1, 1, d) Vᵀ`` and ``t = ȳ − R x̄``.

Why not ``torch.linalg.svd``'s own backward: it differentiates ``U`` and ``V``, whose
derivatives contain ``1/(s_i² − s_j²)``, infinite for repeated singular values, although
``R`` itself is smooth there. ``R`` depends on ``M`` only through ``1/(s'_i + s'_j)``
(``s' = (s1, s2, d·s3)``): from ``M = R P`` with ``P = V diag(s') Vᵀ`` symmetric,
``dR = R Ω``, ``Ω`` skew, and ``Rᵀ dM − dMᵀ R = Ω P + P Ω``, so in ``V``'s basis
``Ω̃_ij = (A_ij − A_ji)/(s'_i + s'_j)`` with ``A = U'ᵀ dM V`` (``U' = U diag(1, 1, d)``).
The backward of a loss ``L(R)``: ``B = U'ᵀ (∂L/∂R) V``,
``C_ij = (B_ij − B_ji)/(s'_i + s'_j)``, ``∂L/∂M = U' C Vᵀ``.
``s'_i + s'_j`` vanishes only where the rotation is not determined (rank ≤ 1, e.g. all
points on a line, or a reflection tie ``s2 = s3`` with ``d = −1``); there the
denominator is kept away from zero (``|s'_i + s'_j| ≥ eps · s1``), which bounds the
gradient instead of returning inf/NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["procrustes_rotation", "weighted_procrustes"]

#: Relative floor of ``|s'_i + s'_j|`` (to the largest singular value) in the backward.
DEGENERATE_EPS = 1e-6
_ABSOLUTE_FLOOR = 1e-12


def _polar(M: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``R, U', s', V`` of ``M [..., 3, 3]``, in ``M``'s dtype (the SVD in float64)."""
    U, S, Vh = torch.linalg.svd(M.double())
    V = Vh.transpose(-1, -2)
    d = torch.linalg.det(U @ Vh).sign()
    d = torch.where(d == 0, torch.ones_like(d), d)
    flip = torch.ones_like(S)
    flip[..., 2] = d
    U1 = U * flip[..., None, :]
    R = U1 @ Vh
    return R, U1, S * flip, V


class _ProcrustesRotation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, M: Tensor, eps: float) -> Tensor:
        R, U1, s, V = _polar(M.detach())
        ctx.save_for_backward(U1, s, V)
        ctx.eps = eps
        return R.to(M.dtype)

    @staticmethod
    def backward(ctx, grad_R: Tensor) -> tuple[Tensor, None]:
        U1, s, V = ctx.saved_tensors
        B = U1.transpose(-1, -2) @ grad_R.double() @ V
        denom = s[..., :, None] + s[..., None, :]
        # Relative to s1, and an absolute floor for M = 0 (every denominator zero).
        floor = (ctx.eps * s[..., :1].abs()).clamp_min(_ABSOLUTE_FLOOR)[..., None]
        sign = torch.where(denom < 0, -torch.ones_like(denom), torch.ones_like(denom))
        denom = sign * torch.maximum(denom.abs(), floor)
        C = (B - B.transpose(-1, -2)) / denom
        return (U1 @ C @ V.transpose(-1, -2)).to(grad_R.dtype), None


def procrustes_rotation(M: Tensor, eps: float = DEGENERATE_EPS) -> Tensor:
    """The rotation ``R [..., 3, 3]`` (det +1) maximizing ``tr(Rᵀ M)`` for ``M [..., 3, 3]``,
    differentiable with the guarded backward of the module docstring (``eps``: the
    relative floor of ``|s'_i + s'_j|``).

    Raises:
        ValueError: ``M`` is not ``[..., 3, 3]``.
    """
    if M.dim() < 2 or tuple(M.shape[-2:]) != (3, 3):
        raise ValueError(f"M has shape {tuple(M.shape)}, expected [..., 3, 3]")
    return _ProcrustesRotation.apply(M, float(eps))


def weighted_procrustes(x: Tensor, y: Tensor, weights: Tensor, eps: float = DEGENERATE_EPS) -> Tensor:
    """The rigid transform ``T [..., 4, 4]`` minimizing ``Σ_n w_n ‖R x_n + t − y_n‖²``.

    Args:
        x, y: point sets ``[..., N, 3]`` (corresponding rows).
        weights: ``[..., N]``, non-negative, not all zero per set (normalized here).
        eps: the backward's degenerate-case floor (:func:`procrustes_rotation`).

    No scale is estimated: ``x`` and ``y`` are assumed to be in the same units (in the
    pose-free model both come from depths bounded by the same ``[near, far]``).

    Raises:
        ValueError: on mismatched shapes.
    """
    if x.shape != y.shape or x.shape[-1] != 3 or weights.shape != x.shape[:-1]:
        raise ValueError(f"x, y, weights: expected [..., N, 3], [..., N, 3], [..., N], got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}, {tuple(weights.shape)}")
    w = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    x_mean = (w[..., None] * x).sum(-2)
    y_mean = (w[..., None] * y).sum(-2)
    xc, yc = x - x_mean[..., None, :], y - y_mean[..., None, :]
    M = (w[..., None] * yc).transpose(-1, -2) @ xc  # Σ w y xᵀ
    R = procrustes_rotation(M, eps)
    t = y_mean - (R @ x_mean[..., None]).squeeze(-1)
    return torch.cat([torch.cat([R, t[..., None]], dim=-1),
                   torch.cat([torch.zeros_like(t[..., None, :]), torch.ones_like(t[..., None, :1])], dim=-1)],
                  dim=-2)
