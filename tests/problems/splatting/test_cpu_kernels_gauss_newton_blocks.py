"""The exact per-Gaussian blocks of JᵀJ from the compiled CPU kernels' linearization
against the dense Jacobian of the torch backend (float64), degenerate Gaussians
included, and the block-Jacobi preconditioner they feed inside a PCG solve. Skipped
with the reason when no compiler is available."""

import pytest
import torch

from difftto.objective import InnerObjective
from difftto.problems.splatting import GaussianSplattingProblem, cpu_kernels, project_gaussians, rasterize
from difftto.problems.splatting.gaussians import Gaussians
from difftto.problems.splatting.kernel_linearization import KernelLinearization
from difftto.problems.splatting.synthetic import DEGENERATE_CASES, degenerate_scene, random_scene
from difftto.regularizers import Proximal
from difftto.solvers.dense import DenseCholesky
from difftto.solvers.pcg import PCG
from difftto.solvers.preconditioners import BlockJacobiPreconditioner, make_preconditioner
from difftto.tree import Layout

_AVAILABLE, _WHY = cpu_kernels.cpu_kernels_available()  # compiles the kernels once, if needed
pytestmark = pytest.mark.skipif(not _AVAILABLE, reason=f"compiled CPU kernels unavailable: {_WHY}")

F64 = torch.float64


def _data(theta, V, K, W, H, seed, extras):
    gen = torch.Generator().manual_seed(seed)
    B, C = V.shape[:2]
    images = rasterize(theta, V, K, W, H, backend="torch").colors.detach() + 0.05
    data = dict(viewmats=V, Ks=K, images=images)
    if extras:
        data["background"] = torch.rand(B, C, 3, generator=gen, dtype=F64)
        data["weights"] = torch.rand(B, C, H, W, 1, generator=gen, dtype=F64)
    return data


def _dense_blocks(theta, data, keys):
    """Per-Gaussian diagonal blocks of JᵀJ over ``keys`` from the torch backend's dense
    Jacobian (torch.func.jacfwd at the frozen state): [B, N, p, p]."""
    reference = GaussianSplattingProblem(backend="torch")
    frozen = reference.freeze(theta, data)
    layout = Layout.of(theta)
    flat = layout.flatten(theta)
    dense = torch.func.jacfwd(lambda x: reference.residuals(layout.unflatten(x), frozen))(flat)
    B, N = theta["means"].shape[:2]
    slices = layout.slices()
    index = torch.cat([torch.arange(layout.numel)[slices[k]].reshape(N, -1) for k in keys], dim=1)
    out = []
    for b in range(B):
        jac = dense[b, :, b, :].reshape(-1, layout.numel)  # [m, n]
        cols = jac[:, index]  # [m, N, p]
        out.append(torch.einsum("mnp,mnq->npq", cols, cols))
    return torch.stack(out), frozen


def _footprint_condition(theta, data):
    """The largest condition number of a valid Gaussian's 2D conic (its projected
    footprint): two float64 evaluation orders of the projection Jacobian may differ by
    about eps times it (a needle seen end-on reaches ~1e13)."""
    g = Gaussians.from_params(theta)
    W, H = data["images"].shape[-2], data["images"].shape[-3]
    p = project_gaussians(g.means, g.covariance_factors(), data["viewmats"], data["Ks"], W, H,
                          opacities=g.opacity())
    a, b, c = p.conics.unbind(-1)
    conic = torch.stack([torch.stack([a, b], -1), torch.stack([b, c], -1)], -2)
    ev = torch.linalg.eigvalsh(conic[p.valid]).abs()
    return float((ev[:, -1] / ev[:, 0].clamp_min(torch.finfo(F64).tiny)).max()) if ev.numel() else 1.0


def _check_blocks(theta, data, keys, jacobian="kernel"):
    expected, frozen = _dense_blocks(theta, data, keys)
    lin = KernelLinearization(GaussianSplattingProblem(backend="cpu_kernels"), theta, frozen, jacobian=jacobian)
    blocks, got_keys = lin.gauss_newton_blocks()
    assert got_keys == keys
    assert blocks.shape == expected.shape
    assert expected.abs().max() > 0
    # 1e-10, or float64 round-off amplified by the worst footprint's conditioning where that is larger.
    rel = max(1e-10, torch.finfo(F64).eps * _footprint_condition(theta, data))
    torch.testing.assert_close(blocks, expected, rtol=rel, atol=rel * (1 + float(expected.abs().max())))
    # Their diagonals are the kernel's exact diag(JᵀJ).
    diag = lin.gauss_newton_diagonal()
    B, N = theta["means"].shape[:2]
    flat_diag = torch.cat([diag[k].reshape(B, N, -1) for k in keys], dim=-1)
    torch.testing.assert_close(torch.diagonal(blocks, dim1=-2, dim2=-1), flat_diag, rtol=1e-10, atol=1e-12)


