"""The inner objective ``E(θ) = D(θ; data) + ½ Σ Λ (θ − θ0)²`` on flat parameters.

:class:`InnerObjective` is the glue between a :class:`~difftto.Problem` (which only
defines ``D`` or its residuals on structured parameters) and the machinery that works
on flat ``[B, n]`` vectors: the inner optimizers and the layer's backward. It gives
values, gradients, residuals and the two curvature operators:

- ``gauss_newton_operator(θ)``: ``JᵀJ + diag(Λ)`` (least-squares problems), with
  ``diag(JᵀJ)`` for the Jacobi preconditioner;
- ``hessian_operator(θ)``: ``∇²D + diag(Λ)`` by Hessian-vector products.
"""

from __future__ import annotations

import functools
import operator
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch
from torch import Tensor

from .operators import (
    DiagonalOperator,
    GaussNewtonOperator,
    HessianOperator,
    LinearOperator,
    SumOperator,
)
from .problems.base import Data, Linearization, Problem
from .regularizers import Proximal
from .tree import Layout

__all__ = ["InnerObjective", "JVP_MODES"]

JVP_MODES = ("auto", "forward", "double_vjp", "linearize", "compile")


class InnerObjective:
    """``E`` for a batch, on flat parameters.

    Args:
        problem: the data term.
        layout: the parameter structure (flat ↔ structured).
        data: the problem's data (tensors may require grad; they are used as given).
        proximal: the proximal term, or ``None`` for ``E = D``.
        jvp_mode: how the products with ``J`` (and ``∇²D``) are formed for generic
            problems: ``"forward"`` (``torch.func.jvp``), ``"double_vjp"``
            (reverse-over-reverse on one retained graph; needs only double backward),
            ``"linearize"`` (the whole product ``JᵀJ·v`` / ``∇²D·v`` traced once per
            problem class and shape, with everything that does not depend on ``v``
            precomputed per linearization point and each chain of scalings of ``v``
            merged into one, see :func:`_fold_linear_map`; checked against the eager
            product on every solve, or on the first only where the trace is proven to
            hold at every point; falls
            back to ``"auto"`` where the trace fails), ``"auto"`` (``"linearize"`` from
            ``LINEARIZE_MIN_NUMEL`` unknowns in the batch on when the trace can be
            reused, i.e. ``data`` holds only tensors and plain values; otherwise the
            double VJP, which reuses one graph and was 3-10x
            faster than ``torch.func.jvp`` on small problems here, falling back to
            forward mode when an operation has no double-backward rule), or ``"compile"``
            (``"linearize"`` with the traced product compiled by ``torch.compile``
            (inductor, static shapes) once per trace, so once per problem class and
            shape: a new linearization point feeds new constants to the same compiled
            code; with a proximal term ``(∇²D or JᵀJ) + diag Λ`` is one compiled call, Λ
            an input, and the operator gives that graph to ``PCG(backend="compiled")``,
            which compiles it into its step; the first product of a shape costs the
            compilation, seconds; the folded
            eager product where compiling fails or its result disagrees with the eager
            one, after a :class:`~difftto.solvers.compiled.CompileFallbackWarning`).
            Only the generic traced products are compiled; a problem's own
            :meth:`Problem.linearize` is used as it is.
        diagonal_probes: random probes for the unbiased estimate of ``diag(JᵀJ)``
            (only when the problem supplies no exact diagonal); ``0`` disables it.
    """

    def __init__(self, problem: Problem, layout: Layout, data: Data,
                 proximal: Proximal | None, *, jvp_mode: str = "auto", diagonal_probes: int = 8):
        if jvp_mode not in JVP_MODES:
            raise ValueError(f"jvp_mode must be one of {JVP_MODES}, got {jvp_mode!r}")
        self.problem, self.layout, self.data, self.proximal = problem, layout, data, proximal
        self.jvp_mode = jvp_mode
        self.diagonal_probes = diagonal_probes

    # ----------------------------------------------------------------- values
    def data_term(self, theta: Tensor, data: Data | None = None) -> Tensor:
        """``D(θ)`` per batch element ``[B]``."""
        data = self.data if data is None else data
        value = self.problem.objective(self.layout.unflatten(theta), data)
        if value.shape != (theta.shape[0],):
            raise ValueError(
                f"{type(self.problem).__name__}.objective must return shape [B]={theta.shape[0]}, "
                f"got {tuple(value.shape)}"
            )
        return value

    def residuals(self, theta: Tensor, data: Data | None = None) -> Tensor:
        """``r(θ)`` flattened to ``[B, m]``."""
        data = self.data if data is None else data
        r = self.problem.residuals(self.layout.unflatten(theta), data)
        if r.dim() < 1 or r.shape[0] != theta.shape[0]:
            raise ValueError(
                f"{type(self.problem).__name__}.residuals must return [B={theta.shape[0]}, ...], "
                f"got {tuple(r.shape)}"
            )
        return r.reshape(r.shape[0], -1)

    def value(self, theta: Tensor) -> Tensor:
        """``E(θ)`` per batch element ``[B]``."""
        e = self.data_term(theta)
        return e if self.proximal is None else e + self.proximal.value(theta)

    def value_and_grad(self, theta: Tensor, *, create_graph: bool = False) -> tuple[Tensor, Tensor]:
        """``E(θ)`` ``[B]`` and ``∇θE`` ``[B, n]``.

        With ``create_graph=False`` the result holds no graph (the inner loop's memory
        does not grow); with ``True`` it is differentiable (unrolled backward).
        """
        with torch.enable_grad():
            if create_graph:
                t = theta if theta.requires_grad else theta.detach().requires_grad_(True)
            else:
                t = theta.detach().requires_grad_(True)
            d = self.data_term(t)
            (g,) = torch.autograd.grad(d.sum(), t, create_graph=create_graph)
        if self.proximal is not None:
            src = theta if create_graph else theta.detach()
            g = g + self.proximal.gradient(src)
            d = d + self.proximal.value(src)
        if not create_graph:
            d, g = d.detach(), g.detach()
        return d, g

    # ------------------------------------------------------------- operators
    def _proximal_diagonal(self, theta: Tensor) -> Tensor | None:
        return None if self.proximal is None else self.proximal.hessian_diagonal().detach()

    def gauss_newton_operator(self, theta: Tensor, *, with_proximal: bool = True) -> LinearOperator:
        """``JᵀJ (+ diag Λ)`` at ``θ`` (detached). The problem's discrete state is frozen
        at ``θ`` for every product (:meth:`Problem.freeze`)."""
        lam = self._proximal_diagonal(theta) if with_proximal else None
        jvp, vjp, diag, product, blocks = self._jacobian_products(theta, diagonal=lam)
        gn = GaussNewtonOperator(jvp, vjp, self.layout_shape(theta), theta.dtype, theta.device,
                                 diagonal=diag, product=product, blocks=blocks,
                                 graph=_term_graph(product, lam))
        return _plus_proximal(gn, lam, product)

    def hessian_operator(self, theta: Tensor, *, with_proximal: bool = True) -> LinearOperator:
        """``∇²D (+ diag Λ)`` at ``θ`` by reverse-over-reverse products on one retained
        graph, or by the traced and folded product (``jvp_mode``). Its diagonal (for
        Jacobi) is ``Λ`` plus a probe estimate of ``diag(∇²D)`` clamped at zero."""
        theta = theta.detach()
        data = self.problem.freeze(self.layout.unflatten(theta), self.data)

        def gradient(x):
            return torch.func.grad(lambda y: self.data_term(y, data).sum())(x)

        lam = self._proximal_diagonal(theta) if with_proximal else None
        hvp = None
        keys, signature = _signature("hessian", self.problem, self.layout, data)
        if self._linearize(theta, signature):
            # Forward-over-reverse traced once; reverse-over-reverse where forward mode fails.
            inputs = (theta, *[data[k] for k in keys])

            def gradient_at(x, leaves):
                local = _with_tensors(data, keys, leaves)
                return torch.func.grad(lambda y: self.data_term(y, local).sum())(x)

            def forward_over_reverse(x, *args):
                return torch.func.jvp(lambda y: gradient_at(y, args[:-1]), (x,), (args[-1],))[1]

            def reverse_over_reverse(x, *args):
                return torch.func.vjp(lambda y: gradient_at(y, args[:-1]), x)[1](args[-1])[0]

            def reference(x, *args):
                # Reverse-over-reverse by plain autograd: the check's reference, about half
                # the time of the same through torch.func at 10^4 unknowns (its transform
                # levels cost more than the two backward passes); the check never runs
                # under a torch.func transform (_fold_linear_map returns None there).
                local = _with_tensors(data, keys, args[:-1])
                with torch.enable_grad():
                    y = x.detach().requires_grad_(True)
                    (g,) = torch.autograd.grad(self.data_term(y, local).sum(), y,
                                               create_graph=True)
                    return torch.autograd.grad(g, y, args[-1])[0].detach()

            for kind, fn in (("forward", forward_over_reverse), ("reverse", reverse_over_reverse)):
                # Checked against reverse-over-reverse, the same product (H is symmetric)
                # in one tenth of forward mode's time at 10^4 unknowns (no decompositions).
                hvp = _fold_linear_map(fn, theta, inputs, owner=type(self.problem),
                                       signature=None if signature is None else (kind, signature),
                                       compile=self.jvp_mode == "compile",
                                       reference=reference, diagonal=lam,
                                       provable=_plain_state(self.problem))
                if hvp is not None:
                    break
        if hvp is None:
            _, hvp_fn = torch.func.vjp(gradient, theta)  # reverse-over-reverse, reused

            def hvp(v: Tensor) -> Tensor:
                return hvp_fn(v)[0].detach()

        def diag():
            if self.diagonal_probes <= 0:
                return None
            return _probe_diagonal(lambda z: z * hvp(z), theta, self.diagonal_probes, theta.shape).clamp_min(0)

        h = HessianOperator(hvp, self.layout_shape(theta), theta.dtype, theta.device, diagonal=diag,
                            graph=_term_graph(hvp, lam))
        return _plus_proximal(h, lam, hvp)

    def layout_shape(self, theta: Tensor) -> tuple[int, int]:
        return (theta.shape[0], theta.shape[1])

    def _linearize(self, theta: Tensor, signature: Hashable) -> bool:
        """Whether to trace the products (``jvp_mode``; for ``"auto"``, from
        ``LINEARIZE_MIN_NUMEL`` unknowns and only where the trace can be reused: data with
        a non-plain value, e.g. a rasterizer's frozen state, would need a trace per solve,
        which costs more than it saves)."""
        return self.jvp_mode in ("linearize", "compile") or (
            self.jvp_mode == "auto" and signature is not None
            and theta.numel() >= LINEARIZE_MIN_NUMEL)

    def jacobian_products(self, theta: Tensor) -> tuple[Callable, Callable, Callable[[], Tensor | None]]:
        """``(jvp, vjp, diag)`` at ``θ`` on flat vectors; ``diag()`` computes ``diag(JᵀJ)``
        (or ``None``) when first asked for: the problem's exact one where it gives it
        (:meth:`Problem.linearize`, :meth:`Problem.gauss_newton_diagonal`), else a probe
        estimate.

        Uses the problem's own :meth:`Problem.linearize` when it gives one; otherwise
        autograd on the residuals with the discrete state frozen at ``θ``.
        """
        return self._jacobian_products(theta)[:3]

    def _jacobian_products(self, theta: Tensor, diagonal: Tensor | None = None):
        """``(jvp, vjp, diag, product, blocks)``: :meth:`jacobian_products`, the whole
        ``JᵀJ·v`` as one function where it is formed at once (``None``: ``vjp(jvp(v))``;
        a traced one is a :class:`_Folded`, compiled with ``diagonal`` where given, see
        :func:`_fold_linear_map`),
        and ``blocks() -> (blocks [B, N, p, p], index [N, p])``, the problem's per-item
        diagonal blocks of ``JᵀJ`` on the flat unknowns ``index``
        (:meth:`Linearization.gauss_newton_blocks`; ``None`` where it gives none)."""
        if not self.problem.is_least_squares:
            raise ValueError(
                f"hessian='gauss_newton' needs a least-squares problem (residuals()); "
                f"{type(self.problem).__name__} defines only objective(): use hessian='exact'"
            )
        theta = theta.detach()
        structured = self.layout.unflatten(theta)
        data = self.problem.freeze(structured, self.data)
        lin = self.problem.linearize(structured, data)
        if lin is not None:
            return (*self._wrap_linearization(lin, theta), None, self._linearization_blocks(lin))
        return (*self._autograd_products(theta, data, diagonal), None)

    def _linearization_blocks(self, lin: Linearization):
        """``lin``'s blocks on the flat unknowns (see :meth:`_jacobian_products`), or
        ``None`` where its class gives none."""
        if type(lin).gauss_newton_blocks is Linearization.gauss_newton_blocks:
            return None
        layout = self.layout

        def blocks():
            found = lin.gauss_newton_blocks()
            if found is None:
                return None
            values, keys = found
            slices, shapes = layout.slices(), dict(zip(layout.names, layout.shapes))
            n_items = values.shape[1]
            flat = torch.arange(layout.numel, device=values.device)
            index = torch.cat([flat[slices[k]].reshape(n_items, -1) for k in keys], dim=1)
            if index.shape[1] != values.shape[-1] or any(shapes[k][0] != n_items for k in keys):
                raise ValueError(
                    f"{type(lin).__name__}.gauss_newton_blocks gave blocks "
                    f"{tuple(values.shape)} over groups {keys} of shapes "
                    f"{[shapes[k] for k in keys]}; expected [B, N, p, p] with p their per-item sizes"
                )
            return values.detach(), index

        return blocks

    def _wrap_linearization(self, lin: Linearization, theta: Tensor):
        layout = self.layout

        def jvp(v):
            return lin.jvp(layout.unflatten(v)).reshape(v.shape[0], -1)

        def vjp(w):
            return layout.flatten(lin.vjp(w))

        def diag():
            exact = lin.gauss_newton_diagonal()
            if exact is not None:
                return layout.flatten(exact).detach()
            return self._gauss_newton_diagonal(jvp, vjp, theta, jvp(torch.zeros_like(theta)).shape)

        return jvp, vjp, diag

    def _autograd_products(self, theta: Tensor, data: Data, diagonal: Tensor | None = None):
        # torch.func rather than torch.autograd: the products then also work inside the
        # layer's backward when the layer itself runs under a torch.func transform.
        def residual_fn(x):
            return self.residuals(x, data)

        r, vjp_fn = torch.func.vjp(residual_fn, theta)

        def vjp(w):
            return vjp_fn(w)[0].detach()

        def forward_jvp(v):
            return torch.func.jvp(residual_fn, (theta,), (v,))[1].detach()

        dual = {}

        def double_vjp(v):
            # J v = the VJP of the linear map w ↦ Jᵀw, built once and reused: needs only
            # double-backward rules, and reuses one graph for every product.
            if "fn" not in dual:
                _, dual["fn"] = torch.func.vjp(lambda w: vjp_fn(w)[0], torch.zeros_like(r))
            return dual["fn"](v)[0].detach()

        if self.jvp_mode == "forward":
            jvp = forward_jvp
        elif self.jvp_mode == "double_vjp":
            jvp = double_vjp
        else:
            state = {"mode": None}

            def jvp(v):
                if state["mode"] is None:
                    try:
                        out = double_vjp(v)
                        state["mode"] = double_vjp
                        return out
                    except (NotImplementedError, RuntimeError):
                        state["mode"] = forward_jvp
                return state["mode"](v)

        product = None
        keys, signature = _signature("gauss_newton", self.problem, self.layout, data)
        if self._linearize(theta, signature):

            def gauss_newton(x, *args):
                local = _with_tensors(data, keys, args[:-1])

                def f(y):
                    return self.residuals(y, local)

                return torch.func.vjp(f, x)[1](torch.func.jvp(f, (x,), (args[-1],))[1])[0]

            def gauss_newton_by_vjps(x, *args):
                # The same product with J v as a VJP of w ↦ Jᵀw (the double VJP): the
                # check's reference, 6x cheaper than forward mode at 10^4 unknowns; by plain
                # autograd, cheaper than torch.func (the check never runs under a torch.func
                # transform: _fold_linear_map returns None there).
                local = _with_tensors(data, keys, args[:-1])
                with torch.enable_grad():
                    y = x.detach().requires_grad_(True)
                    r = self.residuals(y, local)
                    w = torch.zeros_like(r, requires_grad=True)
                    (pulled,) = torch.autograd.grad(r, y, w, create_graph=True)
                    (jv,) = torch.autograd.grad(pulled, w, args[-1])
                    return torch.autograd.grad(r, y, jv)[0].detach()

            inputs = (theta, *[data[k] for k in keys])
            product = _fold_linear_map(gauss_newton, theta, inputs, owner=type(self.problem),
                                       signature=signature, compile=self.jvp_mode == "compile",
                                       reference=gauss_newton_by_vjps, diagonal=diagonal,
                                       provable=_plain_state(self.problem))

        def diag():
            exact = self.problem.gauss_newton_diagonal(self.layout.unflatten(theta), data)
            if exact is not None:
                exact = self.layout.flatten(exact).detach()
                if exact.shape != theta.shape:
                    raise ValueError(
                        f"{type(self.problem).__name__}.gauss_newton_diagonal must give the "
                        f"parameters' structure ({tuple(theta.shape)} flat), got {tuple(exact.shape)}")
                return exact
            return self._gauss_newton_diagonal(jvp, vjp, theta, r.shape)

        return jvp, vjp, diag, product

    def _gauss_newton_diagonal(self, jvp, vjp, theta: Tensor, residual_shape) -> Tensor | None:
        """``diag(JᵀJ)``: exact from ``n`` products ``‖J e_j‖²`` when ``n`` is at most the
        probe count, else the unbiased probe estimate ``E[(Jᵀw)²]``."""
        n = theta.shape[1]
        if self.diagonal_probes <= 0:
            return None
        if n <= self.diagonal_probes:
            eye = torch.eye(n, dtype=theta.dtype, device=theta.device)
            cols = [jvp(eye[j].expand_as(theta).contiguous()).pow(2).sum(dim=1) for j in range(n)]
            return torch.stack(cols, dim=1)
        return _probe_diagonal(lambda w: vjp(w).pow(2), theta, self.diagonal_probes, residual_shape)


