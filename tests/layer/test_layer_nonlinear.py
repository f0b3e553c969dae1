"""Nonlinear problems run to convergence: implicit = unrolled = finite differences."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_oracles import central_differences, exp_fit_data, gn_layer

import difftto


def rigid_data(seed, batch, points, noise):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(batch, points, 2, generator=g, dtype=torch.float64)
    truth = torch.randn(batch, 3, generator=g, dtype=torch.float64) * 0.5
    c, s = torch.cos(truth[:, 0, None]), torch.sin(truth[:, 0, None])
    dst = torch.stack([c * src[..., 0] - s * src[..., 1] + truth[:, 1, None],
                       s * src[..., 0] + c * src[..., 1] + truth[:, 2, None]], dim=-1)
    dst = dst + noise * torch.randn(dst.shape, generator=g, dtype=torch.float64)
    theta0 = truth + 0.3 * torch.randn(batch, 3, generator=g, dtype=torch.float64)
    return src, dst, theta0, g


def problem_case(name, seed):
    if name == "exponential_fit":
        t, y, theta0, g = exp_fit_data(seed, 2, 10, noise=0.05)
        return {"t": t, "y": y}, theta0, g
    src, dst, theta0, g = rigid_data(seed, 2, 6, noise=0.1)
    return {"src": src, "dst": dst}, theta0, g


def lipschitz(problem, data, theta, lam):
    """Largest eigenvalue of the exact Hessian of E at theta, per batch element (dense)."""
    def energy(x):
        return problem.objective(x[None], {k: v[i:i + 1] for k, v in data.items()}).sum()
    hs = []
    for i in range(theta.shape[0]):
        h = torch.autograd.functional.hessian(energy, theta[i]) + torch.diag(lam[i])
        hs.append(torch.linalg.eigvalsh(h).abs().max())
    return float(torch.stack(hs).max())


@settings(max_examples=5)
@given(seed=st.integers(0, 2**31 - 1), name=st.sampled_from(["exponential_fit", "rigid_2d"]))
def test_implicit_exact_hessian_matches_unrolled_gradient_descent(seed, name):
    data, theta0, g = problem_case(name, seed)
    lam = 0.5 + torch.rand(theta0.shape, generator=g, dtype=torch.float64)
    problem = difftto.problems.get(name)
    # Converge the start first (cheap GN), then measure the Hessian's scale there.
    start, _ = gn_layer(problem, steps=30)(theta0, lam, data)
    lr = 0.9 / lipschitz(problem, data, start, lam + 2.0)
    inner = difftto.GradientDescent(lr=lr, steps=1500)
    upstream = torch.randn(theta0.shape, generator=g, dtype=torch.float64)
    grads = {}
    for mode in ("implicit", "unrolled"):
        t0 = theta0.clone().requires_grad_(True)
        lm = lam.clone().requires_grad_(True)
        y_key = "y" if name == "exponential_fit" else "dst"
        d = dict(data)
        d[y_key] = data[y_key].clone().requires_grad_(True)
        layer = difftto.ImplicitLayer(problem, inner=inner, backward=mode, hessian="exact",
                                      solver=difftto.solvers.PCG(rtol=1e-12, max_iter=500))
        star, info = layer(t0, lm, d)
        if float(info.forward.stationarity.max()) > 1e-8:
            pytest.skip("gradient descent did not converge on this draw (non-convex case)")
        (star * upstream).sum().backward()
        grads[mode] = (t0.grad, lm.grad, d[y_key].grad)
    for what, a, b in zip(("theta0", "lam", "data"), grads["implicit"], grads["unrolled"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=f"gradient of {what}")


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), name=st.sampled_from(["exponential_fit", "rigid_2d"]))
def test_implicit_gradient_matches_central_differences_of_the_converged_solution(seed, name):
    data, theta0, g = problem_case(name, seed)
    lam = 0.5 + torch.rand(theta0.shape, generator=g, dtype=torch.float64)
    upstream = torch.randn(theta0.shape, generator=g, dtype=torch.float64)
    layer = gn_layer(name, steps=40, hessian="exact")
    t0 = theta0.clone().requires_grad_(True)
    lm = lam.clone().requires_grad_(True)
    star, info = layer(t0, lm, data)
    assert float(info.forward.stationarity.max()) < 1e-9
    (star * upstream).sum().backward()

    def loss_theta0(x):
        return (layer(x, lam, data)[0] * upstream).sum()

    def loss_lam(x):
        return (layer(theta0, x, data)[0] * upstream).sum()

    torch.testing.assert_close(t0.grad, central_differences(loss_theta0, theta0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lm.grad, central_differences(loss_lam, lam), rtol=1e-5, atol=1e-7)


def test_gradcheck_exponential_fit_exact_hessian():
    t, y, theta0, g = exp_fit_data(11, 2, 8, noise=0.05)
    lam = 0.5 + torch.rand(2, 3, generator=g, dtype=torch.float64)
    layer = gn_layer("exponential_fit", steps=40, hessian="exact")

    def fn(theta0, lam, y):
        return layer(theta0, lam, {"t": t, "y": y})[0]

    inputs = tuple(x.clone().requires_grad_(True) for x in (theta0, lam, y))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_gauss_newton_bias_vanishes_with_zero_residual_and_is_measurable_otherwise():
    """GN drops Σ r ∇²r: exact when the optimum fits the data, biased otherwise. The
    bias is measured, not hidden behind a tolerance."""
    errors = {}
    for noise in (0.0, 0.3):
        t, y, truth_like, g = exp_fit_data(5, 2, 12, noise=noise)
        lam = torch.full((2, 3), 1e-9, dtype=torch.float64)  # optimum ≈ the data's own fit
        upstream = torch.randn(2, 3, generator=g, dtype=torch.float64)
        grads = {}
        for hessian in ("gauss_newton", "exact"):
            yy = y.clone().requires_grad_(True)
            star, _ = gn_layer("exponential_fit", steps=60, hessian=hessian)(truth_like, lam, {"t": t, "y": yy})
            (star * upstream).sum().backward()
            grads[hessian] = yy.grad
        errors[noise] = float((grads["gauss_newton"] - grads["exact"]).norm() / grads["exact"].norm())
    assert errors[0.0] < 1e-6
    assert errors[0.3] > 1e-3  # a real, visible bias with noisy data


def test_unconverged_forward_is_reported_by_stationarity_warning():
    t, y, theta0, _ = exp_fit_data(2, 1, 10, noise=0.1)
    layer = difftto.ImplicitLayer("exponential_fit", inner=difftto.GradientDescent(lr=1e-3, steps=2),
                                  stationarity_warning=1e-3)
    with pytest.warns(RuntimeWarning, match="stationarity"):
        _, info = layer(theta0, 1.0, {"t": t, "y": y})
    assert float(info.forward.stationarity.max()) > 1e-3
