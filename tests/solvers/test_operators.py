"""Operator algebra: products, diagonals, materialization and declared structure."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from difftto.operators import (
    DiagonalOperator,
    FunctionOperator,
    GaussNewtonOperator,
    HessianOperator,
    LinearOperator,
    ScaledOperator,
    SumOperator,
    materialize,
)

shapes = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 4),
        "n": st.integers(0, 12),
        "dtype": st.sampled_from([torch.float32, torch.float64]),
        "seed": st.integers(0, 2**31 - 1),
    }
)


def matrices(shape, count=1):
    g = torch.Generator().manual_seed(shape["seed"])
    b, n = shape["batch"], shape["n"]
    return [torch.randn(b, n, n, generator=g, dtype=shape["dtype"]) for _ in range(count)]


def vector(shape, seed_offset=0):
    g = torch.Generator().manual_seed(shape["seed"] + 1 + seed_offset)
    return torch.randn(shape["batch"], shape["n"], generator=g, dtype=shape["dtype"])


def matrix_operator(a, **flags):
    return FunctionOperator(lambda v: (a @ v[..., None])[..., 0], tuple(a.shape[:2]), a.dtype,
                            diagonal=a.diagonal(dim1=-2, dim2=-1).clone(), **flags)


def tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12,
                                                                         "atol": 1e-12}


@given(shapes)
def test_materialize_recovers_the_matrix(shape):
    (a,) = matrices(shape)
    torch.testing.assert_close(materialize(matrix_operator(a)), a, **tol(a.dtype))


@given(shapes, st.floats(-3.0, 3.0))
def test_sum_and_scale_act_like_their_matrices(shape, c):
    a, m = matrices(shape, 2)
    v = vector(shape)
    opa, opm = matrix_operator(a), matrix_operator(m)
    total = opa + opm
    assert isinstance(total, SumOperator)
    torch.testing.assert_close(total.mv(v), ((a + m) @ v[..., None])[..., 0], **tol(a.dtype))
    torch.testing.assert_close(total.diagonal(), (a + m).diagonal(dim1=-2, dim2=-1),
                               **tol(a.dtype))
    torch.testing.assert_close(materialize(total), a + m, **tol(a.dtype))
    for scaled in (c * opa, opa * c):
        assert isinstance(scaled, ScaledOperator)
        torch.testing.assert_close(scaled(v), c * (a @ v[..., None])[..., 0], **tol(a.dtype))
        torch.testing.assert_close(scaled.diagonal(), c * a.diagonal(dim1=-2, dim2=-1),
                                   **tol(a.dtype))


@given(shapes)
def test_per_batch_scale(shape):
    (a,) = matrices(shape)
    scale = torch.arange(1, shape["batch"] + 1, dtype=a.dtype)
    op = ScaledOperator(matrix_operator(a), scale)
    torch.testing.assert_close(materialize(op), scale[:, None, None] * a, **tol(a.dtype))
    torch.testing.assert_close(op.diagonal(),
                               scale[:, None] * a.diagonal(dim1=-2, dim2=-1), **tol(a.dtype))


@given(shapes)
def test_diagonal_operator(shape):
    d = vector(shape)
    op = DiagonalOperator(d)
    v = vector(shape, 1)
    torch.testing.assert_close(op.mv(v), d * v)
    torch.testing.assert_close(materialize(op), torch.diag_embed(d))
    assert op.diagonal() is d
    assert op.symmetric and not op.positive_definite


@given(shapes, st.integers(1, 6))
def test_gauss_newton_is_jt_j(shape, m):
    g = torch.Generator().manual_seed(shape["seed"])
    j = torch.randn(shape["batch"], m, shape["n"], generator=g, dtype=shape["dtype"])
    op = GaussNewtonOperator(lambda v: (j @ v[..., None])[..., 0],
                             lambda w: (j.transpose(1, 2) @ w[..., None])[..., 0],
                             (shape["batch"], shape["n"]), shape["dtype"])
    torch.testing.assert_close(materialize(op), j.transpose(1, 2) @ j, **tol(j.dtype))
    assert op.diagonal() is None


def test_diagonal_unknown_propagates_as_none():
    a = torch.randn(2, 3, 3)
    known = matrix_operator(a)
    unknown = FunctionOperator(lambda v: v, (2, 3))
    assert (known + unknown).diagonal() is None
    assert (2.0 * unknown).diagonal() is None
    assert unknown.diagonal() is None


def hessian(batch=2, n=3):
    return HessianOperator(lambda v: -v, (batch, n))


def gauss_newton(batch=2, n=3):
    return GaussNewtonOperator(lambda v: v, lambda w: w, (batch, n))


def proximal(batch=2, n=3, **flags):
    return DiagonalOperator(torch.ones(batch, n), **flags)


@pytest.mark.parametrize(
    "build, symmetric, positive_definite, semidefinite",
    [
        (lambda: gauss_newton(), True, False, True),
        (lambda: proximal(positive_definite=True), True, True, False),
        (lambda: gauss_newton() + proximal(positive_definite=True), True, True, True),
        (lambda: proximal(positive_definite=True) + gauss_newton(), True, True, True),
        # Λ ≥ 0 only: JᵀJ + diag(Λ) may be singular.
        (lambda: gauss_newton() + proximal(semidefinite=True), True, False, True),
        (lambda: gauss_newton() + proximal(), True, False, False),
        (lambda: gauss_newton() + gauss_newton(), True, False, True),
        (lambda: proximal(positive_definite=True) + proximal(positive_definite=True),
         True, True, True),
        # An exact Hessian has no declared definiteness: nor has any sum with it.
        (lambda: hessian() + proximal(positive_definite=True), True, False, False),
        (lambda: (gauss_newton() + proximal(positive_definite=True)) + hessian(),
         True, False, False),
        (lambda: hessian() + (gauss_newton() + proximal(positive_definite=True)),
         True, False, False),
        (lambda: FunctionOperator(lambda v: v, (2, 3)) + proximal(positive_definite=True),
         False, False, False),
        (lambda: 2.0 * (gauss_newton() + proximal(positive_definite=True)), True, True, True),
        (lambda: 0.0 * (gauss_newton() + proximal(positive_definite=True)), True, False, True),
        (lambda: -1.0 * (gauss_newton() + proximal(positive_definite=True)),
         True, False, False),
        (lambda: ScaledOperator(proximal(positive_definite=True), torch.tensor([1.0, -1.0])),
         True, False, False),
        (lambda: 3.0 * gauss_newton(), True, False, True),
    ],
)
def test_declared_structure(build, symmetric, positive_definite, semidefinite):
    op = build()
    assert op.symmetric is symmetric
    assert op.positive_definite is positive_definite
    assert op.positive_semidefinite is (semidefinite or positive_definite)


def test_function_operator_declares_what_it_is_told():
    op = FunctionOperator(lambda v: v, (1, 2), symmetric=True, semidefinite=True)
    assert op.symmetric and op.semidefinite and not op.positive_definite
    assert "symmetric" in repr(op)


def test_shape_errors_name_what_was_received():
    with pytest.raises(ValueError, match=r"\(B >= 1, n >= 0\), got \(0, 3\)"):
        FunctionOperator(lambda v: v, (0, 3))
    with pytest.raises(ValueError, match=r"diagonal must have shape \(2, 3\).*got \(2, 4\)"):
        FunctionOperator(lambda v: v, (2, 3), diagonal=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"\[B, n\], got \(3,\)"):
        DiagonalOperator(torch.ones(3))
    with pytest.raises(ValueError, match=r"shapes \(2, 3\) and \(2, 4\)"):
        proximal(2, 3) + proximal(2, 4)
    with pytest.raises(ValueError, match=r"scale must be a scalar or have shape \[B\] = \[2\]"):
        ScaledOperator(proximal(2, 3), torch.ones(3))
    with pytest.raises(TypeError, match="not multiplied"):
        proximal() * proximal()
    with pytest.raises(TypeError, match="can only add LinearOperators"):
        SumOperator(proximal(), torch.ones(2, 3))
    op = proximal(2, 3)
    with pytest.raises(ValueError, match=r"v must have shape \(2, 3\).*got \(3,\)"):
        op.check_vector(torch.ones(3))


def test_base_operator_needs_mv():
    op = LinearOperator((1, 2), torch.float32, "cpu")
    with pytest.raises(NotImplementedError):
        op.mv(torch.ones(1, 2))
    assert op.diagonal() is None


def test_materialize_empty():
    assert materialize(proximal(3, 0)).shape == (3, 0, 0)


def test_lazy_diagonal_is_computed_only_when_a_solve_preconditions_with_it():
    from difftto.operators import GaussNewtonOperator
    from difftto.solvers import PCG

    calls = []
    d = torch.tensor([[1.0, 4.0]], dtype=torch.float64)

    def diagonal():
        calls.append(1)
        return d

    op = GaussNewtonOperator(lambda v: v * d.sqrt(), lambda w: w * d.sqrt(), (1, 2), torch.float64, diagonal=diagonal)
    b = torch.ones(1, 2, dtype=torch.float64)
    PCG(preconditioner="identity").solve(op, b)
    assert calls == []
    PCG(preconditioner="jacobi").solve(op, b)
    PCG(preconditioner="jacobi").solve(op, b)
    assert calls == [1]  # computed once, then kept
    torch.testing.assert_close(op.diagonal(), d)
