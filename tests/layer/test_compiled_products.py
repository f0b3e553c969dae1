"""``jvp_mode="compile"``: the traced Gauss-Newton and Hessian products compiled by inductor
once per trace, against the eager products, and the layer's gradient through them.

Each problem class here has its own traces (they are kept per class and signature), and
the shapes are few and fixed: compiling costs about a second per product and shape.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import difftto
import difftto.objective as objective_module
from difftto.objective import InnerObjective
from difftto.regularizers import Proximal
from difftto.solvers import PCG, compiled
from difftto.tree import Layout

BATCH, N = 2, 16


class _Smoothing(difftto.Problem):
    """Elementwise nonlinearity and a neighbour coupling (``cat``, slices): the shape of
    the peers benchmark's NLS, plus a weighted sine term so ∇²D has a second kind of term."""

    def residuals(self, theta, data):
        fit = data["w"] * (torch.tanh(theta) - data["y"])
        smooth = data["s"] * (theta[:, 1:] - theta[:, :-1])
        return torch.cat([fit, smooth, 0.3 * torch.sin(theta)], dim=-1)


class _Fresh(_Smoothing):
    """Its own traces, so the compile count below starts from zero."""


def _point(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    data = {"w": 0.5 + rnd(BATCH, N).abs(), "y": 0.5 * rnd(BATCH, N), "s": 0.7}
    return data, rnd(BATCH, N), 0.1 + rnd(BATCH, N).abs()


def _operators(problem, kind, data, theta, lam):
    ops = {}
    for mode in ("compile", "forward"):
        obj = InnerObjective(problem, Layout.of(theta), data, Proximal(theta, lam), jvp_mode=mode)
        ops[mode] = (obj.gauss_newton_operator(theta) if kind == "gauss_newton"
                     else obj.hessian_operator(theta))
    return ops


def _uses_compiled(op, kind) -> bool:
    """The term's product is the compiled one and the sum ``term + diag Λ`` is one
    compiled call whose graph the operator gives."""
    product = op.a._product if kind == "gauss_newton" else op.a._hvp
    compiled_term = getattr(product, "graph", None) is not None
    return compiled_term and op._product is not None and op.graph() is not None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["gauss_newton", "hessian"])
def test_compiled_product_equals_eager(kind, dtype):
    data, theta, lam = _point(0, dtype)
    ops = _operators(_Smoothing(), kind, data, theta, lam)
    assert _uses_compiled(ops["compile"], kind), "the product was not compiled"
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64).to(dtype)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(ops["compile"].mv(v), ops["forward"].mv(v), **tol)
    # The term alone (the same compiled code with a zero diagonal) and the sum's diagonal
    # (Λ plus the term's, exact or estimated with the term's product) as the eager ones.
    torch.testing.assert_close(ops["compile"].a.mv(v), ops["forward"].a.mv(v), **tol)
    torch.testing.assert_close(ops["compile"].diagonal(), ops["forward"].diagonal(), **tol)


class _Coupled(difftto.Problem):
    """Only a neighbour coupling: its Gauss-Newton product has no ``+ v ⊙ c`` term."""

    def residuals(self, theta, data):
        return data["s"] * (theta[:, 1:] - theta[:, :-1])


@settings(max_examples=6, deadline=None)  # the compiled code is shared across examples
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["gauss_newton", "hessian"]),
       coupled_only=st.booleans())
def test_scaling_merged_into_the_diagonal_equals_eager(seed, kind, coupled_only):
    """A product that ends in ``+ v ⊙ c`` (c a constant: the elementwise residuals'
    ``J_fitᵀ J_fit``) gets that term merged into the proximal diagonal input (``Λ + c``,
    once per point); the sum, the term alone and the graph PCG's step compiles (with its
    constants) equal the eager products. A product without such a term is left whole."""
    problem = _Coupled() if coupled_only else _Smoothing()
    data, theta, lam = _point(seed)
    ops = _operators(problem, kind, data, theta, lam)
    assert _uses_compiled(ops["compile"], kind), "the product was not compiled"
    v = torch.randn(BATCH, N, generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64)
    module, constants = ops["compile"].graph()
    want = ops["forward"].mv(v)
    torch.testing.assert_close(ops["compile"].mv(v), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module(v, *constants), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ops["compile"].a.mv(v), ops["forward"].a.mv(v), rtol=1e-12,
                               atol=1e-12)
    merged = [t.merged for t in objective_module._TRACES[type(problem)].values()
              if t is not None and t._with_diagonal is not None]
    assert merged and all((m is None) == coupled_only for m in merged), merged