KEYS = ("means", "log_scales", "quats", "opacities", "colors")


@pytest.mark.parametrize(("extras", "sh"), [(False, None), (True, None), (True, 1)])
def test_blocks_equal_dense_jacobian(extras, sh):
    B, N, C, W, H = 2, 6, 2, 7, 6
    theta, V, K = random_scene(B, N, C, W, H, seed=3, dtype=F64, sh_degree=sh)
    data = _data(theta, V, K, W, H, 4, extras)
    keys = tuple(theta)
    assert keys == (KEYS if sh is None else KEYS[:4] + ("sh",))
    _check_blocks(theta, data, keys)


# In the "needles" scene one Gaussian is seen nearly end-on: its conic's condition number
# is 7e13 (footprint radii of 1e6–1e7 px), and the compiled and torch Jacobians, two
# evaluation orders, differ there by 3e-4 relative to the largest block entry, within
# eps × 7e13 ≈ 1.6e-2; the tolerance of _check_blocks scales with that conditioning (it
# stays 1e-10 in every other case, whose conditions are below 10).
@pytest.mark.parametrize("jacobian", ["kernel", "torch.func"])
@pytest.mark.parametrize("case", DEGENERATE_CASES)
def test_blocks_equal_dense_jacobian_with_degenerate_gaussians(case, jacobian):
    B, N, C, W, H = 1, 8, 2, 7, 6
    theta, V, K = degenerate_scene(B, N, C, W, H, case, seed=5, count=3)
    data = _data(theta, V, K, W, H, 6, True)
    _check_blocks(theta, data, KEYS, jacobian=jacobian)


def test_blocks_leave_the_pose_to_the_diagonal():
    B, N, C, W, H = 1, 6, 2, 7, 6
    theta, V, K = random_scene(B, N, C, W, H, seed=8, dtype=F64)
    theta = dict(theta, pose_deltas=1e-3 * torch.randn(B, C, 6, generator=torch.Generator().manual_seed(9),
                                                       dtype=F64))
    data = _data(theta, V, K, W, H, 10, False)
    _check_blocks(theta, data, KEYS)


@pytest.mark.parametrize("pose", [False, True])
def test_block_jacobi_pcg_reaches_the_dense_cholesky_solution(pose):
    B, N, C, W, H = 2, 12, 2, 8, 6
    theta, V, K = random_scene(B, N, C, W, H, seed=11, dtype=F64)
    gen = torch.Generator().manual_seed(12)
    if pose:
        theta = dict(theta, pose_deltas=1e-3 * torch.randn(B, C, 6, generator=gen, dtype=F64))
    data = _data(theta, V, K, W, H, 13, True)
    layout = Layout.of(theta)
    flat = layout.flatten(theta)
    lam = 0.1 + torch.rand(flat.shape, generator=gen, dtype=F64)
    objective = InnerObjective(GaussianSplattingProblem(backend="cpu_kernels"), layout, data,
                               Proximal(flat.clone(), lam))
    op = objective.gauss_newton_operator(flat)
    found = op.block_diagonal()
    assert found is not None
    precond = make_preconditioner("block_jacobi", op)
    assert isinstance(precond, BlockJacobiPreconditioner) and precond.fallback_blocks == 0
    b = torch.randn(flat.shape, generator=gen, dtype=F64)
    exact = DenseCholesky().solve(op, b).solution
    solver = PCG(rtol=1e-10, max_iter=2000, on_failure="raise")
    block = solver.solve(op, b, preconditioner="block_jacobi")
    jacobi = solver.solve(op, b, preconditioner="jacobi")
    torch.testing.assert_close(block.solution, exact, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(jacobi.solution, exact, rtol=1e-7, atol=1e-8)
    assert (block.iterations <= jacobi.iterations).all()
