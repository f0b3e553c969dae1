"""Least-squares and smooth problems shipped with difftto.

- ``"linear_least_squares"``: ``r = A θ − y`` (ridge regression with the proximal term).
- ``"exponential_fit"``: ``r_i = a · exp(−k t_i) + c − y_i`` (nonlinear, 3 parameters).
- ``"rigid_2d"``: align 2-D points by a rotation and translation (nonlinear).
- ``"logistic_regression"``: an objective-only problem (no residuals), for
  ``hessian="exact"``.

Each takes its inputs from ``data`` so that gradients can flow to them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Data, Problem
from .registry import register

__all__ = ["LinearLeastSquares", "ExponentialFit", "Rigid2D", "LogisticRegression"]


def _require(data: Data, keys: tuple[str, ...], problem: str) -> None:
    if data is None or any(k not in data for k in keys):
        got = None if data is None else sorted(data)
        raise ValueError(f"{problem} needs data with keys {list(keys)}, got {got}")


@register("linear_least_squares")
class LinearLeastSquares(Problem):
    """``D(θ) = ½‖A θ − y‖²`` per batch element.

    data: ``A [B, m, n]``, ``y [B, m]``. θ: ``[B, n]``.
    With the proximal term, ``θ* = (AᵀA + diag Λ)⁻¹ (Aᵀy + Λ θ0)``.
    """

    def residuals(self, theta: Tensor, data: Data) -> Tensor:
        _require(data, ("A", "y"), "linear_least_squares")
        a, y = data["A"], data["y"]
        if theta.dim() != 2 or a.shape[0] != theta.shape[0] or a.shape[-1] != theta.shape[-1]:
            raise ValueError(
                f"linear_least_squares: theta must be [B, n] matching data['A'] [B, m, n]; got "
                f"theta {tuple(theta.shape)}, A {tuple(a.shape)}"
            )
        if y.shape != a.shape[:2]:
            raise ValueError(
                f"linear_least_squares: data['y'] must be [B, m] = {tuple(a.shape[:2])} to match "
                f"data['A'] {tuple(a.shape)}; got {tuple(y.shape)}"
            )
        return torch.einsum("bmn,bn->bm", a, theta) - y


@register("exponential_fit")
class ExponentialFit(Problem):
    """Fit ``y ≈ a · exp(−k t) + c``; θ = ``[B, 3]`` = (a, k, c).

    data: ``t [B, m]``, ``y [B, m]``.
    """

    def residuals(self, theta: Tensor, data: Data) -> Tensor:
        _require(data, ("t", "y"), "exponential_fit")
        if theta.dim() != 2 or theta.shape[-1] != 3:
            raise ValueError(f"exponential_fit: theta must be [B, 3] (a, k, c), got {tuple(theta.shape)}")
        t, y = torch.as_tensor(data["t"]), torch.as_tensor(data["y"])
        try:
            torch.broadcast_shapes((theta.shape[0], 1), t.shape, y.shape)
        except RuntimeError:
            raise ValueError(
                f"exponential_fit: data['t'] {tuple(t.shape)} and data['y'] {tuple(y.shape)} must "
                f"broadcast to [B, m] with B = {theta.shape[0]}"
            ) from None
        a, k, c = theta[:, 0:1], theta[:, 1:2], theta[:, 2:3]
        return a * torch.exp(-k * t) + c - y


@register("rigid_2d")
class Rigid2D(Problem):
    """Align points: ``r_p = R(φ) src_p + τ − dst_p``; θ = ``[B, 3]`` = (φ, τx, τy).

    data: ``src [B, P, 2]``, ``dst [B, P, 2]``.
    """

    def residuals(self, theta: Tensor, data: Data) -> Tensor:
        _require(data, ("src", "dst"), "rigid_2d")
        if theta.dim() != 2 or theta.shape[-1] != 3:
            raise ValueError(f"rigid_2d: theta must be [B, 3] (phi, tx, ty), got {tuple(theta.shape)}")
        phi = theta[:, 0, None]
        cos, sin = torch.cos(phi), torch.sin(phi)
        src = data["src"]
        x = cos * src[..., 0] - sin * src[..., 1] + theta[:, 1, None]
        y = sin * src[..., 0] + cos * src[..., 1] + theta[:, 2, None]
        return torch.stack([x, y], dim=-1) - data["dst"]


@register("logistic_regression")
class LogisticRegression(Problem):
    """``D(θ) = Σ_i softplus(−y_i x_iᵀθ)`` (labels ``y ∈ {−1, +1}``); objective only.

    data: ``X [B, m, n]``, ``y [B, m]``. θ: ``[B, n]``.
    """

    def objective(self, theta: Tensor, data: Data) -> Tensor:
        _require(data, ("X", "y"), "logistic_regression")
        margins = data["y"] * torch.einsum("bmn,bn->bm", data["X"], theta)
        return F.softplus(-margins).sum(dim=1)