def test_new_linearization_point_reuses_the_compiled_product(monkeypatch):
    """One compilation per trace of the product and of its constants: a second point (new
    θ, new data) feeds new constants, computed by the same compiled code, to the same
    compiled product, and its products are those of that point."""
    calls = []
    compile_graph = compiled.compile_graph

    def counting(*args, **kwargs):
        calls.append(args[2])
        return compile_graph(*args, **kwargs)

    monkeypatch.setattr(compiled, "compile_graph", counting)
    problem = _Fresh()
    v = torch.randn(BATCH, N, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for seed in (3, 4):
        data, theta, lam = _point(seed)
        ops = _operators(problem, "gauss_newton", data, theta, lam)
        assert _uses_compiled(ops["compile"], "gauss_newton")
        torch.testing.assert_close(ops["compile"].mv(v), ops["forward"].mv(v), rtol=1e-12,
                                   atol=1e-12)
    assert sorted(calls) == ["a traced product (jvp_mode='compile')",
                             "the constants of a traced product (jvp_mode='compile')"], calls
    (traced,) = [t for t in objective_module._TRACES[_Fresh].values() if t is not None]
    assert [code is not None for code in traced._compiled_constants.values()] == [True]


def test_compiling_leaves_the_trace_usable_eagerly():
    """The folded eager product of a trace still holds after its graph was compiled
    (inductor rewrites the graph it is given; it gets a copy)."""
    class _Shared(_Smoothing):
        pass

    data, theta, lam = _point(8)
    v = torch.randn(BATCH, N, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for mode in ("compile", "linearize", "compile"):
        obj = InnerObjective(_Shared(), Layout.of(theta), data, Proximal(theta, lam), jvp_mode=mode)
        op = obj.gauss_newton_operator(theta)
        assert op.a._product is not None, f"{mode}: the trace was dropped"
        assert _uses_compiled(op, "gauss_newton") == (mode == "compile")
        eager = _operators(_Shared(), "gauss_newton", data, theta, lam)["forward"]
        torch.testing.assert_close(op.mv(v), eager.mv(v), rtol=1e-12, atol=1e-12)


def test_compile_failure_keeps_the_folded_product_with_a_warning(monkeypatch):
    import torch._inductor

    def broken(*args, **kwargs):
        raise RuntimeError("inductor unavailable")

    monkeypatch.setattr(torch._inductor, "compile", broken)
    monkeypatch.setattr(compiled, "_WARNED", set())

    class _Uncompilable(_Smoothing):
        pass

    data, theta, lam = _point(5)
    with pytest.warns(compiled.CompileFallbackWarning, match="inductor unavailable"):
        ops = _operators(_Uncompilable(), "gauss_newton", data, theta, lam)
    assert not _uses_compiled(ops["compile"], "gauss_newton")
    assert ops["compile"].a._product is not None, "the folded eager product is kept"
    traced = [t for t in objective_module._TRACES[_Uncompilable].values() if t is not None]
    assert traced and traced[0].compiled[True] is False
    v = torch.randn(BATCH, N, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    torch.testing.assert_close(ops["compile"].mv(v), ops["forward"].mv(v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hessian", ["gauss_newton", "exact"])
def test_layer_gradient_with_compiled_products_and_pcg_equals_default(hessian, monkeypatch):
    """The whole compiled path (products and PCG, the product and ``+ Λv`` compiled into
    PCG's step) against the defaults: the same implicit gradient to the solves'
    tolerance."""
    data, theta0, lam = _point(7)
    inner = difftto.GaussNewton(steps=30, damping=1e-6, tol=1e-13)
    fused = []
    product_step = compiled.CompiledVectorOps.product_step

    def recording(self, operator, count=1):
        found = product_step(self, operator, count)
        fused.append((count, found is not None))
        return found

    monkeypatch.setattr(compiled.CompiledVectorOps, "product_step", recording)
    grads = {}
    for name, options in {"default": {},
                          "compiled": {"jvp_mode": "compile",
                                       "solver": PCG(rtol=1e-12, backend="compiled")}}.items():
        options.setdefault("solver", PCG(rtol=1e-12))
        layer = difftto.ImplicitLayer(_Smoothing(), inner=inner, hessian=hessian,
                                      on_failure="raise", **options)
        t0, lm = theta0.clone().requires_grad_(True), lam.clone().requires_grad_(True)
        out, info = layer(t0, lm, data)
        (out.sin().sum() + out.pow(2).sum()).backward()
        assert info.backward.failures == 0
        grads[name] = (t0.grad, lm.grad)
    # One fused step, and the iterations between two looks in one call (small vectors).
    per_call = compiled.CompiledVectorOps.steps_per_call
    assert fused == [(1, True), (per_call, True)], \
        "the backward solve did not fuse the product into PCG's step"
    for compiled_grad, default_grad in zip(grads["compiled"], grads["default"]):
        torch.testing.assert_close(compiled_grad, default_grad, rtol=1e-9, atol=1e-12)


def test_the_check_uses_the_reference_and_falls_back_to_the_traced_function():
    """The per-solve check evaluates ``reference`` (a cheaper eager order of the same
    product): a reference that disagrees rejects the trace; one that raises is replaced
    by the traced function itself."""
    from difftto.objective import _fold_linear_map

    weights = torch.linspace(0.5, 2.0, N, dtype=torch.float64)[None].expand(BATCH, N).contiguous()

    def product(w, v):
        return torch.tanh(w) * v

    def raises(w, v):
        raise RuntimeError("no double-backward rule")

    def wrong(w, v):
        return 2 * torch.tanh(w) * v

    like = torch.zeros(BATCH, N, dtype=torch.float64)
    v = torch.randn(BATCH, N, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    assert _fold_linear_map(product, like, (weights,), reference=wrong) is None
    folded = _fold_linear_map(product, like, (weights,), reference=raises)
    assert folded is not None
    torch.testing.assert_close(folded(v), product(weights, v), rtol=0, atol=0)
