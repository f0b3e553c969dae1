"""Inner (test-time) optimizers: minimize ``E`` from a warm start.

An inner optimizer only optimizes. It works on flat parameters ``[B, n]`` through an
:class:`~difftto.objective.InnerObjective` and returns the final iterate with
:class:`InnerInfo` diagnostics. The layer decides whether its steps build an autograd
graph (``unrolled``/``truncated`` backward) or not (``implicit``: memory independent
of the number of steps).

Per-group learning rates (as 3DGS trainers use) are given as a dict keyed by the
parameter groups of a dict-structured ``θ``; :meth:`Layout.expand` broadcasts them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .objective import InnerObjective
from .solvers.pcg import PCG
from .tree import Layout

__all__ = ["InnerOptimizer", "InnerInfo", "GradientDescent", "Adam", "GaussNewton"]


@dataclass
class InnerInfo:
    """Forward diagnostics, per batch element.

    Attributes:
        steps: ``[B]`` steps taken.
        objective: ``[B]`` final ``E(θ*)``.
        initial_objective: ``[B]`` ``E`` at the warm start.
        stationarity: ``[B]`` ``‖∇E(θ*)‖ / ‖∇E(θ_start)‖`` — how far the IFT's
            assumption ``∇E(θ*) = 0`` holds (small is good).
        gradient_norm: ``[B]`` ``‖∇E(θ*)‖``.
        converged: ``[B]`` bool, ``stationarity <= tol`` when the optimizer has a
            ``tol``; all False otherwise.
    """

    steps: Tensor
    objective: Tensor
    initial_objective: Tensor
    stationarity: Tensor
    gradient_norm: Tensor
    converged: Tensor

    def summary(self) -> str:
        return (
            f"inner: steps {self.steps.tolist()}, E {_fmt(self.initial_objective)} -> "
            f"{_fmt(self.objective)}, stationarity {_fmt(self.stationarity)}"
        )


def _fmt(t: Tensor) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in t.detach().cpu().tolist()) + "]"


class InnerOptimizer:
    """Base class. Subclasses implement :meth:`init_state` and :meth:`step`.

    Args (common):
        steps: maximum number of steps.
        tol: stop an element early once ``‖∇E‖ / ‖∇E(θ_start)‖ <= tol`` (checked every
            ``check_every`` steps, so the host syncs rarely). ``None``: run all steps.
    """

    steps: int
    tol: float | None
    check_every: int = 10
    supports_unrolling: bool = True

    def init_state(self, objective: InnerObjective, theta: Tensor) -> dict:
        return {}

    def step(self, objective: InnerObjective, theta: Tensor, state: dict, active: Tensor,
             *, create_graph: bool) -> tuple[Tensor, dict]:
        """One step for the elements where ``active`` ``[B]`` is True."""
        raise NotImplementedError

    def _validate(self):
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {self.steps!r}")
        if self.tol is not None and not self.tol >= 0:
            raise ValueError(f"tol must be >= 0 or None, got {self.tol!r}")

    def run(self, objective: InnerObjective, theta_start: Tensor, *, create_graph: bool = False,
            graph_last: int | None = None) -> tuple[Tensor, InnerInfo]:
        """Runs up to ``steps`` steps from ``theta_start`` ``[B, n]``.

        Args:
            create_graph: build an autograd graph through every step (unrolled).
            graph_last: build it only through the last ``graph_last`` steps (truncated);
                the state entering them is detached.

        Returns:
            ``(θ*, InnerInfo)``.
        """
        theta = theta_start if create_graph else theta_start.detach()
        e0, g0 = objective.value_and_grad(theta)
        g0_norm = torch.linalg.vector_norm(g0, dim=1)
        state = self.init_state(objective, theta)
        batch = theta.shape[0]
        active = torch.ones(batch, dtype=torch.bool, device=theta.device)
        steps_taken = torch.zeros(batch, dtype=torch.int64, device=theta.device)
        for k in range(self.steps):
            graph = create_graph or (graph_last is not None and k >= self.steps - graph_last)
            if graph_last is not None and k == self.steps - graph_last and not create_graph:
                theta = theta.detach().requires_grad_(False)
                state = {key: (v.detach() if isinstance(v, Tensor) else v) for key, v in state.items()}
            theta, state = self.step(objective, theta, state, active, create_graph=graph)
            steps_taken += active.to(steps_taken.dtype)
            if self.tol is not None and (k + 1) % self.check_every == 0 and k + 1 < self.steps:
                _, g = objective.value_and_grad(theta)
                rel = torch.linalg.vector_norm(g, dim=1) / g0_norm.clamp_min(torch.finfo(g.dtype).tiny)
                active = active & (rel > self.tol)
                if not bool(active.any()):
                    break
        e, g = objective.value_and_grad(theta)
        g_norm = torch.linalg.vector_norm(g, dim=1)
        stationarity = torch.where(g0_norm > 0, g_norm / g0_norm.clamp_min(torch.finfo(g.dtype).tiny),
                                   g_norm)
        converged = (stationarity <= self.tol) if self.tol is not None else torch.zeros_like(active)
        info = InnerInfo(steps_taken, e, e0, stationarity, g_norm, converged)
        return theta, info


def _group_values(value, layout: Layout, name: str) -> Tensor:
    """A per-group setting (a number or a dict by group) as a ``[1, n]`` tensor."""
    if isinstance(value, Mapping):
        missing = set(layout.names) - set(value)
        if layout.keys is None or missing:
            raise ValueError(
                f"{name} given per group must have the keys {sorted(layout.names)}, "
                f"got {sorted(value)}"
            )
        value = {k: value[k] for k in layout.names}
    elif not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number or a dict by group, got {value!r}")
    one = Layout(layout.keys, layout.shapes, 1, layout.dtype, layout.device)
    return one.expand(value, name)


@dataclass
class GradientDescent(InnerOptimizer):
    """``θ ← θ − lr ∇E``. ``lr`` is a number or a dict by parameter group."""

    lr: float | Mapping[str, float] = 1e-2
    steps: int = 100
    tol: float | None = None
    check_every: int = 10

    def __post_init__(self):
        self._validate()

    def init_state(self, objective, theta):
        return {"lr": _group_values(self.lr, objective.layout, "lr")}

    def step(self, objective, theta, state, active, *, create_graph):
        _, g = objective.value_and_grad(theta, create_graph=create_graph)
        update = state["lr"] * g
        return theta - torch.where(active[:, None], update, 0.0), state


@dataclass
class Adam(InnerOptimizer):
    """Adam with bias correction and per-group learning rates (dict by group)."""

    lr: float | Mapping[str, float] = 1e-2
    steps: int = 100
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    tol: float | None = None
    check_every: int = 10

    def __post_init__(self):
        self._validate()
        b1, b2 = self.betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")

    def init_state(self, objective, theta):
        z = torch.zeros_like(theta.detach())
        return {"lr": _group_values(self.lr, objective.layout, "lr"), "m": z, "v": z.clone(),
                "t": torch.zeros(theta.shape[0], dtype=theta.dtype, device=theta.device)}

    def step(self, objective, theta, state, active, *, create_graph):
        b1, b2 = self.betas
        _, g = objective.value_and_grad(theta, create_graph=create_graph)
        a = active[:, None]
        m = torch.where(a, b1 * state["m"] + (1 - b1) * g, state["m"])
        v = torch.where(a, b2 * state["v"] + (1 - b2) * g * g, state["v"])
        t = state["t"] + active.to(theta.dtype)
        c1 = (1 - b1 ** t.clamp_min(1))[:, None]
        c2 = (1 - b2 ** t.clamp_min(1))[:, None]
        # sqrt clamped at the smallest normal number: where a gradient entry is exactly 0 (a
        # parameter the data does not see), sqrt'(0) = inf would turn an unrolled backward into
        # NaN; the clamp changes the denominator by ~1e-19, far below eps.
        v_hat = (v / c2).clamp_min(torch.finfo(v.dtype).tiny)
        update = state["lr"] * (m / c1) / (v_hat.sqrt() + self.eps)
        theta = theta - torch.where(a, update, 0.0)
        return theta, {"lr": state["lr"], "m": m, "v": v, "t": t}


@dataclass
class GaussNewton(InnerOptimizer):
    """Gauss-Newton / Levenberg-Marquardt for least-squares problems.

    Each step solves ``(JᵀJ + diag Λ + μ D) δ = −∇E`` matrix-free with PCG, where
    ``D = max(diag(JᵀJ + Λ), diagonal_floor · mean diag)`` (Marquardt scaling, floored;
    identity where the diagonal is unknown). With
    ``damping > 0`` the damping ``μ`` adapts per batch element: a step that does not
    decrease ``E`` is rejected and ``μ`` grows ×``damping_factor``; an accepted one
    shrinks it. ``damping = 0`` gives plain Gauss-Newton (every step accepted).

    The damping belongs to the forward solve only; the layer's backward uses the
    undamped ``JᵀJ + diag Λ``.

    Not unrollable (its linear solves are not differentiated): use ``backward="implicit"``.
    """

    steps: int = 10
    damping: float = 1e-3
    damping_factor: float = 10.0
    diagonal_floor: float = 1e-2
    solver: PCG = field(default_factory=lambda: PCG(rtol=1e-4, max_iter=50, on_failure="best"))
    tol: float | None = None
    check_every: int = 1
    supports_unrolling = False

    def __post_init__(self):
        self._validate()
        if self.damping < 0 or self.damping_factor <= 1:
            raise ValueError(
                f"damping must be >= 0 and damping_factor > 1, got {self.damping}, {self.damping_factor}"
            )

    def init_state(self, objective, theta):
        mu = torch.full((theta.shape[0],), float(self.damping), dtype=theta.dtype, device=theta.device)
        return {"mu": mu}

    def step(self, objective, theta, state, active, *, create_graph):
        if create_graph:
            raise ValueError("GaussNewton steps cannot be unrolled; use backward='implicit'")
        import warnings

        from .operators import DiagonalOperator
        from .solvers.result import LinearSolveWarning

        e, g = objective.value_and_grad(theta)
        op = objective.gauss_newton_operator(theta)
        mu = state["mu"]
        diag = op.diagonal()
        if diag is None:
            scale = torch.ones_like(theta)
        else:
            # Marquardt scaling, floored relative to the mean curvature: directions the data
            # barely sees (an occluded Gaussian's scale or rotation) would otherwise get no
            # damping, and the local model sends them arbitrarily far.
            floor = self.diagonal_floor * diag.mean(dim=1, keepdim=True).clamp_min(1e-30)
            scale = torch.maximum(diag, floor)
        damped = op + DiagonalOperator(mu[:, None] * scale, positive_definite=bool((mu > 0).all()))
        with warnings.catch_warnings():
            # An inexact inner step is fine; the step is checked by the decrease of E below.
            warnings.simplefilter("ignore", LinearSolveWarning)
            delta = self.solver.solve(damped, -g).solution
        delta = torch.nan_to_num(delta, nan=0.0, posinf=0.0, neginf=0.0)
        candidate = theta + torch.where(active[:, None], delta, 0.0)
        if self.damping == 0:
            return candidate, state
        e_new, _ = objective.value_and_grad(candidate)
        accept = active & torch.isfinite(e_new) & (e_new <= e)
        theta = torch.where(accept[:, None], candidate, theta)
        mu = torch.where(accept, mu / self.damping_factor, torch.where(active, mu * self.damping_factor, mu))
        return theta, {"mu": mu.clamp(1e-12, 1e12)}
