"""Agreement with Theseus's TheseusLayer (implicit backward) on the same problem, and
the TheseusObjective wrapper."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_oracles import exp_fit_data, gn_layer

th = pytest.importorskip("theseus", reason="theseus-ai is not installed")

from difftto.problems.theseus import TheseusObjective  # noqa: E402


def fit_error(optim_vars, aux_vars):
    (x,) = optim_vars
    t, y = aux_vars
    a, k, c = x.tensor[:, 0:1], x.tensor[:, 1:2], x.tensor[:, 2:3]
    return a * torch.exp(-k * t.tensor) + c - y.tensor


def build_objective(batch, m, with_prior):
    dt = torch.float64
    x = th.Vector(3, name="x", dtype=dt)
    t = th.Variable(torch.zeros(batch, m, dtype=dt), name="t")
    y = th.Variable(torch.zeros(batch, m, dtype=dt), name="y")
    objective = th.Objective(dtype=dt)
    one = th.ScaleCostWeight(torch.tensor(1.0, dtype=dt), name="one")
    objective.add(th.AutoDiffCostFunction([x], fit_error, m, aux_vars=[t, y], cost_weight=one, name="fit"))
    if with_prior:
        x0 = th.Vector(3, name="x0", dtype=dt)
        sqrt_lam = th.Variable(torch.ones(batch, 3, dtype=dt), name="sqrt_lam")
        objective.add(th.Difference(x, x0, th.DiagonalCostWeight(sqrt_lam), name="prior"))
    return objective


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1))
def test_matches_theseus_layer_implicit_gradients(seed):
    t, y, theta0, g = exp_fit_data(seed, 2, 10, noise=0.05)
    lam = 0.5 + torch.rand(2, 3, generator=g, dtype=torch.float64)
    upstream = torch.randn(2, 3, generator=g, dtype=torch.float64)

    # Theseus: the proximal term is a Difference cost with weight sqrt(Λ).
    objective = build_objective(2, 10, with_prior=True)
    optimizer = th.GaussNewton(objective, th.CholeskyDenseSolver, max_iterations=30, step_size=1.0,
                               abs_err_tolerance=0.0, rel_err_tolerance=0.0)
    layer_th = th.TheseusLayer(optimizer)
    x0 = theta0.clone().requires_grad_(True)
    lam_th = lam.clone().requires_grad_(True)
    y_th = y.clone().requires_grad_(True)
    out, _ = layer_th.forward(
        {"x": theta0.clone(), "x0": x0, "sqrt_lam": lam_th.sqrt(), "t": t, "y": y_th},
        optimizer_kwargs={"backward_mode": "implicit", "damping": 0.0},
    )
    (out["x"] * upstream).sum().backward()

    # difftto on the same data term, wrapped from a Theseus objective without the prior.
    problem = TheseusObjective(build_objective(2, 10, with_prior=False))
    x0_d = theta0.clone().requires_grad_(True)
    lam_d = lam.clone().requires_grad_(True)
    y_d = y.clone().requires_grad_(True)
    star, info = gn_layer(problem, steps=50)({"x": x0_d}, {"x": lam_d}, {"t": t, "y": y_d})
    (star["x"] * upstream).sum().backward()

    torch.testing.assert_close(star["x"], out["x"].detach(), rtol=1e-8, atol=1e-10)
    for name, ours, theirs in (("theta0", x0_d, x0), ("lam", lam_d, lam_th), ("y", y_d, y_th)):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=1e-9, msg=f"gradient of {name}")


def test_theseus_objective_errors_name_the_problem():
    problem = TheseusObjective(build_objective(1, 4, with_prior=False))
    with pytest.raises(ValueError, match="expected \\['x'\\]"):
        problem.residuals({"z": torch.zeros(1, 3, dtype=torch.float64)}, None)
    with pytest.raises(ValueError, match="not auxiliary variables"):
        problem.residuals({"x": torch.zeros(1, 3, dtype=torch.float64)}, {"nope": torch.zeros(1)})
    with pytest.raises(TypeError, match="theseus.Objective"):
        TheseusObjective(object())