def _term_graph(product, lam: Tensor | None):
    """The compiled graph of a curvature term's product alone (no proximal term)."""
    return product.graph if isinstance(product, _Folded) and lam is None else None


def _plus_proximal(term: LinearOperator, lam: Tensor | None, product) -> LinearOperator:
    """``term + diag Λ``: one compiled call for both where ``product`` (the term's traced
    product) was compiled with ``Λ`` (:class:`_Folded`), else the two products added."""
    if lam is None:
        return term
    # (min > 0: one reduction, no mask; NaN propagates to the min and fails it too)
    positive = lam.numel() == 0 or bool(lam.amin() > 0)
    proximal = DiagonalOperator(lam, positive_definite=positive)
    if isinstance(product, _Folded) and product.plus_diagonal is not None:
        return SumOperator(term, proximal, product=product.plus_diagonal, graph=product.graph)
    return term + proximal


def _probe_diagonal(sample: Callable[[Tensor], Tensor], theta: Tensor, probes: int,
                    probe_shape) -> Tensor:
    """Mean of ``sample(z)`` over Rademacher probes ``z`` of ``probe_shape``, seeded so
    the estimate is reproducible. For ``sample(w) = (Jᵀw)²`` this is an unbiased,
    non-negative estimate of ``diag(JᵀJ)``; for ``sample(z) = z ⊙ Hz`` of ``diag(H)``."""
    gen = torch.Generator(device="cpu").manual_seed(0x5EED)
    acc = torch.zeros_like(theta)
    for _ in range(probes):
        z = torch.randint(0, 2, tuple(probe_shape), generator=gen).to(theta.device, theta.dtype)
        acc += sample(2 * z - 1)
    return acc / probes


