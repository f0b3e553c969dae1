"""SE(3) exponential, logarithm and composition on twists ``ξ = (ρ, ω) [..., 6]``.

``ρ`` (first three entries) is the translational part, ``ω`` the rotation vector, the
same order as :func:`~difftto.problems.splatting.problem.apply_pose_deltas`. Closed
forms (Rodrigues and the left Jacobian ``V``), differentiable in reverse and forward
mode everywhere, including ``ω = 0``: near zero the coefficients are Taylor series,
selected with :func:`torch.where` on a *safe* angle so that neither branch produces a
NaN that the other's gradient would pick up.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hat", "vee", "se3_exp", "se3_log", "se3_compose", "se3_inverse", "so3_exp", "so3_log",
           "so3_exp_quat", "matrix_to_quat", "quat_multiply"]

# Below this squared angle the series are used; the closed forms lose digits to
# cancellation (1 − cos θ, θ − sin θ) for small θ in float32. At θ = 0.3 the first
# neglected term of every series is below 1e-16, so float64 keeps its precision too.
_SMALL_ANGLE2 = 0.09
# D(θ²) = Σ_{n≥1} (−1)^(n+1) B_2n θ^(2n−2) / (2n)! (Bernoulli numbers B_2n).
_D_SERIES = (1.0 / 12.0, 1.0 / 720.0, 1.0 / 30240.0, 1.0 / 1209600.0, 1.0 / 47900160.0,
             691.0 / 1307674368000.0)


def _alternating_series(s: Tensor, first: float, ratios: tuple[int, ...]) -> Tensor:
    """``first · (1 − s/r0 · (1 − s/r1 · (1 − …)))``: Horner's form of a series whose
    successive terms have the ratio ``−s/r_k``."""
    acc = torch.ones_like(s)
    for r in reversed(ratios):
        acc = 1.0 - s / r * acc
    return first * acc


def hat(w: Tensor) -> Tensor:
    """Skew matrices ``[..., 3, 3]`` with ``hat(w) @ x = w × x`` for ``w [..., 3]``."""
    if w.shape[-1] != 3:
        raise ValueError(f"w has shape {tuple(w.shape)}, expected [..., 3]")
    x, y, z = w.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).unflatten(-1, (3, 3))


def vee(m: Tensor) -> Tensor:
    """The vector ``[..., 3]`` of the antisymmetric part of ``m [..., 3, 3]`` (inverse of :func:`hat`)."""
    return 0.5 * torch.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0],
                              m[..., 1, 0] - m[..., 0, 1]], dim=-1)


def _coefficients(theta2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``A = sin θ/θ``, ``B = (1 − cos θ)/θ²``, ``C = (θ − sin θ)/θ³`` from ``θ² [...]``."""
    small = theta2 < _SMALL_ANGLE2
    t2 = torch.where(small, torch.ones_like(theta2), theta2)  # safe: the exact branch never sees 0
    t = torch.sqrt(t2)
    a_exact = torch.sin(t) / t
    b_exact = 2.0 * torch.sin(0.5 * t) ** 2 / t2  # 1 − cos θ without cancellation
    c_exact = (t - torch.sin(t)) / (t2 * t)
    s = theta2
    a_series = _alternating_series(s, 1.0, (6, 20, 42, 72, 110, 156))
    b_series = _alternating_series(s, 0.5, (12, 30, 56, 90, 132, 182))
    c_series = _alternating_series(s, 1.0 / 6.0, (20, 42, 72, 110, 156, 210))
    return (torch.where(small, a_series, a_exact), torch.where(small, b_series, b_exact),
            torch.where(small, c_series, c_exact))


def _check_twist(xi: Tensor, name: str = "xi") -> None:
    if not isinstance(xi, Tensor) or xi.dim() < 1 or xi.shape[-1] != 6:
        shape = tuple(xi.shape) if isinstance(xi, Tensor) else type(xi).__name__
        raise ValueError(f"{name} has shape {shape}, expected [..., 6] = (translation, rotation)")


def so3_exp(w: Tensor) -> Tensor:
    """Rotation matrices ``[..., 3, 3]`` of rotation vectors ``w [..., 3]`` (Rodrigues)."""
    a, b, _ = _coefficients((w * w).sum(-1))
    W = hat(w)
    eye = torch.eye(3, dtype=w.dtype, device=w.device)
    return eye + a[..., None, None] * W + b[..., None, None] * (W @ W)


