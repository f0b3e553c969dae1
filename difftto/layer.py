"""``ImplicitLayer``: a differentiable test-time optimization layer.

Forward: ``θ* = argmin_θ E(θ) = D(θ; data) + ½ Σ Λ (θ − θ0)²`` by an inner optimizer
started at ``θ0`` (the warm start, which gets no gradient).

Backward (``backward="implicit"``, the default) by the Implicit Function Theorem at
``∇E(θ*) = 0``. With ``ḡ = ∂L/∂θ*`` and ``H = JᵀJ + diag Λ`` (Gauss-Newton) or
``∇²D + diag Λ`` (exact), one matrix-free PCG solve ``H u = ḡ`` gives

- ``∂L/∂θ0 = Λ ⊙ u`` (through the proximal anchor),
- ``∂L/∂Λ = −(θ* − θ0) ⊙ u``,
- ``∂L/∂data = −(∂²E/∂θ∂data)ᵀ u`` (one autograd VJP of ``∇θD`` at ``θ*``).

The inner steps are never backpropagated, so memory does not grow with their number.
This module is the only place in difftto that differentiates a solve.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .finite import all_finite
from .inner import GradientDescent, InnerInfo, InnerOptimizer
from .objective import JVP_MODES, InnerObjective
from .problems.base import Problem
from .problems.registry import get as get_problem
from .regularizers import Proximal, check_weights
from .solvers.dense import DenseCholesky
from .solvers.pcg import PCG
from .solvers.result import FAILURE_POLICIES, LinearSolveResult, Status
from .tree import Layout, Params

__all__ = ["ImplicitLayer", "LayerInfo", "BackwardInfo", "BACKWARD_MODES", "HESSIANS",
           "StationarityWarning", "InnerDivergenceWarning", "InnerDivergenceError"]

BACKWARD_MODES = ("implicit", "unrolled", "truncated", "straight_through")
HESSIANS = ("gauss_newton", "exact")


class StationarityWarning(RuntimeWarning):
    """The inner optimizer stopped far from a stationary point: the implicit gradient
    is biased."""


class InnerDivergenceWarning(RuntimeWarning):
    """The inner optimizer produced non-finite parameters (it diverged) for some batch
    elements; their outputs are NaN/Inf."""


class InnerDivergenceError(RuntimeError):
    """As :class:`InnerDivergenceWarning`, raised instead under ``on_failure="raise"``."""


@dataclass
class BackwardInfo:
    """The implicit backward's linear solve, per batch element (filled by backward)."""

    status: Tensor
    iterations: Tensor
    relative_residual: Tensor

    @property
    def failures(self) -> int:
        return int((self.status != Status.CONVERGED).sum())

    @staticmethod
    def of(result: LinearSolveResult) -> BackwardInfo:
        return BackwardInfo(result.status, result.iterations, result.relative_residual)


@dataclass
class LayerInfo:
    """What a layer call did. ``forward`` is set at once; ``backward`` once the implicit
    backward has run (``None`` before, and in other backward modes)."""

    forward: InnerInfo
    backward: BackwardInfo | None = None
    mode: str = "implicit"
    extras: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        b = "pending" if self.backward is None else (
            f"status {self.backward.status.tolist()}, iterations {self.backward.iterations.tolist()}, "
            f"residual {[f'{v:.2e}' for v in self.backward.relative_residual.tolist()]}"
        )
        return f"LayerInfo(mode={self.mode}, {self.forward.summary()}, backward: {b})"


