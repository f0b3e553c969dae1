"""The compiled CPU rasterizer against its pure-PyTorch twin: forward image, alpha and
depth (fresh and frozen), gradients of every parameter group and of the cameras,
forward mode, degenerate Gaussians, gradcheck, and the fallback when the kernels cannot
be built. Skipped with the reason when no compiler is available."""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difftto.problems.splatting import cpu_kernels, rasterize
from difftto.problems.splatting.synthetic import degenerate_scene, random_scene

rasterize_module = importlib.import_module("difftto.problems.splatting.rasterize")
F64 = torch.float64
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}


pytestmark = pytest.mark.usefixtures("compiled_kernels")


def _both(theta, V, K, W, H, **kw):
    ref = rasterize(theta, V, K, W, H, backend="torch", **kw)
    out = rasterize(theta, V, K, W, H, backend="cpu_kernels", **kw)
    return ref, out


def _assert_render_close(ref, out, dtype):
    for name, a, b in zip(("colors", "alphas", "depths"), ref[:3], out[:3]):
        tol = dict(TOL[dtype])
        if name == "depths":  # a ratio by the alpha sum: looser where alpha is tiny
            tol = {k: 10 * v for k, v in tol.items()}
        torch.testing.assert_close(b, a, **tol, msg=lambda m, n=name: f"{n}: {m}")


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 2), N=st.integers(0, 60), C=st.integers(1, 2), W=st.integers(1, 23),
       H=st.integers(1, 19), tile=st.sampled_from([1, 3, 4, 8]), seed=st.integers(0, 10_000),
       with_bg=st.booleans(), dtype=st.sampled_from([torch.float32, F64]),
       scale=st.floats(0.5, 5.0))
def test_forward_equals_torch_rasterizer(B, N, C, W, H, tile, seed, with_bg, dtype, scale):
    theta, V, K = random_scene(B, N, C, W, H, seed=seed, dtype=dtype, scale_px=scale)
    bg = torch.rand(B, C, 3, dtype=dtype) if with_bg else None
    ref, out = _both(theta, V, K, W, H, background=bg, tile_size=tile, return_state=True)
    _assert_render_close(ref, out, dtype)
    assert out.state.signature == ref.state.signature
    if dtype == F64:  # same pairs (float32 may flip a pixel's flag at the threshold)
        assert out.state.num_pairs == ref.state.num_pairs
    # Frozen: each backend with the other's state reproduces the reference render.
    frozen = rasterize(theta, V, K, W, H, background=bg, tile_size=tile, backend="cpu_kernels",
                       state=ref.state)
    _assert_render_close(ref, frozen, dtype)
    twin = rasterize(theta, V, K, W, H, background=bg, tile_size=tile, backend="torch", state=out.state)
    _assert_render_close(ref, twin, dtype)


def _grads(backend, theta, V, K, W, H, bg, gen, state=None):
    params = {k: v.clone().requires_grad_() for k, v in theta.items()}
    cams = V.clone().requires_grad_()
    out = rasterize(params, cams, K, W, H, background=bg, backend=backend, state=state)
    weights = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in out[:3]]
    loss = sum((w * t).sum() for w, t in zip(weights, out[:3]))
    return torch.autograd.grad(loss, [*params.values(), cams])


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("B", "N", "C", "W", "H", "sh"), [(1, 30, 2, 13, 11, None), (2, 50, 3, 16, 16, None),
                                                          (1, 40, 2, 17, 9, 2), (1, 1, 1, 4, 4, None)])
def test_backward_equals_torch_autograd(dtype, B, N, C, W, H, sh):
    theta, V, K = random_scene(B, N, C, W, H, seed=N, dtype=dtype, sh_degree=sh)
    bg = torch.rand(B, C, 3, dtype=dtype)
    state = rasterize(theta, V, K, W, H, backend="torch", return_state=True).state
    for frozen in (None, state):
        ref = _grads("torch", theta, V, K, W, H, bg, torch.Generator().manual_seed(1), frozen)
        out = _grads("cpu_kernels", theta, V, K, W, H, bg, torch.Generator().manual_seed(1), frozen)
        for name, a, b in zip([*theta, "viewmats"], ref, out):
            scale = a.abs().max().clamp_min(1e-30)
            tol = TOL[dtype]["rtol"] * 10
            assert (a - b).abs().max() <= tol * scale, (name, (a - b).abs().max(), scale)


@pytest.mark.parametrize("case", ["zero_scales", "huge_scales", "zero_quats", "behind_camera", "far_offscreen",
                                  "opaque"])
def test_degenerate_gaussians_match_torch(case):
    theta, V, K = degenerate_scene(1, 20, 1, 10, 10, case, seed=8, count=5)
    gen = torch.Generator().manual_seed(0)
    ref = _grads("torch", theta, V, K, 10, 10, None, gen)
    out = _grads("cpu_kernels", theta, V, K, 10, 10, None, torch.Generator().manual_seed(0))
    for a, b in zip(ref, out):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def test_forward_mode_equals_torch():
    theta, V, K = random_scene(1, 30, 2, 12, 10, seed=3)
    state = rasterize(theta, V, K, 12, 10, backend="torch", return_state=True).state
    v = {k: torch.randn_like(x) for k, x in theta.items()}

    def render(backend):
        return lambda t: torch.cat(rasterize(t, V, K, 12, 10, backend=backend, state=state)[:3], dim=-1)

    _, ref = torch.func.jvp(render("torch"), (theta,), (v,))
    _, out = torch.func.jvp(render("cpu_kernels"), (theta,), (v,))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_gradcheck_and_gradgradcheck_tiny_scene():
    theta, V, K = random_scene(1, 4, 1, 5, 4, seed=6, scale_px=1.5)
    state = rasterize(theta, V, K, 5, 4, backend="cpu_kernels", return_state=True).state
    keys = list(theta)

    def fn(*tensors):
        out = rasterize(dict(zip(keys, tensors[:-1])), tensors[-1], K, 5, 4, backend="cpu_kernels", state=state)
        return torch.cat(out[:3], dim=-1)

    inputs = tuple(theta[k].clone().requires_grad_() for k in keys) + (V.clone().requires_grad_(),)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    # Second order runs through the pure-torch twin.
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_auto_picks_the_kernels_on_cpu_and_falls_back_with_a_warning(monkeypatch):
    theta, V, K = random_scene(1, 5, 1, 8, 8)
    assert rasterize_module._choose_backend("auto", torch.device("cpu"), F64) == "cpu_kernels"
    assert rasterize_module._choose_backend("auto", torch.device("cpu"), torch.float16) == "torch"
    ref = rasterize(theta, V, K, 8, 8, backend="torch").colors
    monkeypatch.setattr(cpu_kernels, "_STATUS", {"error": "difftto's CPU kernels are unavailable: no compiler"})
    monkeypatch.setattr(rasterize_module, "_FALLBACK_WARNED", set())
    for backend in ("auto", "cpu_kernels"):
        with pytest.warns(RuntimeWarning, match="no compiler.*falls back to backend='torch'"):
            monkeypatch.setattr(rasterize_module, "_FALLBACK_WARNED", set())
            out = rasterize(theta, V, K, 8, 8, backend=backend).colors
        torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="cpu_kernels"):
        rasterize(theta, V, K, 8, 8, backend="cuda")
