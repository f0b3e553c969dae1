"""Oracles for the layer tests: closed forms, unrolled references, finite differences."""

from __future__ import annotations

import torch

import difftto
from difftto.solvers import PCG

TIGHT = PCG(rtol=1e-12, max_iter=500, on_failure="raise")


def gn_layer(problem, steps=20, tol=1e-12, **kwargs):
    """A layer whose inner Gauss-Newton solves converge tightly (float64 tests); it
    stops once the relative stationarity is below ``tol``."""
    inner = difftto.GaussNewton(steps=steps, damping=0.0, tol=tol, solver=PCG(rtol=1e-13, max_iter=500))
    kwargs.setdefault("solver", TIGHT)
    return difftto.ImplicitLayer(problem, inner=inner, **kwargs)


def ridge_data(seed, batch, m, n, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, m, n, generator=g, dtype=dtype)
    y = torch.randn(batch, m, generator=g, dtype=dtype)
    theta0 = torch.randn(batch, n, generator=g, dtype=dtype)
    return a, y, theta0, g


def ridge_closed_form(a, y, theta0, lam_full):
    """``(AᵀA + diag Λ)⁻¹ (Aᵀy + Λ θ0)``, differentiable by autograd."""
    h = a.transpose(1, 2) @ a + torch.diag_embed(lam_full)
    rhs = (a.transpose(1, 2) @ y[..., None])[..., 0] + lam_full * theta0
    return torch.linalg.solve(h, rhs)


def exp_fit_data(seed, batch, m, noise, dtype=torch.float64):
    """Exponential-decay data; ``noise = 0`` gives a zero-residual optimum."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 2, m, dtype=dtype).repeat(batch, 1)
    truth = torch.stack([1 + torch.rand(batch, generator=g, dtype=dtype),
                         0.5 + torch.rand(batch, generator=g, dtype=dtype),
                         torch.randn(batch, generator=g, dtype=dtype) * 0.3], dim=1)
    y = truth[:, 0:1] * torch.exp(-truth[:, 1:2] * t) + truth[:, 2:3]
    y = y + noise * torch.randn(batch, m, generator=g, dtype=dtype)
    theta0 = truth + 0.2 * torch.randn(batch, 3, generator=g, dtype=dtype)
    return t, y, theta0, g


def central_differences(fn, x, eps=1e-6):
    """``d fn / d x`` of a scalar function by central differences (float64)."""
    grad = torch.zeros_like(x)
    flat = grad.view(-1)
    base = x.detach().clone()
    for i in range(base.numel()):
        e = torch.zeros_like(base).view(-1)
        e[i] = eps
        e = e.view_as(base)
        flat[i] = (fn(base + e) - fn(base - e)) / (2 * eps)
    return grad


def examples(ci_count: int) -> int:
    """``ci_count`` examples under the ``ci`` profile, a fifth (at least 10) otherwise."""
    import os

    return ci_count if os.environ.get("HYPOTHESIS_PROFILE", "dev") == "ci" else max(ci_count // 5, 10)
