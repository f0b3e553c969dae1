"""What a linear solve returns: the solution and, per batch element, how it went.

A failure is never silent: every solve carries a :class:`Status` per batch element,
and :func:`apply_failure_policy` turns failures into an exception, a warning, a
zeroed solution or the best iterate, as the caller chose.
"""

from __future__ import annotations

import enum
import os
import sys
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Status", "LinearSolveResult", "LinearSolveError", "LinearSolveWarning",
           "FAILURE_POLICIES", "apply_failure_policy"]

FAILURE_POLICIES = ("raise", "warn", "zero", "best")


class Status(enum.IntEnum):
    """Outcome of a solve for one batch element."""

    CONVERGED = 0
    MAX_ITER_REACHED = 1
    BREAKDOWN = 2
    NON_FINITE_INPUT = 3

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    Status.CONVERGED: "converged",
    Status.MAX_ITER_REACHED: (
        "max_iter reached before the tolerance: raise max_iter, loosen rtol, or improve "
        "the conditioning (larger proximal weights Lambda, a Jacobi preconditioner)"
    ),
    Status.BREAKDOWN: (
        "breakdown: a search direction had p·Ap <= 0, so the operator is not positive "
        "definite (e.g. Lambda = 0 on a singular Gauss-Newton matrix, or an indefinite "
        "exact Hessian)"
    ),
    Status.NON_FINITE_INPUT: "non-finite values (NaN/Inf) in the right-hand side or operator output",
}


class LinearSolveError(RuntimeError):
    """Raised by the ``"raise"`` policy when a batch element did not converge."""


class LinearSolveWarning(RuntimeWarning):
    """Issued by the ``"warn"`` policy when a batch element did not converge."""


@dataclass
class LinearSolveResult:
    """A batched solve's outcome.

    Attributes:
        solution: ``[B, n]``.
        status: ``[B]`` int64 of :class:`Status` codes.
        iterations: ``[B]`` int64, iterations each element ran.
        relative_residual: ``[B]``, the true ``‖b − A x‖ / ‖b‖`` recomputed at the end
            (``0`` where ``b = 0``).
    """

    solution: Tensor
    status: Tensor
    iterations: Tensor
    relative_residual: Tensor

    @property
    def converged(self) -> Tensor:
        """``[B]`` bool, True where the element converged."""
        return self.status == Status.CONVERGED

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def describe(self, max_lines: int = 5) -> str:
        """A human summary: one line per failed element (the first ``max_lines``), then
        a count per status for the rest, and what each status means."""
        failed = [
            (b, Status(s), it, rr)
            for b, (s, it, rr) in enumerate(
                zip(self.status.tolist(), self.iterations.tolist(), self.relative_residual.tolist())
            )
            if s != Status.CONVERGED
        ]
        if not failed:
            return "all batch elements converged"
        lines = [
            f"  batch element {b}: {s.name} after {it} iterations, relative residual {rr:.3e}"
            for b, s, it, rr in failed[:max_lines]
        ]
        if len(failed) > max_lines:
            rest = {}
            for _, s, _, _ in failed[max_lines:]:
                rest[s.name] = rest.get(s.name, 0) + 1
            lines.append("  ... and " + ", ".join(f"{n} more {name}" for name, n in rest.items()))
        for status in sorted({s for _, s, _, _ in failed}):
            lines.append(f"  {status.name}: {status.message}")
        return "\n".join(lines)


def _internal_dirs() -> tuple[str, ...]:
    import torch as _torch

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # difftto/
    return (here + os.sep, os.path.dirname(os.path.abspath(_torch.__file__)) + os.sep)


def _user_stacklevel() -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` called by this function's caller)
    of the first frame outside difftto and torch: user code, not the solver or
    torch's ``no_grad`` decorator, nor the autograd engine of a backward pass."""
    internal = _internal_dirs()
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        internal
    ):
        frame = frame.f_back
        level += 1
    return level


def apply_failure_policy(
    result: LinearSolveResult,
    policy: str,
    *,
    best: Tensor | None = None,
    best_relative_residual: Tensor | None = None,
    what: str = "linear solve",
) -> LinearSolveResult:
    """Acts on failed elements of ``result`` according to ``policy``.

    - ``"raise"``: raises :class:`LinearSolveError` naming each failed element.
    - ``"warn"``: warns (:class:`LinearSolveWarning`) and keeps the last iterate.
    - ``"zero"``: warns and sets the failed elements' solutions to zero (their
      relative residual becomes ``1``, that of ``x = 0``, where it was finite).
    - ``"best"``: warns and returns, for failed elements, ``best`` (the iterate with
      the smallest residual seen) when given, with ``best_relative_residual``.

    The status is kept as it was in every case: callers can still see the failure.
    Warnings point at the first caller outside difftto and torch.

    Raises:
        ValueError: for an unknown ``policy``.
        LinearSolveError: with ``policy="raise"`` when an element failed.
    """
    if policy not in FAILURE_POLICIES:
        raise ValueError(f"on_failure must be one of {FAILURE_POLICIES}, got {policy!r}")
    failed = ~result.converged
    if not bool(failed.any()):
        return result
    summary = (
        f"{what} did not converge for {int(failed.sum())} of {failed.numel()} batch "
        f"elements:\n{result.describe()}"
    )
    if policy == "raise":
        raise LinearSolveError(summary)
    solution, rel = result.solution, result.relative_residual
    if policy == "zero":
        solution = torch.where(failed[:, None], torch.zeros_like(solution), solution)
        rel = torch.where(failed & torch.isfinite(rel), torch.ones_like(rel), rel)
        summary += "\n(on_failure='zero': their solutions were set to zero)"
    elif policy == "best" and best is not None:
        solution = torch.where(failed[:, None], best, solution)
        if best_relative_residual is not None:
            rel = torch.where(failed, best_relative_residual, rel)
        summary += "\n(on_failure='best': their best iterates were returned)"
    warnings.warn(summary, LinearSolveWarning, stacklevel=_user_stacklevel())
    return LinearSolveResult(solution, result.status, result.iterations, rel)
