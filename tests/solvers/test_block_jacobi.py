"""The block-Jacobi preconditioner: its apply is the inverse of the block-diagonal
matrix it stands for (a hypothesis property against a dense inverse), failed blocks
fall back to their diagonal, and operators pass their blocks through sums and scales."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difftto.operators import DiagonalOperator, GaussNewtonOperator
from difftto.solvers.pcg import PCG
from difftto.solvers.preconditioners import (
    BlockJacobiPreconditioner,
    IdentityPreconditioner,
    JacobiPreconditioner,
    make_preconditioner,
)

F64 = torch.float64


def _system(B, N, p, extra, seed, dtype=F64):
    """Random SPD blocks [B, N, p, p], a random disjoint index [N, p] into n = N·p + extra
    unknowns, a positive diagonal [B, n], and the dense M [B, n, n] they stand for."""
    gen = torch.Generator().manual_seed(seed)
    n = N * p + extra
    a = torch.randn(B, N, p, p, generator=gen, dtype=F64)
    blocks = a @ a.transpose(-1, -2) + 0.1 * torch.eye(p, dtype=F64)
    index = torch.randperm(n, generator=gen)[: N * p].reshape(N, p)
    diagonal = 0.5 + torch.rand(B, n, generator=gen, dtype=F64)
    dense = torch.diag_embed(diagonal)
    for b in range(B):
        for i in range(N):
            dense[b][index[i][:, None], index[i][None, :]] = blocks[b, i]
    return blocks.to(dtype), index, diagonal.to(dtype), dense, gen


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 3), N=st.integers(1, 6), p=st.integers(1, 5), extra=st.integers(0, 4),
       seed=st.integers(0, 10_000), dtype=st.sampled_from([torch.float32, F64]))
def test_apply_is_the_dense_inverse(B, N, p, extra, seed, dtype):
    blocks, index, diagonal, dense, gen = _system(B, N, p, extra, seed, dtype)
    precond = BlockJacobiPreconditioner(blocks, index, diagonal)
    assert precond.fallback_blocks == 0
    assert precond.covers_all == (extra == 0)  # the permutation path, or blocks + diagonal
    r = torch.randn(B, dense.shape[-1], generator=gen, dtype=F64)
    expected = torch.linalg.solve(dense, r)
    z = precond.apply(r.to(dtype))
    assert z.dtype == dtype and z.shape == r.shape
    tol = 1e-10 if dtype == F64 else 1e-4
    scale = 1 + float(expected.abs().max())
    assert float((z.to(F64) - expected).abs().max()) <= tol * scale


def test_singular_empty_and_nonfinite_blocks_fall_back_to_their_diagonal():
    blocks, index, diagonal, _, gen = _system(1, 4, 3, 2, seed=1)
    blocks[0, 0] = 0.0  # an empty Gaussian with Λ = 0
    blocks[0, 1] = torch.ones(3, 3, dtype=F64)  # rank one
    blocks[0, 2, 0, 0] = float("nan")
    diagonal[0, index[0]] = 0.0  # no useful scale: treated as 1, as Jacobi does
    precond = BlockJacobiPreconditioner(blocks, index, diagonal)
    assert precond.fallback_blocks == 3
    r = torch.randn(1, diagonal.shape[1], generator=gen, dtype=F64)
    z = precond.apply(r)
    assert torch.isfinite(z).all()
    jacobi = JacobiPreconditioner(diagonal).apply(r)
    for i in range(3):
        torch.testing.assert_close(z[:, index[i]], jacobi[:, index[i]])
    expected = torch.linalg.solve(blocks[0, 3], r[0, index[3]])
    torch.testing.assert_close(z[0, index[3]], expected)


def test_rejects_mismatched_shapes():
    blocks, index, diagonal, _, _ = _system(1, 2, 3, 0, seed=2)
    with pytest.raises(ValueError, match="blocks must have shape"):
        BlockJacobiPreconditioner(blocks[0], index, diagonal)
    with pytest.raises(ValueError, match="index must have shape"):
        BlockJacobiPreconditioner(blocks, index[:, :2], diagonal)
    with pytest.raises(ValueError, match="diagonal must have shape"):
        BlockJacobiPreconditioner(blocks, index, diagonal[0])


def _gauss_newton(dense_jtj, blocks_fn):
    return GaussNewtonOperator(lambda v: torch.einsum("bij,bj->bi", dense_jtj, v), lambda w: w,
                               tuple(dense_jtj.shape[:2]), F64,
                               diagonal=torch.diagonal(dense_jtj, dim1=-2, dim2=-1).clone(), blocks=blocks_fn)


def test_blocks_pass_through_sum_and_scale_and_pcg_solves_with_them():
    B, N, p = 2, 5, 3
    blocks, index, _, _, gen = _system(B, N, p, 0, seed=3)
    jtj = torch.zeros(B, N * p, N * p, dtype=F64)
    for b in range(B):
        for i in range(N):
            jtj[b][index[i][:, None], index[i][None, :]] = blocks[b, i]
    coupling = 0.1 * torch.randn(B, N * p, N * p, generator=gen, dtype=F64)
    jtj = jtj + coupling @ coupling.transpose(-1, -2)  # off-block couplings, as in JᵀJ
    exact_blocks = torch.stack([torch.stack([jtj[b][index[i][:, None], index[i][None, :]] for i in range(N)])
                                for b in range(B)])
    lam = 0.1 + torch.rand(B, N * p, generator=gen, dtype=F64)
    op = 2.0 * (_gauss_newton(jtj, lambda: (exact_blocks, index)) + DiagonalOperator(lam, positive_definite=True))
    found_blocks, found_index = op.block_diagonal()
    expected = 2.0 * (exact_blocks + torch.diag_embed(lam[:, index.reshape(-1)].reshape(B, N, p)))
    torch.testing.assert_close(found_blocks, expected)
    assert torch.equal(found_index, index)
    precond = make_preconditioner("block_jacobi", op)
    assert isinstance(precond, BlockJacobiPreconditioner)
    b = torch.randn(B, N * p, generator=gen, dtype=F64)
    result = PCG(rtol=1e-12, max_iter=500, on_failure="raise").solve(op, b, preconditioner="block_jacobi")
    dense = 2.0 * (jtj + torch.diag_embed(lam))
    torch.testing.assert_close(result.solution, torch.linalg.solve(dense, b), rtol=1e-9, atol=1e-10)


def test_falls_back_to_jacobi_or_identity_without_blocks():
    jtj = torch.eye(4, dtype=F64).expand(1, 4, 4)
    op = _gauss_newton(jtj, None)
    assert op.block_diagonal() is None
    assert isinstance(make_preconditioner("block_jacobi", op), JacobiPreconditioner)
    no_diag = GaussNewtonOperator(lambda v: v, lambda w: w, (1, 4), F64)
    assert isinstance(make_preconditioner("block_jacobi", no_diag), IdentityPreconditioner)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_block_whose_rounded_inverse_is_not_positive_definite_falls_back_in_float32(dtype):
    # Block 0 holds float32 numbers and is positive definite (eigenvalues 1.03e-8, 1, 1): its
    # float64 inverse is, but rounded to float32 that inverse is not (found by a search).
    blocks, index, diagonal, _, gen = _system(1, 3, 3, 0, seed=4)
    blocks[0, 0] = torch.tensor([[0.23609061539173126, -0.16905198991298676, -0.3895808756351471],
                                 [-0.16905198991298676, 0.9625890254974365, -0.08621365576982498],
                                 [-0.3895808756351471, -0.08621365576982498, 0.8013203740119934]], dtype=F64)
    diagonal[0, index[0]] = 1.0
    precond = BlockJacobiPreconditioner(blocks.to(dtype), index, diagonal.to(dtype))
    assert precond.dtype == dtype and precond.covers_all
    assert precond.fallback_blocks == (1 if dtype == torch.float32 else 0)
    r = torch.randn(1, diagonal.shape[1], generator=gen, dtype=F64).to(dtype)
    z = precond.apply(r).to(F64)
    r = r.to(F64)
    blocks = blocks.to(dtype).to(F64)
    rest = index[1:].reshape(-1)
    expected_rest = torch.block_diag(*[torch.linalg.inv(blocks[0, i]) for i in (1, 2)]) @ r[0, rest]
    torch.testing.assert_close(z[0, rest], expected_rest, rtol=1e-5, atol=1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(z[0, index[0]], r[0, index[0]])  # its diagonal: 1
    else:
        torch.testing.assert_close(z[0, index[0]], torch.linalg.solve(blocks[0, 0], r[0, index[0]]))


def test_block_whose_inverse_overflows_float32_falls_back():
    # Block 0 (float64 blocks, a float32 system) is SPD with a smallest eigenvalue of 1e-40:
    # its inverse holds 1e40, beyond float32's range.
    blocks, index, diagonal, _, gen = _system(1, 2, 2, 0, seed=5)
    blocks[0, 0] = torch.diag(torch.tensor([1e-40, 1.0], dtype=F64))
    precond = BlockJacobiPreconditioner(blocks, index, diagonal.to(torch.float32))
    assert precond.dtype == torch.float32 and precond.fallback_blocks == 1
    r = torch.randn(1, diagonal.shape[1], generator=gen).to(torch.float32)
    z = precond.apply(r)
    assert torch.isfinite(z).all()
    jacobi = JacobiPreconditioner(diagonal.to(torch.float32)).apply(r)
    torch.testing.assert_close(z[:, index[0]], jacobi[:, index[0]])


def test_set_up_in_chunks_of_items_gives_the_same_preconditioner(monkeypatch):
    import difftto.solvers.preconditioners as preconditioners

    blocks, index, diagonal, dense, gen = _system(2, 7, 3, 2, seed=6)
    blocks[1, 3] = 0.0  # a failed block in a middle chunk falls back there
    whole = BlockJacobiPreconditioner(blocks, index, diagonal)
    monkeypatch.setattr(preconditioners, "_SETUP_CHUNK", 2)
    chunked = BlockJacobiPreconditioner(blocks, index, diagonal)
    assert whole.fallback_blocks == chunked.fallback_blocks == 1
    torch.testing.assert_close(whole.inverse_blocks, chunked.inverse_blocks, rtol=1e-12, atol=0)
    r = torch.randn(2, dense.shape[-1], generator=gen, dtype=F64)
    expected = torch.linalg.solve(dense[:1], r[:1])  # element 0 has no failed block
    torch.testing.assert_close(chunked.apply(r)[:1], expected)


def test_auto_is_pcgs_default_and_picks_blocks_then_the_diagonal_then_the_identity():
    assert PCG().preconditioner == "auto"
    B, N, p = 1, 6, 3
    blocks, index, _, _, gen = _system(B, N, p, 0, seed=7)
    jtj = torch.zeros(B, N * p, N * p, dtype=F64)
    for i in range(N):
        jtj[0][index[i][:, None], index[i][None, :]] = blocks[0, i]
    coupling = 0.1 * torch.randn(B, N * p, N * p, generator=gen, dtype=F64)
    jtj = jtj + coupling @ coupling.transpose(-1, -2)
    exact_blocks = torch.stack([jtj[0][index[i][:, None], index[i][None, :]] for i in range(N)])[None]
    with_blocks = _gauss_newton(jtj, lambda: (exact_blocks, index))
    without_blocks = _gauss_newton(jtj, None)
    no_diagonal = GaussNewtonOperator(lambda v: torch.einsum("bij,bj->bi", jtj, v), lambda w: w,
                                      (B, N * p), F64)
    assert isinstance(make_preconditioner("auto", with_blocks), BlockJacobiPreconditioner)
    assert isinstance(make_preconditioner("auto", without_blocks), JacobiPreconditioner)
    assert isinstance(make_preconditioner("auto", no_diagonal), IdentityPreconditioner)
    # The default solve preconditions as its pick does, iteration for iteration.
    b = torch.randn(B, N * p, generator=gen, dtype=F64)
    solver = PCG(rtol=1e-10, max_iter=500, on_failure="raise")
    expected = torch.linalg.solve(jtj, b)
    for op, same_as in ((with_blocks, "block_jacobi"), (without_blocks, "jacobi"),
                        (no_diagonal, "identity")):
        default, named = solver.solve(op, b), solver.solve(op, b, preconditioner=same_as)
        assert torch.equal(default.iterations, named.iterations)
        torch.testing.assert_close(default.solution, named.solution, rtol=0, atol=0)
        torch.testing.assert_close(default.solution, expected, rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="'auto'"):
        make_preconditioner("blocks", with_blocks)
