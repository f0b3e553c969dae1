"""Preconditioners for PCG: ``z = M⁻¹ r``. They are built from operators under
``torch.no_grad()`` and never differentiated."""

from __future__ import annotations

import torch
from torch import Tensor

from ..operators import LinearOperator

__all__ = [
    "Preconditioner",
    "IdentityPreconditioner",
    "JacobiPreconditioner",
    "BlockJacobiPreconditioner",
    "make_preconditioner",
]


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


class BlockJacobiPreconditioner(Preconditioner):
    """``M = blockdiag(A)`` on given index blocks, ``diag(A)`` on the other unknowns.

    Args:
        blocks: the diagonal blocks of ``A``, ``[B, N, p, p]`` (symmetric).
        index: ``[N, p]`` int64, the flat unknowns (columns of ``[B, n]``) of each block;
            disjoint.
        diagonal: ``diag(A)`` ``[B, n]``, used (as by :class:`JacobiPreconditioner`) for
            the unknowns in no block, and for a block whose Cholesky factorization fails.

    The blocks are factored and inverted once, in float64 (a block of a 3DGS Gaussian spans
    parameters whose curvatures differ by many orders of magnitude). A block that is
    not positive definite (an empty or degenerate one: a Gaussian that touches no pixel
    with ``Λ = 0``, a quaternion's norm direction, non-finite entries) falls back to its
    own diagonal, so that ``M`` stays SPD. Raises ``ValueError`` on mismatched shapes.
    """

    def __init__(self, blocks: Tensor, index: Tensor, diagonal: Tensor):
        if blocks.dim() != 4 or blocks.shape[-1] != blocks.shape[-2]:
            raise ValueError(f"blocks must have shape [B, N, p, p], got {tuple(blocks.shape)}")
        if tuple(index.shape) != tuple(blocks.shape[1:3]):
            raise ValueError(f"index must have shape [N, p] = {list(blocks.shape[1:3])}, "
                             f"got {tuple(index.shape)}")
        if diagonal.dim() != 2 or diagonal.shape[0] != blocks.shape[0]:
            raise ValueError(f"diagonal must have shape [B, n] with B = {blocks.shape[0]}, "
                             f"got {tuple(diagonal.shape)}")
        self.index = index.to(device=diagonal.device, dtype=torch.long).reshape(-1)
        self.jacobi = JacobiPreconditioner(diagonal)
        blocks = blocks.detach().to(torch.float64)
        finite = torch.isfinite(blocks).all(dim=(-2, -1))
        factor, info = torch.linalg.cholesky_ex(torch.where(finite[..., None, None], blocks, 0.0))
        ok = (info == 0) & finite & torch.isfinite(factor).all(dim=(-2, -1))
        eye = torch.eye(blocks.shape[-1], dtype=torch.float64, device=blocks.device)
        inverse = torch.cholesky_inverse(torch.where(ok[..., None, None], factor, eye))
        inverse = torch.where(torch.isfinite(inverse).all(dim=(-2, -1), keepdim=True), inverse, 0.0)
        ok = ok & (inverse != 0).any(dim=(-2, -1))
        # A failed block gets its Jacobi inverse diagonal.
        fallback = self.jacobi.inverse_diagonal[:, self.index].to(torch.float64)
        fallback = torch.diag_embed(fallback.reshape(blocks.shape[:-1]))
        # The explicit inverses (symmetrized), applied by a broadcast multiply-and-sum: on a
        # CPU ~2× faster per PCG iteration than batched triangular solves of 14×14 blocks.
        inverse = 0.5 * (inverse + inverse.transpose(-1, -2))
        self.inverse_blocks = torch.where(ok[..., None, None], inverse, fallback)
        self.fallback_blocks = int((~ok).sum())

    def apply(self, r: Tensor) -> Tensor:
        z = self.jacobi.apply(r)
        rb = r[:, self.index].to(torch.float64).reshape(*self.inverse_blocks.shape[:-2], 1, -1)
        zb = (self.inverse_blocks * rb).sum(dim=-1).reshape(r.shape[0], -1)
        return z.index_copy(1, self.index, zb.to(r.dtype))


def make_preconditioner(spec: str | Preconditioner | None, operator: LinearOperator) -> Preconditioner:
    """Builds a preconditioner from ``"jacobi"``, ``"block_jacobi"``, ``"identity"``,
    ``None`` or an instance.

    ``"jacobi"`` needs ``operator.diagonal()``; an operator with no known diagonal
    raises ``ValueError`` (ask for ``"identity"`` explicitly). ``"block_jacobi"``
    (:class:`BlockJacobiPreconditioner`) uses the operator's diagonal blocks
    (:meth:`LinearOperator.block_diagonal`) and falls back to ``"jacobi"`` where it knows none (to
    ``"identity"`` where it knows no diagonal either).
    """
    if isinstance(spec, Preconditioner):
        return spec
    if spec is None or spec == "identity":
        return IdentityPreconditioner()
    if spec == "block_jacobi":
        with torch.no_grad():
            found = operator.block_diagonal()
            d = operator.diagonal() if found is not None else None
        if found is None or d is None:  # as PCG does for "jacobi" with no diagonal
            return make_preconditioner("jacobi" if operator.diagonal() is not None else "identity", operator)
        return BlockJacobiPreconditioner(found[0], found[1], d)
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
        f"preconditioner must be 'jacobi', 'block_jacobi', 'identity', None or a Preconditioner, "
        f"got {spec!r}"
    )
