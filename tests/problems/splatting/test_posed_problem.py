"""The ``gaussian_splatting_posed`` problem: cameras as parameters (SE(3) twists)."""

import pytest
import torch

import difftto
from difftto.objective import InnerObjective
from difftto.problems import get
from difftto.problems.splatting import GaussianSplattingProblem, PosedSplattingProblem, rasterize
from difftto.problems.splatting.se3 import se3_exp, se3_log
from difftto.problems.splatting.synthetic import pixel_aligned_scene, random_scene
from difftto.regularizers import Proximal
from difftto.solvers import PCG

F64 = torch.float64
GROUPS = ("means", "log_scales", "quats", "opacities", "colors", "pose")


def _identity(B, C, dtype=F64):
    return torch.eye(4, dtype=dtype).expand(B, C, 4, 4).clone()


def test_registered_and_equal_to_the_unposed_problem_at_the_true_pose():
    problem = get("gaussian_splatting_posed")
    assert isinstance(problem, PosedSplattingProblem) and problem.is_least_squares
    theta, viewmats, Ks = random_scene(2, 15, 3, 10, 8, seed=3)
    images = rasterize(theta, viewmats, Ks, 10, 8).colors + 0.02
    plain = GaussianSplattingProblem(backend="torch").residuals(
        theta, {"viewmats": viewmats, "Ks": Ks, "images": images})
    # The whole pose in θ (identity base cameras) ...
    posed = problem.residuals({**theta, "pose": se3_log(viewmats)},
                              {"viewmats": _identity(2, 3), "Ks": Ks, "images": images})
    torch.testing.assert_close(posed, plain, atol=1e-9, rtol=1e-7)
    # ... or a zero correction of the given cameras.
    zero = problem.residuals({**theta, "pose": torch.zeros(2, 3, 6, dtype=F64)},
                             {"viewmats": viewmats, "Ks": Ks, "images": images})
    torch.testing.assert_close(zero, plain)


def test_errors_name_the_pose_group():
    problem = PosedSplattingProblem()
    theta, viewmats, Ks = random_scene(1, 5, 2, 8, 8)
    data = {"viewmats": viewmats, "Ks": Ks, "images": torch.zeros(1, 2, 8, 8, 3, dtype=F64)}
    with pytest.raises(KeyError, match="pose"):
        problem.residuals(theta, data)
    with pytest.raises(ValueError, match=r"theta\['pose'\] has shape \(1, 3, 6\)"):
        problem.residuals({**theta, "pose": torch.zeros(1, 3, 6, dtype=F64)}, data)
    with pytest.raises(ValueError, match="backend"):
        PosedSplattingProblem(backend="cpu_kernels")


def test_jacobian_products_reach_the_pose():
    """Forward-mode J·v of a pose direction matches a central finite difference."""
    problem = PosedSplattingProblem()
    theta, viewmats, Ks = random_scene(1, 20, 2, 10, 10, seed=1, scale_px=2.5)
    images = rasterize(theta, viewmats, Ks, 10, 10).colors
    data = problem.freeze({**theta, "pose": se3_log(viewmats)},
                          {"viewmats": _identity(1, 2), "Ks": Ks, "images": images})
    pose = se3_log(viewmats)
    direction = torch.randn(pose.shape, generator=torch.Generator().manual_seed(0), dtype=F64)

    def r(p):
        return problem.residuals({**theta, "pose": p}, data)

    _, jv = torch.func.jvp(r, (pose,), (direction,))
    eps = 1e-6
    fd = (r(pose + eps * direction) - r(pose - eps * direction)) / (2 * eps)
    assert jv.abs().max() > 1e-3
    torch.testing.assert_close(jv, fd, atol=1e-6, rtol=1e-4)


def _largest_eigenvalue(objective, theta, iters=30):
    op = objective.hessian_operator(theta)
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(0), dtype=theta.dtype)
    for _ in range(iters):
        v = op.mv(v)
        v = v / v.norm()
    return float((v * op.mv(v)).sum())


