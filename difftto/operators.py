"""Matrix-free linear operators on batched flat vectors.

Every operator acts on a batch of vectors ``v`` of shape ``[B, n]`` and returns
``A_b v_b`` for each batch element ``b``: one (usually implicit) ``n x n`` matrix
per element. Operators only apply; they never solve and never differentiate.

Structure is declared, never guessed: ``symmetric``, ``positive_definite`` and
``semidefinite`` (positive semi-definite) are flags set by whoever builds the
operator. Sums and scalings derive theirs from their terms' declarations only:
``A + B`` is positive definite when one term is positive definite and the other
positive semi-definite (both symmetric). An operator may know its diagonal exactly (:meth:`LinearOperator.diagonal`),
which the Jacobi preconditioner uses. An operator may also give its product as a graph of
aten operations (:meth:`LinearOperator.graph`), which a compiled solver backend fuses with
its own per-iteration work.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "LinearOperator",
    "FunctionOperator",
    "DiagonalOperator",
    "SumOperator",
    "ScaledOperator",
    "GaussNewtonOperator",
    "HessianOperator",
    "materialize",
]


class LinearOperator:
    """A batch of linear maps ``[B, n] -> [B, n]``.

    Subclasses implement :meth:`mv`. ``shape`` is ``(B, n)``.

    Attributes:
        symmetric: declared ``A = Aᵀ``.
        positive_definite: declared ``vᵀAv > 0`` for ``v ≠ 0`` (with ``symmetric``).
        semidefinite: declared ``vᵀAv ≥ 0``; positive definite operators are
            semi-definite too (see :attr:`positive_semidefinite`).
    """

    symmetric: bool = False
    positive_definite: bool = False
    semidefinite: bool = False

    @property
    def positive_semidefinite(self) -> bool:
        """Declared positive semi-definite: ``semidefinite`` or ``positive_definite``."""
        return bool(self.semidefinite or self.positive_definite)

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device):
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 0:
            raise ValueError(f"operator shape must be (B >= 1, n >= 0), got {tuple(shape)}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        self.device = torch.device(device)

    def mv(self, v: Tensor) -> Tensor:
        """Returns ``A v`` for a batch ``v`` of shape ``[B, n]``."""
        raise NotImplementedError

    def diagonal(self) -> Tensor | None:
        """The exact diagonal ``[B, n]`` where known, else ``None``."""
        return None

    def block_diagonal(self) -> tuple[Tensor, Tensor] | None:
        """``(blocks [B, N, p, p], index [N, p])``: diagonal blocks of ``A`` on the
        disjoint sets of unknowns ``index`` (e.g. each Gaussian's parameters), where
        known, else ``None`` (the default). Read by the ``"block_jacobi"`` preconditioner."""
        return None

    def graph(self) -> tuple[torch.fx.GraphModule, tuple[Tensor, ...]] | None:
        """``(module, constants)`` with ``mv(v) == module(v, *constants)`` for ``v`` of this
        operator's shape, ``module`` a graph of aten operations (e.g. a traced product)
        that is kept across operators of the same kind and shape, so that code compiled
        for it is reused; ``None`` (the default) where the product is no such graph. Read
        by ``PCG(backend="compiled")``, which compiles ``q = A p`` and its iteration's
        vector work into one call."""
        return None

    def __call__(self, v: Tensor) -> Tensor:
        return self.mv(v)

    def __add__(self, other: LinearOperator) -> LinearOperator:
        return SumOperator(self, other)

    def __mul__(self, scale: float | Tensor) -> LinearOperator:
        return ScaledOperator(self, scale)

    __rmul__ = __mul__

    def check_vector(self, v: Tensor, name: str = "v") -> None:
        """Raises ``ValueError`` unless ``v`` has this operator's shape."""
        if tuple(v.shape) != self.shape:
            raise ValueError(
                f"{name} must have shape {self.shape} (batch, n) for this operator, "
                f"got {tuple(v.shape)}"
            )

    def __repr__(self) -> str:
        flags = []
        if self.symmetric:
            flags.append("symmetric")
        if self.positive_definite:
            flags.append("positive_definite")
        return f"{type(self).__name__}(shape={self.shape}, {', '.join(flags) or 'general'})"


class FunctionOperator(LinearOperator):
    """An operator given by any function ``mv: [B, n] -> [B, n]``.

    Args:
        mv: the matrix-vector product.
        shape: ``(B, n)``.
        dtype, device: of the vectors it acts on.
        diagonal: the exact diagonal ``[B, n]``, if known.
        symmetric, positive_definite, semidefinite: declared structure.
    """

    def __init__(
        self,
        mv: Callable[[Tensor], Tensor],
        shape: tuple[int, int],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        *,
        diagonal: Tensor | None = None,
        symmetric: bool = False,
        positive_definite: bool = False,
        semidefinite: bool = False,
    ):
        super().__init__(shape, dtype, device)
        self._mv = mv
        self._diagonal = diagonal
        self.symmetric = symmetric
        self.positive_definite = positive_definite
        self.semidefinite = semidefinite
        if diagonal is not None:
            self.check_vector(diagonal, "diagonal")

    def mv(self, v: Tensor) -> Tensor:
        return self._mv(v)

    def diagonal(self) -> Tensor | None:
        return self._diagonal


class DiagonalOperator(LinearOperator):
    """``diag(d)`` per batch element; ``d`` has shape ``[B, n]``.

    Symmetric; positive definite (``d > 0``) or semi-definite (``d ≥ 0``) when
    declared so: that is the caller's promise (e.g. proximal weights ``Lambda``), not
    checked, so that building an operator never synchronises with the device.
    """

    symmetric = True

    def __init__(self, diagonal: Tensor, *, positive_definite: bool = False,
                 semidefinite: bool = False):
        if diagonal.dim() != 2:
            raise ValueError(
                f"diagonal must have shape [B, n], got {tuple(diagonal.shape)}"
            )
        super().__init__(tuple(diagonal.shape), diagonal.dtype, diagonal.device)
        self.d = diagonal
        self.positive_definite = positive_definite
        self.semidefinite = semidefinite

    def mv(self, v: Tensor) -> Tensor:
        return self.d * v

    def diagonal(self) -> Tensor:
        return self.d


class SumOperator(LinearOperator):
    """``A + B``. Symmetric if both are. Positive definite if both are symmetric, one
    is declared positive definite and the other positive semi-definite; positive
    semi-definite if both are. An operator with no declared definiteness (e.g. an
    exact Hessian) makes the sum's definiteness unknown, hence undeclared.

    ``product`` (optional) is ``v ↦ A v + B v`` formed at once (e.g. one compiled call
    instead of two products and an addition) and ``graph`` its :meth:`graph`; the
    structure (diagonal, blocks, flags) still comes from the terms."""

    def __init__(self, a: LinearOperator, b: LinearOperator, *,
                 product: Callable[[Tensor], Tensor] | None = None,
                 graph: tuple[torch.fx.GraphModule, tuple[Tensor, ...]] | None = None):
        if not isinstance(a, LinearOperator) or not isinstance(b, LinearOperator):
            raise TypeError(
                f"can only add LinearOperators, got {type(a).__name__} and {type(b).__name__}"
            )
        if a.shape != b.shape:
            raise ValueError(f"cannot add operators of shapes {a.shape} and {b.shape}")
        super().__init__(a.shape, a.dtype, a.device)
        self.a, self.b = a, b
        self.symmetric = a.symmetric and b.symmetric
        psd_a, psd_b = a.positive_semidefinite, b.positive_semidefinite
        self.positive_definite = self.symmetric and (
            (a.positive_definite and psd_b) or (b.positive_definite and psd_a)
        )
        self.semidefinite = self.symmetric and psd_a and psd_b
        self._product, self._graph = product, graph

    def mv(self, v: Tensor) -> Tensor:
        if self._product is not None:
            return self._product(v)
        return self.a.mv(v) + self.b.mv(v)

    def graph(self) -> tuple[torch.fx.GraphModule, tuple[Tensor, ...]] | None:
        return self._graph

    def diagonal(self) -> Tensor | None:
        da, db = self.a.diagonal(), self.b.diagonal()
        if da is None or db is None:
            return None
        return da + db

    def block_diagonal(self) -> tuple[Tensor, Tensor] | None:
        """Both terms' blocks added where they cover the same unknowns; one term's blocks
        plus the other's diagonal (e.g. ``diag Λ``) on them; else ``None``."""
        found_a, found_b = self.a.block_diagonal(), self.b.block_diagonal()
        if found_a is not None and found_b is not None:
            same = found_a[1].shape == found_b[1].shape and torch.equal(found_a[1], found_b[1])
            return (found_a[0] + found_b[0], found_a[1]) if same else None
        for found, other in ((found_a, self.b), (found_b, self.a)):
            if found is not None:
                d = other.diagonal()
                if d is None:
                    return None
                blocks, index = found
                extra = d[:, index.reshape(-1)].reshape(blocks.shape[:-1])
                return blocks + torch.diag_embed(extra), index
        return None


class ScaledOperator(LinearOperator):
    """``c A`` for a scalar ``c`` or a per-batch-element scale ``[B]``.

    Keeps ``A``'s symmetry; positive (semi-)definite when ``A`` is declared so and
    every scale is ``> 0`` (``≥ 0``). Reading the scale's sign synchronises once, at
    construction.
    """

    def __init__(self, op: LinearOperator, scale: float | Tensor):
        if not isinstance(op, LinearOperator):
            raise TypeError(f"op must be a LinearOperator, got {type(op).__name__}")
        if isinstance(scale, LinearOperator):
            raise TypeError(
                "operators can be scaled by a number or a [B] tensor, not multiplied "
                f"together; got scale={scale!r}"
            )
        super().__init__(op.shape, op.dtype, op.device)
        self.op = op
        scale = torch.as_tensor(scale, dtype=op.dtype, device=op.device)
        if scale.dim() > 1 or (scale.dim() == 1 and scale.shape[0] != op.shape[0]):
            raise ValueError(
                f"scale must be a scalar or have shape [B] = [{op.shape[0]}], "
                f"got shape {tuple(scale.shape)}"
            )
        if scale.dim() == 1:
            scale = scale[:, None]
        self.scale = scale
        self.symmetric = op.symmetric
        positive = bool((scale > 0).all())
        nonnegative = bool((scale >= 0).all())
        self.positive_definite = op.positive_definite and positive
        self.semidefinite = op.positive_semidefinite and nonnegative

    def mv(self, v: Tensor) -> Tensor:
        return self.scale * self.op.mv(v)

    def diagonal(self) -> Tensor | None:
        d = self.op.diagonal()
        return None if d is None else self.scale * d

    def block_diagonal(self) -> tuple[Tensor, Tensor] | None:
        found = self.op.block_diagonal()
        if found is None:
            return None
        scale = self.scale.reshape(-1, 1, 1, 1) if self.scale.dim() else self.scale
        return scale * found[0], found[1]


class _LazyDiagonal:
    """A diagonal given as a tensor, or as a function computed on the first
    :meth:`diagonal` call and kept: estimating it costs products, which a solve that
    does not precondition with it should not pay."""

    def _set_diagonal(self, diagonal) -> None:
        self._diagonal, self._diagonal_fn = (None, diagonal) if callable(diagonal) else (diagonal, None)

    def diagonal(self) -> Tensor | None:
        if self._diagonal_fn is not None:
            self._diagonal, self._diagonal_fn = self._diagonal_fn(), None
        return self._diagonal


class GaussNewtonOperator(_LazyDiagonal, LinearOperator):
    """``JᵀJ`` from a Jacobian-vector product and a vector-Jacobian product.

    Args:
        jvp: ``v [B, n] -> J v [B, m]``.
        vjp: ``w [B, m] -> Jᵀ w [B, n]``.
        shape: ``(B, n)``.
        diagonal: ``diag(JᵀJ)`` ``[B, n]`` where known (exact or estimated; it only
            preconditions), or a function computing it on first use.
        product: ``v ↦ JᵀJ v`` formed at once (e.g. traced and folded once per
            linearization point); ``None`` (default): ``vjp(jvp(v))``.
        blocks: a function giving :meth:`block_diagonal` (e.g. a problem's exact
            per-item blocks of ``JᵀJ``), or ``None`` (default: none known).
        graph: ``product`` as :meth:`graph` gives it, where it is such a graph.

    Symmetric and positive semi-definite by construction (``semidefinite = True``),
    so ``GaussNewtonOperator + DiagonalOperator(Λ > 0)`` is positive definite.
    """

    symmetric = True
    semidefinite = True

    def __init__(
        self,
        jvp: Callable[[Tensor], Tensor],
        vjp: Callable[[Tensor], Tensor],
        shape: tuple[int, int],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        *,
        diagonal: Tensor | Callable[[], Tensor | None] | None = None,
        product: Callable[[Tensor], Tensor] | None = None,
        blocks: Callable[[], tuple[Tensor, Tensor] | None] | None = None,
        graph: tuple[torch.fx.GraphModule, tuple[Tensor, ...]] | None = None,
    ):
        super().__init__(shape, dtype, device)
        self.jvp, self.vjp = jvp, vjp
        self._product = product
        self._blocks = blocks
        self._graph = graph
        self._set_diagonal(diagonal)

    def mv(self, v: Tensor) -> Tensor:
        if self._product is not None:
            return self._product(v)
        return self.vjp(self.jvp(v))

    def block_diagonal(self) -> tuple[Tensor, Tensor] | None:
        return None if self._blocks is None else self._blocks()

    def graph(self) -> tuple[torch.fx.GraphModule, tuple[Tensor, ...]] | None:
        return self._graph


class HessianOperator(_LazyDiagonal, LinearOperator):
    """The exact Hessian of a per-element scalar function via Hessian-vector products.

    Args:
        hvp: ``v [B, n] -> ∇²f v [B, n]`` (built by the caller, e.g. forward-over-reverse).
        shape, dtype, device: as for every operator.
        diagonal: an estimate of ``diag(∇²f)`` ``[B, n]``, or a function computing it on
            first use.
        graph: ``hvp`` as :meth:`graph` gives it, where it is such a graph.

    Symmetric; definiteness is not assumed (non-convex data terms are common).
    """

    symmetric = True

    def __init__(
        self,
        hvp: Callable[[Tensor], Tensor],
        shape: tuple[int, int],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        *,
        diagonal: Tensor | Callable[[], Tensor | None] | None = None,
        graph: tuple[torch.fx.GraphModule, tuple[Tensor, ...]] | None = None,
    ):
        super().__init__(shape, dtype, device)
        self._hvp = hvp
        self._graph = graph
        self._set_diagonal(diagonal)

    def mv(self, v: Tensor) -> Tensor:
        return self._hvp(v)

    def graph(self) -> tuple[torch.fx.GraphModule, tuple[Tensor, ...]] | None:
        return self._graph


def materialize(op: LinearOperator) -> Tensor:
    """The dense matrices ``[B, n, n]`` of ``op``: column ``j`` is ``op.mv(e_j)``.

    Costs ``n`` operator products and ``O(B n²)`` memory: for small ``n`` only (test
    oracles and the dense solver)."""
    batch, n = op.shape
    eye = torch.eye(n, dtype=op.dtype, device=op.device)
    cols = [op.mv(eye[j].expand(batch, n).contiguous()) for j in range(n)]
    if not cols:
        return torch.zeros(batch, 0, 0, dtype=op.dtype, device=op.device)
    return torch.stack(cols, dim=-1)