# --------------------------------------------------------------- linearize once
# A product with J, Jᵀ, JᵀJ or ∇²D at a fixed θ through torch.func re-runs the primal
# computation (tanh θ, the rasterizer's geometry, ...) and the autograd bookkeeping on
# every call; PCG makes tens to hundreds of calls at one θ. ``_fold_linear_map`` traces
# the product once with ``make_fx`` (θ and the data are constants of the trace), merges
# each chain of scalings by such constants into one (``_fold_scalings``), evaluates every
# node that does not depend on the vector once, and keeps a graph of the rest: each
# product then runs only the vector-dependent operations.

LINEARIZE_MIN_NUMEL = 10_000  # below this the trace (tens of ms) costs more than it saves


def _is_mutating(node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _simplify(graph) -> bool:
    """Removes the no-op copies forward-mode AD leaves in a trace (``expand`` to the same
    shape, ``_to_copy`` to the same dtype/device, ``mul`` by 1) and ``slice(cat(...))``
    that picks one piece back out; and writes as a constant fill a value that reads only
    its input's shape: ``ones_like`` / ``zeros_like`` / ``full_like`` (e.g. the seed of a
    traced gradient) and ``x ** 0`` (the second derivative of a square: 1 for every ``x``,
    NaN and ±inf included), so that what computed ``x`` (e.g. the residuals) drops out of
    the trace when nothing else reads it. Exact: every rewrite returns the same values
    (a fill only where the replaced value is contiguous, so the same strides too).
    Returns whether it rewrote anything."""
    changed = False
    aten = torch.ops.aten
    fills = {aten.ones_like.default: 1, aten.zeros_like.default: 0}

    def val(n):
        return n.meta.get("val") if hasattr(n, "meta") else None

    def same_tensor_meta(a, b):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device)

    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        out = val(node)
        repl = None
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node):
            continue
        if node.target is aten.expand.default and same_tensor_meta(val(src), out):
            repl = src
        elif (node.target is aten._to_copy.default and same_tensor_meta(val(src), out)
              and node.kwargs.get("layout", torch.strided) == torch.strided
              and node.kwargs.get("memory_format") is None):
            repl = src
        elif (node.target is aten.mul.Tensor and len(node.args) == 2
              and isinstance(node.args[1], (int, float)) and not isinstance(node.args[1], bool)
              and node.args[1] == 1 and same_tensor_meta(val(src), out)):
            repl = src
        elif (node.target is aten.slice.Tensor and src.op == "call_function"
              and src.target is aten.cat.default and isinstance(out, Tensor)):
            pieces = src.args[0]
            cat_dim = src.args[1] if len(src.args) > 1 else src.kwargs.get("dim", 0)
            dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
            whole = val(src)
            if isinstance(whole, Tensor) and step == 1:
                ndim = whole.dim()
                if dim % ndim == cat_dim % ndim:
                    offset = 0
                    for piece in pieces:
                        pv = val(piece)
                        if not isinstance(pv, Tensor):
                            break
                        size = pv.shape[dim % ndim]
                        if start == offset and same_tensor_meta(pv, out):
                            repl = piece
                            break
                        offset += size
        elif isinstance(out, Tensor) and out.is_contiguous() and not node.kwargs.get("pin_memory"):
            fill = None
            if node.target in fills:
                fill = fills[node.target]
            elif node.target is aten.full_like.default and len(node.args) > 1:
                fill = node.args[1]
            elif (node.target is aten.pow.Tensor_Scalar and len(node.args) == 2
                  and isinstance(node.args[1], (int, float)) and not isinstance(node.args[1], bool)
                  and node.args[1] == 0):
                fill = 1
            if isinstance(fill, (int, float)) and not isinstance(fill, bool):
                with graph.inserting_before(node):
                    repl = graph.call_function(aten.full.default, (list(out.shape), fill),
                                               {"dtype": out.dtype, "device": out.device})
                repl.meta = dict(node.meta)
        if repl is not None:
            node.replace_all_uses_with(repl)
            graph.erase_node(node)
            changed = True
    graph.eliminate_dead_code()
    return changed


