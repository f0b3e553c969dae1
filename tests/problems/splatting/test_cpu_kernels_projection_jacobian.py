"""The compiled projection Jacobian (``project_jacobian`` in ``csrc/project_cpu.cpp``)
against dense ``torch.func.jacfwd`` of its pure-torch twin (:func:`cpu_kernels.projection_twin`)
in float64, over random and degenerate Gaussians and camera pose deltas; and the
Gauss-Newton products of :class:`KernelLinearization` built on it against those built on
the ``torch.func`` Jacobian. Skipped with the reason when no compiler is available."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difftto.problems.splatting import GaussianSplattingProblem, cpu_kernels, rasterize
from difftto.problems.splatting.kernel_linearization import KernelLinearization
from difftto.problems.splatting.problem import apply_pose_deltas
from difftto.problems.splatting.synthetic import degenerate_scene, random_scene

_AVAILABLE, _WHY = cpu_kernels.cpu_kernels_available()  # compiles the kernels once, if needed
pytestmark = pytest.mark.skipif(not _AVAILABLE, reason=f"compiled CPU kernels unavailable: {_WHY}")

F64 = torch.float64
KEYS = ("means", "log_scales", "quats", "opacities", "colors")
SIZES = (3, 3, 4, 1, 3)


def _scene(B, N, C, W, H, seed=0, case=None):
    return degenerate_scene(B, N, C, W, H, case, seed=seed, dtype=F64)


def _flat(theta, keys=KEYS):
    B, N = theta["means"].shape[:2]
    return torch.cat([theta[k].reshape(B, N, -1) for k in keys], dim=-1)


def _twin_jacobians(theta, V, K, settings_, pose=None):
    """Dense ``jacfwd`` of the twin, restricted to each Gaussian's own parameters and each
    camera's own pose: ``([B, C, N, F, p], [B, C, N, F, 6] or None)``."""
    B, N = theta["means"].shape[:2]
    C = V.shape[1]

    def feats(x, q):
        parts = dict(zip(KEYS, torch.split(x, SIZES, dim=-1)))
        parts["opacities"] = parts["opacities"].squeeze(-1)
        cams = V if q is None else apply_pose_deltas(V, q)
        return cpu_kernels.projection_twin(*[parts[k] for k in KEYS], cams, K, settings_)

    x = _flat(theta)
    dense = torch.func.jacfwd(lambda y: feats(y, pose))(x)  # [B, C, N, F, B, N, p]
    b, n = torch.arange(B), torch.arange(N)
    jac = dense[b[:, None, None], :, n[None, None, :], :, b[:, None, None], n[None, None, :]]  # [B, 1, N, C, F, p]
    jac = jac.squeeze(1).permute(0, 2, 1, 3, 4)
    jac_pose = None
    if pose is not None:
        dp = torch.func.jacfwd(lambda q: feats(x, q))(pose)  # [B, C, N, F, B, C, 6]
        c = torch.arange(C)
        jac_pose = dp[b[:, None], c[None, :], :, :, b[:, None], c[None, :]]  # [B, C, N, F, 6]
    return jac, jac_pose


def _compiled_jacobians(theta, V, K, settings_, pose=None, cols=(0, 3, 6, 10, 11), p=14):
    ext = cpu_kernels.load_extension()
    cams, dviews = V, V.new_zeros(0)
    if pose is not None:
        cams = apply_pose_deltas(V, pose)
        dviews = torch.func.jacfwd(lambda q: apply_pose_deltas(V, q))(pose)  # [B, C, 4, 4, B, C, 6]
        B, C = pose.shape[:2]
        b, c = torch.arange(B), torch.arange(C)
        dviews = dviews[b[:, None], c[None, :], :, :, b[:, None], c[None, :]].permute(0, 1, 4, 2, 3).contiguous()
    out = ext.project_jacobian(*[theta[k].contiguous() for k in KEYS], cams.contiguous(), K.contiguous(),
                               *settings_, torch.tensor(cols, dtype=torch.int64), p, dviews)
    return out[0], (out[1] if pose is not None else None)


def _assert_equal(actual, expected):
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    err = (actual - expected).abs().max()
    assert err <= 1e-10 * (1 + expected.abs().max()), float(err)


CASES = [None, "zero_scales", "huge_scales", "bound_scales", "zero_quats", "huge_quats", "behind_camera",
         "far_offscreen", "transparent", "needles"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("pose", [False, True])
def test_jacobian_equals_the_twin_on_degenerate_gaussians(case, pose):
    W, H = 13, 11
    theta, V, K = _scene(2, 12, 3, W, H, seed=3, case=case)
    settings_ = (W, H, 0.3, 0.01, 1e10)
    q = 1e-2 * torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(4), dtype=F64) if pose else None
    jac_ref, pose_ref = _twin_jacobians(theta, V, K, settings_, q)
    jac, jac_pose = _compiled_jacobians(theta, V, K, settings_, q)
    assert jac_ref.abs().max() > 0
    _assert_equal(jac, jac_ref)
    if pose:
        assert pose_ref.abs().max() > 0
        _assert_equal(jac_pose, pose_ref)


