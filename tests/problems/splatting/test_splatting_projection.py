"""EWA projection and activations against gsplat's pure-PyTorch reference functions."""

import math

import pytest
import torch
from gsplat.cuda import _torch_impl as ref
from hypothesis import given, settings
from hypothesis import strategies as st

from difftto.problems.splatting import Gaussians, look_at, project_gaussians, quat_to_rotmat
from difftto.problems.splatting.gaussians import eval_sh

F64 = torch.float64


def _scene(seed, B=2, N=40, C=3, W=32, H=28, spread=0.5, log_scale=-2.0):
    gen = torch.Generator().manual_seed(seed)
    g = Gaussians.from_params(dict(
        means=torch.randn(B, N, 3, generator=gen, dtype=F64),
        log_scales=log_scale + 0.5 * torch.randn(B, N, 3, generator=gen, dtype=F64),
        quats=torch.randn(B, N, 4, generator=gen, dtype=F64),
        opacities=torch.randn(B, N, generator=gen, dtype=F64),
        colors=torch.rand(B, N, 3, generator=gen, dtype=F64),
    ))
    eye = torch.randn(B, C, 3, generator=gen, dtype=F64) * spread
    eye = eye + torch.tensor([0.0, 0.0, -4.0], dtype=F64)
    viewmats = look_at(eye, torch.zeros(B, C, 3, dtype=F64))
    f = 0.8 * W + 10 * torch.rand(B, C, generator=gen, dtype=F64)
    Ks = torch.zeros(B, C, 3, 3, dtype=F64)
    Ks[..., 0, 0], Ks[..., 1, 1] = f, f * 1.05
    Ks[..., 0, 2] = W / 2 + torch.randn(B, C, generator=gen, dtype=F64)
    Ks[..., 1, 2] = H / 2 + torch.randn(B, C, generator=gen, dtype=F64)
    Ks[..., 2, 2] = 1.0
    return g, viewmats, Ks, W, H


def test_rotation_matches_gsplat_and_zero_quaternion_is_identity():
    q = torch.randn(100, 4, dtype=F64)
    torch.testing.assert_close(quat_to_rotmat(q), ref._quat_to_rotmat(q))
    assert torch.equal(quat_to_rotmat(torch.zeros(4, dtype=F64)), torch.eye(3, dtype=F64))


def test_covariances_match_gsplat():
    g, *_ = _scene(0)
    covars, _ = ref._quat_scale_to_covar_preci(g.quats, g.scales(), compute_preci=False)
    torch.testing.assert_close(g.covariances(), covars)


@settings(max_examples=15)
@given(seed=st.integers(0, 10_000), spread=st.floats(0.0, 2.0), log_scale=st.floats(-4.0, 0.0))
def test_projection_matches_gsplat_reference(seed, spread, log_scale):
    """means2d, conics, depths, radii and culling agree with ``_fully_fused_projection``
    (which uses the plain 3.33σ radius, i.e. no opacities)."""
    g, viewmats, Ks, W, H = _scene(seed, spread=spread, log_scale=log_scale)
    ours = project_gaussians(g.means, g.covariance_factors(), viewmats, Ks, W, H)
    covars, _ = ref._quat_scale_to_covar_preci(g.quats, g.scales(), compute_preci=False)
    radii, means2d, depths, conics, _ = ref._fully_fused_projection(
        g.means, covars, viewmats, Ks, W, H)
    theirs_valid = (radii > 0).all(-1)
    assert torch.equal(ours.valid, theirs_valid)
    v = ours.valid
    torch.testing.assert_close(ours.means2d[v], means2d[v])
    torch.testing.assert_close(ours.conics[v], conics[v])
    torch.testing.assert_close(ours.depths, depths)
    assert torch.equal(ours.radii[v], radii[v])


def test_world_to_cam_and_perspective_pieces_match_gsplat():
    """The 2-D covariance before dilation is gsplat's ``_persp_proj(_world_to_cam(...))``."""
    g, viewmats, Ks, W, H = _scene(3)
    ours = project_gaussians(g.means, g.covariance_factors(), viewmats, Ks, W, H, eps2d=0.0)
    means_c, covars_c = ref._world_to_cam(g.means, g.covariances(), viewmats)
    means2d, cov2d = ref._persp_proj(means_c, covars_c, Ks, W, H)
    v = ours.depths > 0.01
    torch.testing.assert_close(ours.covars2d[v], cov2d[v])
    torch.testing.assert_close(ours.means2d[v], means2d[v])