def _fold_scalings(graph, vector) -> None:
    """Rewrites the vector-dependent part of a traced linear map so that each chain of
    scalings by values that do not depend on the vector (constants) becomes one scaling
    by a constant computed once per linearization point:

    - ``tanh_backward(x, c)`` → ``x ⊙ (1 − c²)``, ``sigmoid_backward(x, c)`` → ``x ⊙ (c − c²)``;
    - ``(x ⊙ a) ⊙ b`` → ``x ⊙ (a ⊙ b)``; ``x ⊙ a + x ⊙ b`` → ``x ⊙ (a + b)``;
    - ``slice(x ⊙ k)`` → ``slice(x) ⊙ slice(k)`` where every user of ``x ⊙ k`` is a slice
      (so that :func:`_simplify`'s ``slice(cat(...))`` rule then picks one piece);
    - a ``view`` to the shape it has, a one-piece ``cat``, the one piece of a ``split``:
      dropped; and :func:`_simplify`'s rules.

    ``x`` depends on the vector; ``a``, ``b``, ``c``, ``k`` do not and are numbers or
    tensors of the result's dtype (no promotion moves the arithmetic to another
    precision), and no new constant is larger than both it replaces. Exact in real
    arithmetic; in floating point the result differs from the traced one by rounding
    (the caller checks it against the eager product). The constants are new nodes that
    do not depend on the vector, so splitting the graph computes them with the others."""
    aten = torch.ops.aten
    muls = (aten.mul.Tensor, aten.mul.Scalar)
    views = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
    splits = (aten.split_with_sizes.default, aten.split.Tensor)

    def val(a):
        return a.meta.get("val") if isinstance(a, torch.fx.Node) else a

    def number(a):
        return isinstance(a, (int, float)) and not isinstance(a, bool)

    def same_shape(a, b):
        return isinstance(val(a), Tensor) and isinstance(val(b), Tensor) and val(a).shape == val(b).shape

    dependent: set = set()

    def constant(a, dtype) -> bool:
        return number(a) or (isinstance(a, torch.fx.Node) and a not in dependent
                             and isinstance(val(a), Tensor) and val(a).dtype == dtype)

    def operands(node):
        """``(x, k)`` for ``mul(x, k)`` or ``mul(k, x)``, ``x`` dependent, ``k`` a constant."""
        if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in muls
                and len(node.args) == 2 and not node.kwargs and isinstance(val(node), Tensor)):
            return None
        for x, k in (node.args, node.args[::-1]):
            if isinstance(x, torch.fx.Node) and x in dependent and constant(k, val(node).dtype):
                return x, k
        return None

    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()

    def like(v):
        """A fake tensor of ``v``'s shape, strides, dtype and device (``v`` if a number)."""
        if not isinstance(v, Tensor):
            return v
        with mode:
            return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)

    def emit(target, args, before):
        with graph.inserting_before(before):
            node = graph.call_function(target, tuple(args))
        fakes = [like(val(a)) for a in args]
        with mode:
            node.meta["val"] = target(*fakes)
        if any(isinstance(a, torch.fx.Node) and a in dependent for a in args):
            dependent.add(node)
        return node

    def combine(a, b, op, before):
        """``a ⊙ b`` or ``a + b`` of two constants (a number where both are); ``None``
        where the result would be larger than both (an outer product)."""
        if number(a) and number(b):
            return a * b if op == "mul" else a + b
        if number(a):
            a, b = b, a
        if number(b):
            return emit(aten.mul.Scalar if op == "mul" else aten.add.Scalar, (a, b), before)
        if torch.broadcast_shapes(val(a).shape, val(b).shape) not in (val(a).shape, val(b).shape):
            return None
        return emit(aten.mul.Tensor if op == "mul" else aten.add.Tensor, (a, b), before)

    def scale(x, k, before):
        return emit(aten.mul.Scalar if number(k) else aten.mul.Tensor, (x, k), before)

    def rewrite(node):
        target, args, out = node.target, node.args, val(node)
        if target is aten.cat.default:
            pieces = args[0]
            return pieces[0] if len(pieces) == 1 and same_shape(pieces[0], node) else None
        src = args[0] if args else None
        if not isinstance(src, torch.fx.Node) or not isinstance(out, Tensor):
            return None
        if target in views:
            return src if same_shape(src, node) else None
        if target is operator.getitem:
            whole = src.args[0] if src.op == "call_function" and src.target in splits else None
            return whole if whole is not None and args[1] == 0 and same_shape(whole, node) else None
        if target in (aten.tanh_backward.default, aten.sigmoid_backward.default) and len(args) == 2:
            c = args[1]
            if constant(c, out.dtype) and not number(c) and same_shape(c, node) and same_shape(src, node):
                square = emit(aten.mul.Tensor, (c, c), node)
                k = (emit(aten.rsub.Scalar, (square, 1), node) if target is aten.tanh_backward.default
                     else emit(aten.sub.Tensor, (c, square), node))
                return scale(src, k, node)
            return None
        if target in muls:
            found = operands(node)
            inner = None if found is None else operands(found[0])
            if inner is not None and val(found[0]).dtype == out.dtype:
                ab = combine(inner[1], found[1], "mul", node)
                return None if ab is None else scale(inner[0], ab, node)
            return None
        if target is aten.add.Tensor and len(args) == 2 and not node.kwargs:
            left, right = operands(args[0]), operands(args[1])
            if (left is not None and right is not None and left[0] is right[0] and same_shape(left[0], node)
                    and val(args[0]).dtype == val(args[1]).dtype == out.dtype):
                total = combine(left[1], right[1], "add", node)
                return None if total is None else scale(left[0], total, node)
            return None
        if target is aten.slice.Tensor:
            found = operands(src)
            if found is None or not all(u.op == "call_function" and u.target is aten.slice.Tensor
                                        for u in src.users):
                return None
            x, k = found
            whole = val(src)
            dim, start, end, step = (list(args[1:]) + [0, None, None, 1][len(args) - 1:])[:4]
            dim = dim % whole.dim()
            if not same_shape(x, src):
                return None
            if not number(k):
                kv = val(k)
                kdim = dim - (whole.dim() - kv.dim())
                if kdim >= 0 and kv.shape[kdim] != 1:
                    if kv.shape[kdim] != whole.shape[dim]:
                        return None
                    k = emit(aten.slice.Tensor, (k, kdim, start, end, step), node)
            return scale(emit(aten.slice.Tensor, (x, dim, start, end, step), node), k, node)
        return None

    changed, sweeps = True, 0
    while changed and sweeps < 100:  # sweeps in graph order until one rewrites nothing (a few)
        changed, sweeps = False, sweeps + 1
        dependent.clear()
        dependent.add(vector)
        for node in graph.nodes:
            if node.op == "call_function" and any(a in dependent for a in node.all_input_nodes):
                dependent.add(node)
        for node in list(graph.nodes):
            if node not in dependent or node is vector or node.op != "call_function" or not node.users:
                continue
            try:
                repl = rewrite(node)
            except Exception:  # noqa: BLE001 - a rule that does not fit leaves the node as it is
                repl = None
            if repl is not None:
                node.replace_all_uses_with(repl)
                changed = True
        changed = _simplify(graph) or changed


