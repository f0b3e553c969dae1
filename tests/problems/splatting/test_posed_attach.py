"""``gaussian_splatting_posed(attach="camera")``: Gaussians parametrized in the frame of
the context camera that predicted them, carried into the world by its current pose."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import difftto
from difftto.objective import InnerObjective
from difftto.problems import get
from difftto.problems.splatting import PosedSplattingProblem, rasterize
from difftto.problems.splatting.se3 import (
    matrix_to_quat,
    quat_multiply,
    se3_exp,
    se3_log,
    so3_exp,
    so3_exp_quat,
    so3_log,
)
from difftto.problems.splatting.synthetic import pixel_aligned_scene, random_scene
from difftto.regularizers import Proximal
from difftto.solvers import PCG

F64 = torch.float64
GROUPS = ("means", "log_scales", "quats", "opacities", "colors", "pose")


def _identity(B, C, dtype=F64):
    return torch.eye(4, dtype=dtype).expand(B, C, 4, 4).clone()


def _quat_matrix(q):
    """Rotation matrices of (not necessarily unit) wxyz quaternions, written out."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).unflatten(-1, (3, 3))


def _in_first_frame(theta, viewmats):
    """The scene re-expressed in camera 0's frame (camera 0 the identity)."""
    c0 = viewmats[:, :1].clone()
    out = dict(theta)
    out["means"] = (theta["means"].unsqueeze(-2) @ c0[:, :, :3, :3].transpose(-1, -2)).squeeze(-2) + c0[:, :, :3, 3]
    out["quats"] = quat_multiply(matrix_to_quat(c0[:, :, :3, :3]), theta["quats"])
    return out, viewmats @ torch.linalg.inv(c0)


def _to_cameras(theta, cameras, view):
    """World Gaussians written in the frame of camera ``view[n]`` (the inverse of the
    attachment, computed here from the matrices)."""
    B = cameras.shape[0]
    R = cameras[torch.arange(B)[:, None], view.expand(B, -1), :3, :3]
    t = cameras[torch.arange(B)[:, None], view.expand(B, -1), :3, 3]
    out = dict(theta)
    out["means"] = (R @ theta["means"].unsqueeze(-1)).squeeze(-1) + t
    out["quats"] = quat_multiply(matrix_to_quat(R), theta["quats"])
    return out


def test_quaternion_helpers_match_the_matrices():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 3, generator=g, dtype=F64) * torch.rand(50, 1, generator=g, dtype=F64) * 3
    w = torch.cat([w, 1e-9 * w[:5], torch.zeros(1, 3, dtype=F64)])
    torch.testing.assert_close(_quat_matrix(so3_exp_quat(w)), so3_exp(w))
    torch.testing.assert_close(_quat_matrix(matrix_to_quat(so3_exp(w))), so3_exp(w))
    v = torch.randn(w.shape, generator=g, dtype=F64)
    torch.testing.assert_close(_quat_matrix(quat_multiply(so3_exp_quat(w), so3_exp_quat(v))), so3_exp(w) @ so3_exp(v))
    # near π (branches other than w of Shepperd's method)
    axis = torch.nn.functional.normalize(torch.randn(20, 3, generator=g, dtype=F64), dim=-1)
    near_pi = axis * (torch.pi - 1e-3)
    torch.testing.assert_close(_quat_matrix(matrix_to_quat(so3_exp(near_pi))), so3_exp(near_pi))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_attached_residuals_equal_the_world_problem_at_the_same_gaussians(backend):
    """Base cameras not the identity, poses a correction, camera 0 masked: the attached
    problem at the Gaussians written in their cameras' frames renders what the world
    problem renders at the world Gaussians; its world_gaussians are those."""
    theta, viewmats, Ks = random_scene(2, 30, 3, 12, 10, seed=4)
    images = rasterize(theta, viewmats, Ks, 12, 10).colors + 0.02
    g = torch.Generator().manual_seed(1)
    pose = 0.05 * torch.randn(2, 3, 6, generator=g, dtype=F64)
    mask = torch.tensor([0.0, 1.0, 1.0], dtype=F64)
    view = torch.randint(0, 3, (2, 30), generator=g)
    data = {"viewmats": viewmats, "Ks": Ks, "images": images, "pose_mask": mask, "gaussian_view": view}
    cameras = se3_exp(pose * mask[:, None]) @ viewmats
    local = _to_cameras(theta, cameras, view)
    world = get("gaussian_splatting_posed", backend=backend)
    attached = get("gaussian_splatting_posed", backend=backend, attach="camera")
    torch.testing.assert_close(attached.residuals({**local, "pose": pose}, data),
                               world.residuals({**theta, "pose": pose}, data), atol=1e-10, rtol=1e-8)
    placed = attached.world_gaussians({**local, "pose": pose}, data)
    torch.testing.assert_close(placed["means"], theta["means"])
    torch.testing.assert_close(_quat_matrix(placed["quats"]), _quat_matrix(theta["quats"]))
    assert world.world_gaussians({**theta, "pose": pose}, data)["means"] is theta["means"]