class ImplicitLayer(nn.Module):
    """A test-time optimization layer with implicit (IFT + PCG) gradients.

    Args:
        problem: a :class:`~difftto.Problem` or the name of a registered one.
        inner: the inner optimizer (default ``GradientDescent(lr=1e-2, steps=100)``).
        backward: ``"implicit"`` (default), ``"unrolled"`` (autograd through every inner
            step: the reference), ``"truncated"`` (through the last ``truncate`` steps),
            or ``"straight_through"`` (``∂θ*/∂θ0 = I``; no gradient to Λ or data).
        hessian: ``"gauss_newton"`` (``JᵀJ + diag Λ``; least-squares problems, the
            Diff3R choice) or ``"exact"`` (``∇²D + diag Λ`` by Hessian-vector products).
        solver: the backward's linear solver (default ``PCG(rtol=1e-6)``); any object
            with ``solve(operator, b, on_failure=...) -> LinearSolveResult``.
        on_failure: what a backward solve that did not converge does: ``"raise"``,
            ``"warn"`` (default), ``"zero"`` (zero gradient for those elements) or
            ``"best"`` (best iterate).
        truncate: steps unrolled in ``"truncated"`` mode.
        jvp_mode: how generic problems form ``J·v`` (see :class:`InnerObjective`);
            ``"compile"`` (opt-in) compiles the traced products with inductor, best
            paired with ``solver=PCG(backend="compiled")`` (see
            :mod:`difftto.solvers.compiled`); the first solve of a shape pays seconds of
            compilation.
        stationarity_warning: warn when an element's relative stationarity after the
            forward exceeds this (``None``: never).

    Call: ``theta_star, info = layer(theta0, lam, data)``; see :meth:`forward`.
    """

    def __init__(
        self,
        problem: Problem | str,
        inner: InnerOptimizer | None = None,
        backward: str = "implicit",
        hessian: str = "gauss_newton",
        solver: Any | None = None,
        on_failure: str = "warn",
        *,
        truncate: int = 10,
        jvp_mode: str = "auto",
        stationarity_warning: float | None = None,
    ):
        super().__init__()
        if isinstance(problem, str):
            problem = get_problem(problem)
        if not isinstance(problem, Problem):
            raise TypeError(f"problem must be a difftto.Problem or a registered name, got {problem!r}")
        if backward not in BACKWARD_MODES:
            raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}")
        if hessian not in HESSIANS:
            raise ValueError(f"hessian must be one of {HESSIANS}, got {hessian!r}")
        if hessian == "gauss_newton" and not problem.is_least_squares:
            raise ValueError(
                f"hessian='gauss_newton' needs residuals(); {type(problem).__name__} defines only "
                "objective(). Use hessian='exact'."
            )
        if on_failure not in FAILURE_POLICIES:
            raise ValueError(f"on_failure must be one of {FAILURE_POLICIES}, got {on_failure!r}")
        if jvp_mode not in JVP_MODES:
            raise ValueError(f"jvp_mode must be one of {JVP_MODES}, got {jvp_mode!r}")
        inner = GradientDescent() if inner is None else inner
        if not isinstance(inner, InnerOptimizer):
            raise TypeError(f"inner must be an InnerOptimizer, got {inner!r}")
        if backward in ("unrolled", "truncated") and not inner.supports_unrolling:
            raise ValueError(
                f"backward={backward!r} differentiates through the inner steps, which "
                f"{type(inner).__name__} does not support; use backward='implicit'"
            )
        if backward == "truncated" and not (isinstance(truncate, int) and truncate >= 1):
            raise ValueError(f"truncate must be an int >= 1, got {truncate!r}")
        self.problem, self.inner, self.backward_mode, self.hessian = problem, inner, backward, hessian
        self.solver = PCG(rtol=1e-6) if solver is None else solver
        self.on_failure, self.truncate, self.jvp_mode = on_failure, truncate, jvp_mode
        self.stationarity_warning = stationarity_warning

    def extra_repr(self) -> str:
        return (f"problem={self.problem!r}, inner={type(self.inner).__name__}, "
                f"backward={self.backward_mode!r}, hessian={self.hessian!r}")

    def forward(self, theta0: Params, lam: Any = None, data: Mapping[str, Any] | None = None
                ) -> tuple[Params, LayerInfo]:
        """Refines ``theta0`` and returns ``(theta_star, info)``.

        Args:
            theta0: the initial guess and proximal anchor: a tensor ``[B, ...]`` or a dict
                of named tensors each ``[B, ...]``.
            lam: proximal weights ``Λ ≥ 0``: a number, a tensor broadcastable per group
                (scalar, ``[B]``, a leading prefix of the group's shape such as ``[B, N]``
                for ``[B, N, 3]``, or the full shape), or a dict by group. ``None``: no
                proximal term (the data term's own curvature must then be positive
                definite, or the backward solve reports a breakdown).
            data: the problem's data, a dict (or ``None``). Tensors in it that require
                grad receive gradients (implicit: the cross term; unrolled: autograd).

        Returns:
            ``theta_star`` with the structure of ``theta0``, differentiable with respect
            to ``theta0``, ``lam`` and ``data``; and :class:`LayerInfo`.

        Raises:
            ValueError / TypeError: malformed inputs (the message names the argument).
        """
        layout = Layout.of(theta0, "theta0")
        flat0 = layout.flatten(theta0)
        _check_finite(flat0, "theta0")
        lam_flat = None
        if lam is not None:
            lam_flat = layout.expand(lam, "lam")
            check_weights(lam_flat.detach(), "lam")
        if data is not None and not isinstance(data, Mapping):
            raise TypeError(f"data must be a dict (or None), got {type(data).__name__}")
        data_keys = [k for k, v in (data or {}).items()
                     if isinstance(v, Tensor) and v.requires_grad]
        for k, v in (data or {}).items():
            if isinstance(v, Tensor) and (v.is_floating_point() or v.is_complex()):
                _check_finite(v.detach(), f"data[{k!r}]")

        mode = self.backward_mode
        if mode == "implicit":
            info = LayerInfo(forward=None, mode=mode)  # type: ignore[arg-type]
            ctx = _Context(self, layout, data, data_keys, info)
            lam_arg = lam_flat if lam_flat is not None else flat0.new_zeros(0)
            flat_star = _ImplicitSolve.apply(flat0, lam_arg, ctx, *[data[k] for k in data_keys])
        else:
            flat_star, inner_info = self._run_differentiable(layout, flat0, lam_flat, data, mode)
            info = LayerInfo(forward=inner_info, mode=mode)
        self._check_divergence(flat_star)
        self._check_stationarity(info.forward)
        return layout.unflatten(flat_star), info

    # -------------------------------------------------------------- forward
    def _objective(self, layout, anchor, lam_flat, data) -> InnerObjective:
        prox = None if lam_flat is None else Proximal(anchor, lam_flat)
        return InnerObjective(self.problem, layout, data, prox, jvp_mode=self.jvp_mode)

    def _run_differentiable(self, layout, flat0, lam_flat, data, mode):
        objective = self._objective(layout, flat0, lam_flat, data)
        start = flat0.detach()  # the warm start gets no gradient; the anchor does
        if mode == "straight_through":
            with torch.no_grad():
                star, inner_info = self.inner.run(objective, start)
            return flat0 + (star - flat0).detach(), inner_info
        if mode == "unrolled":
            return self.inner.run(objective, start, create_graph=True)
        return self.inner.run(objective, start, graph_last=min(self.truncate, self.inner.steps))

    def _check_divergence(self, flat_star: Tensor) -> None:
        """Never hands back NaN/Inf silently: warns (raises under ``on_failure="raise"``)
        naming the diverged batch elements. Inputs were checked finite, so a non-finite
        θ* means the inner optimizer diverged."""
        bad = ~all_finite(flat_star.detach(), dim=1)
        if not bool(bad.any()):
            return
        idx = bad.nonzero().flatten().tolist()
        msg = (f"the inner optimizer {self.inner!r} diverged: theta_star is non-finite (NaN/Inf) for "
               f"batch elements {idx} of {flat_star.shape[0]}; lower the inner lr, use damping, or "
               "raise the proximal weights lam")
        if self.on_failure == "raise":
            raise InnerDivergenceError(msg)
        warnings.warn(msg, InnerDivergenceWarning, stacklevel=3)

    def _check_stationarity(self, inner_info: InnerInfo) -> None:
        limit = self.stationarity_warning
        if limit is None:
            return
        bad = inner_info.stationarity > limit
        if bool(bad.any()):
            warnings.warn(
                f"the inner optimizer stopped at relative stationarity "
                f"{inner_info.stationarity.tolist()} (> {limit} for {int(bad.sum())} elements): "
                "the implicit gradient assumes ∇E(θ*) = 0 and is biased there; run more inner "
                "steps or raise the proximal weights",
                StationarityWarning, stacklevel=3,
            )

    # ------------------------------------------------------------- backward
    def _backward_operator(self, objective: InnerObjective, theta_star: Tensor):
        if self.hessian == "gauss_newton":
            return objective.gauss_newton_operator(theta_star)
        return objective.hessian_operator(theta_star)

    def _solve_backward(self, operator, rhs) -> LinearSolveResult:
        if isinstance(self.solver, (PCG, DenseCholesky)):
            return self.solver.solve(operator, rhs, on_failure=self.on_failure)
        return self.solver.solve(operator, rhs)


