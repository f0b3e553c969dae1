"""Finite but huge colours (the dtype's largest value) render finite and give finite
gradients to every group in both backends; the bound on the compositing weights'
cotangent that makes this so leaves the gradients of ordinary scenes bit-identical."""

import importlib

import pytest
import torch

from difftto.problems.splatting import cpu_kernels, rasterize
from difftto.problems.splatting.synthetic import random_scene

rasterize_module = importlib.import_module("difftto.problems.splatting.rasterize")


def _backends():
    ok, why = cpu_kernels.cpu_kernels_available()
    return ["torch", pytest.param("cpu_kernels", marks=pytest.mark.skipif(not ok, reason=why))]


def _grads(backend, theta, V, K, W, H):
    params = {k: v.clone().requires_grad_() for k, v in theta.items()}
    out = rasterize(params, V, K, W, H, backend=backend)
    loss = out.colors.sum() + out.alphas.sum() + out.depths.sum()
    return out, dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", ["one", "all"])
def test_largest_finite_colour_gives_finite_gradients(backend, dtype, channels):
    theta, V, K = random_scene(1, 20, 2, 10, 10, seed=8, dtype=dtype)
    theta = {k: v.clone() for k, v in theta.items()}
    huge = torch.finfo(dtype).max
    if channels == "one":
        theta["colors"][0, ::2, 0] = huge
    else:  # Σ over channels of g·colour overflows before any bound could see one term
        theta["colors"][0, ::3] = huge
    out, grads = _grads(backend, theta, V, K, 10, 10)
    assert all(bool(torch.isfinite(t).all()) for t in out[:3])
    for name, g in grads.items():
        assert bool(torch.isfinite(g).all()), f"non-finite gradient for {name}"
    assert grads["means"].abs().max() > 0  # the geometry still gets a gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_colour_gradients_agree_between_backends(dtype):
    if not cpu_kernels.cpu_kernels_available()[0]:
        pytest.skip("compiled CPU kernels unavailable")
    theta, V, K = random_scene(1, 20, 1, 10, 10, seed=3, dtype=dtype)
    theta = {k: v.clone() for k, v in theta.items()}
    theta["colors"][0, :5, 1] = torch.finfo(dtype).max
    _, ref = _grads("torch", theta, V, K, 10, 10)
    _, out = _grads("cpu_kernels", theta, V, K, 10, 10)
    for name in ref:
        scale = ref[name].abs().max().clamp_min(1e-30)
        assert (ref[name] - out[name]).abs().max() <= 1e-4 * scale, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bound_leaves_ordinary_gradients_bit_identical(dtype, monkeypatch):
    theta, V, K = random_scene(2, 30, 2, 13, 11, seed=5, dtype=dtype)
    theta = {k: v.clone() for k, v in theta.items()}
    theta["colors"] = theta["colors"] * 1e3  # far outside [0, 1], far below the bound
    _, bounded = _grads("torch", theta, V, K, 13, 11)
    monkeypatch.setattr(rasterize_module, "COTANGENT_BOUND_FRACTION", 1.0)  # bound = finfo.max
    _, unbounded = _grads("torch", theta, V, K, 13, 11)
    for name in bounded:
        assert torch.equal(bounded[name], unbounded[name]), name
