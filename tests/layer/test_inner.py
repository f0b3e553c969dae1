"""Inner optimizers: convergence, per-group learning rates, diagnostics, errors."""

import pytest
import torch
from layer_oracles import exp_fit_data, ridge_closed_form, ridge_data

import difftto
from difftto.objective import InnerObjective
from difftto.regularizers import Proximal


def ridge_objective(seed=0, batch=2, m=10, n=4, lam=0.5):
    a, y, theta0, _ = ridge_data(seed, batch, m, n)
    layout = difftto.Layout.of(theta0)
    lam_full = torch.full((batch, n), lam, dtype=torch.float64)
    obj = InnerObjective(difftto.problems.get("linear_least_squares"), layout, {"A": a, "y": y},
                         Proximal(theta0, lam_full))
    return obj, theta0, ridge_closed_form(a, y, theta0, lam_full)


@pytest.mark.parametrize("inner", [
    difftto.GradientDescent(lr=0.02, steps=3000),
    difftto.Adam(lr=0.05, steps=3000),
    difftto.GaussNewton(steps=5, damping=1e-3),
])
def test_inner_optimizers_reach_the_ridge_solution(inner):
    obj, theta0, solution = ridge_objective()
    star, info = inner.run(obj, theta0)
    torch.testing.assert_close(star, solution, rtol=1e-5, atol=1e-6)
    assert (info.stationarity < 1e-4).all()
    assert (info.objective <= info.initial_objective).all()
    assert info.steps.shape == (2,) and not star.requires_grad


def test_tolerance_stops_early_per_element_and_reports_convergence():
    obj, theta0, _ = ridge_objective()
    star, info = difftto.GradientDescent(lr=0.02, steps=5000, tol=1e-6, check_every=10).run(obj, theta0)
    assert (info.steps < 5000).all() and info.converged.all()
    assert (info.stationarity <= 1e-6).all()


def test_levenberg_marquardt_never_increases_the_objective():
    t, y, theta0, _ = exp_fit_data(3, 2, 10, noise=0.1)
    layout = difftto.Layout.of(theta0)
    obj = InnerObjective(difftto.problems.get("exponential_fit"), layout, {"t": t, "y": y}, None)
    gn = difftto.GaussNewton(steps=1, damping=1e-2)
    state, x = gn.init_state(obj, theta0), theta0
    active = torch.ones(2, dtype=torch.bool)
    values = [obj.value(x)]
    for _ in range(10):
        x, state = gn.step(obj, x, state, active, create_graph=False)
        values.append(obj.value(x))
    values = torch.stack(values)
    assert (values[1:] <= values[:-1] + 1e-12).all()
    assert (values[-1] < values[0]).all()


def test_per_group_learning_rates_apply_to_their_groups():
    """A zero-curvature group with lr → moves by lr·gradient exactly: each group's rate
    is applied to its own coordinates."""

    class Linear(difftto.Problem):
        def objective(self, theta, data):
            return theta["a"].sum(1) + 2 * theta["b"].sum(1)

    theta0 = {"a": torch.zeros(1, 2, dtype=torch.float64), "b": torch.zeros(1, 3, dtype=torch.float64)}
    layout = difftto.Layout.of(theta0)
    obj = InnerObjective(Linear(), layout, None, None)
    star, _ = difftto.GradientDescent(lr={"a": 0.1, "b": 0.01}, steps=1).run(obj, layout.flatten(theta0))
    torch.testing.assert_close(star, torch.tensor([[-0.1, -0.1, -0.02, -0.02, -0.02]], dtype=torch.float64))
    with pytest.raises(ValueError, match="lr given per group must have the keys"):
        difftto.GradientDescent(lr={"a": 0.1}, steps=1).run(obj, layout.flatten(theta0))


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        difftto.GradientDescent(steps=-1)
    with pytest.raises(ValueError, match="betas"):
        difftto.Adam(betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="damping_factor > 1"):
        difftto.GaussNewton(damping_factor=1.0)
    obj, theta0, _ = ridge_objective()
    with pytest.raises(ValueError, match="lr must be a positive number"):
        difftto.GradientDescent(lr=-1.0).run(obj, theta0)