@dataclass
class _Context:
    """Non-tensor state carried from the layer call into the autograd function."""

    layer: ImplicitLayer
    layout: Layout
    data: Mapping[str, Any] | None
    grad_keys: list[str]
    info: LayerInfo


def _with_leaves(data, keys, leaves):
    if data is None:
        return None
    out = dict(data)
    out.update(zip(keys, leaves))
    return out


class _ImplicitSolve(torch.autograd.Function):
    """``flat θ* = argmin E`` with the IFT backward. Inputs: ``θ0 [B, n]``, ``Λ [B, n]``
    (or an empty tensor for none), the context, and the data tensors that need grad."""

    @staticmethod
    def forward(theta0: Tensor, lam: Tensor, ctx_data: _Context, *leaves: Tensor) -> Tensor:
        layer = ctx_data.layer
        lam_flat = None if lam.numel() == 0 else lam.detach()
        data = _with_leaves(ctx_data.data, ctx_data.grad_keys, [t.detach() for t in leaves])
        objective = layer._objective(ctx_data.layout, theta0.detach(), lam_flat, data)
        with torch.no_grad():
            star, inner_info = layer.inner.run(objective, theta0.detach())
        ctx_data.info.forward = inner_info
        return star

    @staticmethod
    def setup_context(ctx, inputs, output):
        theta0, lam, ctx_data, *leaves = inputs
        ctx.ctx_data = ctx_data
        ctx.has_lam = lam.numel() > 0
        ctx.save_for_backward(theta0, lam, output, *leaves)

    @staticmethod
    def backward(ctx, grad_star: Tensor):
        theta0, lam, star, *leaves = ctx.saved_tensors
        c: _Context = ctx.ctx_data
        layer = c.layer
        lam_flat = lam.detach() if ctx.has_lam else None
        data = _with_leaves(c.data, c.grad_keys, [t.detach() for t in leaves])
        objective = layer._objective(c.layout, theta0.detach(), lam_flat, data)
        star = star.detach()
        operator = layer._backward_operator(objective, star)
        result = layer._solve_backward(operator, grad_star.detach())
        c.info.backward = BackwardInfo.of(result)
        u = result.solution  # the failure policy has already acted on failed elements
        grad_theta0 = grad_lam = None
        if ctx.has_lam:
            prox = Proximal(theta0.detach(), lam_flat)
            if ctx.needs_input_grad[0]:
                grad_theta0 = prox.anchor_cotangent(u)
            if ctx.needs_input_grad[1]:
                grad_lam = prox.weights_cotangent(star, u)
        grad_leaves = [None] * len(leaves)
        wanted = [i for i, _ in enumerate(leaves) if ctx.needs_input_grad[3 + i]]
        if wanted:
            grad_leaves = _data_cotangents(c, lam_flat, theta0, star, leaves, u, wanted)
        return (grad_theta0, grad_lam, None, *grad_leaves)


def _data_cotangents(c: _Context, lam_flat, theta0, star, leaves, u, wanted):
    """``−(∂²D/∂θ∂data)ᵀ u``: one VJP of ``∇θD(θ*, data)`` with respect to data (by
    torch.func, so that it also runs under an outer torch.func transform)."""
    fixed = [t.detach() for t in leaves]
    star = star.detach()

    def data_gradient(*targets):
        local = list(fixed)
        for i, t in zip(wanted, targets):
            local[i] = t
        data = _with_leaves(c.data, c.grad_keys, local)
        objective = c.layer._objective(c.layout, theta0.detach(), None, data)
        return torch.func.grad(lambda t: objective.data_term(t).sum())(star)

    _, vjp_fn = torch.func.vjp(data_gradient, *[fixed[i] for i in wanted])
    grads = vjp_fn(u)
    out = [None] * len(leaves)
    for i, gi in zip(wanted, grads):
        out[i] = -gi
    return out


def _check_finite(t: Tensor, name: str) -> None:
    if not bool(all_finite(t)):
        bad = ~torch.isfinite(t)
        raise ValueError(f"{name} contains {int(bad.sum())} non-finite values (NaN/Inf) of {t.numel()}")
