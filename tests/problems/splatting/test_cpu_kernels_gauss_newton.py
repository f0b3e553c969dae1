"""Gauss-Newton products of the 3DGS problem from the compiled CPU kernels: J·v and Jᵀ·w
against torch autograd at the frozen state, the adjoint identity, the exact diag(JᵀJ)
against a dense Jacobian, and the kernel Gauss-Newton operator inside a PCG solve.
Skipped with the reason when no compiler is available."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difftto.objective import InnerObjective
from difftto.problems.splatting import GaussianSplattingProblem, rasterize
from difftto.problems.splatting.kernel_linearization import KernelLinearization
from difftto.problems.splatting.synthetic import random_scene
from difftto.regularizers import Proximal
from difftto.solvers.pcg import PCG
from difftto.tree import Layout

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("compiled_kernels")


def _setup(B=1, N=20, C=2, W=12, H=10, seed=0, dtype=F64, pose=False, extras=False, sh=None):
    theta, V, K = random_scene(B, N, C, W, H, seed=seed, dtype=dtype, sh_degree=sh)
    gen = torch.Generator().manual_seed(seed)
    images = rasterize(theta, V, K, W, H, backend="torch").colors + 0.05
    data = dict(viewmats=V, Ks=K, images=images)
    if extras:
        data["background"] = torch.rand(B, C, 3, generator=gen, dtype=dtype)
        data["weights"] = torch.rand(B, C, H, W, 1, generator=gen, dtype=dtype)
    if pose:
        theta = dict(theta, pose_deltas=1e-3 * torch.randn(B, C, 6, generator=gen, dtype=dtype))
    return theta, data


def _products(theta, data):
    """(kernel linearization, torch residual fn, frozen data)."""
    reference = GaussianSplattingProblem(backend="torch")
    frozen = reference.freeze(theta, data)
    lin = GaussianSplattingProblem(backend="cpu_kernels").linearize(theta, frozen)
    assert isinstance(lin, KernelLinearization)
    return lin, (lambda t: reference.residuals(t, frozen)), frozen


def _dot(a, b):
    return sum((a[k] * b[k]).sum() for k in a)


@settings(max_examples=8, deadline=None)
@given(B=st.integers(1, 2), N=st.integers(1, 40), C=st.integers(1, 3), W=st.integers(3, 17), H=st.integers(3, 13),
       seed=st.integers(0, 10_000), pose=st.booleans(), extras=st.booleans(),
       dtype=st.sampled_from([torch.float32, F64]))
def test_jvp_and_vjp_equal_autograd_at_the_frozen_state(B, N, C, W, H, seed, pose, extras, dtype):
    theta, data = _setup(B, N, C, W, H, seed=seed, dtype=dtype, pose=pose, extras=extras)
    lin, residual, _ = _products(theta, data)
    gen = torch.Generator().manual_seed(seed + 1)
    v = {k: torch.randn(x.shape, generator=gen, dtype=dtype) for k, x in theta.items()}
    r, jv_ref = torch.func.jvp(residual, (theta,), (v,))
    tol = 1e-10 if dtype == F64 else 2e-4
    jv = lin.jvp(v)
    assert jv.shape == r.shape
    assert (jv - jv_ref).abs().max() <= tol * (1 + jv_ref.abs().max())
    w = torch.randn(r.shape, generator=gen, dtype=dtype)
    (jtw_ref,) = torch.func.vjp(residual, theta)[1](w)
    jtw = lin.vjp(w)
    assert set(jtw) == set(theta)
    for k in theta:
        assert (jtw[k] - jtw_ref[k]).abs().max() <= tol * (1 + jtw_ref[k].abs().max()), k


@pytest.mark.parametrize("sh", [None, 1])
def test_adjoint_identity(sh):
    theta, data = _setup(B=2, N=30, C=2, seed=4, pose=True, extras=True, sh=sh)
    lin, residual, _ = _products(theta, data)
    gen = torch.Generator().manual_seed(5)
    v = {k: torch.randn(x.shape, generator=gen, dtype=F64) for k, x in theta.items()}
    jv = lin.jvp(v)
    u = torch.randn(jv.shape, generator=gen, dtype=F64)
    torch.testing.assert_close((u * jv).sum(), _dot(lin.vjp(u), v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("pose", "extras", "sh"), [(False, False, None), (True, True, None), (False, True, 1)])
def test_diagonal_equals_dense_jacobian(pose, extras, sh):
    theta, data = _setup(B=2, N=6, C=2, W=7, H=6, seed=7, pose=pose, extras=extras, sh=sh)
    lin, residual, _ = _products(theta, data)
    layout = Layout.of(theta)
    flat = layout.flatten(theta)
    dense = torch.func.jacfwd(lambda x: residual(layout.unflatten(x)))(flat)  # [B, m, B, n]
    exact = torch.stack([dense[b, :, b, :].pow(2).sum(0) for b in range(flat.shape[0])])
    diag = layout.flatten(lin.gauss_newton_diagonal())
    assert exact.abs().max() > 0
    torch.testing.assert_close(diag, exact, rtol=1e-10, atol=1e-12)


def test_kernel_operator_equals_autograd_operator_inside_pcg():
    theta, data = _setup(B=2, N=12, C=2, W=8, H=6, seed=11, extras=True)
    layout = Layout.of(theta)
    flat = layout.flatten(theta)
    gen = torch.Generator().manual_seed(12)
    lam = 0.1 + torch.rand(flat.shape, generator=gen, dtype=F64)
    proximal = Proximal(flat.clone(), lam)
    ops = {backend: InnerObjective(GaussianSplattingProblem(backend=backend), layout, data,
                                   proximal).gauss_newton_operator(flat)
           for backend in ("torch", "cpu_kernels")}
    v = torch.randn(flat.shape, generator=gen, dtype=F64)
    torch.testing.assert_close(ops["cpu_kernels"].mv(v), ops["torch"].mv(v), rtol=1e-10, atol=1e-10)
    # The autograd Gauss-Newton matrix, dense: JᵀJ + diag Λ from torch.func.jacfwd.
    _, residual, _ = _products(theta, data)
    dense = torch.func.jacfwd(lambda x: residual(layout.unflatten(x)))(flat)
    matrices = torch.stack([dense[i, :, i, :].T @ dense[i, :, i, :] for i in range(flat.shape[0])])
    matrices = matrices + torch.diag_embed(lam)
    b = torch.randn(flat.shape, generator=gen, dtype=F64)
    exact = torch.linalg.solve(matrices, b)
    solver = PCG(rtol=1e-10, max_iter=2000, on_failure="raise")
    plain = solver.solve(ops["cpu_kernels"], b, preconditioner="identity")
    jacobi = solver.solve(ops["cpu_kernels"], b)  # from the exact kernel diagonal
    for result in (plain, jacobi):
        torch.testing.assert_close(result.solution, exact, rtol=1e-7, atol=1e-8)
    assert (jacobi.iterations <= plain.iterations).all()


def test_linearize_returns_none_for_the_torch_backend_and_freezes_when_needed():
    theta, data = _setup()
    assert GaussianSplattingProblem(backend="torch").linearize(theta, data) is None
    lin = GaussianSplattingProblem(backend="auto").linearize(theta, data)  # not frozen yet
    assert isinstance(lin, KernelLinearization)
    with pytest.raises(ValueError, match="frozen data"):
        KernelLinearization(GaussianSplattingProblem(backend="cpu_kernels"), theta, data)
