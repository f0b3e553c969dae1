"""The registered ``gaussian_splatting`` problem: residuals, frozen state, Jacobian
products, the Gauss-Newton operator, and test-time optimization on a known scene."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difftto.operators import GaussNewtonOperator, materialize
from difftto.problems import get
from difftto.problems.splatting import GaussianSplattingProblem, rasterize
from difftto.problems.splatting.problem import STATE_KEY
from difftto.problems.splatting.synthetic import random_scene
from difftto.tree import Layout

F64 = torch.float64


def _setup(B=1, N=20, C=2, W=12, H=10, seed=0, offset=0.05):
    theta, V, K = random_scene(B, N, C, W, H, seed=seed)
    images = rasterize(theta, V, K, W, H).colors + offset
    return theta, dict(viewmats=V, Ks=K, images=images)


def test_registered_and_residual_shape():
    problem = get("gaussian_splatting")
    assert isinstance(problem, GaussianSplattingProblem) and problem.is_least_squares
    theta, data = _setup(B=2, C=3)
    r = problem.residuals(theta, data)
    assert r.shape == (2, 3 * 10 * 12 * 3)
    torch.testing.assert_close(r, torch.full_like(r, -0.05))
    torch.testing.assert_close(problem.objective(theta, data), 0.5 * r.pow(2).sum(1))


def test_weights_scale_residuals_by_their_square_root():
    problem = GaussianSplattingProblem(backend="torch")
    theta, data = _setup()
    weights = torch.rand(1, 2, 10, 12, 1, dtype=F64)
    r = problem.residuals(theta, dict(data, weights=weights)).view(1, 2, 10, 12, 3)
    torch.testing.assert_close(r, -0.05 * weights.sqrt().expand_as(r))
    with pytest.raises(ValueError, match=r"data\['weights'\] has shape"):
        problem.residuals(theta, dict(data, weights=torch.ones(3, 5)))


def test_freeze_adds_state_and_keeps_residuals():
    problem = GaussianSplattingProblem(backend="torch")
    theta, data = _setup(B=2)
    frozen = problem.freeze(theta, data)
    assert STATE_KEY in frozen and STATE_KEY not in data
    torch.testing.assert_close(problem.residuals(theta, frozen), problem.residuals(theta, data),
                               rtol=1e-13, atol=1e-13)


def _flat_products(problem, theta, data):
    """J·v (forward mode) and Jᵀ·w (one reverse-mode graph reused) on flat [B, n]."""
    layout = Layout.of(theta)
    frozen = problem.freeze(theta, data)
    flat = layout.flatten(theta)

    def residual(x):
        return problem.residuals(layout.unflatten(x), frozen)

    r, vjp_fn = torch.func.vjp(residual, flat)
    return layout, flat, residual, (lambda v: torch.func.jvp(residual, (flat,), (v,))[1]), (
        lambda w: vjp_fn(w)[0])


@settings(max_examples=4)
@given(seed=st.integers(0, 10_000))
def test_jvp_of_residuals_matches_finite_differences_including_poses(seed):
    problem = GaussianSplattingProblem(backend="torch")
    theta, data = _setup(seed=seed)
    theta["pose_deltas"] = torch.zeros(1, 2, 6, dtype=F64)
    layout, flat, residual, jvp, vjp = _flat_products(problem, theta, data)
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(flat.shape, generator=gen, dtype=F64)
    eps = 1e-6
    fd = (residual(flat + eps * v) - residual(flat - eps * v)) / (2 * eps)
    jv = jvp(v)
    assert (jv - fd).abs().max() <= 1e-6 * jv.abs().max()
    u = torch.randn(jv.shape, generator=gen, dtype=F64)
    torch.testing.assert_close((u * jv).sum(), (vjp(u) * v).sum(), rtol=1e-12, atol=1e-12)


def test_gauss_newton_operator_is_symmetric_psd_and_equals_explicit_jtj():
    problem = GaussianSplattingProblem(backend="torch")
    theta, data = _setup(N=4, W=6, H=5)
    layout, flat, residual, jvp, vjp = _flat_products(problem, theta, data)
    op = GaussNewtonOperator(jvp, vjp, (1, layout.numel), F64)
    A = materialize(op)[0]
    torch.testing.assert_close(A, A.T, rtol=1e-12, atol=1e-12)
    assert torch.linalg.eigvalsh(A).min() >= -1e-10 * A.diagonal().max()
    J = torch.func.jacfwd(residual)(flat)[0, :, 0]  # [m, n]
    torch.testing.assert_close(A, J.T @ J, rtol=1e-10, atol=1e-10)


def test_mixed_second_derivative_reaches_cameras():
    """∂/∂viewmats of uᵀ∇θD: what the implicit backward needs for pose gradients."""
    problem = GaussianSplattingProblem(backend="torch")
    theta, data = _setup()
    V = data["viewmats"].clone().requires_grad_()
    params = {k: v.clone().requires_grad_() for k, v in theta.items()}
    frozen = problem.freeze(params, dict(data, viewmats=V))
    D = problem.objective(params, frozen).sum()
    grads = torch.autograd.grad(D, list(params.values()), create_graph=True)
    inner = sum((g * torch.randn_like(g)).sum() for g in grads)
    (dV,) = torch.autograd.grad(inner, V)
    assert torch.isfinite(dV).all() and dV.abs().sum() > 0


def test_data_errors():
    problem = GaussianSplattingProblem(backend="torch")
    theta, data = _setup()
    with pytest.raises(KeyError, match="missing"):
        problem.residuals(theta, {"viewmats": data["viewmats"]})
    with pytest.raises(ValueError, match=r"data\['images'\] has shape"):
        problem.residuals(theta, dict(data, images=data["images"][0]))
    with pytest.raises(ValueError, match="channels"):
        problem.residuals(theta, dict(data, images=data["images"][..., :2]))
    with pytest.raises(ValueError, match=r"data\['images'\].*viewmats"):
        problem.residuals(theta, dict(data, images=data["images"][:, :1]))
    with pytest.raises(ValueError, match=r"pose_deltas.*\[B, C, 6\]"):
        problem.residuals(dict(theta, pose_deltas=torch.zeros(1, 6, dtype=F64)), data)
    with pytest.raises(TypeError, match="dict"):
        problem.residuals(theta["means"], data)


def _psnr(problem, theta, data):
    mse = problem.residuals(theta, data).pow(2).mean()
    return float(10 * torch.log10(1.0 / mse))


def test_test_time_optimization_recovers_known_scene():
    """Levenberg-Marquardt (dense J on the frozen renderer, re-frozen every step) from
    perturbed Gaussians fits the context views of a scene made of known Gaussians.

    Steps are accepted on the gain ratio against the *unfrozen* render: a step that the
    frozen model over-predicts (a depth-order swap or a footprint change) is damped."""
    problem = GaussianSplattingProblem(backend="torch")
    truth, V, K = random_scene(1, 12, 2, 12, 12, seed=11, scale_px=2.5)
    data = dict(viewmats=V, Ks=K, images=rasterize(truth, V, K, 12, 12).colors)
    gen = torch.Generator().manual_seed(0)
    theta = {k: v + s * torch.randn(v.shape, generator=gen, dtype=F64) for (k, v), s in
             zip(truth.items(), (0.005, 0.05, 0.05, 0.2, 0.05))}
    layout = Layout.of(theta)
    x = layout.flatten(theta)
    start = _psnr(problem, theta, data)
    damping = 1e-2
    for _ in range(15):
        frozen = problem.freeze(layout.unflatten(x), data)

        def residual(y, frozen=frozen):
            return problem.residuals(layout.unflatten(y), frozen)[0]

        r = residual(x)
        J = torch.func.jacfwd(residual)(x)[:, 0]
        JtJ, g = J.T @ J, J.T @ r
        cost = r.pow(2).sum()
        while damping < 1e8:
            A = JtJ + damping * (JtJ.diagonal().diag() + 1e-9 * torch.eye(len(g), dtype=F64))
            step = torch.linalg.solve(A, -g)
            trial = problem.residuals(layout.unflatten(x + step), data).pow(2).sum()
            predicted = cost - (r + J @ step).pow(2).sum()
            if cost - trial > 0.25 * predicted:
                x, damping = x + step, max(damping / 3, 1e-7)
                break
            damping *= 4
        if _psnr(problem, layout.unflatten(x), data) > 45:
            break
    final = _psnr(problem, layout.unflatten(x), data)
    assert start < 35 and final >= 40, (start, final)
    assert math.isfinite(final)