def test_a_view_rendered_from_its_own_gaussians_does_not_depend_on_its_pose():
    theta, viewmats, Ks = random_scene(1, 25, 2, 10, 10, seed=2, scale_px=2.5)
    images = rasterize(theta, viewmats, Ks, 10, 10).colors
    problem = PosedSplattingProblem(attach="camera")
    data = {"viewmats": viewmats, "Ks": Ks, "images": images, "gaussian_view": torch.ones(25, dtype=torch.long)}
    base = torch.zeros(1, 2, 6, dtype=F64)
    moved = base.clone()
    moved[0, 1] = torch.tensor([0.1, -0.05, 0.08, 0.05, 0.04, -0.06])
    r0 = problem.render({**theta, "pose": base}, data).colors
    r1 = problem.render({**theta, "pose": moved}, data).colors
    torch.testing.assert_close(r1[:, 1], r0[:, 1])  # its own view: unchanged
    assert (r1[:, 0] - r0[:, 0]).abs().max() > 1e-2  # the other view sees them move


def test_attach_errors():
    theta, viewmats, Ks = random_scene(1, 5, 2, 8, 8)
    data = {"viewmats": viewmats, "Ks": Ks, "images": torch.zeros(1, 2, 8, 8, 3, dtype=F64)}
    point = {**theta, "pose": torch.zeros(1, 2, 6, dtype=F64)}
    problem = PosedSplattingProblem(attach="camera")
    with pytest.raises(KeyError, match="gaussian_view"):
        problem.residuals(point, data)
    with pytest.raises(ValueError, match="outside"):
        problem.residuals(point, {**data, "gaussian_view": torch.full((5,), 2)})
    with pytest.raises(ValueError, match="integers"):
        problem.residuals(point, {**data, "gaussian_view": torch.zeros(4, dtype=torch.long)})
    with pytest.raises(ValueError, match="attach"):
        PosedSplattingProblem(attach="rig")
    sh_theta, _, _ = random_scene(1, 5, 2, 8, 8, sh_degree=1)
    with pytest.raises(ValueError, match="sh"):
        problem.residuals({**sh_theta, "pose": point["pose"]},
                          {**data, "gaussian_view": torch.zeros(5, dtype=torch.long)})


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), backend=st.sampled_from(["torch", "auto"]), scale=st.floats(0.01, 0.2))
def test_jacobian_pose_columns_match_finite_differences(seed, backend, scale):
    """J·v along a random direction of the poses (and of the attached Gaussians) against
    a central difference, through the attachment, at a frozen raster state."""
    theta, viewmats, Ks = random_scene(1, 20, 3, 10, 10, seed=seed % 7, scale_px=2.5)
    images = rasterize(theta, viewmats, Ks, 10, 10).colors
    g = torch.Generator().manual_seed(seed)
    view = torch.randint(0, 3, (20,), generator=g)
    pose = scale * torch.randn(1, 3, 6, generator=g, dtype=F64)
    data = {"viewmats": viewmats, "Ks": Ks, "images": images, "gaussian_view": view,
            "pose_mask": torch.tensor([0.0, 1.0, 1.0], dtype=F64)}
    local = _to_cameras(theta, viewmats, view)
    problem = PosedSplattingProblem(backend=backend, attach="camera")
    frozen = problem.freeze({**local, "pose": pose}, data)
    direction = torch.randn(pose.shape, generator=g, dtype=F64)

    def r(p):
        return problem.residuals({**local, "pose": p}, frozen)

    _, jv = torch.func.jvp(r, (pose,), (direction,))
    eps = 1e-6
    fd = (r(pose + eps * direction) - r(pose - eps * direction)) / (2 * eps)
    assert jv.abs().max() > 1e-4
    torch.testing.assert_close(jv, fd, atol=1e-6, rtol=1e-4)
    # reverse mode agrees with forward mode: <J v, w> = <v, Jᵀ w>
    w = torch.randn(jv.shape, generator=g, dtype=F64)
    (jtw,) = torch.func.vjp(r, pose)[1](w)
    torch.testing.assert_close((jv * w).sum(), (direction * jtw).sum(), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("attach", ["world", "camera"])
def test_implicit_gradient_agrees_with_unrolled_at_convergence(largest_eigenvalue, attach):
    """Gaussians (in the world frame, or each in its source view's frame) and both context
    cameras refined; the IFT gradient w.r.t. Θ0 (poses included) matches backprop through
    400 converged gradient steps (cosine ≥ 0.99)."""
    size = 4
    truth, viewmats, ks = pixel_aligned_scene(1, 2, size, size, render_views=3, seed=0, dtype=F64)
    ctx_v, ctx_k = viewmats[:, [0, 2]], ks[:, [0, 2]]
    tgt = (viewmats[:, [1]], ks[:, [1]])
    images = rasterize(truth, ctx_v, ctx_k, size, size).colors
    target = rasterize(truth, *tgt, size, size).colors
    view = torch.arange(2).repeat_interleave(size * size)
    g = torch.Generator().manual_seed(1)
    gaussians = truth if attach == "world" else _to_cameras(truth, ctx_v, view)
    noisy = {**gaussians, "pose": se3_log(ctx_v)}
    theta0 = {k: v + 0.02 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in noisy.items()}
    data = {"viewmats": _identity(1, 2), "Ks": ctx_k, "images": images}
    if attach == "camera":
        data["gaussian_view"] = view
    problem = get("gaussian_splatting_posed", attach=attach)
    lam = {k: torch.full(v.shape[:2], 3.0, dtype=F64) for k, v in theta0.items()}
    layout = difftto.Layout.of(theta0)
    flat0 = layout.flatten(theta0)
    objective = InnerObjective(problem, layout, data, Proximal(flat0, layout.expand(lam)))
    lr = 1.0 / largest_eigenvalue(objective, flat0)

    grads = {}
    for mode in ("implicit", "unrolled"):
        t0 = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
        layer = difftto.ImplicitLayer(problem, inner=difftto.GradientDescent(lr=lr, steps=400), backward=mode,
                                      hessian="exact", solver=PCG(rtol=1e-10, max_iter=2000))
        star, info = layer(t0, lam, data)
        assert float(info.forward.stationarity.max()) < 1e-4, info
        render = rasterize(problem.world_gaussians(star, data), *tgt, size, size).colors
        (render - target).pow(2).mean().backward()
        grads[mode] = torch.cat([t0[k].grad.reshape(-1) for k in GROUPS])
        assert t0["pose"].grad.abs().max() > 0
    cosine = torch.nn.functional.cosine_similarity(grads["implicit"], grads["unrolled"], dim=0)
    assert cosine >= 0.99, float(cosine)


def test_attached_tto_reduces_a_context_rotation_error_the_world_frame_tto_keeps():
    """The mechanism of pose-free bundle adjustment. Known Gaussians, half predicted by
    each of two context views in that view's frame (exact), held by a large Λ; view 1's
    pose perturbed by 2.7° (and 0.04 in translation). A feed-forward model places view
    1's Gaussians in the world with that wrong pose. Attached to their camera they move
    with it, so the true pose fits both views exactly and Gauss-Newton TTO on the pose
    recovers it; in the world frame the misplaced Gaussians agree with the wrong pose and
    the rotation error stays."""
    size, n = 16, 40
    truth, viewmats, ks = random_scene(1, n, 2, size, size, seed=3, scale_px=2.5)
    truth, viewmats = _in_first_frame(truth, viewmats)
    images = rasterize(truth, viewmats, ks, size, size).colors
    view = torch.arange(n) % 2
    pose_true = se3_log(viewmats)
    delta = torch.tensor([[[0.0] * 6, [0.03, -0.02, 0.02, 0.03, -0.03, 0.02]]], dtype=F64)
    pose0 = se3_log(se3_exp(delta) @ viewmats)
    data = {"viewmats": _identity(1, 2), "Ks": ks, "images": images, "gaussian_view": view,
            "pose_mask": torch.tensor([0.0, 1.0], dtype=F64)}
    local = _to_cameras(truth, viewmats, view)  # what each view predicts, in its own frame
    attached = PosedSplattingProblem(attach="camera")
    starts = {"camera": {**local, "pose": pose0},
              "world": {**attached.world_gaussians({**local, "pose": pose0}, data), "pose": pose0}}

    def rotation_error(pose):
        R = se3_exp(pose[0, 1])[:3, :3] @ se3_exp(pose_true[0, 1])[:3, :3].T
        return float(so3_log(R).norm())

    after = {}
    for attach, theta0 in starts.items():
        lam = {k: torch.full(v.shape[:2], 1e6, dtype=F64) for k, v in theta0.items()}
        lam["pose"] = torch.full((1, 2), 1e-6, dtype=F64)
        inner = difftto.GaussNewton(steps=20, damping=1e-3, solver=PCG(rtol=1e-8, max_iter=200, on_failure="best"))
        layer = difftto.ImplicitLayer(PosedSplattingProblem(attach=attach), inner=inner)
        star, info = layer(theta0, lam, data)
        after[attach] = rotation_error(star["pose"])
    before = rotation_error(pose0)
    assert before > 0.04
    assert after["camera"] < 0.05 * before, (before, after)
    assert after["world"] > 0.5 * before, (before, after)
