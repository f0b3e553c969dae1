"""``difftto.finite.all_finite`` against ``torch.isfinite(...).all(...)``, including the
cases its sum-first path must not get wrong: Inf and NaN terms, ``Inf − Inf`` in a sum,
and finite terms whose sum overflows."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difftto.finite import all_finite

_SPECIAL = [float("inf"), float("-inf"), float("nan")]


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 4), cols=st.integers(1, 40),
       dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]),
       seed=st.integers(0, 2**31 - 1), special=st.integers(0, 3), huge=st.booleans(),
       dim=st.sampled_from([None, 0, 1, -1]))
def test_all_finite_equals_the_elementwise_test(rows, cols, dtype, seed, special, huge, dim):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    if huge:  # finite terms near the dtype's largest: their sum overflows
        t = t.sign() * torch.finfo(dtype).max * (0.5 + 0.5 * torch.rand(rows, cols, generator=g, dtype=torch.float64))
    t = t.to(dtype)
    for _ in range(special):
        i, j = (int(torch.randint(0, s, (1,), generator=g)) for s in (rows, cols))
        t[i, j] = _SPECIAL[int(torch.randint(0, 3, (1,), generator=g))]
    want = torch.isfinite(t).all() if dim is None else torch.isfinite(t).all(dim=dim)
    got = all_finite(t, dim)
    assert got.dtype == torch.bool and torch.equal(got, want), (t, got, want)


def test_all_finite_on_integers_and_empty_tensors():
    assert bool(all_finite(torch.arange(5)))
    assert bool(all_finite(torch.empty(0)))
    assert torch.equal(all_finite(torch.empty(2, 0), dim=1), torch.tensor([True, True]))
