"""PCG against dense solves, and its per-element status on systems it cannot solve.

The systems are random SPD matrices ``Q diag(λ) Qᵀ`` with a chosen condition number
(hypothesis picks shape, dtype, conditioning and a seed; torch draws the entries).
Accuracy is asserted with the forward-error bound ``‖x − x*‖ ≤ κ ‖b − A x‖ / ‖b‖ · ‖x*‖``
(measured residual in float64), so no tolerance is tuned to what PCG happens to reach.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difftto.operators import DiagonalOperator, FunctionOperator
from difftto.solvers import (
    PCG,
    LinearSolveError,
    LinearSolveWarning,
    Status,
)

DTYPES = (torch.float32, torch.float64)
# Tolerances PCG is asked for, and the worst conditioning it is asked to reach them on:
# ε·κ must stay well below rtol, since no method beats the rounding of A x itself.
RTOL = {torch.float32: 1e-4, torch.float64: 1e-9}
MAX_COND = {torch.float32: 1e2, torch.float64: 1e6}


def random_spd(batch: int, n: int, cond: float, seed: int, scale: float = 1.0) -> torch.Tensor:
    """``[batch, n, n]`` float64 SPD matrices, eigenvalues log-spread over ``[1, cond]``
    (both ends present when ``n > 1``), times ``scale``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))
    t = torch.rand(batch, n, generator=g, dtype=torch.float64)
    if n > 1:
        t[:, 0], t[:, 1] = 0.0, 1.0
    eig = scale * cond**t
    a = q @ torch.diag_embed(eig) @ q.transpose(-1, -2)
    return 0.5 * (a + a.transpose(-1, -2))


def dense_operator(a: torch.Tensor, *, with_diagonal: bool = True, **flags) -> FunctionOperator:
    """A matrix-free view of dense ``a [B, n, n]`` (SPD declared unless overridden)."""
    flags = {"symmetric": True, "positive_definite": True} | flags
    batch, n, _ = a.shape
    return FunctionOperator(
        lambda v: (a @ v[..., None])[..., 0],
        (batch, n),
        a.dtype,
        diagonal=a.diagonal(dim1=-2, dim2=-1).clone() if with_diagonal else None,
        **flags,
    )


def check_against_dense(a: torch.Tensor, b: torch.Tensor, result, rtol: float) -> None:
    """Status, reported residual and forward error of ``result`` against a float64 solve."""
    a64, b64 = a.double(), b.double()
    x = result.solution.double()
    x_ref = torch.linalg.solve(a64, b64)
    eig = torch.linalg.eigvalsh(a64)
    cond = eig[:, -1] / eig[:, 0]
    b_norm = b64.norm(dim=1)
    res = (b64 - (a64 @ x[..., None])[..., 0]).norm(dim=1) / b_norm
    eps = torch.finfo(a.dtype).eps
    assert (result.status == Status.CONVERGED).all(), result.describe()
    assert (result.relative_residual <= rtol).all(), result.relative_residual
    # The residual PCG reports is its own (working-precision) b − A x: it agrees with
    # the float64 one up to the rounding of A x.
    rounding = 4 * n_eff(a) * eps * cond
    assert torch.allclose(result.relative_residual.double(), res, rtol=0.0, atol=float(rounding.max()) + 1e-15)
    # Forward error bound; x_ref itself carries ~ε64·κ of error.
    err = (x - x_ref).norm(dim=1)
    bound = cond * res * x_ref.norm(dim=1) * 1.01 + 1e-12 * cond * x_ref.norm(dim=1)
    assert (err <= bound).all(), (err, bound)


def n_eff(a: torch.Tensor) -> int:
    return max(int(a.shape[-1]) ** 0.5, 1.0)


systems = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 4),
        "n": st.integers(1, 48),
        "dtype": st.sampled_from(DTYPES),
        "log_cond": st.floats(0.0, 1.0),  # fraction of MAX_COND's exponent
        "log_scale": st.floats(-3.0, 3.0),
        "seed": st.integers(0, 2**31 - 1),
    }
)