class _Traced:
    """A linear map ``v ↦ f(inputs…, v)`` traced once: ``constants(*inputs)`` computes
    every value that does not depend on ``v``; ``product(v, *constants)`` the rest.
    :meth:`graph` is ``product`` or ``product`` plus a diagonal term (the proximal
    ``diag Λ``, an input); ``compiled`` holds each compiled (``jvp_mode="compile"``) once
    asked for, kept with the trace (so keyed as it is); ``False`` once compiling it failed
    or disagreed. ``check`` is the vector the product is checked on (seeded, so the same
    one each time; kept rather than drawn again: a draw costs ~50 ms at 10^6 unknowns).
    ``proven``: the trace holds at every input of its signature (:func:`_holds_everywhere`),
    so each product (``"eager"``, or compiled without / with the diagonal: ``False`` /
    ``True``) is checked on its first use only, and ``verified`` holds those that passed;
    otherwise every solve checks."""

    def __init__(self, constants: torch.fx.GraphModule, product: torch.fx.GraphModule):
        self.constants, self.product = constants, product
        self.compiled: dict[bool, tuple | bool] = {}
        self.check: Tensor | None = None
        self.proven = False
        self.verified: set[bool | str] = set()
        self._with_diagonal: torch.fx.GraphModule | None = None
        self.merged: int | None = None  # see _add_diagonal
        self._compiled_constants: OrderedDict[tuple, Callable | None] = OrderedDict()

    def constants_at(self, inputs: tuple[Tensor, ...], compiled: bool = False) -> tuple[Tensor, ...]:
        """``constants(*inputs)``; with ``compiled``, by code compiled once per input key
        (shapes, strides, dtypes, devices: one pass over memory for what is otherwise an
        operation at a time), detached; eager where compiling fails (after a
        :class:`~difftto.solvers.compiled.CompileFallbackWarning`)."""
        if not compiled:
            return tuple(self.constants(*inputs))
        from .solvers.compiled import compile_graph, input_key

        key = input_key(inputs)
        if key not in self._compiled_constants:
            self._compiled_constants[key] = compile_graph(
                self.constants, inputs, "the constants of a traced product (jvp_mode='compile')")
            while len(self._compiled_constants) > 4:
                self._compiled_constants.popitem(last=False)
        code = self._compiled_constants[key]
        with torch.no_grad():
            return tuple(self.constants(*inputs) if code is None else code(*inputs))

    def graph(self, with_diagonal: bool) -> torch.fx.GraphModule:
        """``product(v, *constants)``, or with ``with_diagonal``
        ``(v, d, *constants) ↦ product(v, *constants) + d ⊙ v`` (built once, kept: code
        compiled for it is keyed by it; where ``merged`` is set, ``d`` must be given as
        ``d + constants[merged]``, see :func:`_add_diagonal`)."""
        if not with_diagonal:
            return self.product
        if self._with_diagonal is None:
            self._with_diagonal, self.merged = _add_diagonal(self.product)
        return self._with_diagonal

    def compiled_product(self, inputs: tuple[Tensor, ...], with_diagonal: bool):
        """The compiled :meth:`graph` (compiled now on first use, with ``inputs``, the
        vector, the diagonal where ``with_diagonal``, then the constants, as the example
        inputs), or ``None`` where it could not be compiled or was compiled for inputs of
        other strides (the code is specialized to them)."""
        from .solvers.compiled import compile_graph, input_key, warn_fallback

        key = input_key(inputs)
        found = self.compiled.get(with_diagonal)
        if found is None:
            compiled = compile_graph(self.graph(with_diagonal), inputs,
                                     "a traced product (jvp_mode='compile')")
            found = self.compiled[with_diagonal] = False if compiled is None else (compiled, key)
        if found is False:
            return None
        compiled, compiled_key = found
        if key != compiled_key:
            warn_fallback("a traced product (jvp_mode='compile')", ValueError(
                "this linearization point's constants have other strides than those it was "
                "compiled for"))
            return None
        return compiled


