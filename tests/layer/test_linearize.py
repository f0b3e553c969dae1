"""``jvp_mode="linearize"``: the Gauss-Newton and Hessian products traced once per
linearization point, with everything independent of the vector precomputed.

Oracles: the dense Jacobian / Hessian from ``torch.autograd.functional`` and the eager
products of the other ``jvp_mode`` values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import difftto
import difftto.objective as objective_module
from difftto.objective import InnerObjective, _fold_linear_map
from difftto.regularizers import Proximal
from difftto.tree import Layout


class _Coupled(difftto.Problem):
    """Elementwise nonlinearity, a neighbour coupling and a dense mixing: the shapes of
    residual a trace has to get right (``cat``, slices, broadcasting, a matmul)."""

    def residuals(self, theta, data):
        fit = data["w"] * (torch.tanh(theta) - data["y"])
        smooth = data["s"] * (theta[:, 1:] - theta[:, :-1])
        mixed = torch.sin(torch.einsum("bmn,bn->bm", data["A"], theta))
        return torch.cat([fit, smooth, mixed], dim=-1)


class _Split(difftto.Problem):
    """Dict parameters with a product between groups."""

    def residuals(self, theta, data):
        a, b = theta["a"], theta["b"]
        return torch.cat([a * b.sum(dim=-1, keepdim=True) - data["y"], torch.exp(0.3 * b) - 1], -1)


cases = st.fixed_dictionaries({
    "batch": st.integers(1, 3),
    "n": st.integers(2, 9),
    "m": st.integers(1, 4),
    "dtype": st.sampled_from([torch.float32, torch.float64]),
    "seed": st.integers(0, 2**31 - 1),
})


def _setup(case):
    g = torch.Generator().manual_seed(case["seed"])
    b, n, m, dt = case["batch"], case["n"], case["m"], case["dtype"]

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dt)

    data = {"w": 0.5 + rnd(b, n).abs(), "y": 0.5 * rnd(b, n), "s": 0.7, "A": rnd(b, m, n)}
    theta = rnd(b, n)
    lam = 0.1 + rnd(b, n).abs()
    return data, theta, lam


def _objective(problem, theta, lam, data, mode):
    return InnerObjective(problem, Layout.of(theta), data, Proximal(theta, lam), jvp_mode=mode)


def _dense_jacobian(problem, theta, data):
    """``[B, m, n]`` by ``torch.autograd.functional.jacobian`` per batch element."""
    rows = []
    for i in range(theta.shape[0]):
        local = {k: (v[i:i + 1] if isinstance(v, torch.Tensor) else v) for k, v in data.items()}
        jac = torch.autograd.functional.jacobian(
            lambda t, local=local: problem.residuals(t, local).reshape(-1), theta[i:i + 1])
        rows.append(jac.reshape(jac.shape[0], -1))
    return torch.stack(rows)


def _tol(dtype):
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}


@settings(max_examples=12)  # each example traces (~0.1 s)
@given(cases)
def test_linearized_gauss_newton_product_equals_dense_jtj(case):
    data, theta, lam = _setup(case)
    problem = _Coupled()
    op = _objective(problem, theta, lam, data, "linearize").gauss_newton_operator(theta)
    assert op.a._product is not None, "the product was not traced"
    jac = _dense_jacobian(problem, theta, data)
    dense = jac.transpose(1, 2) @ jac + torch.diag_embed(lam)
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(case["seed"] + 1),
                    dtype=torch.float64).to(theta.dtype)
    torch.testing.assert_close(op.mv(v), (dense @ v[..., None])[..., 0], **_tol(theta.dtype))
    # The same operator through the eager products.
    eager = _objective(problem, theta, lam, data, "forward").gauss_newton_operator(theta)
    torch.testing.assert_close(op.mv(v), eager.mv(v), **_tol(theta.dtype))


@settings(max_examples=12)
@given(cases)
def test_linearized_hessian_product_equals_dense_hessian(case):
    data, theta, lam = _setup(case)
    problem = _Coupled()
    obj = _objective(problem, theta, lam, data, "linearize")
    op = obj.hessian_operator(theta)
    assert op.a._hvp.__qualname__.startswith("_fold_linear_map"), "the product was not traced"
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(case["seed"] + 2),
                    dtype=torch.float64).to(theta.dtype)
    want = []
    for i in range(theta.shape[0]):
        local = {k: (x[i:i + 1] if isinstance(x, torch.Tensor) else x) for k, x in data.items()}
        hess = torch.autograd.functional.hessian(
            lambda t, local=local: problem.objective(t[None], local).sum(), theta[i])
        want.append(hess @ v[i] + lam[i] * v[i])
    torch.testing.assert_close(op.mv(v), torch.stack(want), **_tol(theta.dtype))


def test_linearize_handles_dict_parameters():
    g = torch.Generator().manual_seed(3)
    theta = {"a": torch.randn(2, 4, generator=g, dtype=torch.float64),
             "b": torch.randn(2, 3, generator=g, dtype=torch.float64)}
    data = {"y": torch.randn(2, 4, generator=g, dtype=torch.float64)}
    layout = Layout.of(theta)
    flat = layout.flatten(theta)
    problem = _Split()
    ops = {mode: InnerObjective(problem, layout, data, None, jvp_mode=mode).gauss_newton_operator(flat)
           for mode in ("linearize", "double_vjp")}
    assert ops["linearize"]._product is not None
    v = torch.randn(flat.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ops["linearize"].mv(v), ops["double_vjp"].mv(v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hessian", ["gauss_newton", "exact"])
def test_layer_gradients_agree_across_jvp_modes(hessian):
    data, theta0, lam = _setup({"batch": 2, "n": 6, "m": 3, "dtype": torch.float64, "seed": 11})
    grads = {}
    for mode in ("linearize", "forward", "double_vjp"):
        layer = difftto.ImplicitLayer(
            _Coupled(), inner=difftto.GaussNewton(steps=30, damping=1e-3, tol=1e-12),
            hessian=hessian, jvp_mode=mode, solver=difftto.solvers.PCG(rtol=1e-12),
            on_failure="raise")
        t0, lm = theta0.clone().requires_grad_(True), lam.clone().requires_grad_(True)
        star, info = layer(t0, lm, data)
        (star.pow(2).sum() + star[:, 0].sum()).backward()
        grads[mode] = (t0.grad, lm.grad)
    for mode in ("forward", "double_vjp"):
        for a, b in zip(grads["linearize"], grads[mode]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_auto_linearizes_from_the_size_threshold(monkeypatch):
    data, theta, lam = _setup({"batch": 1, "n": 5, "m": 2, "dtype": torch.float64, "seed": 5})
    problem = _Coupled()
    small = _objective(problem, theta, lam, data, "auto").gauss_newton_operator(theta)
    assert small.a._product is None  # below the threshold: the eager products
    monkeypatch.setattr(objective_module, "LINEARIZE_MIN_NUMEL", 1)
    big = _objective(problem, theta, lam, data, "auto").gauss_newton_operator(theta)
    assert big.a._product is not None
    v = torch.ones_like(theta)
    torch.testing.assert_close(big.mv(v), small.mv(v), rtol=1e-12, atol=1e-12)


def test_fold_refuses_what_the_trace_cannot_see():
    # A product through numpy: the trace would record its output as a constant. The check
    # on a second vector catches it and the caller keeps the eager products.
    scale = torch.linspace(1, 2, 6, dtype=torch.float64)[None]

    def opaque(v):
        return torch.from_numpy(np.asarray(v.detach().numpy()) * 2.0) * scale

    assert _fold_linear_map(opaque, scale) is None
    assert _fold_linear_map(lambda v: 2.0 * v * scale, scale) is not None


def test_fold_refuses_mutation():
    def mutating(v):
        out = v * 3.0
        out.add_(1.0)
        return out

    assert _fold_linear_map(mutating, torch.ones(1, 4)) is None


def test_linearize_inside_a_torch_func_transform_keeps_eager_products():
    # Under an outer torch.func transform the products stay eager (and still correct).
    data, theta, lam = _setup({"batch": 1, "n": 4, "m": 2, "dtype": torch.float64, "seed": 9})
    problem = _Coupled()

    def product(t):
        op = _objective(problem, t, lam, data, "linearize").gauss_newton_operator(t)
        return op.mv(torch.ones_like(t)).sum()

    g = torch.func.grad(product)(theta)
    assert torch.isfinite(g).all()


def test_trace_is_reused_at_a_new_point_and_stays_exact():
    problem = _Coupled()
    data, theta, lam = _setup({"batch": 2, "n": 7, "m": 3, "dtype": torch.float64, "seed": 21})
    first = _objective(problem, theta, lam, data, "linearize").gauss_newton_operator(theta)
    assert first.a._product is not None
    traces = dict(objective_module._TRACES[type(problem)])
    # Another point and other data of the same shapes: no new trace, products still exact.
    data2, theta2, lam2 = _setup({"batch": 2, "n": 7, "m": 3, "dtype": torch.float64, "seed": 22})
    second = _objective(problem, theta2, lam2, data2, "linearize").gauss_newton_operator(theta2)
    assert dict(objective_module._TRACES[type(problem)]) == traces
    jac = _dense_jacobian(problem, theta2, data2)
    v = torch.randn(theta2.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = (jac.transpose(1, 2) @ jac @ v[..., None])[..., 0] + lam2 * v
    torch.testing.assert_close(second.mv(v), want, rtol=1e-10, atol=1e-10)


class _Branching(difftto.Problem):
    """Python control flow on the values of θ: a trace holds for one branch only."""

    def residuals(self, theta, data):
        if bool(theta.sum() > 0):
            return torch.tanh(theta) - data["y"]
        return theta.pow(3) - data["y"]


def test_control_flow_on_theta_keeps_the_eager_products():
    # θ and the data tensors are inputs of the trace, so reading their values (bool, item)
    # stops it: such a problem keeps the eager products, at every point.
    problem = _Branching()
    y = torch.zeros(1, 5, dtype=torch.float64)
    layout = Layout.of(y)
    for sign in (1.0, -1.0):
        point = torch.full((1, 5), 0.5 * sign, dtype=torch.float64)
        op = InnerObjective(problem, layout, {"y": y}, None, jvp_mode="linearize").gauss_newton_operator(point)
        assert op._product is None
        slope = (1 - torch.tanh(point).pow(2)) if sign > 0 else 3 * point.pow(2)
        v = torch.linspace(-1, 1, 5, dtype=torch.float64)[None]
        torch.testing.assert_close(op.mv(v), slope.pow(2) * v)


class _ConstantBranch(difftto.Problem):
    """Control flow on Python state the trace bakes in (the trace refuses control flow on
    any tensor's value). A plain attribute is part of the trace's signature; state that
    is not (a dict) keys the traces by the instance, and a change to it in place is
    caught by the check vector."""

    def __init__(self):
        self.power = 2.0
        self.config = {"cube": False}

    def residuals(self, theta, data):
        if self.power > 2.5 or self.config["cube"]:
            return theta.pow(3) - data["y"]
        return torch.tanh(theta) - data["y"]


def _point_operator(problem, value):
    """A point ``[1, 5]`` filled with ``value`` and ``operator()``, the problem's
    linearized Gauss-Newton operator there (data ``y = 0``), built anew on each call."""
    point = torch.full((1, 5), value, dtype=torch.float64)
    y = torch.zeros(1, 5, dtype=torch.float64)

    def operator():
        return InnerObjective(problem, Layout.of(point), {"y": y}, None,
                              jvp_mode="linearize").gauss_newton_operator(point)

    return point, operator


def _stale_setup():
    problem = _ConstantBranch()
    return (problem, *_point_operator(problem, 0.5))


def test_a_changed_plain_attribute_gets_its_own_trace():
    problem, point, operator = _stale_setup()
    assert operator()._product is not None
    problem.power = 3.0  # another signature: traced again, exact
    op = operator()
    assert op._product is not None
    v = torch.ones_like(point)
    torch.testing.assert_close(op.mv(v), (3 * point.pow(2)).pow(2) * v)


def test_a_reused_trace_that_no_longer_holds_is_dropped():
    problem, point, operator = _stale_setup()
    assert operator()._product is not None
    problem.config["cube"] = True  # same signature, other branch: the check catches it
    op = operator()
    assert op._product is None
    v = torch.ones_like(point)
    torch.testing.assert_close(op.mv(v), (3 * point.pow(2)).pow(2) * v)


def test_instances_of_one_problem_class_share_traces():
    data, theta, lam = _setup({"batch": 1, "n": 6, "m": 2, "dtype": torch.float64, "seed": 31})
    _objective(_Coupled(), theta, lam, data, "linearize").gauss_newton_operator(theta)
    before = dict(objective_module._TRACES[_Coupled])
    op = _objective(_Coupled(), theta, lam, data, "linearize").gauss_newton_operator(theta)
    assert op.a._product is not None and dict(objective_module._TRACES[_Coupled]) == before


class _Stencil(difftto.Problem):
    """``r = [w ⊙ (tanh θ − y); s (θ_{i+1} − θ_i)]`` with its exact ``diag(JᵀJ)``."""

    def residuals(self, theta, data):
        fit = data["w"] * (torch.tanh(theta) - data["y"])
        return torch.cat([fit, data["s"] * (theta[:, 1:] - theta[:, :-1])], dim=-1)

    def gauss_newton_diagonal(self, theta, data):
        neighbours = torch.full_like(theta, 2.0)
        neighbours[:, 0] = neighbours[:, -1] = 1.0
        return (data["w"] * (1 - torch.tanh(theta).pow(2))).pow(2) + data["s"] ** 2 * neighbours


@settings(max_examples=12)
@given(cases)
def test_problem_diagonal_is_used_and_equals_dense_oracle(case):
    data, theta, lam = _setup(case)
    data.pop("A")
    problem = _Stencil()
    for mode in ("linearize", "double_vjp"):
        op = _objective(problem, theta, lam, data, mode).gauss_newton_operator(theta)
        jac = _dense_jacobian(problem, theta, data)
        want = jac.pow(2).sum(dim=1) + lam
        torch.testing.assert_close(op.diagonal(), want, **_tol(theta.dtype))


def test_problem_diagonal_of_the_wrong_shape_is_an_error():
    class Wrong(_Stencil):
        def gauss_newton_diagonal(self, theta, data):
            return theta[:, :-1]

    data, theta, lam = _setup({"batch": 1, "n": 4, "m": 1, "dtype": torch.float64, "seed": 3})
    op = _objective(Wrong(), theta, lam, data, "double_vjp").gauss_newton_operator(theta)
    with pytest.raises(ValueError, match="gauss_newton_diagonal"):
        op.diagonal()


def test_auto_does_not_trace_when_the_data_holds_state(monkeypatch):
    # A non-plain value in data (a rasterizer's frozen state, here a list) would need a
    # trace per solve: "auto" keeps the eager products; "linearize" still traces.
    monkeypatch.setattr(objective_module, "LINEARIZE_MIN_NUMEL", 1)
    data, theta, lam = _setup({"batch": 1, "n": 5, "m": 2, "dtype": torch.float64, "seed": 41})
    data["state"] = [1, 2]
    problem = _Coupled()
    auto = _objective(problem, theta, lam, data, "auto")
    assert auto.gauss_newton_operator(theta).a._product is None
    assert not auto.hessian_operator(theta).a._hvp.__qualname__.startswith("_fold_linear_map")
    forced = _objective(problem, theta, lam, data, "linearize").gauss_newton_operator(theta)
    assert forced.a._product is not None
    v = torch.ones_like(theta)
    torch.testing.assert_close(forced.mv(v), auto.gauss_newton_operator(theta).mv(v),
                               rtol=1e-12, atol=1e-12)


# ------------------------------------------------- traces proven to hold everywhere
_SCALE = torch.tensor([2.0], dtype=torch.float64)


class _ClosesOver(difftto.Problem):
    """Reads the value of a tensor it does not take as data (a module-level one): a trace
    bakes that value in, so the trace is not proven and every solve checks it."""

    def residuals(self, theta, data):
        return float(_SCALE) * torch.tanh(theta) - data["y"]


def _count_checks(monkeypatch):
    calls = []
    agrees = objective_module._agrees

    def counting(got, want):
        calls.append(1)
        return agrees(got, want)

    monkeypatch.setattr(objective_module, "_agrees", counting)
    return calls


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_a_proven_trace_is_checked_once_and_stays_exact_at_new_points(seed, dtype):
    # A problem of tensor operations only, with plain attributes: the fake-tensor trace
    # proves the trace holds at every point of its signature, so the check vector runs on
    # the first solve only; the products at the later points are still exact.
    class _Once(_Coupled):
        pass

    calls = []
    agrees = objective_module._agrees
    objective_module._agrees = lambda got, want: calls.append(1) or agrees(got, want)
    try:
        problem = _Once()
        for k in range(3):
            case = {"batch": 2, "n": 6, "m": 3, "dtype": dtype, "seed": (seed + k) % 2**31}
            data, theta, lam = _setup(case)
            op = _objective(problem, theta, lam, data, "linearize").gauss_newton_operator(theta)
            assert op.a._product is not None
            assert len(calls) == 1, f"solve {k}: {len(calls)} checks, expected the first solve's only"
            jac = _dense_jacobian(problem, theta, data)
            v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64).to(dtype)
            want = (jac.transpose(1, 2) @ jac @ v[..., None])[..., 0] + lam * v
            torch.testing.assert_close(op.mv(v), want, **_tol(dtype))
    finally:
        objective_module._agrees = agrees
    (traced,) = [t for t in objective_module._TRACES[_Once].values() if t is not None]
    assert traced.proven and traced.verified == {"eager"}


def test_a_trace_of_a_closed_over_tensor_is_checked_every_solve(monkeypatch):
    calls = _count_checks(monkeypatch)
    theta, operator = _point_operator(_ClosesOver(), 0.3)
    assert operator()._product is not None
    (traced,) = [t for t in objective_module._TRACES[_ClosesOver].values() if t is not None]
    assert not traced.proven
    before = len(calls)
    original = _SCALE.clone()
    try:
        _SCALE.fill_(3.0)  # changed in place: same signature, the baked-in 2 no longer holds
        op = operator()
        assert len(calls) > before, "the unproven trace was not checked"
        assert op._product is None  # dropped; the eager products are exact
        v = torch.ones_like(theta)
        torch.testing.assert_close(op.mv(v), (3.0 * (1 - torch.tanh(theta).pow(2))).pow(2) * v)
    finally:
        _SCALE.copy_(original)


def test_holds_everywhere_refuses_value_reads_closed_over_tensors_and_dynamic_shapes():
    x, w, v = (torch.randn(4, dtype=torch.float64) for _ in range(3))
    holds = objective_module._holds_everywhere
    assert holds(lambda x, w, v: torch.func.jvp(lambda y: w * torch.tanh(y) * torch.tensor(3.0),
                                                (x,), (v,))[1], (x, w), v)
    assert not holds(lambda x, w, v: v * float(w.sum()), (x, w), v)  # a value read
    assert not holds(lambda x, w, v: 2 * v if bool((x > 0).all()) else v, (x, w), v)  # a branch
    assert not holds(lambda x, w, v: v * _SCALE, (x, w), v)  # a tensor it closes over
    assert not holds(lambda x, w, v: v * float(_SCALE), (x, w), v)  # ... and its value
    assert not holds(lambda x, w, v: v * torch.tensor(3.0).item(), (x, w), v)  # any value read
    assert not holds(lambda x, w, v: v[x > 0].sum() * v, (x, w), v)  # a value-dependent size


def test_problem_state_other_than_plain_values_is_never_proven():
    # _ConstantBranch's dict can change in place under one signature (the test above that
    # drops a stale trace): its traces stay checked on every solve.
    problem, point, operator = _stale_setup()
    assert operator()._product is not None
    traced = [t for t in objective_module._TRACES[_ConstantBranch].values() if t is not None]
    assert traced and not any(t.proven for t in traced)


# ------------------------------------------------------------- folded scalings
class _Scaled(difftto.Problem):
    """Chains of scalings the fold merges: sigmoid and tanh fits stacked with a weighted
    difference, scaled twice more (the shape of a weighted least-squares data term)."""

    def residuals(self, theta, data):
        fit = data["w"] * (torch.sigmoid(theta) - data["y"])
        bend = 0.5 * data["w"] * torch.tanh(2.0 * theta)
        smooth = data["s"] * (theta[:, 1:] - theta[:, :-1])
        return 1.5 * torch.cat([fit, bend, smooth], dim=-1) * data["k"]


def _product_graph(problem, kind):
    traced = [t for (k, *_), t in objective_module._TRACES[type(problem)].items()
              if t is not None and (kind == "gauss_newton") == (k == "gauss_newton")]
    assert traced, "nothing was traced"
    return traced[-1].product.graph


_MULS = (torch.ops.aten.mul.Tensor, torch.ops.aten.mul.Scalar)


def _scalings(graph, vector):
    """``(muls, chains)`` of a graph's vector-dependent part: its multiplications, and
    those that scale by a constant what is already a scaling by a constant."""
    dependent = {vector}
    for node in graph.nodes:
        if node.op == "call_function" and any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)

    def by_constant(node):
        return (isinstance(node, torch.fx.Node) and node in dependent and node.target in _MULS
                and any(a not in dependent for a in node.args))

    muls = [n for n in graph.nodes if n in dependent and n.target in _MULS]
    return len(muls), sum(by_constant(n) and any(by_constant(a) for a in n.args) for n in muls)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 9), batch=st.integers(1, 3),
       kind=st.sampled_from(["gauss_newton", "hessian"]))
def test_folded_products_equal_the_dense_oracle_and_hold_no_scaling_chains(seed, n, batch, kind):
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    m = 3 * n - 1
    data = {"w": 0.5 + torch.rand(batch, n, generator=g, dtype=dt), "y": torch.rand(batch, n, generator=g, dtype=dt),
            "s": 0.7, "k": 0.5 + torch.rand(batch, m, generator=g, dtype=dt)}
    theta = torch.randn(batch, n, generator=g, dtype=dt)
    lam = 0.1 + torch.rand(batch, n, generator=g, dtype=dt)
    problem = _Scaled()
    obj = _objective(problem, theta, lam, data, "linearize")
    op = obj.gauss_newton_operator(theta) if kind == "gauss_newton" else obj.hessian_operator(theta)
    v = torch.randn(batch, n, generator=g, dtype=dt)
    if kind == "gauss_newton":
        jac = _dense_jacobian(problem, theta, data)
        want = (jac.transpose(1, 2) @ jac @ v[..., None])[..., 0]
    else:
        want = torch.stack([
            torch.autograd.functional.hessian(
                lambda t, i=i: 0.5 * problem.residuals(t[None], {k: (x[i:i + 1] if torch.is_tensor(x) else x)
                                                                 for k, x in data.items()}).pow(2).sum(),
                theta[i]) @ v[i] for i in range(batch)])
    torch.testing.assert_close(op.mv(v), want + lam * v, rtol=1e-10, atol=1e-10)
    graph = _product_graph(problem, kind)
    targets = [node.target for node in graph.nodes if node.op == "call_function"]
    aten = torch.ops.aten
    assert aten.tanh_backward.default not in targets and aten.sigmoid_backward.default not in targets
    assert aten.cat.default not in targets  # each piece's slice went through the scalings
    assert _scalings(graph, next(iter(graph.nodes)))[1] == 0, graph


def test_fold_keeps_precision_and_size():
    # A float32 constant scaling a float64 product (promotion) and two constants whose
    # product would be an outer product are left as they are; a plain chain is merged.
    from torch.fx.experimental.proxy_tensor import make_fx

    col = torch.rand(3, 1, dtype=torch.float64)
    row = torch.rand(1, 4, dtype=torch.float64)
    low = torch.rand(3, 4, dtype=torch.float32)
    v = torch.rand(3, 4, dtype=torch.float64)

    def folded(fn, *args):
        graph = make_fx(fn)(*args, v).graph
        vector = [n for n in graph.nodes if n.op == "placeholder"][-1]
        objective_module._fold_scalings(graph, vector)
        return _scalings(graph, vector)

    assert folded(lambda c, r, v: (v * c) * r, col, row) == (2, 1)  # an outer product: kept
    assert folded(lambda c, lo, v: (v * c) * lo, col, low) == (2, 1)  # float32: kept
    assert folded(lambda lo, c, v: (v.float() * lo) * c, low, col) == (2, 1)  # a float32 step: kept
    assert folded(lambda c, r, v: ((v * c) * 2.0) * c, col, row) == (1, 0)  # merged


class _Ridge(difftto.Problem):
    """A linear fit and a difference: its Hessian's constants are ``w²`` and the
    differences' unit weights, whatever the residuals' values."""

    def residuals(self, theta, data):
        return torch.cat([data["w"] * theta - data["y"], theta[:, 1:] - theta[:, :-1]], dim=-1)


_FILLS = (torch.ops.aten.pow.Tensor_Scalar, torch.ops.aten.ones_like.default,
          torch.ops.aten.zeros_like.default, torch.ops.aten.full_like.default)


@settings(max_examples=20, deadline=None)
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=6,
                       max_size=6),
       fill=st.floats(-3.0, 3.0, allow_nan=False))
def test_simplify_writes_shape_only_values_as_fills_exactly(values, fill):
    """``x ** 0``, ``ones_like``, ``zeros_like`` and ``full_like`` become constant fills
    (``_simplify``): the same values, bit for bit, at inputs other than the traced one,
    NaN and ±inf included; a ``*_like`` whose result is not contiguous (it keeps its
    input's strides) is left as it is."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, t):
        like = torch.ones_like(t)  # t transposed: ones_like keeps its strides
        return (x ** 0) * 3 + torch.ones_like(x) + torch.zeros_like(x) + torch.full_like(x, fill), like

    x0, t0 = torch.zeros(2, 3, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64).t()
    traced = make_fx(f)(x0, t0)
    assert objective_module._simplify(traced.graph)
    traced.recompile()
    kept = [n.target for n in traced.graph.nodes if n.op == "call_function" and n.target in _FILLS]
    assert kept == [torch.ops.aten.ones_like.default]  # the non-contiguous one only
    x = torch.tensor(values, dtype=torch.float64).reshape(2, 3)
    t = torch.randn(3, 2, dtype=torch.float64).t()
    got, want = traced(x, t), f(x, t)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1]) and got[1].stride() == want[1].stride()