def build(system):
    dtype = system["dtype"]
    cond = MAX_COND[dtype] ** system["log_cond"]
    a = random_spd(system["batch"], system["n"], cond, system["seed"], 10 ** system["log_scale"])
    g = torch.Generator().manual_seed(system["seed"] + 1)
    b = torch.randn(system["batch"], system["n"], generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


@given(systems, st.sampled_from(["jacobi", "identity"]))
def test_pcg_matches_dense_solve(system, preconditioner):
    a, b = build(system)
    rtol = RTOL[a.dtype]
    n = a.shape[-1]
    result = PCG(rtol=rtol, max_iter=20 * n + 50, on_failure="raise").solve(
        dense_operator(a), b, preconditioner=preconditioner
    )
    check_against_dense(a, b, result, rtol)
    assert result.solution.dtype == a.dtype
    assert (result.iterations <= 20 * n + 50).all()


@settings(max_examples=5)
@given(
    n=st.sampled_from([700, 1500, 4000]),
    rank=st.integers(1, 8),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_pcg_large_matrix_free_diagonal_plus_low_rank(n, rank, dtype, seed):
    """n in the thousands, ``A = D + U Uᵀ`` applied matrix-free. The reference is the
    Woodbury solve, the condition number bounded by ``(max D + ‖U‖²) / min D``: no
    ``O(n³)`` oracle, so large n stays cheap."""
    g = torch.Generator().manual_seed(seed)
    d64 = 10 ** (torch.rand(1, n, generator=g, dtype=torch.float64) * 2)  # κ(D) ≤ 100
    u64 = torch.randn(1, n, rank, generator=g, dtype=torch.float64) / n**0.5
    b64 = torch.randn(1, n, generator=g, dtype=torch.float64)
    d, u, b = d64.to(dtype), u64.to(dtype), b64.to(dtype)

    def mv(v):
        return d * v + (u @ (u.transpose(1, 2) @ v[..., None]))[..., 0]

    op = FunctionOperator(mv, (1, n), dtype, diagonal=d + (u * u).sum(-1),
                          symmetric=True, positive_definite=True)
    rtol = RTOL[dtype]
    result = PCG(rtol=rtol, on_failure="raise").solve(op, b)
    assert result.all_converged
    # Jacobi on diagonal + rank r: about r + (a few for D) iterations, far below n.
    assert int(result.iterations.max()) < 100

    d64, u64 = d.double(), u.double()  # the system actually solved
    dinv_b, dinv_u = b64 / d64, u64 / d64[..., None]
    small = torch.eye(rank, dtype=torch.float64) + u64.transpose(1, 2) @ dinv_u
    x_ref = dinv_b - (dinv_u @ torch.linalg.solve(small, u64.transpose(1, 2) @ dinv_b[..., None]))[..., 0]
    x = result.solution.double()
    res = (b64 - d64 * x - (u64 @ (u64.transpose(1, 2) @ x[..., None]))[..., 0]).norm() / b64.norm()
    eps = torch.finfo(dtype).eps
    cond = float((d64.max() + (u64 * u64).sum()) / d64.min())
    assert float(res) <= rtol + 4 * n**0.5 * eps * cond
    torch.testing.assert_close(result.relative_residual.double(), res[None], rtol=0,
                               atol=4 * n**0.5 * eps * cond)
    assert float((x - x_ref).norm()) <= 1.01 * cond * float(res) * float(x_ref.norm()) + 1e-10


@given(
    n=st.integers(60, 150),
    spread=st.floats(3.0, 6.0),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_jacobi_cuts_iterations_on_badly_scaled_diagonal(n, spread, dtype, seed):
    """``A = S C S`` with ``C`` well conditioned and ``S`` spanning ``10^spread``: Jacobi
    undoes ``S`` (up to C's own diagonal), the identity does not."""
    g = torch.Generator().manual_seed(seed)
    c = random_spd(1, n, 4.0, seed)
    s = 10 ** (spread / 2 * torch.rand(1, n, generator=g, dtype=torch.float64))
    a = (s[:, :, None] * c * s[:, None, :]).to(dtype)
    b = torch.randn(1, n, generator=g, dtype=torch.float64).to(dtype)
    op = dense_operator(a)
    # A loose tolerance: the identity run must be able to reach it too (κ up to ~10^7).
    solver = PCG(rtol=1e-2 if dtype == torch.float32 else 1e-6, max_iter=50 * n,
                 on_failure="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LinearSolveWarning)
        plain = solver.solve(op, b, preconditioner="identity")
    jacobi = solver.solve(op, b, preconditioner="jacobi")
    assert jacobi.all_converged, jacobi.describe()
    # CG on C (κ ≤ 4 after a diagonal scaling that is within a factor of C's diagonal)
    # needs few iterations; the unscaled A needs many more, or does not converge.
    assert int(jacobi.iterations[0]) <= 30
    assert int(jacobi.iterations[0]) * 2 <= int(plain.iterations[0])


@given(systems, st.sampled_from(["jacobi", "identity"]))
def test_batched_equals_per_element(system, preconditioner):
    a, b = build(system)
    rtol = RTOL[a.dtype]
    solver = PCG(rtol=rtol, max_iter=20 * a.shape[-1] + 50, on_failure="raise")
    batched = solver.solve(dense_operator(a), b, preconditioner=preconditioner)
    for i in range(a.shape[0]):
        single = solver.solve(dense_operator(a[i : i + 1]), b[i : i + 1],
                              preconditioner=preconditioner)
        # Each element runs its own α, β: the same algorithm whatever its neighbours do.
        # Batched and single matmuls round differently, and on badly conditioned systems
        # CG's path amplifies rounding (loss of orthogonality), so iteration counts are
        # only compared on well-conditioned systems (the test below); here both runs
        # must meet the tolerance and agree within the forward-error bound.
        assert single.status[0] == batched.status[i] == Status.CONVERGED
        scale = float(single.solution[0].norm()) + 1e-30
        eig = torch.linalg.eigvalsh(a[i].double())
        cond = float(eig[-1] / eig[0])
        # Each is within κ·(rtol + rounding of its own residual) of the exact solution.
        rounding = 4 * n_eff(a) * torch.finfo(a.dtype).eps * cond
        tol = 2.05 * cond * (rtol + rounding) * scale
        assert float((single.solution[0] - batched.solution[i]).norm()) <= tol


def test_batched_equals_per_element_iteration_for_iteration():
    """Well-conditioned float64 elements never restart: iteration counts equal up to one
    (the residual can cross the threshold one step apart, since batched matmuls round
    differently from single ones), solutions equal up to rounding."""
    a = random_spd(5, 30, 10.0, seed=3)
    b = torch.randn(5, 30, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    solver = PCG(rtol=1e-10, on_failure="raise")
    batched = solver.solve(dense_operator(a), b)
    for i in range(5):
        single = solver.solve(dense_operator(a[i : i + 1]), b[i : i + 1])
        assert abs(int(single.iterations[0]) - int(batched.iterations[i])) <= 1
        # κ = 10, rtol = 1e-10: each is within 1e-9 of the exact solution.
        torch.testing.assert_close(single.solution[0], batched.solution[i], rtol=2e-9, atol=0)


def test_b_zero_elements_return_zero_without_iterating():
    a = random_spd(3, 10, 100.0, seed=0)
    b = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    b[1] = 0.0
    result = PCG(rtol=1e-10, on_failure="raise").solve(dense_operator(a), b)
    assert result.status.tolist() == [Status.CONVERGED] * 3
    assert torch.equal(result.solution[1], torch.zeros(10, dtype=torch.float64))
    assert int(result.iterations[1]) == 0 and float(result.relative_residual[1]) == 0.0
    assert int(result.iterations[0]) > 0
    all_zero = PCG(on_failure="raise").solve(dense_operator(a), torch.zeros_like(b))
    assert all_zero.all_converged and int(all_zero.iterations.max()) == 0
    assert torch.equal(all_zero.solution, torch.zeros_like(b))


def test_empty_system():
    op = DiagonalOperator(torch.ones(2, 0), positive_definite=True)
    result = PCG(on_failure="raise").solve(op, torch.zeros(2, 0))
    assert result.solution.shape == (2, 0) and result.all_converged


@given(systems, st.floats(0.0, 1.0))
def test_x0_start(system, perturbation):
    a, b = build(system)
    rtol = RTOL[a.dtype]
    solver = PCG(rtol=rtol, max_iter=20 * a.shape[-1] + 50, on_failure="raise")
    x_ref = torch.linalg.solve(a.double(), b.double())
    g = torch.Generator().manual_seed(system["seed"] + 2)
    x0 = (x_ref + perturbation * torch.randn(x_ref.shape, generator=g, dtype=torch.float64)
          * x_ref.norm(dim=1, keepdim=True)).to(a.dtype)
    result = solver.solve(dense_operator(a), b, x0=x0)
    check_against_dense(a, b, result, rtol)


def test_exact_x0_needs_no_iteration_and_x0_is_not_modified():
    a = random_spd(2, 8, 10.0, seed=5)
    x_true = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    b = (a @ x_true[..., None])[..., 0]
    x0 = x_true.clone()
    result = PCG(rtol=1e-8, on_failure="raise").solve(dense_operator(a), b, x0=x0)
    assert result.iterations.tolist() == [0, 0]
    assert torch.equal(x0, x_true)
    with pytest.raises(ValueError, match=r"x0 must have shape \(2, 8\)"):
        PCG().solve(dense_operator(a), b, x0=x0[:, :3])


# --- systems PCG cannot solve: reported, never silent -------------------------------


def hard_system(batch=3, n=40, seed=0):
    """κ = 10^5 and a budget of 3 iterations: no element can reach rtol = 1e-10."""
    a = random_spd(batch, n, 1e5, seed)
    b = torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return a, b


def test_max_iter_reached_is_reported():
    a, b = hard_system()
    result = PCG(rtol=1e-10, max_iter=3, on_failure="warn")
    with pytest.warns(LinearSolveWarning, match="MAX_ITER_REACHED"):
        out = result.solve(dense_operator(a), b, preconditioner="identity")
    assert out.status.tolist() == [Status.MAX_ITER_REACHED] * 3
    assert out.iterations.tolist() == [3, 3, 3]
    assert (out.relative_residual > 1e-10).all()
    res = (b - (a @ out.solution[..., None])[..., 0]).norm(dim=1) / b.norm(dim=1)
    torch.testing.assert_close(out.relative_residual, res)


def test_policy_raise_names_the_failed_elements():
    a, b = hard_system()
    b[1] = 0.0  # this one converges trivially
    with pytest.raises(LinearSolveError, match=r"2 of 3 batch elements(.|\n)*batch element 0"):
        PCG(rtol=1e-10, max_iter=3, on_failure="raise").solve(dense_operator(a), b)


def test_policy_warn_keeps_last_iterate_and_points_at_caller():
    a, b = hard_system()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = PCG(rtol=1e-10, max_iter=3, on_failure="warn").solve(dense_operator(a), b)
    (w,) = [w for w in caught if issubclass(w.category, LinearSolveWarning)]
    assert w.filename == __file__, w.filename  # not torch's no_grad wrapper, not difftto
    # Same as four iterations of an unbounded run stopped after 3: the last iterate.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LinearSolveWarning)
        again = PCG(rtol=1e-10, max_iter=3, on_failure="zero").solve(dense_operator(a), b)
    assert not torch.equal(out.solution, again.solution)
    assert (out.solution.abs().sum(1) > 0).all()


def test_policy_zero_zeroes_only_failed_elements():
    a, b = hard_system()
    b[1] = 0.0
    a[2] = torch.eye(40, dtype=torch.float64) * 3.0  # converges in one iteration
    with pytest.warns(LinearSolveWarning, match="set to zero"):
        out = PCG(rtol=1e-10, max_iter=3, on_failure="zero").solve(dense_operator(a), b)
    assert out.status.tolist() == [Status.MAX_ITER_REACHED, Status.CONVERGED, Status.CONVERGED]
    assert torch.equal(out.solution[0], torch.zeros(40, dtype=torch.float64))
    torch.testing.assert_close(out.solution[2], b[2] / 3.0)
    assert float(out.relative_residual[0]) == 1.0  # the residual of x = 0


@given(max_iter=st.integers(1, 12), seed=st.integers(0, 1000))
def test_policy_best_returns_smallest_residual_iterate(max_iter, seed):
    """CG's residual norm is not monotone, so the best iterate is not always the last.
    The best one must be the one with the smallest residual among all iterates."""
    a, b = hard_system(batch=2, n=30, seed=seed)
    op = dense_operator(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LinearSolveWarning)
        best = PCG(rtol=1e-12, max_iter=max_iter, on_failure="best").solve(
            op, b, preconditioner="identity")
        iterates = [torch.zeros_like(b)] + [
            PCG(rtol=1e-12, max_iter=k, on_failure="warn")
            .solve(op, b, preconditioner="identity").solution
            for k in range(1, max_iter + 1)
        ]
    assert (best.status == Status.MAX_ITER_REACHED).all()
    residuals = torch.stack(
        [(b - (a @ x[..., None])[..., 0]).norm(dim=1) / b.norm(dim=1) for x in iterates]
    )  # [K+1, B]
    smallest = residuals.min(dim=0).values
    torch.testing.assert_close(best.relative_residual, smallest, rtol=1e-6, atol=0)
    own = (b - (a @ best.solution[..., None])[..., 0]).norm(dim=1) / b.norm(dim=1)
    torch.testing.assert_close(best.relative_residual, own)
    assert (best.relative_residual <= residuals[-1] * (1 + 1e-12)).all()


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="on_failure must be one of"):
        PCG(on_failure="ignore")
    a, b = hard_system()
    with pytest.raises(ValueError, match="'ignore'"):
        PCG().solve(dense_operator(a), b, on_failure="ignore")


# --- non-finite inputs -------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_rhs(bad, dtype):
    a = random_spd(3, 12, 10.0, seed=1).to(dtype)
    b = torch.randn(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    b = b.to(dtype)
    b[1, 4] = bad
    with pytest.warns(LinearSolveWarning, match="NON_FINITE_INPUT"):
        out = PCG(rtol=RTOL[dtype], on_failure="warn").solve(dense_operator(a), b)
    assert out.status.tolist() == [Status.CONVERGED, Status.NON_FINITE_INPUT, Status.CONVERGED]
    assert torch.isnan(out.solution[1]).all()  # never a silent zero
    assert torch.isnan(out.relative_residual[1])
    assert torch.isfinite(out.solution[[0, 2]]).all()
    with pytest.raises(LinearSolveError, match="NON_FINITE_INPUT"):
        PCG(on_failure="raise").solve(dense_operator(a), b)


class PoisonedOperator(FunctionOperator):
    """``A v``, except that from product number ``start`` on, batch element ``element``
    of the output holds ``value`` at entry 0. Counts its products."""

    def __init__(self, a, start, element, value):
        super().__init__(lambda v: (a @ v[..., None])[..., 0], tuple(a.shape[:2]), a.dtype,
                         diagonal=a.diagonal(dim1=-2, dim2=-1).clone(), symmetric=True,
                         positive_definite=True)
        self.start, self.element, self.value, self.calls = start, element, value, 0

    def mv(self, v):
        out = super().mv(v)
        if self.calls >= self.start:
            out = out.clone()
            out[self.element, 0] = self.value
        self.calls += 1
        return out


@given(
    start=st.integers(0, 60),
    element=st.integers(0, 2),
    value=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    use_x0=st.booleans(),
    recompute_every=st.sampled_from([2, 5, 50]),
    dtype=st.sampled_from(DTYPES),
)
def test_non_finite_operator_output(start, element, value, use_x0, recompute_every, dtype):
    """However late the operator turns non-finite (start vector, loop, residual
    replacement, restart check, final residual), the element is reported as
    NON_FINITE_INPUT, and the others are unaffected."""
    a = random_spd(3, 20, 1e2, seed=7).to(dtype)
    b = torch.randn(3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    b = b.to(dtype)
    x0 = torch.zeros_like(b) if use_x0 else None
    op = PoisonedOperator(a, start, element, value)
    rtol = RTOL[dtype]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LinearSolveWarning)
        out = PCG(rtol=rtol, max_iter=200, recompute_every=recompute_every,
                  on_failure="warn").solve(op, b, x0=x0)
    others = [i for i in range(3) if i != element]
    if op.calls > start:  # the poison was seen
        assert out.status[element] == Status.NON_FINITE_INPUT, out.describe()
    else:
        assert out.status[element] == Status.CONVERGED
    assert (out.status[others] == Status.CONVERGED).all(), out.describe()
    assert (out.relative_residual[others] <= rtol).all()
    assert torch.isfinite(out.solution[others]).all()


def test_non_finite_x0():
    a = random_spd(2, 6, 10.0, seed=1)
    b = torch.ones(2, 6, dtype=torch.float64)
    x0 = torch.zeros(2, 6, dtype=torch.float64)
    x0[0, 2] = float("nan")
    with pytest.warns(LinearSolveWarning):
        out = PCG(on_failure="warn").solve(dense_operator(a), b, x0=x0)
    assert out.status.tolist() == [Status.NON_FINITE_INPUT, Status.CONVERGED]


# --- operators that are not positive definite ---------------------------------------


@given(systems)
def test_negative_definite_gives_breakdown(system):
    a, b = build(system)
    op = dense_operator(-a, positive_definite=False)
    with pytest.warns(LinearSolveWarning, match="BREAKDOWN"):
        out = PCG(on_failure="warn").solve(op, b, preconditioner="identity")
    assert (out.status == Status.BREAKDOWN).all()
    assert (out.iterations == 0).all()


def test_indefinite_along_a_negative_direction_gives_breakdown():
    a = torch.diag(torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64))[None]
    b = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    with pytest.raises(LinearSolveError, match="BREAKDOWN(.|\n)*not positive"):
        PCG(on_failure="raise").solve(dense_operator(a, positive_definite=False), b)


@given(
    n=st.integers(2, 30),
    negatives=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_indefinite_is_never_reported_converged_wrongly(n, negatives, seed):
    """CG may or may not break down on an indefinite system; whatever status it gives
    must be true: CONVERGED only with the true residual within tolerance."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(1, n, n, generator=g, dtype=torch.float64))
    eig = 1 + 9 * torch.rand(1, n, generator=g, dtype=torch.float64)
    eig[:, : min(negatives, n - 1)] *= -1
    a = q @ torch.diag_embed(eig) @ q.transpose(-1, -2)
    a = 0.5 * (a + a.transpose(-1, -2))
    b = torch.randn(1, n, generator=g, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LinearSolveWarning)
        out = PCG(rtol=1e-8, on_failure="warn").solve(
            dense_operator(a, positive_definite=False), b, preconditioner="identity")
    status = Status(int(out.status[0]))
    assert status in (Status.CONVERGED, Status.BREAKDOWN, Status.MAX_ITER_REACHED)
    res = float((b - (a @ out.solution[..., None])[..., 0]).norm() / b.norm())
    if status == Status.CONVERGED:
        assert res <= 1e-8
    else:
        assert res > 1e-8 or status == Status.BREAKDOWN


def test_non_symmetric_operator_is_refused():
    a = torch.randn(1, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="not declared symmetric"):
        PCG().solve(dense_operator(a, symmetric=False), torch.ones(1, 4, dtype=torch.float64))


def test_operator_returning_wrong_shape_is_named():
    op = FunctionOperator(lambda v: v[:, :2], (1, 4), torch.float64, symmetric=True)
    with pytest.raises(ValueError, match=r"operator.mv returned shape \(1, 2\)"):
        PCG().solve(op, torch.ones(1, 4, dtype=torch.float64))


def test_mismatched_b_is_named():
    op = DiagonalOperator(torch.ones(2, 4), positive_definite=True)
    with pytest.raises(ValueError, match=r"b must have shape \(2, 4\).*got \(2, 5\)"):
        PCG().solve(op, torch.ones(2, 5))


def test_constructor_validation():
    with pytest.raises(ValueError, match="rtol and atol"):
        PCG(rtol=-1.0)
    with pytest.raises(ValueError, match="max_iter"):
        PCG(max_iter=-2)
    with pytest.raises(ValueError, match="backend must be one of"):
        PCG(backend="numpy")
    with pytest.raises(ValueError, match="check_every"):
        PCG(check_every=0)


def test_atol_stops_early():
    a = random_spd(1, 30, 1e4, seed=2)
    b = torch.randn(1, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    loose = PCG(rtol=0.0, atol=1e-1 * float(b.norm()), on_failure="raise").solve(
        dense_operator(a), b)
    tight = PCG(rtol=1e-10, max_iter=1000, on_failure="raise").solve(dense_operator(a), b)
    assert int(loose.iterations[0]) < int(tight.iterations[0])
    assert float(loose.relative_residual[0]) <= 1e-1


def test_jacobi_without_diagonal_falls_back_to_identity():
    a = random_spd(2, 10, 10.0, seed=0)
    b = torch.ones(2, 10, dtype=torch.float64)
    without = PCG(rtol=1e-10, on_failure="raise").solve(dense_operator(a, with_diagonal=False), b)
    plain = PCG(rtol=1e-10, on_failure="raise").solve(dense_operator(a), b,
                                                      preconditioner="identity")
    torch.testing.assert_close(without.solution, plain.solution, rtol=0, atol=0)


def test_solution_carries_no_graph():
    d = torch.rand(2, 5, dtype=torch.float64, requires_grad=True)
    op = DiagonalOperator(d + 1.0, positive_definite=True)
    out = PCG(rtol=1e-12, on_failure="raise").solve(op, torch.ones(2, 5, dtype=torch.float64))
    assert not out.solution.requires_grad


def test_cpu_backends():
    """``auto`` on CPU tensors is the torch path; ``cupy`` on CPU names what is missing."""
    a = random_spd(2, 10, 10.0, seed=0)
    b = torch.ones(2, 10, dtype=torch.float64)
    auto = PCG(rtol=1e-10, backend="auto", on_failure="raise").solve(dense_operator(a), b)
    plain = PCG(rtol=1e-10, backend="torch", on_failure="raise").solve(dense_operator(a), b)
    torch.testing.assert_close(auto.solution, plain.solution, rtol=0, atol=0)


@pytest.mark.parametrize("where", ["start vector", "final residual", "residual replacement"])
def test_non_finite_operator_output_at_each_stage(where):
    """The stages the loop's own ``p·Ap`` check does not see."""
    a = random_spd(2, 20, 1e2, seed=7)
    b = torch.randn(2, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    clean = PoisonedOperator(a, start=10**9, element=0, value=float("nan"))
    solver = PCG(rtol=1e-10, max_iter=200, recompute_every=4, on_failure="warn")
    reference = solver.solve(clean, b, x0=torch.zeros_like(b))
    assert reference.all_converged
    # Products: 1 (r0 from x0) + iterations + replacements + true-residual checks + 1.
    start = {"start vector": 0, "final residual": clean.calls - 1, "residual replacement": 5}
    op = PoisonedOperator(a, start=start[where], element=0, value=float("nan"))
    with pytest.warns(LinearSolveWarning, match="NON_FINITE_INPUT"):
        out = solver.solve(op, b, x0=torch.zeros_like(b))
    assert out.status.tolist() == [Status.NON_FINITE_INPUT, Status.CONVERGED]


class CountingOperator(FunctionOperator):
    """Dense ``a`` that counts its products (one per iteration, plus the checks')."""

    def __init__(self, a):
        super().__init__(lambda v: (a @ v[..., None])[..., 0], tuple(a.shape[:2]), a.dtype,
                         diagonal=a.diagonal(dim1=-2, dim2=-1).clone(), symmetric=True,
                         positive_definite=True)
        self.calls = 0

    def mv(self, v):
        self.calls += 1
        return super().mv(v)


@pytest.mark.parametrize("seed", range(4))
def test_default_check_interval_on_cpu_is_every_iteration(seed):
    """On the CPU the default looks after every iteration: the same result as looking
    every 10 (elements that converged stop changing), and no idle iterations after the
    last element converged."""
    a = random_spd(3, 30, 1e3, seed=seed)
    b = torch.randn(3, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    every, tenth = CountingOperator(a), CountingOperator(a)
    got = PCG(rtol=1e-8, on_failure="raise").solve(every, b)
    ref = PCG(rtol=1e-8, check_every=10, on_failure="raise").solve(tenth, b)
    assert got.status.tolist() == ref.status.tolist()
    assert got.iterations.tolist() == ref.iterations.tolist()
    torch.testing.assert_close(got.solution, ref.solution, rtol=0, atol=0)
    # Products: one per iteration run, one per residual replacement (every 50), and the
    # convergence check's true residual, which is also the reported one (x is unchanged).
    last = int(got.iterations.max())
    ran = -(-last // 10) * 10  # looking every 10: up to the next multiple of 10
    assert every.calls == last + last // 50 + 1
    assert tenth.calls == ran + ran // 50 + 1
    true = torch.linalg.vector_norm(b - (a @ got.solution[..., None])[..., 0], dim=1) / b.norm(dim=1)
    torch.testing.assert_close(got.relative_residual, true, rtol=1e-12, atol=0)
