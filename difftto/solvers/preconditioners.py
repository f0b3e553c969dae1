"""Preconditioners for PCG: ``z = M⁻¹ r``. They are built from operators under
``torch.no_grad()`` and never differentiated."""

from __future__ import annotations

import torch
from torch import Tensor

from ..operators import LinearOperator

__all__ = ["Preconditioner", "IdentityPreconditioner", "JacobiPreconditioner", "make_preconditioner"]


class Preconditioner:
    """Applies ``M⁻¹`` to a batch of vectors ``[B, n]``."""

    def apply(self, r: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, r: Tensor) -> Tensor:
        return self.apply(r)


class IdentityPreconditioner(Preconditioner):
    """``M = I``: plain conjugate gradient."""

    def apply(self, r: Tensor) -> Tensor:
        return r


class JacobiPreconditioner(Preconditioner):
    """``M = diag(A)``. Entries that are not positive and finite are replaced by 1
    (the preconditioner must stay SPD; such entries only mean the operator knew no
    useful scale there)."""

    def __init__(self, diagonal: Tensor):
        diagonal = diagonal.detach()
        ok = torch.isfinite(diagonal) & (diagonal > 0)
        self.inverse_diagonal = torch.where(ok, 1.0 / torch.where(ok, diagonal, 1.0), 1.0)

    def apply(self, r: Tensor) -> Tensor:
        return self.inverse_diagonal * r


def make_preconditioner(spec: str | Preconditioner | None, operator: LinearOperator) -> Preconditioner:
    """Builds a preconditioner from ``"jacobi"``, ``"identity"``, ``None`` or an instance.

    ``"jacobi"`` needs ``operator.diagonal()``; an operator with no known diagonal
    raises ``ValueError`` (ask for ``"identity"`` explicitly).
    """
    if isinstance(spec, Preconditioner):
        return spec
    if spec is None or spec == "identity":
        return IdentityPreconditioner()
    if spec == "jacobi":
        with torch.no_grad():
            d = operator.diagonal()
        if d is None:
            raise ValueError(
                f"preconditioner='jacobi' needs the operator's diagonal, but {operator!r} "
                "knows none; pass preconditioner='identity' or give the operator a diagonal"
            )
        return JacobiPreconditioner(d)
    raise ValueError(
        f"preconditioner must be 'jacobi', 'identity', None or a Preconditioner, got {spec!r}"
    )
