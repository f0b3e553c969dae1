"""The proximal term's closed forms against autograd, and Λ broadcasting laws."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_oracles import examples

import difftto
from difftto.regularizers import Proximal, check_weights

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3)


@settings(max_examples=examples(200))
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), n=st.integers(1, 10))
def test_proximal_closed_forms_equal_autograd(seed, batch, n):
    g = torch.Generator().manual_seed(seed)
    theta, anchor, u = (torch.randn(batch, n, generator=g, dtype=torch.float64) for _ in range(3))
    lam = torch.rand(batch, n, generator=g, dtype=torch.float64)
    prox = Proximal(anchor, lam)
    t = theta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(prox.value(t).sum(), t, create_graph=True)
    torch.testing.assert_close(grad, prox.gradient(theta))
    (hess_u,) = torch.autograd.grad(grad, t, u)
    torch.testing.assert_close(hess_u, prox.hessian_diagonal() * u)
    # Cross terms: the IFT's ∂/∂θ0 and ∂/∂Λ of −⟨∇θR, u⟩ (the sign of the implicit formula).
    a = anchor.clone().requires_grad_(True)
    w = lam.clone().requires_grad_(True)
    cross = -(Proximal(a, w).gradient(theta) * u).sum()
    ga, gw = torch.autograd.grad(cross, (a, w))
    torch.testing.assert_close(ga, prox.anchor_cotangent(u))
    torch.testing.assert_close(gw, prox.weights_cotangent(theta, u))


@settings(max_examples=examples(200))
@given(batch=st.integers(1, 3), group=shapes, prefix=st.integers(0, 4), seed=st.integers(0, 1000))
def test_leading_prefix_weights_broadcast_over_trailing_dims(batch, group, prefix, seed):
    full = (batch, *group)
    k = min(prefix, len(full))
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(full[:k], generator=g, dtype=torch.float64) if k else torch.tensor(0.5, dtype=torch.float64)
    layout = difftto.Layout.of(torch.zeros(full, dtype=torch.float64))
    got = layout.expand(weights)
    want = weights.reshape(*weights.shape, *([1] * (len(full) - k))).expand(full).reshape(batch, -1)
    torch.testing.assert_close(got, want)


def test_invalid_weights_are_rejected_with_their_count():
    with pytest.raises(ValueError, match="2 negative"):
        check_weights(torch.tensor([1.0, -1.0, -2.0]))
    with pytest.raises(ValueError, match="1 non-finite"):
        check_weights(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="same \\[B, n\\] shape"):
        Proximal(torch.zeros(2, 3), torch.zeros(2, 4))
