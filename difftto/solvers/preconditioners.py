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
    parameters whose curvatures differ by many orders of magnitude), and applied in the
    precision of ``diagonal`` (float32 or float64). A block that is not positive definite
    (an empty or degenerate one: a Gaussian that touches no pixel with ``Λ = 0``, a
    quaternion's norm direction, non-finite entries), or whose inverse rounded to that
    precision is not, falls back to its own diagonal, so that ``M`` stays SPD. Raises
    ``ValueError`` on mismatched shapes.

    Attributes:
        inverse_blocks: ``[B, N, p, p]`` in :attr:`dtype`, the inverses applied (a view).
        dtype: the precision of the application (``diagonal``'s, at least float32).
        fallback_blocks: how many blocks fell back to their diagonal.
        covers_all: whether the blocks hold every unknown (then no diagonal pass is made).
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
        index = index.to(device=diagonal.device, dtype=torch.long)
        self.jacobi = JacobiPreconditioner(diagonal)
        self.dtype = torch.promote_types(diagonal.dtype, torch.float32)
        batch, n_items, p = blocks.shape[:3]
        fallback = self.jacobi.inverse_diagonal[:, index.reshape(-1)].reshape(batch, n_items, p)
        # Applied as a multiply-and-sum with the items last, [B, p, p, N] · [B, 1, p, N]
        # summed over the columns: every elementwise pass runs over N contiguous items.
        # On a CPU (2048 blocks of 14×14) that is ~2× faster than the same in [B, N, p, p]
        # (whose sums run over 14 entries) or a batched matmul, ~3× faster than batched
        # triangular solves.
        self._inverse = torch.empty(batch, p, p, n_items, dtype=self.dtype, device=diagonal.device)
        self.fallback_blocks = 0
        # In chunks of items: the float64 set-up needs a few copies of the blocks, which at
        # 10⁶ Gaussians would be gigabytes at once.
        for start in range(0, n_items, _SETUP_CHUNK):
            items = slice(start, start + _SETUP_CHUNK)
            inverse, ok = _invert_blocks(blocks[:, items].detach(), fallback[:, items], self.dtype)
            self._inverse[..., items] = inverse.permute(0, 2, 3, 1)
            self.fallback_blocks += int((~ok).sum())
        # Gather r's unknowns column-major ([p, N]: entry j of every item, then j + 1).
        self._gather = index.t().reshape(-1).contiguous()
        n = diagonal.shape[1]
        self.covers_all = self._gather.numel() == n and bool(
            (torch.bincount(self._gather, minlength=n) == 1).all())
        if self.covers_all:
            # The blocks hold every unknown (disjoint, so a permutation): z is the blocks'
            # output put back in place by one gather, with no diagonal pass.
            self._scatter = torch.empty_like(self._gather)
            self._scatter[self._gather] = torch.arange(n, device=self._gather.device)

    @property
    def inverse_blocks(self) -> Tensor:
        return self._inverse.permute(0, 3, 1, 2)

    def apply(self, r: Tensor) -> Tensor:
        batch, (p, n_items) = r.shape[0], self._inverse.shape[2:]
        rb = r.index_select(1, self._gather).to(self.dtype).reshape(batch, 1, p, n_items)
        zb = (self._inverse * rb).sum(dim=2).reshape(batch, -1)
        if self.covers_all:
            dtype = torch.promote_types(self.jacobi.inverse_diagonal.dtype, r.dtype)  # as Jacobi's
            return zb.to(dtype).index_select(1, self._scatter)
        z = self.jacobi.apply(r)
        return z.index_copy_(1, self._gather, zb.to(z.dtype))


# Items per chunk of the block-Jacobi set-up (float64 temporaries of ~25 MB at p = 14).
_SETUP_CHUNK = 16384


def _invert_blocks(blocks: Tensor, inverse_diagonal: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The inverses ``[B, N, p, p]`` (in ``dtype``) of SPD blocks ``[B, N, p, p]``, factored
    and inverted in float64, and which blocks succeeded ``[B, N]``; a failed block gets
    ``diag(inverse_diagonal)`` (``[B, N, p]``) instead (see :class:`BlockJacobiPreconditioner`)."""
    blocks = blocks.to(torch.float64)
    # Finiteness per block from one sum (NaN or ±inf if any entry is; one pass, where
    # isfinite + all makes two): the set-up is a fixed cost of every solve.
    finite = torch.isfinite(blocks.sum(dim=(-2, -1)))
    factor, info = torch.linalg.cholesky_ex(torch.where(finite[..., None, None], blocks, 0.0))
    # A factor of finite entries is finite (|L_ij| ≤ √A_ii); its inverse may overflow.
    ok = (info == 0) & finite
    eye = torch.eye(blocks.shape[-1], dtype=torch.float64, device=blocks.device)
    inverse = torch.cholesky_inverse(torch.where(ok[..., None, None], factor, eye))
    ok = ok & torch.isfinite(inverse.sum(dim=(-2, -1)))
    inverse = 0.5 * (inverse + inverse.transpose(-1, -2))  # symmetrized
    # Applied in the system's precision (float32 for a float32 system: half the memory
    # traffic, ~2× faster inside a 3DGS solve, the same iteration counts). Rounding is
    # relative per entry, so the rounded inverse stays positive definite unless a block's
    # equilibrated condition number nears 1/eps (~1e6 in float32; ≤ 1.5e4 on the 3DGS
    # systems of benchmarks/preconditioning.py): such a block falls back to its diagonal.
    if dtype != torch.float64:
        rounded = inverse.to(dtype).to(torch.float64)
        ok = ok & torch.isfinite(rounded.sum(dim=(-2, -1)))  # no overflow (Cholesky passes inf)
        ok = ok & (torch.linalg.cholesky_ex(torch.where(ok[..., None, None], rounded, eye))[1] == 0)
    fallback = torch.diag_embed(inverse_diagonal.to(torch.float64))
    return torch.where(ok[..., None, None], inverse, fallback).to(dtype), ok


def make_preconditioner(spec: str | Preconditioner | None, operator: LinearOperator) -> Preconditioner:
    """Builds a preconditioner from ``"auto"``, ``"block_jacobi"``, ``"jacobi"``,
    ``"identity"``, ``None`` or an instance.

    ``"auto"`` (:class:`~difftto.solvers.pcg.PCG`'s default) and ``"block_jacobi"`` give a
    :class:`BlockJacobiPreconditioner` where the operator knows its diagonal blocks
    (:meth:`LinearOperator.block_diagonal`, e.g. the 3DGS kernels' per-Gaussian blocks of
    ``JᵀJ``) and its diagonal, else a :class:`JacobiPreconditioner` where it knows its
    diagonal, else the identity. ``"jacobi"`` needs ``operator.diagonal()``; an operator with
    no known diagonal raises ``ValueError`` (ask for ``"identity"`` explicitly; ``PCG`` does
    that itself).
    """
    if isinstance(spec, Preconditioner):
        return spec
    if spec is None or spec == "identity":
        return IdentityPreconditioner()
    if spec in ("auto", "block_jacobi"):
        with torch.no_grad():
            found = operator.block_diagonal()
            d = operator.diagonal()
        if d is None:
            return IdentityPreconditioner()
        if found is None:
            return JacobiPreconditioner(d)
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
        f"preconditioner must be 'auto', 'block_jacobi', 'jacobi', 'identity', None or a "
        f"Preconditioner, got {spec!r}"
    )
