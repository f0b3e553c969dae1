"""The :class:`Problem` base class: a data term ``D(θ; data)``.

A problem only defines mathematics: residuals ``r(θ; data)`` (least squares,
``D = ½‖r‖²``, which enables Gauss-Newton) or a scalar objective per batch element.
It never differentiates itself for the layer and never solves. Optional hooks let a
problem offer structure the generic machinery cannot see:

- :meth:`Problem.freeze`: the discrete state at a linearization point (e.g. the tile
  assignment and depth order of a rasterizer), so that products with ``J`` during one
  linear solve see one smooth function.
- :meth:`Problem.linearize`: hand-written ``J·v`` / ``Jᵀ·w`` products and the exact
  ``diag(JᵀJ)`` (e.g. compiled kernels), optionally its per-item diagonal blocks
  (:meth:`Linearization.gauss_newton_blocks`). ``None`` means "use autograd".
- :meth:`Problem.gauss_newton_diagonal`: only the exact ``diag(JᵀJ)``, with autograd
  products (elementwise residuals, a fixed stencil: the column norms of ``J`` are a
  formula). ``None`` means "estimate it with probes" for the Jacobi preconditioner.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..tree import Params

__all__ = ["Problem", "Linearization", "Data"]

Data = Mapping[str, Any] | None


class Linearization:
    """The residual Jacobian ``J`` of a problem at a fixed point ``θ``.

    Tangents and cotangents of ``θ`` use the parameter structure (a tensor or a dict
    of tensors with the batch dimension first). Residual-space vectors are ``[B, m]``.
    """

    def jvp(self, tangent: Params) -> Tensor:
        """``J · tangent`` → ``[B, m]``."""
        raise NotImplementedError

    def vjp(self, cotangent: Tensor) -> Params:
        """``Jᵀ · cotangent`` (``cotangent [B, m]``) → parameter structure."""
        raise NotImplementedError

    def gauss_newton_diagonal(self) -> Params | None:
        """``diag(JᵀJ)`` in the parameter structure, or ``None`` if not known."""
        return None

    def gauss_newton_blocks(self) -> tuple[Tensor, tuple[str, ...]] | None:
        """The per-item diagonal blocks of ``JᵀJ``, or ``None`` if not known (the default).

        Returns ``(blocks, keys)``: ``keys`` names groups that each have shape
        ``[B, N, ...]`` with the same ``N`` items (e.g. Gaussians); ``blocks`` is
        ``[B, N, p, p]`` with ``p`` the sum of the groups' per-item sizes, its rows and
        columns running over the groups in the order of ``keys``, each item's entries
        flattened. Groups not named (e.g. a camera pose shared by all items) are left to
        :meth:`gauss_newton_diagonal`. Used by the ``"block_jacobi"`` preconditioner.
        """
        return None


class Problem:
    """Base class of every data term. Subclass and implement :meth:`residuals`
    (least squares) or :meth:`objective`.

    ``theta`` is a tensor ``[B, ...]`` or a dict of such tensors; ``data`` is a dict of
    tensors (or other values) or ``None``. Both must be used functionally: no in-place
    changes, so that autograd and ``torch.func`` see through them.
    """

    #: the name under which the problem is registered (set by ``register``).
    name: str = ""

    def residuals(self, theta: Params, data: Data) -> Tensor:
        """Residuals ``r(θ; data)``, shape ``[B, ...]`` (flattened per element)."""
        raise NotImplementedError(
            f"{type(self).__name__} defines no residuals(); it is not a least-squares problem"
        )

    def objective(self, theta: Params, data: Data) -> Tensor:
        """``D(θ; data)`` per batch element, shape ``[B]``. Default ``½‖r‖²``."""
        if not self.is_least_squares:
            raise NotImplementedError(
                f"{type(self).__name__} must implement residuals() or objective()"
            )
        r = self.residuals(theta, data)
        return 0.5 * r.reshape(r.shape[0], -1).pow(2).sum(dim=1)

    @property
    def is_least_squares(self) -> bool:
        """True when the problem defines :meth:`residuals` (Gauss-Newton is available)."""
        return type(self).residuals is not Problem.residuals

    def freeze(self, theta: Params, data: Data) -> Data:
        """``data`` extended with the discrete state at ``theta`` (default: unchanged).

        The layer calls it once per linearization point and evaluates residuals with
        the returned data for every product of one linear solve.
        """
        return data

    def linearize(self, theta: Params, data: Data) -> Linearization | None:
        """Hand-written Jacobian products at ``theta`` (``data`` already frozen), or
        ``None`` to let the layer use autograd (the default)."""
        return None

    def gauss_newton_diagonal(self, theta: Params, data: Data) -> Params | None:
        """The exact ``diag(JᵀJ)`` at ``theta`` (``data`` already frozen), in the parameter
        structure, or ``None`` (the default: the Jacobi preconditioner then uses a probe
        estimate). Used with autograd products, i.e. when :meth:`linearize` gives none.
        An estimate from random probes can precondition worse than none on problems
        whose diagonal varies little, which is why a problem that knows it should say."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
