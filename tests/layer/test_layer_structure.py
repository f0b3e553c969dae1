"""Parameter structures, Λ broadcasting, failure policies, clear errors, torch.func."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_oracles import examples, gn_layer, ridge_data

import difftto
from difftto.problems import Problem
from difftto.solvers import PCG, LinearSolveError, LinearSolveWarning, Status


class GroupedQuadratic(Problem):
    """r = A·concat(a, b) − y with θ = {"a": [B, 2, 2], "b": [B, 3]}."""

    def residuals(self, theta, data):
        flat = torch.cat([theta["a"].reshape(theta["a"].shape[0], -1), theta["b"]], dim=1)
        return torch.einsum("bmn,bn->bm", data["A"], flat) - data["y"]


@settings(max_examples=examples(150))
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3))
def test_dict_parameters_with_per_group_weights_equal_the_flat_problem(seed, batch):
    a, y, _, g = ridge_data(seed, batch, 9, 7)
    theta_a = torch.randn(batch, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    theta_b = torch.randn(batch, 3, generator=g, dtype=torch.float64, requires_grad=True)
    lam_a = (0.5 + torch.rand(batch, 2, generator=g, dtype=torch.float64)).requires_grad_(True)  # per row
    lam_b = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)  # one for the group
    upstream = torch.randn(batch, 7, generator=g, dtype=torch.float64)

    star, _ = gn_layer(GroupedQuadratic(), steps=2)(
        {"a": theta_a, "b": theta_b}, {"a": lam_a, "b": lam_b}, {"A": a, "y": y})
    flat_star = torch.cat([star["a"].reshape(batch, -1), star["b"]], dim=1)
    (flat_star * upstream).sum().backward()

    flat0 = torch.cat([theta_a.detach().reshape(batch, -1), theta_b.detach()], dim=1).requires_grad_(True)
    lam_a2 = lam_a.detach().clone().requires_grad_(True)
    lam_b2 = lam_b.detach().clone().requires_grad_(True)
    lam_flat = torch.cat([lam_a2[:, :, None].expand(batch, 2, 2).reshape(batch, 4),
                          lam_b2.expand(batch, 3)], dim=1)
    ref, _ = gn_layer("linear_least_squares", steps=2)(flat0, lam_flat, {"A": a, "y": y})
    (ref * upstream).sum().backward()

    torch.testing.assert_close(flat_star, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(theta_a.grad.reshape(batch, -1), flat0.grad[:, :4])
    torch.testing.assert_close(theta_b.grad, flat0.grad[:, 4:])
    torch.testing.assert_close(lam_a.grad, lam_a2.grad)
    torch.testing.assert_close(lam_b.grad, lam_b2.grad)


def singular_case():
    """A rank-deficient A with Λ = 0: the backward system is singular."""
    a, y, theta0, g = ridge_data(0, 2, 2, 5)
    return a, y, theta0


@pytest.mark.parametrize("policy", ["raise", "warn", "zero", "best"])
def test_backward_that_does_not_converge_triggers_the_policy(policy):
    a, y, theta0 = singular_case()
    a = a * torch.logspace(0, 6, 5, dtype=torch.float64)  # badly scaled columns
    t0 = theta0.clone().requires_grad_(True)
    lam = torch.full((2, 5), 1e-6, dtype=torch.float64)
    layer = difftto.ImplicitLayer(
        "linear_least_squares", inner=difftto.GradientDescent(lr=1e-14, steps=1),
        solver=PCG(rtol=1e-14, max_iter=2, preconditioner="identity"), on_failure=policy)
    star, info = layer(t0, lam, {"A": a, "y": y})
    if policy == "raise":
        with pytest.raises(LinearSolveError, match="MAX_ITER_REACHED"):
            star.sum().backward()
        return
    with pytest.warns(LinearSolveWarning, match="did not converge"):
        star.sum().backward()
    assert info.backward.failures == 2
    assert (info.backward.status == Status.MAX_ITER_REACHED).all()
    assert torch.isfinite(t0.grad).all()
    if policy == "zero":
        assert torch.count_nonzero(t0.grad) == 0
    if policy == "warn":  # the last iterate is kept
        assert torch.count_nonzero(t0.grad) > 0


def test_breakdown_without_proximal_term_is_reported():
    a, y, theta0 = singular_case()  # 2 equations, 5 unknowns, no Λ: JᵀJ is singular
    t0 = theta0.clone()
    data = {"A": a, "y": y.clone().requires_grad_(True)}
    layer = difftto.ImplicitLayer("linear_least_squares", inner=difftto.GradientDescent(lr=1e-2, steps=5),
                                  solver=PCG(rtol=1e-12, max_iter=50, preconditioner="identity"),
                                  on_failure="warn")
    star, info = layer(t0, None, data)
    with pytest.warns(LinearSolveWarning):
        star.sum().backward()
    assert info.backward.failures > 0


def test_clear_errors_name_the_argument():
    a, y, theta0, _ = ridge_data(0, 2, 4, 3)
    layer = gn_layer("linear_least_squares")
    data = {"A": a, "y": y}
    with pytest.raises(ValueError, match=r"lam must be >= 0"):
        layer(theta0, -torch.ones(2, 3, dtype=torch.float64), data)
    with pytest.raises(ValueError, match=r"lam must be finite"):
        layer(theta0, torch.full((2, 3), float("nan"), dtype=torch.float64), data)
    with pytest.raises(ValueError, match=r"lam has shape \(2, 4\)"):
        layer(theta0, torch.ones(2, 4, dtype=torch.float64), data)
    with pytest.raises(ValueError, match=r"theta0 contains 1 non-finite"):
        bad = theta0.clone()
        bad[0, 0] = float("inf")
        layer(bad, 1.0, data)
    with pytest.raises(ValueError, match=r"lam has keys"):
        gn_layer(GroupedQuadratic())({"a": torch.zeros(1, 2, 2), "b": torch.zeros(1, 3)}, {"a": 1.0}, None)
    with pytest.raises(ValueError, match=r"theta0\['b'\] has batch size 2"):
        gn_layer(GroupedQuadratic())({"a": torch.zeros(1, 2, 2), "b": torch.zeros(2, 3)}, 1.0, None)
    with pytest.raises(ValueError, match="backward must be one of"):
        difftto.ImplicitLayer("linear_least_squares", backward="magic")
    with pytest.raises(ValueError, match="hessian='gauss_newton' needs residuals"):
        difftto.ImplicitLayer("logistic_regression")
    with pytest.raises(KeyError, match="no problem registered as 'nope'"):
        difftto.ImplicitLayer("nope")
    with pytest.raises(ValueError, match="cannot be unrolled|does not support"):
        difftto.ImplicitLayer("linear_least_squares", inner=difftto.GaussNewton(), backward="unrolled")


def test_exact_hessian_on_an_objective_only_problem_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    labels = torch.where(torch.rand(2, 6, generator=g) > 0.5, 1.0, -1.0).to(torch.float64)
    theta0 = torch.randn(2, 3, generator=g, dtype=torch.float64)
    inner = difftto.GradientDescent(lr=0.2, steps=1000, tol=1e-13)
    layer = difftto.ImplicitLayer("logistic_regression", inner=inner,
                                  hessian="exact", solver=PCG(rtol=1e-12))

    def fn(theta0, x):
        return layer(theta0, 0.5, {"X": x, "y": labels})[0]

    assert torch.autograd.gradcheck(fn, (theta0.requires_grad_(True), x.requires_grad_(True)),
                                    eps=1e-6, atol=1e-5)


def test_composes_with_torch_func_grad():
    a, y, theta0, _ = ridge_data(4, 2, 6, 3)
    layer = gn_layer("linear_least_squares", steps=2)
    lam = torch.ones(2, 3, dtype=torch.float64)

    def loss(t0):
        return layer(t0, lam, {"A": a, "y": y})[0].pow(2).sum()

    t0 = theta0.clone().requires_grad_(True)
    loss(t0).backward()
    torch.testing.assert_close(torch.func.grad(loss)(theta0), t0.grad)


def test_registry_lists_shipped_problems_and_rejects_duplicates():
    names = difftto.problems.available()
    for name in ("linear_least_squares", "exponential_fit", "rigid_2d", "logistic_regression", "theseus"):
        assert name in names
    with pytest.raises(ValueError, match="already registered"):
        @difftto.problems.register("linear_least_squares")
        class Other(Problem):
            pass
