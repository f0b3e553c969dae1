"""The dense Cholesky oracle: correct where it applies, and honest where it does not."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from difftto.operators import FunctionOperator
from difftto.solvers import PCG, DenseCholesky, LinearSolveError, LinearSolveWarning, Status


def spd(batch, n, cond, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))
    eig = cond ** torch.rand(batch, n, generator=g, dtype=torch.float64)
    a = q @ torch.diag_embed(eig) @ q.transpose(-1, -2)
    return (0.5 * (a + a.transpose(-1, -2))).to(dtype)


def operator(a, **flags):
    flags = {"symmetric": True, "positive_definite": True} | flags
    return FunctionOperator(lambda v: (a @ v[..., None])[..., 0], tuple(a.shape[:2]), a.dtype,
                            diagonal=a.diagonal(dim1=-2, dim2=-1).clone(), **flags)


@given(
    batch=st.integers(1, 4),
    n=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    log_cond=st.floats(0.0, 4.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_dense_matches_linalg_solve(batch, n, dtype, log_cond, seed):
    a = spd(batch, n, 10**log_cond, seed, dtype)
    b = torch.randn(batch, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    out = DenseCholesky(on_failure="raise").solve(operator(a), b)
    eps = torch.finfo(dtype).eps
    x_ref = torch.linalg.solve(a.double(), b.double())
    # Cholesky is backward stable: forward error O(n ε κ).
    rel_err = (out.solution.double() - x_ref).norm(dim=1) / x_ref.norm(dim=1)
    assert (rel_err <= 10 * n * eps * 10**log_cond).all()
    assert out.all_converged and (out.iterations == 0).all()
    assert (out.relative_residual <= 10 * n * eps * 10**log_cond).all()


def test_dense_agrees_with_pcg():
    a = spd(3, 25, 100.0, seed=1)
    b = torch.randn(3, 25, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    dense = DenseCholesky(on_failure="raise").solve(operator(a), b)
    pcg = PCG(rtol=1e-12, max_iter=500, on_failure="raise").solve(operator(a), b)
    torch.testing.assert_close(dense.solution, pcg.solution, rtol=1e-8, atol=1e-10)


def test_not_positive_definite_is_breakdown():
    a = spd(2, 5, 10.0, seed=0)
    a[1] = -a[1]
    b = torch.ones(2, 5, dtype=torch.float64)
    with pytest.warns(LinearSolveWarning, match="BREAKDOWN"):
        out = DenseCholesky(on_failure="warn").solve(operator(a, positive_definite=False), b)
    assert out.status.tolist() == [Status.CONVERGED, Status.BREAKDOWN]
    with pytest.raises(LinearSolveError, match="batch element 1: BREAKDOWN"):
        DenseCholesky(on_failure="raise").solve(operator(a, positive_definite=False), b)


def test_non_finite_is_reported_not_zeroed():
    a = spd(3, 4, 10.0, seed=0)
    b = torch.ones(3, 4, dtype=torch.float64)
    b[0, 1] = float("nan")
    a[2, 0, 0] = float("inf")
    with pytest.warns(LinearSolveWarning, match="NON_FINITE_INPUT"):
        out = DenseCholesky().solve(operator(a), b)
    assert out.status.tolist() == [Status.NON_FINITE_INPUT, Status.CONVERGED,
                                   Status.NON_FINITE_INPUT]
    assert torch.isnan(out.solution[[0, 2]]).all()
    assert torch.isfinite(out.solution[1]).all()


def test_zero_policy_and_warning_location():
    a = -spd(1, 3, 10.0, seed=0)
    with pytest.warns(LinearSolveWarning) as record:
        out = DenseCholesky(on_failure="zero").solve(operator(a, positive_definite=False),
                                                     torch.ones(1, 3, dtype=torch.float64))
    assert record[0].filename == __file__
    assert torch.equal(out.solution, torch.zeros(1, 3, dtype=torch.float64))
    assert out.status.tolist() == [Status.BREAKDOWN]


def test_non_symmetric_is_refused():
    a = torch.randn(1, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="DenseCholesky needs a symmetric operator"):
        DenseCholesky().solve(operator(a, symmetric=False), torch.ones(1, 3, dtype=torch.float64))
