"""``PCG(backend="compiled")`` against the torch backend: the same algorithm, its vector
work compiled (``difftto/solvers/compiled.py``).

Compiling costs about a second per function and input shape, so every test here uses
one of two systems' shapes (``SHAPES``): the compiled code of the first test is reused by
the others. The random systems, conditioning, right-hand sides, start vectors and failure
modes vary; the shapes do not. The torch backend is the oracle: same statuses, and
solutions that agree within the forward-error bound (the two backends round in another
order, e.g. fused multiply-adds, so their iterates are not bitwise equal).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difftto.operators import FunctionOperator
from difftto.solvers import PCG, LinearSolveWarning, Status, compiled
from tests.solvers.test_pcg import (
    MAX_COND,
    RTOL,
    PoisonedOperator,
    check_against_dense,
    dense_operator,
    n_eff,
    random_spd,
)

# (batch, n, dtype): the only shapes compiled for in this file.
SHAPES = ((3, 20, torch.float64), (2, 12, torch.float32))


def system(shape, log_cond: float, seed: int):
    batch, n, dtype = shape
    a = random_spd(batch, n, MAX_COND[dtype] ** log_cond, seed)
    b = torch.randn(batch, n, generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


def solve_both(a, b, **kwargs):
    """``(torch, compiled)`` results of the same solve (``solve`` keyword arguments among
    ``kwargs``: ``x0``, ``preconditioner``, ``operator``)."""
    solve_args = {k: kwargs.pop(k) for k in ("x0", "preconditioner") if k in kwargs}
    make_operator = kwargs.pop("operator", lambda: dense_operator(a))
    out = []
    for backend in ("torch", "compiled"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LinearSolveWarning)
            out.append(PCG(backend=backend, **kwargs).solve(make_operator(), b, **solve_args))
    return out


def assert_agree(a, eager, fused, rtol, rows=None):
    """Same statuses; solutions (of ``rows``, default all) within the sum of both
    forward-error bounds of each other."""
    assert fused.status.tolist() == eager.status.tolist(), (eager.describe(), fused.describe())
    rows = list(range(a.shape[0])) if rows is None else rows
    eig = torch.linalg.eigvalsh(a[rows].double())
    cond = eig[:, -1] / eig[:, 0]
    rounding = 4 * n_eff(a) * torch.finfo(a.dtype).eps * cond
    x_eager, x_fused = eager.solution[rows].double(), fused.solution[rows].double()
    tol = 2.05 * cond * (rtol + rounding) * (x_eager.norm(dim=1) + 1e-30)
    diff = (x_eager - x_fused).norm(dim=1)
    assert (diff <= tol).all(), (diff, tol)


@settings(max_examples=10)  # each example two solves; the compiled code is shared
@given(shape=st.sampled_from(SHAPES), log_cond=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**31 - 1), preconditioner=st.sampled_from(["jacobi", "identity"]),
       with_x0=st.booleans())
def test_compiled_solution_equals_torch_backend(shape, log_cond, seed, preconditioner, with_x0):
    a, b = system(shape, log_cond, seed)
    rtol = RTOL[a.dtype]
    x0 = (0.1 * torch.randn(b.shape, generator=torch.Generator().manual_seed(seed + 2),
                            dtype=torch.float64).to(a.dtype) if with_x0 else None)
    eager, fused = solve_both(a, b, rtol=rtol, max_iter=20 * shape[1] + 50, on_failure="raise",
                              preconditioner=preconditioner, x0=x0)
    check_against_dense(a, b, fused, rtol)
    assert fused.solution.dtype == a.dtype
    assert_agree(a, eager, fused, rtol)


def test_well_conditioned_iterations_equal_torch_backend():
    """κ = 10, float64: no threshold is crossed within rounding, so the iteration counts
    are those of the torch backend exactly."""
    a = random_spd(3, 20, 10.0, seed=3)
    b = torch.randn(3, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eager, fused = solve_both(a, b, rtol=1e-10, on_failure="raise")
    assert fused.iterations.tolist() == eager.iterations.tolist()
    torch.testing.assert_close(fused.solution, eager.solution, rtol=1e-9, atol=0)


def test_max_iter_and_best_iterate_as_torch_backend():
    a = random_spd(3, 20, 1e5, seed=0)
    b = torch.randn(3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    b[1] = 0.0  # converges without iterating
    eager, fused = solve_both(a, b, rtol=1e-10, max_iter=3, on_failure="best",
                              preconditioner="identity")
    assert fused.status.tolist() == [Status.MAX_ITER_REACHED, Status.CONVERGED,
                                     Status.MAX_ITER_REACHED]
    assert fused.status.tolist() == eager.status.tolist()
    assert fused.iterations.tolist() == eager.iterations.tolist() == [3, 0, 3]
    torch.testing.assert_close(fused.solution, eager.solution, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fused.relative_residual, eager.relative_residual,
                               rtol=1e-9, atol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=["float64", "float32"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rhs_as_torch_backend(shape, bad):
    a, b = system(shape, 0.5, seed=1)
    b[1, 4] = bad
    eager, fused = solve_both(a, b, rtol=RTOL[a.dtype], on_failure="warn")
    assert fused.status[1] == Status.NON_FINITE_INPUT
    assert fused.status.tolist() == eager.status.tolist()
    assert torch.isnan(fused.solution[1]).all() and torch.isnan(fused.relative_residual[1])
    assert torch.isfinite(fused.solution[[0]]).all()


# Product numbers at which the operator turns non-finite: the start vector (with x0),
# the loop's p·Ap, a residual replacement (recompute_every=4: product 5 is b − A x), the
# final residual.
@pytest.mark.parametrize("start", [0, 3, 5, 10**9 - 1])
@pytest.mark.parametrize("value", [float("nan"), -float("inf")])
def test_non_finite_operator_output_as_torch_backend(start, value):
    a = random_spd(3, 20, 1e2, seed=7)
    b = torch.randn(3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    if start == 10**9 - 1:  # the last product of the clean solve: the final residual
        clean = PoisonedOperator(a, 10**9, 0, value)
        PCG(rtol=1e-10, max_iter=200, recompute_every=4).solve(clean, b, x0=torch.zeros_like(b))
        start = clean.calls - 1
    eager, fused = solve_both(a, b, rtol=1e-10, max_iter=200, recompute_every=4,
                              on_failure="warn", x0=torch.zeros_like(b),
                              operator=lambda: PoisonedOperator(a, start, 1, value))
    assert fused.status.tolist() == [Status.CONVERGED, Status.NON_FINITE_INPUT, Status.CONVERGED]
    assert torch.isfinite(fused.solution[[0, 2]]).all()
    assert_agree(a, eager, fused, 1e-10, rows=[0, 2])


def test_breakdown_as_torch_backend():
    """Negative definite elements stop at once with BREAKDOWN, the others converge."""
    a = random_spd(3, 20, 10.0, seed=5)
    a[1] = -a[1]
    b = torch.randn(3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    eager, fused = solve_both(a, b, rtol=1e-10, on_failure="warn",
                              operator=lambda: dense_operator(a, positive_definite=False))
    assert fused.status.tolist() == [Status.CONVERGED, Status.BREAKDOWN, Status.CONVERGED]
    assert fused.status.tolist() == eager.status.tolist()
    assert fused.iterations[1] == 0


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    """Where inductor fails, the torch updates run, after one warning naming the reason."""
    import torch._inductor

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch._inductor, "compile", broken)
    monkeypatch.setattr(compiled, "_OPS", compiled.CompiledVectorOps())
    monkeypatch.setattr(compiled, "_WARNED", set())
    a, b = system(SHAPES[0], 0.5, seed=9)
    with pytest.warns(compiled.CompileFallbackWarning, match="no compiler here") as caught:
        eager, fused = solve_both(a, b, rtol=1e-10, on_failure="raise")
    # One warning per compiled function (step, advance, redirect, precondition, dot), not
    # one per call.
    assert len({str(w.message) for w in caught}) == len(caught) <= 5
    assert fused.iterations.tolist() == eager.iterations.tolist()
    torch.testing.assert_close(fused.solution, eager.solution, rtol=0, atol=0)


# The operator's product compiled into PCG's step (``CompiledVectorOps.product_step``):
# an operator that gives its product as a graph. One traced graph per shape, kept, so
# the fused step is compiled once per shape for every test below.
_GRAPHS: dict = {}


def dense_graph(shape):
    """``(v, a) ↦ a v`` traced once per ``(batch, n, dtype)``."""
    if shape not in _GRAPHS:
        from torch.fx.experimental.proxy_tensor import make_fx

        batch, n, dtype = shape
        _GRAPHS[shape] = make_fx(lambda v, a: (a @ v[..., None])[..., 0])(
            torch.zeros(batch, n, dtype=dtype), torch.zeros(batch, n, n, dtype=dtype))
    return _GRAPHS[shape]


class GraphOperator(FunctionOperator):
    """Dense ``a`` whose product is also given as a graph (:meth:`graph`); counts the
    products that go through :meth:`mv` (those the fused step does not make)."""

    def __init__(self, a, shape, positive_definite=True):
        super().__init__(lambda v: (a @ v[..., None])[..., 0], tuple(a.shape[:2]), a.dtype,
                         diagonal=a.diagonal(dim1=-2, dim2=-1).clone(), symmetric=True,
                         positive_definite=positive_definite)
        self.a, self.module, self.calls = a, dense_graph(shape), 0

    def mv(self, v):
        self.calls += 1
        return super().mv(v)

    def graph(self):
        return self.module, (self.a,)


def solve_both_with_graph(a, b, shape, **kwargs):
    """:func:`solve_both` on a :class:`GraphOperator`; also the two operators used."""
    made = []
    positive_definite = kwargs.pop("positive_definite", True)

    def operator():
        made.append(GraphOperator(a, shape, positive_definite))
        return made[-1]

    return (*solve_both(a, b, operator=operator, **kwargs), *made)


@settings(max_examples=6, deadline=None)  # each example two solves; the fused code is shared
@given(shape=st.sampled_from(SHAPES), log_cond=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**31 - 1), preconditioner=st.sampled_from(["jacobi", "identity"]),
       recompute_every=st.sampled_from([5, 50]))
def test_product_compiled_into_the_step_equals_torch_backend(shape, log_cond, seed,
                                                             preconditioner, recompute_every):
    a, b = system(shape, log_cond, seed)
    rtol = RTOL[a.dtype]
    # A host look every iteration (check_every=1): one fused call per iteration, and no
    # idle iterations after convergence (see the next test for several per call).
    eager, fused, eager_op, fused_op = solve_both_with_graph(
        a, b, shape, rtol=rtol, max_iter=20 * shape[1] + 50, on_failure="raise",
        preconditioner=preconditioner, recompute_every=recompute_every, check_every=1)
    check_against_dense(a, b, fused, rtol)
    assert_agree(a, eager, fused, rtol)
    # The fused step made the products of the iterations that replace no residual: mv
    # made only the replacements', the convergence checks' and the final residual's.
    assert eager_op.calls > int(eager.iterations.max())
    assert fused_op.calls < eager_op.calls - int(fused.iterations.max()) // 2


@settings(max_examples=10, deadline=None)  # two solves each; the fused code is shared
@given(log_cond=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1),
       check_every=st.sampled_from([None, 3]), recompute_every=st.sampled_from([5, 7, 50]),
       max_iter=st.sampled_from([4, 11, 17, 200]), to_the_cap=st.booleans(),
       policy=st.sampled_from(["warn", "best"]))
def test_iterations_between_looks_in_one_call_equal_one_call_each(
        log_cond, seed, check_every, recompute_every, max_iter, to_the_cap, policy):
    """Where the product is compiled into the step, the ``check_every`` iterations
    between two host looks run as one compiled call (``product_step(operator, count)``;
    ``check_every=None`` on the CPU: ``steps_per_call`` for small vectors) wherever no
    residual replacement, no best-iterate tracking and not the iteration cap falls among
    them. The oracle: the same solve with one compiled call per iteration (the same
    fused step, looks at the same iterations): the same statuses and iteration counts,
    and the same iterates up to rounding, also where the cap or a replacement cuts a
    call short. ``to_the_cap``: rtol 0, so that every element runs exactly ``max_iter``
    (≤ 17 < n) iterations, on a system conditioned enough (≥ 10^1.8) that CG's residual
    neither vanishes nor underflows before (near a multiple of the identity it does, and
    the element stops early)."""
    shape = SHAPES[0]
    if to_the_cap:
        log_cond, max_iter = max(log_cond, 0.3), min(max_iter, 17)
    a, b = system(shape, log_cond, seed)
    per_look = compiled.CompiledVectorOps.steps_per_call if check_every is None else check_every
    product_step = compiled.CompiledVectorOps.product_step
    results, counts = [], []
    for one_per_call in (True, False):
        def patched(self, operator, count=1, one_per_call=one_per_call):
            counts.append(count)
            return None if one_per_call and count > 1 else product_step(self, operator, count)

        with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
            patch.setattr(compiled.CompiledVectorOps, "product_step", patched)
            warnings.simplefilter("ignore", LinearSolveWarning)
            solver = PCG(backend="compiled", rtol=0.0 if to_the_cap else RTOL[a.dtype],
                         max_iter=max_iter,
                         on_failure=policy, recompute_every=recompute_every,
                         check_every=check_every)
            results.append(solver.solve(GraphOperator(a, shape), b))
    one_each, several = results
    assert several.status.tolist() == one_each.status.tolist()
    assert several.iterations.tolist() == one_each.iterations.tolist()
    torch.testing.assert_close(several.solution, one_each.solution, rtol=1e-9, atol=1e-12)
    if to_the_cap:
        assert several.iterations.tolist() == [max_iter] * shape[0]
    # Several iterations per call were asked for exactly where no best iterate is tracked.
    assert (per_look in counts) == (policy != "best")


@pytest.mark.parametrize("check_every", [None, 4])
def test_large_vectors_get_one_iteration_per_call(monkeypatch, check_every):
    """Above ``steps_per_call_max_numel`` elements (where the unrolled iterations' fresh
    buffers made a call slower per iteration than one call each) no call runs several
    iterations, whatever ``check_every``; by default the loop looks every iteration."""
    shape = SHAPES[0]
    a, b = system(shape, 0.5, seed=21)
    monkeypatch.setattr(compiled.CompiledVectorOps, "steps_per_call_max_numel", b.numel() - 1)
    counts = []
    product_step = compiled.CompiledVectorOps.product_step

    def recording(self, operator, count=1):
        counts.append(count)
        return product_step(self, operator, count)

    monkeypatch.setattr(compiled.CompiledVectorOps, "product_step", recording)
    operator = GraphOperator(a, shape)
    result = PCG(backend="compiled", rtol=RTOL[a.dtype], check_every=check_every,
                 on_failure="raise").solve(operator, b)
    check_against_dense(a, b, result, RTOL[a.dtype])
    assert counts == [1]
    if check_every is None:  # a look (one true-residual product) every iteration: none idle
        assert operator.calls == 1


@pytest.mark.parametrize("bad", ["nan", "negative"])
def test_product_compiled_into_the_step_statuses_as_torch_backend(bad):
    """A non-finite product (NON_FINITE_INPUT) and a negative definite element
    (BREAKDOWN) stop that element only, as with the torch backend."""
    a, b = system(SHAPES[0], 0.5, seed=11)
    if bad == "nan":
        a[1, 0, 0] = float("nan")
    else:
        a[1] = -a[1]
    eager, fused, *_ = solve_both_with_graph(a, b, SHAPES[0], rtol=1e-10, on_failure="warn",
                                             positive_definite=False)
    expected = Status.NON_FINITE_INPUT if bad == "nan" else Status.BREAKDOWN
    assert fused.status.tolist() == [Status.CONVERGED, expected, Status.CONVERGED]
    assert fused.status.tolist() == eager.status.tolist()
    assert fused.iterations[1] == eager.iterations[1] == 0
    assert_agree(a, eager, fused, 1e-10, rows=[0, 2])


def test_for_one_key_looks_up_inputs_of_another_key():
    """A function bound to one key (``for_one_key``, as a solve's fused step is) still
    gives the right result where later inputs have other sizes or strides: inductor's
    own input checks fail and the call is looked up by its key."""
    dot = compiled.CompiledFunction(lambda a, b: torch.linalg.vecdot(a, b, dim=1), "test dot")
    bound = dot.for_one_key()
    g = torch.Generator().manual_seed(12)
    for batch, n, dtype in (*SHAPES, SHAPES[0]):
        a, b = (torch.randn(batch, n, generator=g, dtype=torch.float64).to(dtype)
                for _ in range(2))
        torch.testing.assert_close(bound(a, b), (a * b).sum(dim=1))
        at = torch.randn(n, batch, generator=g, dtype=torch.float64).to(dtype).t()  # strides
        torch.testing.assert_close(bound(at, b), (at * b).sum(dim=1))
