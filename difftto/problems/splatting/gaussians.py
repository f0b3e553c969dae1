"""Batched 3D Gaussians and their activations, in one place.

The raw (unconstrained) parameters are the ones an optimizer sees; the activations
turn them into what the renderer uses:

=============  ==================  ===========================================
group          raw shape           activation
=============  ==================  ===========================================
``means``      ``[B, N, 3]``       identity (world coordinates)
``log_scales`` ``[B, N, 3]``       ``exp(clamp(log_scales, ±LOG_SCALE_BOUND))``
``quats``      ``[B, N, 4]``       normalized (wxyz, gsplat's order); 0 → identity
``opacities``  ``[B, N]``          ``sigmoid`` (the raw values are logits)
``colors``     ``[B, N, D]``       identity (post-activation colors, as gsplat)
``sh``         ``[B, N, K, 3]``    real SH, degree ≤ 3, ``max(SH(dir) + 0.5, 0)``
=============  ==================  ===========================================

Exactly one of ``colors`` and ``sh`` is present.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Gaussians",
    "LOG_SCALE_BOUND",
    "GAUSSIAN_KEYS",
    "quat_to_rotmat",
    "sh_basis",
    "eval_sh",
    "sh_degree_of",
]

#: Log-scales are clamped to ``[-LOG_SCALE_BOUND, LOG_SCALE_BOUND]`` before ``exp``, so
#: that "huge" or "zero" scales give finite covariances in float32 (gradient is zero
#: outside the bound, like any saturating activation).
LOG_SCALE_BOUND = 15.0

#: The parameter-group names the splatting problem understands.
GAUSSIAN_KEYS = ("means", "log_scales", "quats", "opacities", "colors", "sh")


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices ``[..., 3, 3]`` from quaternions ``[..., 4]`` (wxyz).

    Quaternions are normalized first; a zero quaternion gives the identity (its
    normalized value is 0 and the formula below then reduces to ``I``), so no NaN.
    They are divided by their largest entry before the norm is taken: a finite
    float32 quaternion above ~1.8e19 would otherwise overflow ``‖q‖²`` to inf and
    give NaN gradients.
    """
    largest = quats.detach().abs().amax(dim=-1, keepdim=True)
    quats = quats / torch.where(largest > 0, largest, torch.ones_like(largest))
    norm = torch.linalg.vector_norm(quats, dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = (quats / norm).unbind(-1)
    xx, yy, zz = x * x, y * y, z * z
    xy, xz, yz = x * y, x * z, y * z
    wx, wy, wz = w * x, w * y, w * z
    rows = (
        1 - 2 * (yy + zz), 2 * (xy - wz), 2 * (xz + wy),
        2 * (xy + wz), 1 - 2 * (xx + zz), 2 * (yz - wx),
        2 * (xz - wy), 2 * (yz + wx), 1 - 2 * (xx + yy),
    )  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(*quats.shape[:-1], 3, 3)


# Real spherical-harmonics normalization constants (degree 0..3) in the sign and index
# convention gsplat and the original 3DGS code use.
_SH_C0 = 0.5 * math.sqrt(1.0 / math.pi)
_SH_C1 = math.sqrt(3.0 / (4.0 * math.pi))
_SH_C2 = (
    0.5 * math.sqrt(15.0 / math.pi),
    0.25 * math.sqrt(5.0 / math.pi),
    0.25 * math.sqrt(15.0 / math.pi),
)
_SH_C3 = (
    0.25 * math.sqrt(35.0 / (2.0 * math.pi)),
    0.5 * math.sqrt(105.0 / math.pi),
    0.25 * math.sqrt(21.0 / (2.0 * math.pi)),
    0.25 * math.sqrt(7.0 / math.pi),
    0.25 * math.sqrt(105.0 / math.pi),
)


def sh_degree_of(num_coeffs: int) -> int:
    """The SH degree whose basis has ``num_coeffs = (degree + 1)²`` functions.

    Raises ``ValueError`` for a count that is not 1, 4, 9 or 16.
    """
    degree = math.isqrt(num_coeffs) - 1
    if (degree + 1) ** 2 != num_coeffs or not 0 <= degree <= 3:
        raise ValueError(
            f"sh must have K = (degree + 1)^2 coefficients with degree 0..3 (K in 1, 4, 9, 16), "
            f"got K = {num_coeffs}"
        )
    return degree


def sh_basis(degree: int, dirs: Tensor) -> Tensor:
    """Real SH basis ``[..., (degree+1)²]`` at directions ``[..., 3]`` (normalized here)."""
    if not 0 <= degree <= 3:
        raise ValueError(f"sh degree must be in 0..3, got {degree}")
    d = dirs / torch.linalg.vector_norm(dirs, dim=-1, keepdim=True).clamp_min(1e-12)
    x, y, z = d.unbind(-1)
    out = [torch.full_like(x, _SH_C0)]
    if degree >= 1:
        out += [-_SH_C1 * y, _SH_C1 * z, -_SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            _SH_C2[0] * x * y,
            -_SH_C2[0] * y * z,
            _SH_C2[1] * (3.0 * zz - 1.0),
            -_SH_C2[0] * x * z,
            _SH_C2[2] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            -_SH_C3[0] * y * (3.0 * xx - yy),
            _SH_C3[1] * x * y * z,
            -_SH_C3[2] * y * (5.0 * zz - 1.0),
            _SH_C3[3] * z * (5.0 * zz - 3.0),
            -_SH_C3[2] * x * (5.0 * zz - 1.0),
            _SH_C3[4] * z * (xx - yy),
            -_SH_C3[0] * x * (xx - 3.0 * yy),
        ]
    return torch.stack(out, dim=-1)


def eval_sh(sh: Tensor, dirs: Tensor, degree: int | None = None) -> Tensor:
    """Colors ``max(Σ_k Y_k(dir) sh_k + 0.5, 0)`` → ``[..., 3]`` (gsplat's convention).

    ``sh [..., K, 3]``, ``dirs [..., 3]`` (view directions, camera → Gaussian);
    ``degree`` defaults to the full degree that ``K`` holds; higher coefficients are
    ignored when it is smaller.
    """
    full = sh_degree_of(sh.shape[-2])
    degree = full if degree is None else degree
    if not 0 <= degree <= full:
        raise ValueError(f"sh_degree must be in 0..{full} for K = {sh.shape[-2]}, got {degree}")
    k = (degree + 1) ** 2
    basis = sh_basis(degree, dirs)  # [..., k]
    rgb = (basis.unsqueeze(-1) * sh[..., :k, :]).sum(dim=-2)
    return (rgb + 0.5).clamp_min(0.0)


def _shape_error(name: str, got: Tensor, expected: str) -> ValueError:
    return ValueError(f"{name} has shape {tuple(got.shape)}, expected {expected}")


@dataclass(frozen=True)
class Gaussians:
    """A batch of ``B`` scenes of ``N`` 3D Gaussians each, in raw parameters.

    Attributes:
        means: ``[B, N, 3]`` world positions.
        log_scales: ``[B, N, 3]`` log standard deviations along the principal axes.
        quats: ``[B, N, 4]`` rotations, wxyz, need not be normalized.
        opacities: ``[B, N]`` opacity logits.
        colors: ``[B, N, D]`` colors (used as is) or ``None``.
        sh: ``[B, N, K, 3]`` SH coefficients (K ∈ {1, 4, 9, 16}) or ``None``.

    Construct with :meth:`from_params` to get the shape checks.
    """

    means: Tensor
    log_scales: Tensor
    quats: Tensor
    opacities: Tensor
    colors: Tensor | None = None
    sh: Tensor | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Tensor] | Gaussians) -> Gaussians:
        """Gaussians from a dict with the keys ``means``, ``log_scales``, ``quats``,
        ``opacities`` and one of ``colors`` / ``sh`` (other keys are ignored).

        Raises ``KeyError`` for a missing group and ``ValueError`` for a shape, batch
        or dtype mismatch, naming the group, the shape received and the one expected.
        """
        if isinstance(params, Gaussians):
            params.validate()
            return params
        if not isinstance(params, Mapping):
            raise TypeError(f"gaussians must be a Gaussians or a dict, got {type(params).__name__}")
        missing = [k for k in ("means", "log_scales", "quats", "opacities") if k not in params]
        if missing:
            raise KeyError(
                f"gaussians is missing the group(s) {missing}; expected means [B,N,3], "
                f"log_scales [B,N,3], quats [B,N,4], opacities [B,N] and colors [B,N,D] or "
                f"sh [B,N,K,3]; got keys {sorted(params)}"
            )
        out = cls(
            means=params["means"],
            log_scales=params["log_scales"],
            quats=params["quats"],
            opacities=params["opacities"],
            colors=params.get("colors"),
            sh=params.get("sh"),
        )
        out.validate()
        return out

    def validate(self) -> None:
        """Raises ``ValueError`` / ``TypeError`` unless every group has a consistent shape."""
        m = self.means
        if not isinstance(m, Tensor) or m.dim() != 3 or m.shape[-1] != 3:
            raise _shape_error("gaussians['means']", torch.as_tensor(m), "[B, N, 3]")
        if not m.is_floating_point():
            raise TypeError(f"gaussians['means'] must be floating point, got {m.dtype}")
        B, N = m.shape[:2]
        expect = {
            "log_scales": (self.log_scales, (B, N, 3), "[B, N, 3]"),
            "quats": (self.quats, (B, N, 4), "[B, N, 4] (wxyz)"),
            "opacities": (self.opacities, (B, N), "[B, N] (logits)"),
        }
        for name, (t, shape, text) in expect.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"gaussians[{name!r}] must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise _shape_error(
                    f"gaussians[{name!r}]", t, f"{text} = {list(shape)} (B, N from means)"
                )
        if (self.colors is None) == (self.sh is None):
            raise ValueError(
                "gaussians needs exactly one of 'colors' [B, N, D] and 'sh' [B, N, K, 3]; got "
                + ("both" if self.colors is not None else "neither")
            )
        if self.colors is not None:
            c = self.colors
            if c.dim() != 3 or tuple(c.shape[:2]) != (B, N) or c.shape[2] < 1:
                raise _shape_error("gaussians['colors']", c, f"[B, N, D] = [{B}, {N}, D]")
        else:
            s = self.sh
            if s.dim() != 4 or tuple(s.shape[:2]) != (B, N) or s.shape[3] != 3:
                raise _shape_error("gaussians['sh']", s, f"[B, N, K, 3] = [{B}, {N}, K, 3]")
            sh_degree_of(s.shape[2])
        for name, t in self.items():
            if t.dtype != m.dtype or t.device != m.device:
                raise ValueError(
                    f"gaussians[{name!r}] is {t.dtype} on {t.device}; every group must share "
                    f"means' {m.dtype} on {m.device}"
                )

    def items(self) -> list[tuple[str, Tensor]]:
        """``(name, tensor)`` for every present group."""
        names = ("means", "log_scales", "quats", "opacities", "colors", "sh")
        return [(n, getattr(self, n)) for n in names if getattr(self, n) is not None]

    def to_params(self) -> dict[str, Tensor]:
        """The raw groups as a dict (the parameter structure of the problem)."""
        return dict(self.items())

    @property
    def batch(self) -> int:
        return self.means.shape[0]

    @property
    def num(self) -> int:
        return self.means.shape[1]

    @property
    def channels(self) -> int:
        """Color channels ``D`` (3 for SH)."""
        return self.colors.shape[-1] if self.colors is not None else 3

    @property
    def sh_degree(self) -> int | None:
        return None if self.sh is None else sh_degree_of(self.sh.shape[2])

    def scales(self) -> Tensor:
        """``[B, N, 3]`` standard deviations, ``exp`` of the clamped log-scales."""
        return torch.exp(self.log_scales.clamp(-LOG_SCALE_BOUND, LOG_SCALE_BOUND))

    def opacity(self) -> Tensor:
        """``[B, N]`` opacities in (0, 1)."""
        return torch.sigmoid(self.opacities)

    def rotations(self) -> Tensor:
        """``[B, N, 3, 3]`` rotation matrices."""
        return quat_to_rotmat(self.quats)

    def covariance_factors(self) -> Tensor:
        """``M = R·diag(s)`` ``[B, N, 3, 3]``, so that the covariance is ``M Mᵀ``."""
        return self.rotations() * self.scales().unsqueeze(-2)

    def covariances(self) -> Tensor:
        """``[B, N, 3, 3]`` world-space covariances ``R diag(s²) Rᵀ``."""
        m = self.covariance_factors()
        return m @ m.transpose(-1, -2)

    def check_finite(self) -> None:
        """Raises ``ValueError`` naming the first group with a NaN or infinite entry."""
        for name, t in self.items():
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                raise ValueError(
                    f"gaussians[{name!r}] has {int(bad.sum())} non-finite entries (NaN or inf); "
                    "the renderer needs finite parameters"
                )
