"""SE(3) exp / log / compose: the group laws (property-based), the small-angle and
near-π branches, and agreement with the matrix exponential."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from difftto.problems.splatting.problem import apply_pose_deltas
from difftto.problems.splatting.se3 import (
    hat,
    se3_compose,
    se3_exp,
    se3_inverse,
    se3_log,
    so3_exp,
    so3_log,
    vee,
)

F64 = torch.float64


def _twist(translation: list[float], axis: list[float], angle: float) -> torch.Tensor:
    a = torch.tensor(axis, dtype=F64)
    a = a / a.norm().clamp_min(1e-12)
    return torch.cat([torch.tensor(translation, dtype=F64), a * angle])


coord = st.floats(-2.0, 2.0, allow_nan=False)
unit = st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=3, max_size=3).filter(
    lambda v: sum(x * x for x in v) > 1e-2)
translations = st.lists(coord, min_size=3, max_size=3)
# Angles up to just below π: the log returns angles in [0, π], so exp∘log is the
# identity there on twists.
angles = st.one_of(st.floats(0.0, math.pi - 1e-3), st.floats(0.0, 1e-3), st.sampled_from([0.0, 0.3, 1e-8]))
twists = st.builds(_twist, translations, unit, angles)


@given(twists)
def test_log_of_exp_is_the_identity_on_twists(xi):
    torch.testing.assert_close(se3_log(se3_exp(xi)), xi, atol=1e-9, rtol=1e-7)


@given(twists)
def test_exp_of_log_is_the_identity_on_transforms(xi):
    T = se3_exp(xi)
    torch.testing.assert_close(se3_exp(se3_log(T)), T, atol=1e-10, rtol=1e-9)


@given(twists)
def test_exp_is_rigid_and_matches_the_matrix_exponential(xi):
    T = se3_exp(xi)
    R = T[:3, :3]
    torch.testing.assert_close(R.T @ R, torch.eye(3, dtype=F64), atol=1e-12, rtol=0)
    assert torch.det(R) == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(T[3], torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=F64))
    twist_matrix = torch.zeros(4, 4, dtype=F64)
    twist_matrix[:3, :3] = hat(xi[3:])
    twist_matrix[:3, 3] = xi[:3]
    torch.testing.assert_close(T, torch.linalg.matrix_exp(twist_matrix), atol=1e-10, rtol=1e-9)


@given(twists, twists, twists)
def test_composition_is_associative(a, b, c):
    left = se3_compose(se3_compose(a, b), c)
    right = se3_compose(a, se3_compose(b, c))
    # Twists may differ by 2π about the axis when the angle reaches π: compare transforms.
    torch.testing.assert_close(se3_exp(left), se3_exp(right), atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(se3_exp(left), se3_exp(a) @ se3_exp(b) @ se3_exp(c), atol=1e-8, rtol=1e-8)


@given(twists)
def test_inverse_composes_to_the_identity(xi):
    torch.testing.assert_close(se3_exp(se3_compose(xi, se3_inverse(xi))), torch.eye(4, dtype=F64),
                               atol=1e-10, rtol=0)
    torch.testing.assert_close(se3_exp(se3_inverse(xi)), torch.linalg.inv(se3_exp(xi)), atol=1e-9, rtol=1e-9)


def test_batched_shapes_and_agreement_with_apply_pose_deltas():
    torch.manual_seed(0)
    xi = torch.randn(2, 3, 6, dtype=F64) * 0.5
    T = se3_exp(xi)
    assert T.shape == (2, 3, 4, 4) and se3_log(T).shape == (2, 3, 6)
    base = se3_exp(torch.randn(2, 3, 6, dtype=F64))
    torch.testing.assert_close(se3_exp(xi) @ base, apply_pose_deltas(base, xi))


def test_near_pi_rotation_log_recovers_axis_and_angle():
    for angle in (math.pi - 1e-6, math.pi - 1e-3, math.pi):
        w = torch.tensor([0.3, -0.8, 0.5], dtype=F64)
        w = w / w.norm() * angle
        back = so3_log(so3_exp(w))
        # At exactly π, w and −w are the same rotation.
        torch.testing.assert_close(so3_exp(back), so3_exp(w), atol=1e-9, rtol=0)
        assert back.norm().item() == pytest.approx(angle, abs=1e-6)


@pytest.mark.parametrize("scale", [0.0, 1e-6, 0.2, 0.31, 1.5])
def test_gradients_finite_and_match_finite_differences(scale):
    """Across the series/closed-form switch (θ² = 0.09) and at exactly zero, forward
    and reverse derivatives of exp and log are finite and agree with gradcheck."""
    xi = (torch.tensor([0.1, -0.2, 0.3, 0.6, -0.3, 0.74], dtype=F64) * scale
          + torch.tensor([0.1, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(se3_exp, (xi,))
    assert torch.autograd.gradcheck(lambda x: se3_log(se3_exp(x)), (xi,))
    _, tangent = torch.func.jvp(se3_exp, (xi.detach(),), (torch.ones(6, dtype=F64),))
    assert torch.isfinite(tangent).all()


def test_float32_small_angles_are_accurate():
    xi = torch.tensor([[0.0, 0.0, 0.0, 1e-4, 0.0, 0.0], [0.1, 0.2, 0.3, 0.0, 0.25, 0.05]])
    torch.testing.assert_close(se3_log(se3_exp(xi)), xi, atol=2e-6, rtol=1e-4)


def test_hat_vee_inverse_and_errors():
    w = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(vee(hat(w)), w)
    with pytest.raises(ValueError, match=r"expected \[..., 6\]"):
        se3_exp(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"expected \[..., 4, 4\]"):
        se3_log(torch.zeros(2, 3, 3))
