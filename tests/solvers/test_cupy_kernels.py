"""The CuPy backend of PCG: its CUDA source compiles, it equals the torch path on a
GPU, and it fails clearly (or steps aside, under ``auto``) where it cannot run."""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import difftto
from difftto.operators import FunctionOperator
from difftto.solvers import PCG, Status, cupy_kernels
from difftto.solvers.pcg import _TorchVectorOps, _vector_ops

CUDA_REASON = "CUDA not available"
HAS_CUDA = torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA,
    reason=f"{CUDA_REASON} (torch.cuda.is_available()={torch.cuda.is_available()}, "
    f"cupy installed={importlib.util.find_spec('cupy') is not None})",
)
NVCC = shutil.which("nvcc")
KERNELS = ("pcg_dot_partials", "pcg_precondition_partials", "pcg_finalize",
           "pcg_update_solution", "pcg_update_direction")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA source cannot be "
                    "compile-checked on this machine")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_source_compiles_with_nvcc(tmp_path, arch):
    """Syntax and types of every kernel, checked without a GPU (``nvcc --ptx``). The
    same options as the run-time NVRTC compile, with warnings as errors."""
    ptx = tmp_path / "pcg_kernels.ptx"
    done = subprocess.run(
        [NVCC, "--ptx", f"-arch={arch}", "-std=c++14", "--Werror", "all-warnings",
         "-o", str(ptx), str(cupy_kernels.KERNEL_SOURCE)],
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr
    text = ptx.read_text()
    for name in KERNELS:
        for suffix in ("f32", "f64"):
            assert f".entry {name}_{suffix}(" in text, f"{name}_{suffix} missing from the PTX"


def test_block_size_matches_the_source():
    source = cupy_kernels.KERNEL_SOURCE.read_text()
    assert f"#define DIFFTTO_BLOCK {cupy_kernels.BLOCK}\n" in source


@pytest.mark.parametrize("batch, n, sms", [(1, 0, 132), (1, 1, 132), (1, 10**6, 132),
                                            (4096, 64, 132), (3, 5000, 8)])
def test_launch_configuration(batch, n, sms):
    chunks = cupy_kernels.reduction_chunks(batch, n, sms)
    assert chunks >= 1
    # Chunks cover the row; none is so small that a thread has nothing to add up, beyond
    # the one-chunk minimum.
    assert chunks == 1 or n / chunks >= cupy_kernels.BLOCK
    assert batch * chunks <= max(batch, 8 * sms)  # no more blocks than fill the GPU
    assert 1 <= cupy_kernels.elementwise_blocks(batch * n) <= 65_535


def test_cupy_backend_on_cpu_names_what_is_missing():
    b = torch.ones(2, 3)
    op = FunctionOperator(lambda v: 2 * v, (2, 3), symmetric=True, positive_definite=True)
    with pytest.raises(cupy_kernels.CupyBackendUnavailable, match="backend='cupy' cannot run"):
        PCG(backend="cupy").solve(op, b)
    reason = cupy_kernels.unavailable_reason(b)
    assert reason is not None
    assert "CUDA" in reason
    assert cupy_kernels.vector_ops_or_none(b) is None


def test_auto_backend_on_cpu_is_torch():
    b = torch.ones(2, 3, dtype=torch.float64)
    assert _vector_ops("auto", b) is _TorchVectorOps
    assert _vector_ops("torch", b) is _TorchVectorOps
    op = FunctionOperator(lambda v: 2 * v, (2, 3), torch.float64, symmetric=True,
                          positive_definite=True)
    out = PCG(backend="auto", on_failure="raise").solve(op, b)
    torch.testing.assert_close(out.solution, b / 2)


def test_cupy_is_imported_only_by_cupy_kernels():
    """cupy is an optional extra: no other module of the package may import it."""
    root = Path(difftto.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "cupy_kernels.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name == "cupy" or name.startswith("cupy.") for name in names):
                offenders.append(str(path.relative_to(root)))
    assert not offenders, f"modules importing cupy: {offenders}"


# --- on a GPU -----------------------------------------------------------------------


def random_spd(batch, n, cond, seed, dtype, device):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))
    eig = cond ** torch.rand(batch, n, generator=g, dtype=torch.float64)
    a = q @ torch.diag_embed(eig) @ q.transpose(-1, -2)
    return (0.5 * (a + a.transpose(-1, -2))).to(dtype=dtype, device=device)


def dense_operator(a):
    return FunctionOperator(lambda v: (a @ v[..., None])[..., 0], tuple(a.shape[:2]), a.dtype,
                            a.device, diagonal=a.diagonal(dim1=-2, dim2=-1).contiguous(),
                            symmetric=True, positive_definite=True)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("preconditioner", ["jacobi", "identity"])
