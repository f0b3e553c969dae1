"""Shared helpers for the splatting tests: a dense all-pairs reference renderer, a
power-iteration estimate of an objective's largest Hessian eigenvalue, and the
``compiled_kernels`` fixture that skips a module when the CPU kernels cannot be built."""

import pytest
import torch

from difftto.problems.splatting import Gaussians, cpu_kernels, project_gaussians


@pytest.fixture(scope="module")
def compiled_kernels():
    """Compiles (or loads the cached build of) the kernels once per module; skips with the
    reason when they are unavailable. Use as ``pytestmark = pytest.mark.usefixtures("compiled_kernels")``."""
    ok, why = cpu_kernels.cpu_kernels_available()
    if not ok:
        pytest.skip(f"compiled CPU kernels unavailable: {why}")


def dense_render(theta, viewmats, Ks, width, height, background=None):
    """Naive renderer: every Gaussian against every pixel, one Gaussian at a time in depth
    order, gsplat's thresholds (α ≤ 0.999, skip α < 1/255, stop before T ≤ 1e-4).
    Colours only (no SH). Returns colors, alphas, expected depths."""
    g = Gaussians.from_params(theta)
    dt = g.means.dtype
    B, C = viewmats.shape[:2]
    op = g.opacity()
    p = project_gaussians(g.means, g.covariance_factors(), viewmats, Ks, width, height,
                          opacities=op)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=dt) + 0.5,
                            torch.arange(width, dtype=dt) + 0.5, indexing="ij")
    D = g.colors.shape[-1]
    colors = torch.zeros(B, C, height, width, D, dtype=dt)
    alphas = torch.zeros(B, C, height, width, 1, dtype=dt)
    depths = torch.zeros(B, C, height, width, 1, dtype=dt)
    for b in range(B):
        for c in range(C):
            T = torch.ones(height, width, dtype=dt)
            done = torch.zeros(height, width, dtype=torch.bool)
            col = torch.zeros(height, width, D, dtype=dt)
            dep = torch.zeros(height, width, dtype=dt)
            for n in torch.argsort(p.depths[b, c], stable=True).tolist():
                if not p.valid[b, c, n]:
                    continue
                dx = xs - p.means2d[b, c, n, 0]
                dy = ys - p.means2d[b, c, n, 1]
                ca, cb, cc = p.conics[b, c, n]
                sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
                alpha = (op[b, n] * torch.exp(-sigma)).clamp(max=0.999)
                use = (alpha >= 1 / 255) & ~done
                next_t = T * (1 - alpha)
                stop = use & (next_t <= 1e-4)
                done = done | stop
                use = use & ~stop
                w = torch.where(use, alpha * T, 0.0)
                col = col + w[..., None] * g.colors[b, n]
                dep = dep + w * p.depths[b, c, n]
                T = torch.where(use, next_t, T)
            if background is not None:
                col = col + T[..., None] * background[b, c]
            colors[b, c] = col
            alphas[b, c, ..., 0] = 1 - T
            depths[b, c, ..., 0] = dep / (1 - T).clamp_min(1e-10)
    return colors, alphas, depths


@pytest.fixture
def dense_renderer():
    return dense_render


def largest_eigenvalue(objective, theta, iters=30):
    """Power iteration on ``objective.hessian_operator(theta)`` (fixed start vector):
    the Rayleigh quotient after ``iters`` steps, a float (sets a stable GD step 1/λ_max)."""
    op = objective.hessian_operator(theta)
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(0), dtype=theta.dtype)
    for _ in range(iters):
        v = op.mv(v)
        v = v / v.norm()
    return float((v * op.mv(v)).sum())


@pytest.fixture(name="largest_eigenvalue")
def largest_eigenvalue_fixture():
    return largest_eigenvalue