def _merged_scaling(product: torch.fx.GraphModule) -> tuple[torch.fx.Node, int] | None:
    """Where ``product``'s output is ``X + v ⊙ c`` (either order) with ``c`` one of its
    constants, of ``v``'s dtype and used there only: ``(X, c's index among the
    constants)``; else ``None``."""
    aten = torch.ops.aten
    placeholders = [n for n in product.graph.nodes if n.op == "placeholder"]
    v = placeholders[0]
    out = next(n for n in product.graph.nodes if n.op == "output").args[0]
    if not (isinstance(out, torch.fx.Node) and out.target == aten.add.Tensor and not out.kwargs
            and len(out.args) == 2):
        return None
    for term, rest in ((out.args[1], out.args[0]), (out.args[0], out.args[1])):
        if not (isinstance(term, torch.fx.Node) and term.target == aten.mul.Tensor
                and len(term.users) == 1 and isinstance(rest, torch.fx.Node)):
            continue
        a, b = term.args
        c = b if a is v else a if b is v else None
        if c is None or c is v or c not in placeholders or len(c.users) != 1:
            continue
        vv, cv = v.meta.get("val"), c.meta.get("val")
        if vv is None or cv is None or cv.dtype != vv.dtype:
            continue
        return rest, placeholders.index(c) - 1
    return None


def _add_diagonal(product: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, int | None]:
    """``(v, d, *constants) ↦ product(v, *constants) + d ⊙ v`` as one graph (a copy), and
    ``None``; or, where the product ends in ``+ v ⊙ c`` with ``c`` a constant
    (:func:`_merged_scaling`, e.g. ``J_fitᵀ J_fit`` of elementwise residuals), that term
    left out, so that ``d`` stands for ``d + c`` (computed once per linearization point,
    not read again on every product), and ``c``'s index among the constants."""
    aten = torch.ops.aten
    merge = _merged_scaling(product)
    graph = torch.fx.Graph()
    placeholders = [n for n in product.graph.nodes if n.op == "placeholder"]
    env = {placeholders[0]: graph.placeholder("v")}
    env[placeholders[0]].meta = dict(placeholders[0].meta)
    d = graph.placeholder("d")
    d.meta = dict(placeholders[0].meta)
    for node in placeholders[1:]:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node in product.graph.nodes:
        if node.op == "output":
            out = env[merge[0]] if merge is not None else torch.fx.node.map_arg(
                node.args[0], env.__getitem__)
            scaled = graph.call_function(aten.mul.Tensor, (d, env[placeholders[0]]))
            graph.output(graph.call_function(aten.add.Tensor, (out, scaled)))
        elif node.op != "placeholder":
            env[node] = graph.node_copy(node, env.__getitem__)
    graph.eliminate_dead_code()  # the merged term
    return torch.fx.GraphModule(torch.nn.Module(), graph), None if merge is None else merge[1]


class _Folded:
    """What :func:`_fold_linear_map` returns: ``self(v)`` the product; ``plus_diagonal``
    ``v ↦ product + diagonal ⊙ v`` in one compiled call, where a diagonal was given and the
    product is compiled (else ``None``); ``graph`` the graph and constants of
    ``plus_diagonal`` (or of the product without a diagonal) where compiled, for
    :meth:`~difftto.operators.LinearOperator.graph`, else ``None``."""

    def __init__(self, product: Callable[[Tensor], Tensor],
                 plus_diagonal: Callable[[Tensor], Tensor] | None = None,
                 graph: tuple[torch.fx.GraphModule, tuple[Tensor, ...]] | None = None):
        self.product, self.plus_diagonal, self.graph = product, plus_diagonal, graph
        functools.update_wrapper(self, product)  # named as the product it wraps

    def __call__(self, v: Tensor) -> Tensor:
        return self.product(v)


# problem -> {signature: _Traced or None (untraceable)}, the last few signatures each.
_TRACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TRACES_PER_PROBLEM = 4


