"""Fuzzing ImplicitLayer with bad and extreme inputs.

Every generated case must end in one of two ways:

- a finite ``theta_star`` and finite gradients to ``theta0`` (possibly with a warning:
  ``LinearSolveWarning`` for a failed backward solve, which the ``warn`` policy
  answers with the best iterate), or
- an error (``ValueError``/``TypeError``/``LinearSolveError``/``InnerDivergenceError``)
  or, for a diverged inner optimizer, an ``InnerDivergenceWarning``, whose message names
  the offending argument.

Never a crash of another kind, never a hang, never a NaN handed back without a word.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import difftto
from difftto.solvers.result import LinearSolveError, LinearSolveWarning

PROBLEMS = ("linear_least_squares", "exponential_fit")
BAD = (float("nan"), float("inf"), float("-inf"))
ERRORS = (ValueError, TypeError, LinearSolveError, difftto.InnerDivergenceError)


def _data(name, batch, m, n, gen, dtype):
    if name == "linear_least_squares":
        return {"A": torch.randn(batch, m, n, generator=gen, dtype=dtype),
                "y": torch.randn(batch, m, generator=gen, dtype=dtype)}
    t = torch.linspace(0, 2, m, dtype=dtype).expand(batch, m).clone()
    return {"t": t, "y": torch.exp(-t) + 0.1 * torch.randn(batch, m, generator=gen, dtype=dtype)}


def _inner(kind, lr, steps):
    if kind == "gd":
        return difftto.GradientDescent(lr=lr, steps=steps)
    if kind == "adam":
        return difftto.Adam(lr=lr, steps=steps)
    return difftto.GaussNewton(steps=min(steps, 5), damping=0.0 if lr > 1 else 1e-3)


def _names(message: str, *words: str) -> bool:
    return any(w in message for w in words)


def _call(layer, theta0, lam, data):
    """Runs forward + backward; returns (out, grad, warnings) or raises."""
    theta0 = theta0.clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, info = layer(theta0, lam, data)
        out.sum().backward()
    return out, theta0.grad, [w for w in caught if issubclass(w.category, RuntimeWarning)]


def _check_outcome(fn, argument_words):
    """``fn()`` must give finite results or a named error / divergence warning."""
    try:
        out, grad, caught = fn()
    except ERRORS as exc:
        assert _names(str(exc), *argument_words), f"error does not name {argument_words}: {exc}"
        return "error"
    diverged = [w for w in caught if issubclass(w.category, difftto.InnerDivergenceWarning)]
    if not bool(torch.isfinite(out).all()):
        assert diverged, "non-finite theta_star without an InnerDivergenceWarning"
        msg = str(diverged[0].message)
        assert "theta_star" in msg and ("lr" in msg or "lam" in msg), msg
        return "diverged"
    if grad is not None and not bool(torch.isfinite(grad).all()):
        assert any(issubclass(w.category, LinearSolveWarning) for w in caught), (
            "non-finite gradient without a LinearSolveWarning"
        )
        return "bad-grad-warned"
    return "finite"


lam_values = st.one_of(
    st.sampled_from([0.0, 1e-12, 1.0, 1e6, 1e30, 1e300, -1.0, -1e-9, *BAD]),
    st.floats(min_value=0, max_value=1e8),
)


@settings(max_examples=40)
@given(
    name=st.sampled_from(PROBLEMS),
    batch=st.integers(1, 3),
    m=st.integers(1, 6),
    lam=lam_values,
    lam_none=st.booleans(),
    kind=st.sampled_from(["gd", "adam", "gn"]),
    lr=st.sampled_from([1e-3, 1e-1, 1e3, 1e8]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_layer_weights_and_divergence(name, batch, m, lam, lam_none, kind, lr, dtype, seed):
    """Λ = 0 / tiny / huge / negative / NaN, Λ = None (non-SPD backward when m < n),
    diverging inner optimizers (huge lr, Gauss-Newton without damping)."""
    gen = torch.Generator().manual_seed(seed)
    n = 3 if name == "exponential_fit" else 4
    data = _data(name, batch, m, n, gen, dtype)
    theta0 = torch.randn(batch, n, generator=gen, dtype=dtype)
    layer = difftto.ImplicitLayer(name, inner=_inner(kind, lr, 8), solver=difftto.solvers.PCG(max_iter=50))
    lam_arg = None if lam_none else lam
    if lam_arg is not None and dtype == torch.float32 and math.isfinite(lam_arg) and abs(lam_arg) > 3e38:
        lam_arg = float("inf")  # as a float32 tensor it is inf anyway
    outcome = _check_outcome(lambda: _call(layer, theta0, lam_arg, data), ("lam",))
    if lam_arg is not None and (not math.isfinite(lam_arg) or lam_arg < 0):
        assert outcome == "error"


@settings(max_examples=40)
@given(
    name=st.sampled_from(PROBLEMS),
    where=st.sampled_from(["theta0", "y", "A_or_t"]),
    bad=st.sampled_from(BAD),
    requires_grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_layer_non_finite_inputs_are_rejected_by_name(name, where, bad, requires_grad, seed):
    """NaN/Inf in θ0 or in any data tensor (with or without requires_grad) is an error
    naming it, never a NaN output."""
    gen = torch.Generator().manual_seed(seed)
    n = 3 if name == "exponential_fit" else 4
    data = _data(name, 2, 5, n, gen, torch.float64)
    theta0 = torch.randn(2, n, generator=gen, dtype=torch.float64)
    key = where if where in ("theta0", "y") else ("A" if name == "linear_least_squares" else "t")
    if key == "theta0":
        theta0[1, 0] = bad
    else:
        data[key] = data[key].clone()
        data[key].view(-1)[int(torch.randint(data[key].numel(), (1,), generator=gen))] = bad
        data[key].requires_grad_(requires_grad)
    layer = difftto.ImplicitLayer(name, inner=difftto.GradientDescent(lr=1e-2, steps=5))
    with pytest.raises(ValueError) as err:
        _call(layer, theta0, 1.0, data)
    assert (key if key == "theta0" else f"data[{key!r}]") in str(err.value)


@settings(max_examples=40)
@given(
    name=st.sampled_from(PROBLEMS),
    fault=st.sampled_from(["theta_rank", "theta_width", "theta_batch", "data_batch", "y_len", "missing_key",
                           "dict_theta_lam_keys", "lam_shape", "data_not_dict", "theta_int", "theta_0d"]),
    seed=st.integers(0, 2**16),
)
def test_layer_mismatched_shapes_and_keys_name_the_argument(name, fault, seed):
    gen = torch.Generator().manual_seed(seed)
    n = 3 if name == "exponential_fit" else 4
    data = _data(name, 2, 5, n, gen, torch.float64)
    theta0 = torch.randn(2, n, generator=gen, dtype=torch.float64)
    lam = 1.0
    words: tuple[str, ...]
    if fault == "theta_rank":
        theta0, words = theta0[..., None], ("theta",)
    elif fault == "theta_width":
        theta0, words = torch.randn(2, n + 2, dtype=torch.float64), ("theta",)
    elif fault == "theta_batch":
        theta0, words = torch.randn(3, n, dtype=torch.float64), ("theta", "B")
    elif fault == "data_batch":
        data = _data(name, 3, 5, n, gen, torch.float64)
        words = ("data", "theta", "B")
    elif fault == "y_len":
        data["y"], words = data["y"][:, :2], ("data['y']",)
    elif fault == "missing_key":
        data.pop("y")
        words = ("keys", "'y'")
    elif fault == "dict_theta_lam_keys":
        # a dict-structured θ0 with Λ keyed by other names: rejected before the problem runs
        theta0, lam, words = {"p": theta0}, {"q": 1.0}, ("lam",)
    elif fault == "lam_shape":
        lam, words = torch.ones(5, 7, dtype=torch.float64), ("lam",)
    elif fault == "data_not_dict":
        data, words = [data["y"]], ("data",)
    elif fault == "theta_int":
        theta0, words = torch.ones(2, n, dtype=torch.int64), ("theta0",)
    else:
        theta0, words = torch.tensor(1.0, dtype=torch.float64), ("theta0",)
    layer = difftto.ImplicitLayer(name, inner=difftto.GradientDescent(lr=1e-2, steps=3))

    def call():
        th = theta0
        if isinstance(th, torch.Tensor) and th.is_floating_point():
            th = th.clone().requires_grad_()
        out, _ = layer(th, lam, data)
        return out

    with pytest.raises((ValueError, TypeError)) as err:
        call()
    assert _names(str(err.value), *words), f"{fault}: {err.value}"


@settings(max_examples=20)
@given(seed=st.integers(0, 2**16), dead=st.integers(0, 3), steps=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_unrolled_adam_with_a_zero_gradient_entry_stays_finite(seed, dead, steps, dtype):
    """A parameter the data does not see has gradient exactly 0 at the start; unrolled
    Adam then differentiated sqrt(v) at v = 0 (sqrt'(0) = inf) and returned NaN gradients
    (found by the Diff3R ``unrolled`` mode, whose first step wrote NaN into the weights)."""
    gen = torch.Generator().manual_seed(seed)
    data = _data("linear_least_squares", 2, 5, 4, gen, dtype)
    data["A"][:, :, dead] = 0.0
    theta0 = torch.randn(2, 4, generator=gen, dtype=dtype).requires_grad_()
    layer = difftto.ImplicitLayer("linear_least_squares", inner=difftto.Adam(lr=1e-2, steps=steps),
                                  backward="unrolled")
    out, _ = layer(theta0, 1.0, data)
    out.sum().backward()
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(theta0.grad).all()), theta0.grad