def test_jacobian_on_the_clamp_of_the_field_of_view_takes_half_the_slope():
    """A mean exactly on the 1.3× field-of-view limit (a tie of max/min): torch's
    derivatives take the mean of both sides, and so must the kernel."""
    W, H = 16, 12
    theta, _, K = _scene(1, 2, 1, W, H, seed=5)
    V = torch.eye(4, dtype=F64).expand(1, 1, 4, 4).contiguous()
    fx, cx = K[0, 0, 0, 0], K[0, 0, 0, 2]
    lim_neg = cx / fx + 0.3 * (0.5 * W / fx)
    theta["means"][0, 0] = torch.stack([-lim_neg, torch.zeros((), dtype=F64), torch.ones((), dtype=F64)])
    settings_ = (W, H, 0.3, 0.01, 1e10)
    jac_ref, _ = _twin_jacobians(theta, V, K, settings_)
    jac, _ = _compiled_jacobians(theta, V, K, settings_)
    _assert_equal(jac, jac_ref)


@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 2), N=st.integers(1, 16), C=st.integers(1, 3), W=st.integers(3, 17), H=st.integers(3, 13),
       seed=st.integers(0, 10_000), pose=st.booleans())
def test_jacobian_equals_the_twin_on_random_scenes(B, N, C, W, H, seed, pose):
    theta, V, K = _scene(B, N, C, W, H, seed=seed)
    settings_ = (W, H, 0.3, 0.01, 1e10)
    q = 1e-2 * torch.randn(B, C, 6, generator=torch.Generator().manual_seed(seed), dtype=F64) if pose else None
    jac_ref, pose_ref = _twin_jacobians(theta, V, K, settings_, q)
    jac, jac_pose = _compiled_jacobians(theta, V, K, settings_, q)
    _assert_equal(jac, jac_ref)
    if pose:
        _assert_equal(jac_pose, pose_ref)


def test_jacobian_columns_follow_the_given_offsets_and_leave_the_rest_zero():
    W, H = 9, 8
    theta, V, K = _scene(1, 5, 2, W, H, seed=6)
    settings_ = (W, H, 0.3, 0.01, 1e10)
    ref, _ = _compiled_jacobians(theta, V, K, settings_)
    # groups in another order, an unrelated 2-column group first, opacities absent
    cols, p = (2 + 4 + 3, 2 + 4, 2, -1, 2 + 4 + 3 + 3), 2 + 4 + 3 + 3 + 3
    jac, _ = _compiled_jacobians(theta, V, K, settings_, cols=cols, p=p)
    for k, (start, size) in enumerate(zip((0, 3, 6, 10, 11), SIZES)):
        if cols[k] >= 0:
            torch.testing.assert_close(jac[..., cols[k] : cols[k] + size], ref[..., start : start + size],
                                       rtol=0, atol=0)
    assert (jac[..., :2] == 0).all()
    with pytest.raises(RuntimeError, match="does not fit"):
        _compiled_jacobians(theta, V, K, settings_, cols=(0, 3, 6, 10, 12), p=14)


@pytest.mark.parametrize(("pose", "extras", "sh"), [(False, False, None), (True, True, None), (False, True, 2),
                                                   (True, False, 1)])
def test_linearization_products_equal_those_of_the_torch_func_jacobian(pose, extras, sh):
    B, N, C, W, H = 2, 25, 2, 11, 9
    theta, V, K = random_scene(B, N, C, W, H, seed=8, dtype=F64, sh_degree=sh)
    gen = torch.Generator().manual_seed(9)
    # another key order than the kernel's groups
    colour_key = "colors" if sh is None else "sh"
    theta = {k: theta[k] for k in (colour_key, "quats", "means", "opacities", "log_scales")}
    if pose:
        theta["pose_deltas"] = 1e-3 * torch.randn(B, C, 6, generator=gen, dtype=F64)
    images = rasterize(theta, V, K, W, H, backend="torch").colors + 0.05
    data = dict(viewmats=V, Ks=K, images=images)
    if extras:
        data["background"] = torch.rand(B, C, 3, generator=gen, dtype=F64)
        data["weights"] = torch.rand(B, C, H, W, 1, generator=gen, dtype=F64)
    problem = GaussianSplattingProblem(backend="cpu_kernels", sh_degree=sh)
    frozen = problem.freeze(theta, data)
    kernel = KernelLinearization(problem, theta, frozen)
    twin = KernelLinearization(problem, theta, frozen, jacobian="torch.func")
    v = {k: torch.randn(x.shape, generator=gen, dtype=F64) for k, x in theta.items()}
    jv = twin.jvp(v)
    assert jv.abs().max() > 0
    _assert_equal(kernel.jvp(v), jv)
    w = torch.randn(jv.shape, generator=gen, dtype=F64)
    jtw, jtw_ref = kernel.vjp(w), twin.vjp(w)
    diag, diag_ref = kernel.gauss_newton_diagonal(), twin.gauss_newton_diagonal()
    assert set(jtw) == set(diag) == set(theta)
    for k in theta:
        _assert_equal(jtw[k], jtw_ref[k])
        _assert_equal(diag[k], diag_ref[k])


def test_linearization_rejects_an_unknown_jacobian():
    theta, V, K = random_scene(1, 4, 1, 6, 5, seed=1, dtype=F64)
    data = dict(viewmats=V, Ks=K, images=torch.zeros(1, 1, 5, 6, 3, dtype=F64))
    problem = GaussianSplattingProblem(backend="cpu_kernels")
    with pytest.raises(ValueError, match="jacobian must be"):
        KernelLinearization(problem, theta, problem.freeze(theta, data), jacobian="jacrev")