@pytest.mark.parametrize("batch, n, seed", [(1, 1, 0), (3, 17, 1), (4, 300, 2), (2, 2500, 3)])
def test_cupy_pcg_equals_torch_pcg(dtype, preconditioner, batch, n, seed):
    device = torch.device("cuda")
    a = random_spd(batch, n, 1e2, seed, dtype, device)
    b = torch.randn(batch, n, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64).to(dtype=dtype, device=device)
    b[0, 0] = 0.0
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    results = {
        backend: PCG(rtol=rtol, max_iter=20 * n + 50, backend=backend, on_failure="raise")
        .solve(dense_operator(a), b, preconditioner=preconditioner)
        for backend in ("torch", "cupy")
    }
    torch_out, cupy_out = results["torch"], results["cupy"]
    assert (cupy_out.status == Status.CONVERGED).all()
    assert (cupy_out.relative_residual <= rtol).all()
    # The same algorithm with reductions summed in another order: equal up to the
    # forward error each run is allowed (κ ≤ 100).
    scale = torch_out.solution.norm(dim=1, keepdim=True)
    assert ((cupy_out.solution - torch_out.solution).norm(dim=1, keepdim=True)
            <= 2 * 100 * (rtol + 1e-5 * (dtype == torch.float32)) * scale).all()
    assert (cupy_out.iterations - torch_out.iterations).abs().max() <= max(2, n // 10)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cupy_vector_ops_equal_torch_ops(dtype):
    """Each kernel against its torch twin, including inactive elements with NaN inputs."""
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    batch, n = 5, 70_001  # several chunks per element, a ragged last chunk
    ops = cupy_kernels.vector_ops(torch.empty(1, device=device, dtype=dtype))
    t = {name: torch.randn(batch, n, generator=g, device=device, dtype=dtype)
         for name in ("x", "r", "p", "q", "z", "d")}
    alpha = torch.randn(batch, generator=g, device=device, dtype=dtype)
    beta = torch.randn(batch, generator=g, device=device, dtype=dtype)
    active = torch.tensor([True, False, True, True, False], device=device)
    t["p"][1] = float("nan")  # an inactive element's direction may be anything
    tol = {"rtol": 1e-5, "atol": 1e-3} if dtype == torch.float32 else {"rtol": 1e-12,
                                                                        "atol": 1e-9}

    torch.testing.assert_close(ops.dot(t["r"], t["q"]), _TorchVectorOps.dot(t["r"], t["q"]),
                               **tol)
    for inverse_diagonal in (None, t["d"].abs()):
        z, rz, rr = ops.precondition(t["r"], inverse_diagonal)
        z_ref, rz_ref, rr_ref = _TorchVectorOps.precondition(t["r"], inverse_diagonal)
        torch.testing.assert_close(z, z_ref, **tol)
        torch.testing.assert_close(rz, rz_ref, **tol)
        torch.testing.assert_close(rr, rr_ref, **tol)

    x, r = t["x"].clone(), t["r"].clone()
    x_ref, r_ref = t["x"].clone(), t["r"].clone()
    ops.update_solution(x, r, t["p"], t["q"], alpha, active)
    _TorchVectorOps.update_solution(x_ref, r_ref, t["p"], t["q"], alpha, active)
    torch.testing.assert_close(x, x_ref, **tol)
    torch.testing.assert_close(r, r_ref, **tol)
    assert torch.equal(x[1], t["x"][1]) and torch.equal(r[4], t["r"][4])

    p, p_ref = t["p"].clone(), t["p"].clone()
    ops.update_direction(p, t["z"], beta)
    _TorchVectorOps.update_direction(p_ref, t["z"], beta)
    torch.testing.assert_close(p, p_ref, equal_nan=True, **tol)
    torch.cuda.synchronize()


@needs_cuda
def test_cupy_reductions_are_deterministic():
    device = torch.device("cuda")
    v = torch.randn(3, 1_000_003, device=device, dtype=torch.float32)
    ops = cupy_kernels.vector_ops(v)
    first = ops.dot(v, v)
    for _ in range(5):
        assert torch.equal(ops.dot(v, v), first)


@needs_cuda
def test_cupy_backend_rejects_unsupported_dtype():
    b = torch.ones(2, 3, device="cuda", dtype=torch.float16)
    with pytest.raises(cupy_kernels.CupyBackendUnavailable, match="float32 and float64"):
        cupy_kernels.vector_ops(b)
