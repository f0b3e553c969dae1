"""Ridge regression: the layer equals the closed form and its autograd gradients."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_oracles import examples, gn_layer, ridge_closed_form, ridge_data

import difftto

LAM_KINDS = ("scalar", "batch", "full")


def make_lam(kind, batch, n, g, scale):
    if kind == "scalar":
        return torch.tensor(scale * 1.3, dtype=torch.float64)
    if kind == "batch":
        return scale * (0.5 + torch.rand(batch, generator=g, dtype=torch.float64))
    return scale * (0.1 + torch.rand(batch, n, generator=g, dtype=torch.float64))


@settings(max_examples=examples(300))
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), m=st.integers(1, 12),
       n=st.integers(1, 8), kind=st.sampled_from(LAM_KINDS),
       scale=st.sampled_from([1e-2, 1.0, 1e2]))
def test_ridge_solution_and_gradients_match_closed_form(seed, batch, m, n, kind, scale):
    a, y, theta0, g = ridge_data(seed, batch, m, n)
    lam = make_lam(kind, batch, n, g, scale)
    leaves = [t.clone().requires_grad_(True) for t in (a, y, theta0, lam)]
    a1, y1, t1, l1 = leaves
    layer = gn_layer("linear_least_squares", steps=2)
    star, info = layer(t1, l1, {"A": a1, "y": y1})
    w = torch.randn(batch, n, generator=g, dtype=torch.float64)
    (star * w).sum().backward()
    assert info.backward is not None and info.backward.failures == 0

    ref_leaves = [t.clone().requires_grad_(True) for t in (a, y, theta0, lam)]
    a2, y2, t2, l2 = ref_leaves
    lam_full = difftto.Layout.of(t2).expand(l2)
    ref = ridge_closed_form(a2, y2, t2, lam_full)
    (ref * w).sum().backward()
    torch.testing.assert_close(star, ref.detach(), rtol=1e-9, atol=1e-10)
    for name, got, want in zip(("A", "y", "theta0", "lam"), leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-7, atol=1e-9, msg=f"gradient of {name}")


@settings(max_examples=examples(150))
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6))
def test_infinite_weights_make_the_layer_the_identity(seed, n):
    a, y, theta0, g = ridge_data(seed, 2, 5, n)
    theta0 = theta0.requires_grad_(True)
    lam = torch.full((2, n), 1e10, dtype=torch.float64)
    layer = gn_layer("linear_least_squares", steps=2)
    star, _ = layer(theta0, lam, {"A": a, "y": y})
    upstream = torch.randn(2, n, generator=g, dtype=torch.float64)
    (star * upstream).sum().backward()
    torch.testing.assert_close(star.detach(), theta0.detach(), rtol=0, atol=1e-8)
    torch.testing.assert_close(theta0.grad, upstream, rtol=1e-7, atol=1e-8)


def test_gradcheck_ridge():
    a, y, theta0, g = ridge_data(3, 2, 6, 3)
    lam = 0.5 + torch.rand(2, 3, generator=g, dtype=torch.float64)
    layer = gn_layer("linear_least_squares", steps=2)

    def fn(a, y, theta0, lam):
        return layer(theta0, lam, {"A": a, "y": y})[0]

    inputs = tuple(t.clone().requires_grad_(True) for t in (a, y, theta0, lam))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["unrolled", "truncated"])
def test_unrolled_gradient_descent_matches_implicit_on_ridge(mode):
    a, y, theta0, g = ridge_data(7, 2, 8, 4)
    lam = torch.full((2, 4), 0.7, dtype=torch.float64)
    h = a.transpose(1, 2) @ a + torch.diag_embed(lam)
    lr = float(1.0 / torch.linalg.eigvalsh(h).max())
    inner = difftto.GradientDescent(lr=lr, steps=3000)
    grads = {}
    for backward in ("implicit", mode):
        t0 = theta0.clone().requires_grad_(True)
        layer = difftto.ImplicitLayer("linear_least_squares", inner=inner, backward=backward,
                                      truncate=2000, solver=difftto.solvers.PCG(rtol=1e-12))
        star, info = layer(t0, lam, {"A": a, "y": y})
        assert float(info.forward.stationarity.max()) < 1e-9
        star.pow(2).sum().backward()
        grads[backward] = t0.grad
    torch.testing.assert_close(grads[mode], grads["implicit"], rtol=1e-6, atol=1e-9)


def test_straight_through_passes_the_upstream_gradient_to_theta0():
    a, y, theta0, g = ridge_data(1, 2, 5, 3)
    t0 = theta0.clone().requires_grad_(True)
    lam = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    layer = gn_layer("linear_least_squares", steps=2, backward="straight_through")
    star, _ = layer(t0, lam, {"A": a, "y": y})
    upstream = torch.randn(2, 3, generator=g, dtype=torch.float64)
    (star * upstream).sum().backward()
    torch.testing.assert_close(t0.grad, upstream)
    assert lam.grad is None