def test_implicit_gradient_agrees_with_unrolled_at_convergence_with_poses_in_theta():
    """Gaussians and both context cameras refined; the IFT gradient w.r.t. Θ0 (poses
    included) matches backprop through 400 converged gradient steps (cosine ≥ 0.99)."""
    size = 4
    truth, viewmats, ks = pixel_aligned_scene(1, 2, size, size, render_views=3, seed=0, dtype=F64)
    ctx_v, ctx_k = viewmats[:, [0, 2]], ks[:, [0, 2]]
    tgt = (viewmats[:, [1]], ks[:, [1]])
    images = rasterize(truth, ctx_v, ctx_k, size, size).colors
    target = rasterize(truth, *tgt, size, size).colors
    g = torch.Generator().manual_seed(1)
    noisy = {**truth, "pose": se3_log(ctx_v)}
    theta0 = {k: v + 0.02 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in noisy.items()}
    data = {"viewmats": _identity(1, 2), "Ks": ctx_k, "images": images}
    problem = get("gaussian_splatting_posed")
    lam = {k: torch.full(v.shape[:2], 3.0, dtype=F64) for k, v in theta0.items()}
    layout = difftto.Layout.of(theta0)
    flat0 = layout.flatten(theta0)
    objective = InnerObjective(problem, layout, data, Proximal(flat0, layout.expand(lam)))
    lr = 1.0 / _largest_eigenvalue(objective, flat0)

    grads = {}
    for mode in ("implicit", "unrolled"):
        t0 = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
        layer = difftto.ImplicitLayer(problem, inner=difftto.GradientDescent(lr=lr, steps=400), backward=mode,
                                      hessian="exact", solver=PCG(rtol=1e-10, max_iter=2000))
        star, info = layer(t0, lam, data)
        assert float(info.forward.stationarity.max()) < 1e-4, info
        render = rasterize({k: v for k, v in star.items() if k != "pose"}, *tgt, size, size).colors
        (render - target).pow(2).mean().backward()
        grads[mode] = torch.cat([t0[k].grad.reshape(-1) for k in GROUPS])
        assert t0["pose"].grad.abs().max() > 0
    cosine = torch.nn.functional.cosine_similarity(grads["implicit"], grads["unrolled"], dim=0)
    assert cosine >= 0.99, float(cosine)


def test_tto_recovers_a_perturbed_context_pose():
    """Known Gaussians held by a large Λ; one context camera's pose perturbed by ~3°
    and 0.1 in translation; Gauss-Newton TTO on the pose brings it back."""
    truth, viewmats, ks = random_scene(1, 40, 2, 16, 16, seed=5, scale_px=2.5)
    images = rasterize(truth, viewmats, ks, 16, 16).colors
    pose_true = se3_log(viewmats)
    delta = torch.tensor([[[0.0] * 6, [0.06, -0.05, 0.04, 0.03, -0.03, 0.02]]], dtype=F64)
    pose0 = se3_log(se3_exp(delta) @ viewmats)
    theta0 = {**truth, "pose": pose0}
    lam = {k: torch.full(v.shape[:2], 1e6, dtype=F64) for k, v in truth.items()}
    lam["pose"] = torch.tensor([[1e6, 1e-6]], dtype=F64)
    inner = difftto.GaussNewton(steps=15, damping=1e-3, solver=PCG(rtol=1e-8, max_iter=200, on_failure="best"))
    layer = difftto.ImplicitLayer("gaussian_splatting_posed", inner=inner)
    star, info = layer(theta0, lam, {"viewmats": _identity(1, 2), "Ks": ks, "images": images})

    def error(pose):
        rel = se3_log(se3_exp(pose[0, 1]) @ torch.linalg.inv(se3_exp(pose_true[0, 1])))
        return float(rel.norm())

    before, after = error(pose0), error(star["pose"])
    assert before > 0.08 and after < 0.05 * before, (before, after, info)


def test_pose_mask_keeps_a_camera_out_of_the_data_term():
    problem = PosedSplattingProblem()
    theta, viewmats, Ks = random_scene(1, 20, 2, 10, 10, seed=2, scale_px=2.5)
    images = rasterize(theta, viewmats, Ks, 10, 10).colors + 0.1
    pose = torch.full((1, 2, 6), 0.01, dtype=F64, requires_grad=True)
    data = {"viewmats": viewmats, "Ks": Ks, "images": images, "pose_mask": torch.tensor([0.0, 1.0], dtype=F64)}
    problem.objective({**theta, "pose": pose}, data).sum().backward()
    assert pose.grad[0, 0].abs().max() == 0 and pose.grad[0, 1].abs().max() > 0
    masked = problem.residuals({**theta, "pose": pose.detach()}, data)
    plain = problem.residuals({**theta, "pose": pose.detach() * torch.tensor([0.0, 1.0], dtype=F64)[:, None]},
                              {k: v for k, v in data.items() if k != "pose_mask"})
    torch.testing.assert_close(masked, plain)
    with pytest.raises(ValueError, match="pose_mask"):
        problem.residuals({**theta, "pose": pose.detach()}, {**data, "pose_mask": torch.ones(3)})