def _trace_linear_map(fn: Callable[..., Tensor], inputs: tuple[Tensor, ...],
                      example: Tensor) -> _Traced | None:
    from torch.fx.experimental.proxy_tensor import make_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = make_fx(fn, tracing_mode="real")(*inputs, example)
    graph = traced.graph
    if any(_is_mutating(n) for n in graph.nodes if n.op == "call_function"):
        return None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs) + 1:
        return None
    vector = placeholders[-1]
    _fold_scalings(graph, vector)
    dependent = {vector}
    for node in graph.nodes:
        if node.op == "call_function":
            if any(a in dependent for a in node.all_input_nodes):
                dependent.add(node)
        elif node.op not in ("placeholder", "get_attr", "output"):
            return None
    # The values the vector-dependent part reads, in graph order; all must be tensors.
    needed = [n for n in graph.nodes if n not in dependent and n.op != "output"
              and any(u in dependent for u in n.users)]
    if any(not isinstance(n.meta.get("val"), Tensor) and n.op != "get_attr" for n in needed):
        return None
    const_graph = torch.fx.Graph()
    env: dict = {}
    for node in graph.nodes:
        if node in dependent or node.op == "output":
            continue
        env[node] = const_graph.node_copy(node, env.__getitem__)
    const_graph.output(tuple(env[n] for n in needed))
    const_graph.eliminate_dead_code()
    constants = torch.fx.GraphModule(traced, const_graph)

    product_graph = torch.fx.Graph()
    env = {vector: product_graph.placeholder("v")}
    env[vector].meta = dict(vector.meta)
    for i, node in enumerate(needed):
        env[node] = product_graph.placeholder(f"c{i}")
        env[node].meta = dict(node.meta)
    for node in graph.nodes:
        if node in dependent and node is not vector:
            env[node] = product_graph.node_copy(node, env.__getitem__)
        elif node.op == "output":
            product_graph.output(torch.fx.node.map_arg(node.args[0], env.__getitem__))
    # No second _simplify here: _fold_scalings sweeps the whole graph, _simplify included,
    # until a sweep rewrites nothing, and every constant in ``needed`` has a reader here.
    return _Traced(constants, torch.fx.GraphModule(torch.nn.Module(), product_graph))


class _ValueReads(torch.overrides.TorchFunctionMode):
    """Notes every read of a tensor's value into Python (``item``, ``bool``, ``float``,
    ``tolist``, ``numpy``, ...) made under it, on any tensor."""

    READS = frozenset({Tensor.item, Tensor.tolist, Tensor.numpy, Tensor.__array__, Tensor.__bool__,
                       Tensor.__float__, Tensor.__int__, Tensor.__index__, Tensor.__complex__})

    def __init__(self):
        super().__init__()
        self.found = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.found = self.found or func in self.READS
        return func(*args, **(kwargs or {}))