def se3_exp(xi: Tensor) -> Tensor:
    """Rigid transforms ``[..., 4, 4]`` of twists ``xi [..., 6]``: ``[[R, V ρ], [0, 1]]``
    with ``R = exp(ω^)`` and ``V = I + B ω^ + C ω^²``. ``se3_exp(-xi)`` is the inverse."""
    _check_twist(xi)
    rho, w = xi[..., :3], xi[..., 3:]
    a, b, c = _coefficients((w * w).sum(-1))
    W = hat(w)
    W2 = W @ W
    eye = torch.eye(3, dtype=xi.dtype, device=xi.device)
    R = eye + a[..., None, None] * W + b[..., None, None] * W2
    V = eye + b[..., None, None] * W + c[..., None, None] * W2
    t = (V @ rho.unsqueeze(-1)).squeeze(-1)
    top = torch.cat([R, t.unsqueeze(-1)], dim=-1)
    bottom = torch.zeros(*xi.shape[:-1], 1, 4, dtype=xi.dtype, device=xi.device)
    bottom = bottom + torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=xi.dtype, device=xi.device)
    return torch.cat([top, bottom], dim=-2)


def so3_log(R: Tensor) -> Tensor:
    """Rotation vectors ``[..., 3]`` with angle in ``[0, π]`` of rotation matrices ``R [..., 3, 3]``.

    The angle comes from ``atan2(‖vee(R)‖, (tr R − 1)/2)``, well conditioned at every
    angle. Near ``π`` the antisymmetric part vanishes, so the axis is read from the
    symmetric part ``(R + Rᵀ)/2 − cos θ·I = (1 − cos θ) n nᵀ`` instead (its largest
    column), its sign from the antisymmetric part."""
    if R.dim() < 2 or tuple(R.shape[-2:]) != (3, 3):
        raise ValueError(f"R has shape {tuple(R.shape)}, expected [..., 3, 3]")
    v = vee(R)  # sin θ · n
    sin_t = v.norm(dim=-1)
    cos_t = 0.5 * (R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0)
    theta = torch.atan2(sin_t, cos_t)
    theta2 = theta * theta
    a, _, _ = _coefficients(theta2)  # sin θ / θ
    near_pi = (cos_t < 0) & (sin_t < 0.2)
    a_safe = torch.where(near_pi, torch.ones_like(a), a)
    generic = v / a_safe[..., None]
    # Near π: the axis from the symmetric part.
    eye = torch.eye(3, dtype=R.dtype, device=R.device)
    S = 0.5 * (R + R.transpose(-1, -2)) - cos_t[..., None, None] * eye
    col = S.diagonal(dim1=-2, dim2=-1).argmax(-1)
    axis = torch.gather(S, -1, col[..., None, None].expand(*S.shape[:-1], 1)).squeeze(-1)
    axis = axis / axis.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(R.dtype).tiny)
    sign = torch.where((axis * v).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(R.dtype)
    flipped = sign * axis * theta[..., None]
    return torch.where(near_pi[..., None], flipped, generic)


def se3_log(T: Tensor) -> Tensor:
    """Twists ``[..., 6]`` (rotation angle in ``[0, π]``) of rigid transforms ``T [..., 4, 4]``
    (the bottom row is not read): ``ρ = V⁻¹ t``, ``V⁻¹ = I − ½ω^ + D ω^²`` with
    ``D = (1 − A/(2B))/θ²``."""
    if T.dim() < 2 or tuple(T.shape[-2:]) not in ((4, 4), (3, 4)):
        raise ValueError(f"T has shape {tuple(T.shape)}, expected [..., 4, 4]")
    w = so3_log(T[..., :3, :3])
    theta2 = (w * w).sum(-1)
    a, b, _ = _coefficients(theta2)
    small = theta2 < _SMALL_ANGLE2
    t2 = torch.where(small, torch.ones_like(theta2), theta2)
    d_exact = (1.0 - a / (2.0 * b)) / t2
    d_series = torch.full_like(theta2, _D_SERIES[-1])
    for coefficient in reversed(_D_SERIES[:-1]):
        d_series = coefficient + theta2 * d_series
    d = torch.where(small, d_series, d_exact)
    W = hat(w)
    eye = torch.eye(3, dtype=T.dtype, device=T.device)
    V_inv = eye - 0.5 * W + d[..., None, None] * (W @ W)
    rho = (V_inv @ T[..., :3, 3:]).squeeze(-1)
    return torch.cat([rho, w], dim=-1)


def se3_compose(a: Tensor, b: Tensor) -> Tensor:
    """``log(exp(a) · exp(b))`` for twists ``a, b [..., 6]`` (broadcast)."""
    _check_twist(a, "a")
    _check_twist(b, "b")
    return se3_log(se3_exp(a) @ se3_exp(b))


def se3_inverse(xi: Tensor) -> Tensor:
    """The twist of ``exp(xi)⁻¹``: ``−xi``."""
    _check_twist(xi)
    return -xi


def so3_exp_quat(w: Tensor) -> Tensor:
    """Unit quaternions ``[..., 4]`` (wxyz) of the rotations ``exp(w^)`` for rotation
    vectors ``w [..., 3]``: ``(cos(θ/2), sin(θ/2)/θ · w)``, smooth at ``θ = 0`` (series
    below the same small angle as :func:`so3_exp`)."""
    if w.shape[-1] != 3:
        raise ValueError(f"w has shape {tuple(w.shape)}, expected [..., 3]")
    theta2 = (w * w).sum(-1)
    small = theta2 < _SMALL_ANGLE2
    t = 0.5 * torch.sqrt(torch.where(small, torch.ones_like(theta2), theta2))  # θ/2, never 0 in the exact branch
    s = 0.25 * theta2  # (θ/2)²
    cos_half = torch.where(small, _alternating_series(s, 1.0, (2, 12, 30, 56, 90, 132)), torch.cos(t))
    # sin(θ/2)/θ = ½ · sin(x)/x at x = θ/2
    sinc_half = torch.where(small, _alternating_series(s, 0.5, (6, 20, 42, 72, 110, 156)), 0.5 * torch.sin(t) / t)
    return torch.cat([cos_half.unsqueeze(-1), sinc_half.unsqueeze(-1) * w], dim=-1)


def quat_multiply(p: Tensor, q: Tensor) -> Tensor:
    """Hamilton products ``p ⊗ q`` ``[..., 4]`` of quaternions (wxyz, broadcast): the
    rotation of ``p ⊗ q`` is ``R(p) · R(q)``."""
    if p.shape[-1] != 4 or q.shape[-1] != 4:
        raise ValueError(f"quaternions have shapes {tuple(p.shape)} and {tuple(q.shape)}, expected [..., 4]")
    pw, px, py, pz = p.unbind(-1)
    qw, qx, qy, qz = q.unbind(-1)
    return torch.stack([pw * qw - px * qx - py * qy - pz * qz,
                        pw * qx + px * qw + py * qz - pz * qy,
                        pw * qy - px * qz + py * qw + pz * qx,
                        pw * qz + px * qy - py * qx + pz * qw], dim=-1)


def matrix_to_quat(R: Tensor) -> Tensor:
    """Unit quaternions ``[..., 4]`` (wxyz, ``w ≥ 0``) of rotation matrices ``R [..., 3, 3]``
    (Shepperd's method: the largest of ``4w², 4x², 4y², 4z²`` picks the branch; every
    branch's square root is floored, so unused branches stay finite in autograd)."""
    if R.dim() < 2 or tuple(R.shape[-2:]) != (3, 3):
        raise ValueError(f"R has shape {tuple(R.shape)}, expected [..., 3, 3]")
    m00, m11, m22 = R[..., 0, 0], R[..., 1, 1], R[..., 2, 2]
    four = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    a = R[..., 2, 1] - R[..., 1, 2]
    b = R[..., 0, 2] - R[..., 2, 0]
    c = R[..., 1, 0] - R[..., 0, 1]
    d = R[..., 0, 1] + R[..., 1, 0]
    e = R[..., 0, 2] + R[..., 2, 0]
    f = R[..., 1, 2] + R[..., 2, 1]
    root = torch.sqrt(four.clamp_min(1e-12))  # 2|w|, 2|x|, 2|y|, 2|z| in their branches
    cands = torch.stack([
        torch.stack([root[..., 0] ** 2, a, b, c], -1) / (2 * root[..., 0, None]),
        torch.stack([a, root[..., 1] ** 2, d, e], -1) / (2 * root[..., 1, None]),
        torch.stack([b, d, root[..., 2] ** 2, f], -1) / (2 * root[..., 2, None]),
        torch.stack([c, e, f, root[..., 3] ** 2], -1) / (2 * root[..., 3, None]),
    ], dim=-2)  # [..., 4 branches, 4]
    pick = four.argmax(-1)
    q = torch.gather(cands, -2, pick[..., None, None].expand(*pick.shape, 1, 4)).squeeze(-2)
    return torch.where(q[..., :1] < 0, -q, q)
