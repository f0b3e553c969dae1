"""The proximal term ``½ Σ Λ (θ − θ0)²``: uncertainty weights Λ anchor θ to θ0.

All quantities act on flat parameters ``[B, n]`` with ``Λ`` already broadcast to
``[B, n]`` (see :meth:`difftto.Layout.expand`). The closed forms live here once and
are used by the inner objective and by the layer's implicit backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .finite import all_finite

__all__ = ["Proximal", "check_weights"]


def check_weights(lam: Tensor, name: str = "lam") -> None:
    """Raises ``ValueError`` if any weight is negative or non-finite.

    One host synchronisation; called once per layer call, never in a loop.
    """
    if not bool(all_finite(lam)):
        bad_finite = ~torch.isfinite(lam)
        raise ValueError(
            f"{name} must be finite; got {int(bad_finite.sum())} non-finite entries "
            f"(of {lam.numel()})"
        )
    negative = lam < 0
    if bool(negative.any()):
        raise ValueError(
            f"{name} must be >= 0 (uncertainty weights); got {int(negative.sum())} negative "
            f"entries, the smallest {float(lam.min()):.4g}"
        )


class Proximal:
    """``R(θ) = ½ Σᵢ Λᵢ (θᵢ − θ0ᵢ)²`` per batch element, with its derivatives.

    Args:
        anchor: ``θ0`` ``[B, n]``.
        weights: ``Λ`` ``[B, n]`` (``≥ 0``).
    """

    def __init__(self, anchor: Tensor, weights: Tensor):
        if anchor.shape != weights.shape:
            raise ValueError(
                f"anchor and weights must have the same [B, n] shape, got "
                f"{tuple(anchor.shape)} and {tuple(weights.shape)}"
            )
        self.anchor, self.weights = anchor, weights

    def value(self, theta: Tensor) -> Tensor:
        """``[B]``."""
        return 0.5 * (self.weights * (theta - self.anchor).pow(2)).sum(dim=1)

    def gradient(self, theta: Tensor) -> Tensor:
        """``∇θ R = Λ ⊙ (θ − θ0)``, ``[B, n]``."""
        return self.weights * (theta - self.anchor)

    def hessian_diagonal(self) -> Tensor:
        """``∇²θ R = diag(Λ)``: the diagonal ``[B, n]``."""
        return self.weights

    def anchor_cotangent(self, u: Tensor) -> Tensor:
        """``∂L/∂θ0 = Λ ⊙ u`` for the implicit-backward solution ``u = H⁻¹ ḡ``."""
        return self.weights * u

    def weights_cotangent(self, theta_star: Tensor, u: Tensor) -> Tensor:
        """``∂L/∂Λ = −(θ* − θ0) ⊙ u``, as ``(θ0 − θ*) ⊙ u`` (the same floats: rounding is
        symmetric, so ``a − b = −(b − a)`` exactly; one pass fewer)."""
        return (self.anchor - theta_star) * u
