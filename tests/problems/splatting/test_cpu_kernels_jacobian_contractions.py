"""The compiled contractions with the per-(image, Gaussian) projection Jacobian
(``project_tangent``, ``project_cotangent``, ``gram_diagonal``, ``gram_blocks``) against
``torch.einsum``,
at the 3DGS sizes the kernels specialize (F = 10, p = 14) and at others (run-time sizes).
Skipped with the reason when no compiler is available."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difftto.problems.splatting import cpu_kernels

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("compiled_kernels")


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), C=st.integers(1, 4), N=st.integers(1, 300),
       sizes=st.sampled_from([(10, 14), (10, 23), (7, 11), (10, 13), (9, 14), (16, 40)]),
       dtype=st.sampled_from([torch.float32, F64]), seed=st.integers(0, 10_000))
def test_contractions_equal_einsum(B, C, N, sizes, dtype, seed):
    F, p = sizes
    ext = cpu_kernels.load_extension()
    gen = torch.Generator().manual_seed(seed)
    jac = torch.randn(B, C, N, F, p, generator=gen, dtype=dtype)
    v = torch.randn(B, N, p, generator=gen, dtype=dtype)
    g = torch.randn(B, C, N, F, generator=gen, dtype=dtype)
    a = torch.randn(B, C, N, F, F, generator=gen, dtype=dtype)
    gram = a @ a.transpose(-1, -2)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=2e-5, atol=2e-5)

    tangent = ext.project_tangent(jac.transpose(-1, -2).contiguous(), v)
    torch.testing.assert_close(tangent, torch.einsum("bcnfp,bnp->bcnf", jac, v), **tol)
    cotangent = ext.project_cotangent(jac, g)
    torch.testing.assert_close(cotangent, torch.einsum("bcnfp,bcnf->bnp", jac, g), **tol)
    diagonal = ext.gram_diagonal(jac, gram)
    scale = dict(tol, atol=tol["atol"] * float(gram.abs().max() * jac.abs().max() ** 2))
    torch.testing.assert_close(diagonal, torch.einsum("bcnfp,bcnfg,bcngp->bnp", jac, gram, jac), **scale)
    blocks = ext.gram_blocks(jac, gram)
    assert torch.equal(blocks, blocks.transpose(-1, -2))
    torch.testing.assert_close(blocks, torch.einsum("bcnfp,bcnfg,bcngq->bnpq", jac, gram, jac), **scale)


def test_contractions_check_their_shapes():
    ext = cpu_kernels.load_extension()
    jac = torch.zeros(1, 2, 5, 10, 14)
    with pytest.raises(RuntimeError, match="v must be"):
        ext.project_tangent(jac.transpose(-1, -2).contiguous(), torch.zeros(1, 5, 10))
    with pytest.raises(RuntimeError, match="g must be"):
        ext.project_cotangent(jac, torch.zeros(1, 2, 5, 14))
    with pytest.raises(RuntimeError, match="gram must be"):
        ext.gram_blocks(jac, torch.zeros(1, 2, 5, 14, 14))