def test_hessian_constants_do_not_recompute_the_residuals():
    """The traced Hessian of ½‖r‖² reads ``r`` only through ``r ** 0`` (the square's second
    derivative) and the gradient's ``ones_like`` seed: written as fills, the residuals
    (and their ``cat``) drop out of the constants computed at each linearization point;
    the product still equals the dense oracle."""
    batch, n = 2, 7
    g = torch.Generator().manual_seed(3)
    dt = torch.float64
    data = {"w": 0.5 + torch.rand(batch, n, generator=g, dtype=dt),
            "y": torch.rand(batch, n, generator=g, dtype=dt)}
    theta = torch.randn(batch, n, generator=g, dtype=dt)
    lam = 0.1 + torch.rand(batch, n, generator=g, dtype=dt)
    problem = _Ridge()
    op = _objective(problem, theta, lam, data, "linearize").hessian_operator(theta)
    v = torch.randn(batch, n, generator=g, dtype=dt)
    want = torch.stack([
        torch.autograd.functional.hessian(
            lambda t, i=i: 0.5 * problem.residuals(t[None], {k: x[i:i + 1] for k, x in data.items()}
                                                   ).pow(2).sum(), theta[i]) @ v[i]
        for i in range(batch)])
    torch.testing.assert_close(op.mv(v), want + lam * v, rtol=1e-12, atol=1e-12)
    traced = [t for (k, *_), t in objective_module._TRACES[_Ridge].items() if t is not None]
    assert traced, "nothing was traced"
    targets = {node.target for node in traced[-1].constants.graph.nodes if node.op == "call_function"}
    aten = torch.ops.aten
    assert not targets & {aten.cat.default, aten.pow.Tensor_Scalar, aten.ones_like.default,
                          aten.sub.Tensor}, targets