def _holds_everywhere(fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], example: Tensor) -> bool:
    """Whether a trace of ``fn(*inputs, example)`` holds at every input of the same
    shapes, dtypes and devices, as far as tensors go: ``fn`` is traced again with fake
    tensors (shapes without values) and must read no tensor's value into Python (``item``,
    ``bool``, ``float``, ``tolist``: a branch on the data, or a value baked into the trace,
    whether of an input or of a tensor it closes over), use no tensor it closes over
    instead of taking it as an input, and give every value in that trace a static shape
    (no size that depends on values, e.g. a boolean mask's selection). Python state that
    is not a tensor is the caller's to cover (the trace's signature)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils._pytree import tree_leaves

    reads = _ValueReads()
    try:
        with warnings.catch_warnings(), reads:
            warnings.simplefilter("ignore")
            fake = make_fx(fn, tracing_mode="fake")(*inputs, example)
    except Exception:  # noqa: BLE001 - any failure means "not proven": keep checking
        return False
    if reads.found:
        return False
    symbolic = (torch.SymInt, torch.SymFloat, torch.SymBool)
    for node in fake.graph.nodes:
        for value in tree_leaves(node.meta.get("val")):
            if isinstance(value, symbolic) or (
                    isinstance(value, Tensor) and not all(isinstance(s, int) for s in value.shape)):
                return False
    return True


def _fold_linear_map(fn: Callable[..., Tensor], like: Tensor, inputs: tuple[Tensor, ...] = (),
                     *, owner: object = None, signature: Hashable = None, compile: bool = False,
                     reference: Callable[..., Tensor] | None = None,
                     diagonal: Tensor | None = None, provable: bool = False) -> _Folded | None:
    """``v ↦ fn(*inputs, v)`` (linear in ``v``, a tensor shaped as ``like``) as a folded
    graph, or ``None`` where it cannot be traced, mutates tensors, or disagrees with
    ``fn`` on a check vector (e.g. an extension kernel the trace cannot see would turn
    into a constant).

    With an ``owner`` (the problem's class) and a hashable ``signature`` (shapes, dtypes,
    the non-tensor data and problem state), the trace is kept and reused for later inputs
    of that signature:
    a new linearization point then costs one evaluation of the constant part, not a
    trace. The check against ``fn`` runs on every call, so a trace that does not hold at
    new inputs (data-dependent control flow) is caught, dropped, and ``None`` returned;
    except where the trace is proven to hold at every input of its signature: with
    ``provable`` (the caller's signature covers all the Python state ``fn`` reads besides
    its tensor inputs, e.g. a problem whose attributes are all plain values) and
    :func:`_holds_everywhere` true, each product is checked on its first use only.
    ``reference``, where given, is an eager function equal to ``fn`` (another order of
    differentiation) that the check evaluates instead, being cheaper; ``fn`` where it
    raises (e.g. an operation without a double-backward rule).

    With ``compile`` (and a kept trace), the product runs compiled
    (:meth:`_Traced.compiled_product`, under ``no_grad``: the products feed solvers); the
    same check runs on the compiled product, and where it fails (or compiling did) the
    folded eager product is checked and used instead, after a warning. A ``diagonal``
    ``[B, n]`` (the proximal ``Λ``) is then compiled into the product too: the result's
    ``plus_diagonal`` is ``v ↦ fn(v) + diagonal ⊙ v`` in one call, checked as well.

    Returns a :class:`_Folded` (callable as the product), or ``None``.
    """
    if torch._C._functorch.maybe_current_level() is not None:
        return None  # inside an outer torch.func transform: keep the eager products
    cache = None
    if owner is not None and signature is not None:
        try:
            cache = _TRACES.setdefault(owner, OrderedDict())
        except TypeError:  # not weak-referenceable
            cache = None
    try:
        if cache is not None and signature in cache:
            traced = cache[signature]
            cache.move_to_end(signature)
        else:
            gen = torch.Generator(device="cpu").manual_seed(7)
            # Fresh tensors: make_fx tells inputs from constants by identity, so the vector
            # must not be a tensor the function closes over.
            example, check = (torch.randn(like.shape, generator=gen, dtype=like.dtype)
                              .to(like.device) for _ in range(2))
            traced = _trace_linear_map(fn, inputs, example)
            if traced is not None:
                traced.check = check
                traced.proven = provable and cache is not None and _holds_everywhere(fn, inputs, example)
            if cache is not None:
                cache[signature] = traced
                while len(cache) > _TRACES_PER_PROBLEM:
                    cache.popitem(last=False)
        if traced is None:
            return None
        constants = traced.constants_at(inputs, compiled=compile and cache is not None)
        product = traced.product

        def apply(v: Tensor) -> Tensor:
            return product(v, *constants)

        # A second vector: a product the trace did not see would show up as a constant.
        check = traced.check
        found: list[Tensor] = []

        def want() -> Tensor:
            """The eager product on the check vector (computed once, where a check runs)."""
            if not found:
                value = None
                if reference is not None:
                    try:
                        value = reference(*inputs, check)
                    except (NotImplementedError, RuntimeError):
                        value = None
                found.append(fn(*inputs, check) if value is None else value)
            return found[0]

        if compile and cache is not None:
            folded = _compiled_fold(traced, apply, constants, check, want, diagonal)
            if folded is not None:
                return folded
        if compile and cache is None:
            from .solvers.compiled import warn_fallback

            warn_fallback("a traced product (jvp_mode='compile')", ValueError(
                "its trace serves one linearization point only (data or problem state holds "
                "values other than tensors and plain constants), so it is not compiled"))
        ok = _verified(traced, "eager", lambda: _agrees(apply(check), want()))
    except Exception:  # noqa: BLE001 - any tracing failure means "keep the eager products"
        ok = False
    if not ok:
        if cache is not None:
            cache[signature] = None
        return None
    return _Folded(apply)


def _verified(traced: _Traced, product: bool | str, check: Callable[[], bool]) -> bool:
    """``check()``, or ``True`` without running it where ``traced`` is proven and this
    product passed it before (see :class:`_Traced`)."""
    if traced.proven and product in traced.verified:
        return True
    ok = check()
    if ok:
        traced.verified.add(product)
    return ok


def _compiled_fold(traced: _Traced, apply: Callable[[Tensor], Tensor],
                   constants: tuple[Tensor, ...], check: Tensor, want: Callable[[], Tensor],
                   diagonal: Tensor | None) -> _Folded | None:
    """The compiled product of ``traced`` at these ``constants`` (with ``diagonal``: the
    compiled ``product + diagonal ⊙ v``, and the product alone as the same code with a
    zero diagonal), checked on ``check`` against ``want()`` (the eager product there;
    only where :func:`_verified` runs the check); ``None`` (after a warning, the trace
    marked uncompilable) where it disagrees or could not be compiled."""
    from .solvers.compiled import input_key, warn_fallback

    constants = tuple(c.detach() for c in constants)
    with_diagonal = diagonal is not None
    d = diagonal.detach().contiguous() if with_diagonal else None
    if with_diagonal:
        traced.graph(True)  # sets traced.merged
        merged = traced.merged
        # The graph's diagonal input: d, plus the product's own scaling of v where that
        # term was merged into it (the product alone then gets that scaling, else zeros;
        # made on its first use: PCG uses the sum only).
        d_in = d if merged is None else d + constants[merged]
        alone: list[Tensor] = []

        def alone_diagonal() -> Tensor:
            if not alone:
                zeros = torch.zeros_like(d)
                alone.append(zeros if merged is None else zeros + constants[merged])
            return alone[0]
    head = (check, d_in) if with_diagonal else (check,)
    compiled = traced.compiled_product((*head, *constants), with_diagonal)
    if compiled is None:
        return None
    # Compiled for the check vector's shape, strides, dtype and device only.
    like_check = input_key((check,))

    if not with_diagonal:
        def product(v: Tensor) -> Tensor:
            if input_key((v,)) != like_check:
                return apply(v)
            with torch.no_grad():
                return compiled(v, *constants)

        if _verified(traced, False, lambda: _agrees(product(check), want())):
            return _Folded(product, None, (traced.graph(False), constants))
    else:
        def plus_diagonal(v: Tensor) -> Tensor:
            if input_key((v,)) != like_check:
                return apply(v) + d * v
            with torch.no_grad():
                return compiled(v, d_in, *constants)

        def product(v: Tensor) -> Tensor:
            # The same code with d = 0: 0 ⊙ v adds exact zeros (NaN where v is not
            # finite, which a finite product would not give; non-finite either way).
            if input_key((v,)) != like_check:
                return apply(v)
            with torch.no_grad():
                return compiled(v, alone_diagonal(), *constants)

        # Both: the product part alone (a large diagonal would hide its error in the sum).
        def agrees() -> bool:
            return _agrees(product(check), want()) and _agrees(plus_diagonal(check), want() + d * check)

        if _verified(traced, True, agrees):
            return _Folded(product, plus_diagonal, (traced.graph(True), (d_in, *constants)))
    traced.compiled[with_diagonal] = False
    warn_fallback("a traced product (jvp_mode='compile')", ValueError(
        "the compiled product disagrees with the eager product on a check vector"))
    return None


def _agrees(got, want: Tensor) -> bool:
    """``got`` equals ``want`` to ``1e3 ε`` relative to ``max|want|``."""
    if not (isinstance(got, Tensor) and got.shape == want.shape):
        return False
    scale = want.abs().max().clamp_min(torch.finfo(want.dtype).tiny)
    return bool(((got - want).abs().max() / scale) <= 1e3 * torch.finfo(want.dtype).eps)


def _plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _plain_state(problem: Problem) -> bool:
    """Whether every attribute of ``problem`` is a plain value (then the trace's signature
    holds all of its state; other state, e.g. a dict, can change in place unseen)."""
    return all(_plain(v) for v in getattr(problem, "__dict__", {}).values())


def _signature(kind: str, problem: Problem, layout: Layout, data: Data
               ) -> tuple[tuple[str, ...], Hashable]:
    """The keys of ``data`` holding tensors (the trace's inputs after θ), and the signature
    under which a trace is reused by every instance of the problem's class: the kind of
    product, the shapes, the plain values of ``data`` and of the problem's attributes.
    ``None`` when ``data`` holds a non-tensor value that is more than a plain constant
    (the trace then serves this linearization point only); a problem with such an
    attribute also keys its traces by the instance."""
    keys = tuple(k for k, v in (data or {}).items() if isinstance(v, Tensor))
    parts = []
    for k, value in (data or {}).items():
        if isinstance(value, Tensor):
            parts.append((k, tuple(value.shape), value.dtype, value.device))
        elif _plain(value):
            parts.append((k, type(value).__name__, value))
        else:
            return keys, None
    state = getattr(problem, "__dict__", {})
    owner = tuple(sorted((k, type(v).__name__, v) for k, v in state.items() if _plain(v)))
    if not _plain_state(problem):
        owner += (("instance", id(problem)),)
    return keys, (kind, owner, layout, tuple(parts))


def _with_tensors(data: Data, keys: tuple[str, ...], tensors) -> Data:
    if data is None:
        return None
    out = dict(data)
    out.update(zip(keys, tensors))
    return out
