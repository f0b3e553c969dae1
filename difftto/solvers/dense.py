"""Dense Cholesky solve: the test oracle for small systems (it materializes ``A``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..operators import LinearOperator, materialize
from .result import LinearSolveResult, Status, apply_failure_policy

__all__ = ["DenseCholesky"]


@dataclass
class DenseCholesky:
    """Materializes each ``n x n`` matrix (``n`` operator products) and solves it by
    Cholesky. Memory ``O(B n²)``: for small problems and as a test oracle.

    Args:
        on_failure: as for :class:`~difftto.solvers.PCG`. A matrix that is not
            positive definite gives ``BREAKDOWN``.
    """

    on_failure: str = "warn"

    @torch.no_grad()
    def solve(self, operator: LinearOperator, b: Tensor, x0: Tensor | None = None, *,
              on_failure: str | None = None) -> LinearSolveResult:
        """Solves ``operator · x = b``; same result type as :meth:`PCG.solve`
        (iterations are 0). ``x0`` is accepted and ignored.

        Raises:
            ValueError: on a mismatched ``b`` or an operator not declared symmetric.
            LinearSolveError: with ``on_failure="raise"`` when an element fails.
        """
        operator.check_vector(b, "b")
        if not operator.symmetric:
            raise ValueError(
                f"DenseCholesky needs a symmetric operator; {operator!r} is not declared "
                "symmetric"
            )
        a = materialize(operator)
        # Symmetrize away the round-off of the n separate products.
        a = 0.5 * (a + a.transpose(-1, -2))
        finite = torch.isfinite(a).flatten(1).all(1) & torch.isfinite(b).all(1)
        a_safe = torch.where(finite[:, None, None], a, torch.eye(a.shape[-1], dtype=a.dtype, device=a.device))
        chol, info = torch.linalg.cholesky_ex(a_safe)
        spd = info == 0
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        chol = torch.where(spd[:, None, None], chol, eye)
        b_safe = torch.where(finite[:, None], b, 0.0)
        x = torch.cholesky_solve(b_safe[..., None], chol)[..., 0]
        status = torch.full_like(info, int(Status.CONVERGED), dtype=torch.int64)
        status = torch.where(spd, status, int(Status.BREAKDOWN))
        status = torch.where(finite, status, int(Status.NON_FINITE_INPUT))
        x = torch.where(finite[:, None], x, float("nan"))
        b_norm = torch.linalg.vector_norm(b_safe, dim=1)
        res = torch.linalg.vector_norm(b_safe - (a @ x[..., None])[..., 0], dim=1)
        rel = torch.where(b_norm > 0, res / torch.where(b_norm > 0, b_norm, 1.0), res)
        result = LinearSolveResult(x, status, torch.zeros_like(status), rel)
        return apply_failure_policy(result, self.on_failure if on_failure is None else on_failure,
                                    what="dense Cholesky solve")
