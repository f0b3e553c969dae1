"""The ``gaussian_splatting_posed`` problem: cameras as parameters (SE(3) twists)."""

import pytest
import torch

import difftto
from difftto.problems import get
from difftto.problems.splatting import GaussianSplattingProblem, PosedSplattingProblem, rasterize
from difftto.problems.splatting.se3 import se3_exp, se3_log
from difftto.problems.splatting.synthetic import random_scene
from difftto.solvers import PCG

F64 = torch.float64


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
        PosedSplattingProblem(backend="gsplat")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_kernels_products_match_the_torch_rasterizer(dtype):
    """What the layer takes from the problem (residuals, forward-mode J·v and reverse-mode
    Jᵀ·w at a frozen raster state, the gradient of ‖r‖²), cameras included, are the same
    through the compiled kernels as through the torch rasterizer."""
    from difftto.problems.splatting.cpu_kernels import cpu_kernels_available

    ok, why = cpu_kernels_available()
    if not ok:
        pytest.skip(f"compiled CPU kernels unavailable: {why}")
    theta, viewmats, Ks = random_scene(2, 30, 3, 12, 10, seed=3)
    theta = {k: v.to(dtype) for k, v in theta.items()}
    viewmats, Ks = viewmats.to(dtype), Ks.to(dtype)
    images = rasterize(theta, viewmats, Ks, 12, 10, backend="torch").colors + 0.03
    mask = torch.ones(2, 3, dtype=dtype)
    mask[:, 0] = 0
    data = {"viewmats": _identity(2, 3, dtype), "Ks": Ks, "images": images, "pose_mask": mask}
    point = {**theta, "pose": se3_log(viewmats) + 0.01}
    g = torch.Generator().manual_seed(0)
    tangent = {k: torch.randn(v.shape, generator=g, dtype=dtype) for k, v in point.items()}
    cotangent = torch.randn(2, 3 * 10 * 12 * 3, generator=g, dtype=dtype)
    out = {}
    for backend in ("torch", "cpu_kernels"):
        problem = PosedSplattingProblem(backend=backend)
        frozen = problem.freeze(point, data)

        def residuals(t, problem=problem, frozen=frozen):
            return problem.residuals(t, frozen)

        r, jv = torch.func.jvp(residuals, (point,), (tangent,))
        (jtw,) = torch.func.vjp(residuals, point)[1](cotangent)
        leaves = {k: v.clone().requires_grad_(True) for k, v in point.items()}
        problem.residuals(leaves, data).pow(2).sum().backward()
        out[backend] = (r, jv, jtw, {k: v.grad for k, v in leaves.items()})
    tol = {"atol": 1e-10, "rtol": 1e-8} if dtype == torch.float64 else {"atol": 5e-5, "rtol": 1e-4}
    (r0, jv0, jtw0, g0), (r1, jv1, jtw1, g1) = out["torch"], out["cpu_kernels"]
    assert jv0.abs().max() > 1e-2 and jtw0["pose"].abs().max() > 1e-2 and g0["pose"].abs().max() > 1e-2
    torch.testing.assert_close(r1, r0, **tol)
    torch.testing.assert_close(jv1, jv0, **tol)
    for k in point:
        torch.testing.assert_close(jtw1[k], jtw0[k], **tol, msg=lambda m, k=k: f"J^T w [{k}]: {m}")
        torch.testing.assert_close(g1[k], g0[k], **tol, msg=lambda m, k=k: f"grad [{k}]: {m}")


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