def test_dilation_is_point_three_pixels():
    g, viewmats, Ks, W, H = _scene(4)
    a = project_gaussians(g.means, g.covariance_factors(), viewmats, Ks, W, H, eps2d=0.0)
    b = project_gaussians(g.means, g.covariance_factors(), viewmats, Ks, W, H)
    torch.testing.assert_close(b.covars2d - a.covars2d,
                               0.3 * torch.eye(2, dtype=F64).expand_as(a.covars2d))


def test_opacity_aware_radius_follows_gsplat_cuda_rule():
    """With opacities the radius is ceil(min(3.33, sqrt(2 ln(255 o))) σ); o < 1/255 culls."""
    g, viewmats, Ks, W, H = _scene(5)
    op = g.opacity()
    op[0, :3] = torch.tensor([1e-3, 0.5, 0.999], dtype=F64)
    p = project_gaussians(g.means, g.covariance_factors(), viewmats, Ks, W, H, opacities=op)
    plain = project_gaussians(g.means, g.covariance_factors(), viewmats, Ks, W, H)
    assert not p.valid[0, :, 0].any()
    extend = torch.clamp(torch.sqrt(2 * torch.log(op * 255).clamp_min(0)), max=3.33)
    sx = torch.sqrt(p.covars2d[..., 0, 0])
    expect = torch.ceil(extend.unsqueeze(1) * sx).to(torch.int32)
    both = p.valid & plain.valid
    assert torch.equal(p.radii[..., 0][both], expect[both])
    assert (p.radii <= plain.radii).all()


def test_culling_behind_camera_and_on_its_plane_is_finite():
    g, viewmats, Ks, W, H = _scene(6, B=1, C=1, spread=0.0)
    means = g.means.clone()
    # Camera at z = -4 looking at the origin: put Gaussians behind it and on its plane.
    means[0, 0] = torch.tensor([0.0, 0.0, -6.0])
    means[0, 1] = torch.tensor([0.3, 0.1, -4.0])
    means.requires_grad_(True)
    p = project_gaussians(means, g.covariance_factors(), viewmats, Ks, W, H)
    assert not p.valid[0, 0, :2].any()
    for t in (p.means2d, p.conics, p.covars2d):
        assert torch.isfinite(t).all()
    (p.means2d.sum() + p.conics.sum()).backward()
    assert torch.isfinite(means.grad).all()


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_spherical_harmonics_match_gsplat(degree):
    gen = torch.Generator().manual_seed(degree)
    dirs = torch.randn(50, 3, generator=gen, dtype=F64)
    sh = torch.randn(50, (degree + 1) ** 2, 3, generator=gen, dtype=F64)
    theirs = torch.clamp_min(ref._spherical_harmonics(degree, dirs, sh) + 0.5, 0.0)
    torch.testing.assert_close(eval_sh(sh, dirs), theirs)


def test_activations():
    g, *_ = _scene(7)
    torch.testing.assert_close(g.scales(), torch.exp(g.log_scales))
    torch.testing.assert_close(g.opacity(), torch.sigmoid(g.opacities))
    huge = Gaussians.from_params(dict(g.to_params(), log_scales=g.log_scales + 1e3))
    assert torch.isfinite(huge.covariances()).all()
    assert math.isclose(float(huge.scales().max()), math.exp(15.0), rel_tol=1e-12)


def test_huge_finite_quaternions_give_finite_rotations_and_gradients():
    from difftto.problems.splatting import quat_to_rotmat

    q = torch.tensor([[3e19, 1e19, -2e19, 5e18], [1e-30, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
                     requires_grad=True)
    r = quat_to_rotmat(q)
    r.sum().backward()
    assert torch.isfinite(r).all() and torch.isfinite(q.grad).all()
    small = torch.tensor([[3.0, 1.0, -2.0, 0.5]])
    torch.testing.assert_close(r[0], quat_to_rotmat(small)[0])  # scale-invariant
    torch.testing.assert_close(r[2], torch.eye(3))  # zero quaternion: identity
