"""The pure-PyTorch tile rasterizer: agreement with a dense all-pairs renderer, frozen
state, derivatives (reverse, forward, second order), degenerate input, errors, and the
gsplat backend."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difftto.problems.splatting import rasterize
from difftto.problems.splatting.gaussians import eval_sh
from difftto.problems.splatting.synthetic import degenerate_scene, random_scene

F64 = torch.float64


def _dot(a, b):
    return sum((a[k] * b[k]).sum() for k in a)


@pytest.mark.parametrize(("B", "N", "C", "W", "H"), [(1, 1, 1, 4, 4), (2, 40, 2, 21, 18),
                                                     (1, 80, 3, 16, 9), (1, 25, 1, 1, 1)])
def test_matches_dense_all_pairs_renderer(dense_renderer, B, N, C, W, H):
    theta, V, K = random_scene(B, N, C, W, H, seed=N + W)
    bg = torch.rand(B, C, 3, dtype=F64)
    out = rasterize(theta, V, K, W, H, background=bg)
    colors, alphas, depths = dense_renderer(theta, V, K, W, H, background=bg)
    assert out.colors.shape == (B, C, H, W, 3) and out.alphas.shape == (B, C, H, W, 1)
    torch.testing.assert_close(out.colors, colors, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.alphas, alphas, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.depths, depths, rtol=1e-8, atol=1e-8)


def test_dense_scene_with_early_termination(dense_renderer):
    """Many opaque Gaussians: pixels stop at T ≤ 1e-4 exactly as the reference does."""
    theta, V, K = random_scene(1, 120, 1, 12, 12, seed=1, scale_px=4.0)
    theta["opacities"] = theta["opacities"] + 4.0
    out = rasterize(theta, V, K, 12, 12)
    colors, alphas, _ = dense_renderer(theta, V, K, 12, 12)
    assert (alphas > 1 - 1e-3).any()
    torch.testing.assert_close(out.colors, colors, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.alphas, alphas, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("tile_size", [1, 3, 8, 16])
def test_tile_size_does_not_change_the_image(tile_size):
    theta, V, K = random_scene(1, 50, 2, 19, 13, seed=2)
    ref = rasterize(theta, V, K, 19, 13)
    out = rasterize(theta, V, K, 19, 13, tile_size=tile_size)
    torch.testing.assert_close(out.colors, ref.colors, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.depths, ref.depths, rtol=1e-10, atol=1e-10)


def test_spherical_harmonics_colors():
    """SH colours equal plain colours computed from the same view directions."""
    theta, V, K = random_scene(1, 30, 2, 16, 16, seed=3, sh_degree=2)
    out = rasterize(theta, V, K, 16, 16)
    for c in range(2):
        center = torch.linalg.inv(V[0, c])[:3, 3]
        colors = eval_sh(theta["sh"][0], theta["means"][0] - center)
        plain = {k: v for k, v in theta.items() if k != "sh"}
        plain["colors"] = colors.unsqueeze(0)
        ref = rasterize(plain, V[:, c : c + 1], K[:, c : c + 1], 16, 16)
        torch.testing.assert_close(out.colors[:, c : c + 1], ref.colors)
    low = rasterize(theta, V, K, 16, 16, sh_degree=0)
    assert not torch.allclose(low.colors, out.colors)


def test_frozen_state_reproduces_the_render_and_checks_shapes():
    theta, V, K = random_scene(2, 40, 2, 16, 12, seed=4)
    out = rasterize(theta, V, K, 16, 12, return_state=True)
    again = rasterize(theta, V, K, 16, 12, state=out.state)
    # Same pairs and order; only the padding (hence summation blocking) differs.
    torch.testing.assert_close(again.colors, out.colors, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(again.alphas, out.alphas, rtol=1e-13, atol=1e-13)
    assert 0 < out.state.num_pairs <= out.state.num_padded
    with pytest.raises(ValueError, match="state was made for"):
        rasterize(theta, V, K, 17, 12, state=out.state)


def _frozen_fn(theta, V, K, W, H):
    state = rasterize(theta, V, K, W, H, return_state=True).state

    def render(t, viewmats=V):
        out = rasterize(t, viewmats, K, W, H, state=state)
        return torch.cat([out.colors, out.alphas, out.depths], dim=-1)

    return render


@settings(max_examples=8)
@given(seed=st.integers(0, 10_000))
def test_jvp_matches_central_finite_differences(seed):
    theta, V, K = random_scene(1, 30, 2, 14, 12, seed=seed)
    render = _frozen_fn(theta, V, K, 14, 12)
    gen = torch.Generator().manual_seed(seed + 1)
    v = {k: torch.randn(x.shape, generator=gen, dtype=F64) for k, x in theta.items()}
    _, jv = torch.func.jvp(render, (theta,), (v,))
    eps = 1e-6
    plus = render({k: theta[k] + eps * v[k] for k in theta})
    minus = render({k: theta[k] - eps * v[k] for k in theta})
    fd = (plus - minus) / (2 * eps)
    scale = jv.abs().max()
    assert scale > 0
    assert (jv - fd).abs().max() <= 1e-6 * scale


@settings(max_examples=8)
@given(seed=st.integers(0, 10_000))
def test_adjoint_identity(seed):
    """⟨u, J v⟩ = ⟨Jᵀ u, v⟩, J·v by forward mode and Jᵀ·u by reverse mode."""
    theta, V, K = random_scene(2, 25, 2, 12, 10, seed=seed)
    render = _frozen_fn(theta, V, K, 12, 10)
    gen = torch.Generator().manual_seed(seed + 2)
    v = {k: torch.randn(x.shape, generator=gen, dtype=F64) for k, x in theta.items()}
    out, jv = torch.func.jvp(render, (theta,), (v,))
    u = torch.randn(out.shape, generator=gen, dtype=F64)
    _, vjp_fn = torch.func.vjp(render, theta)
    (jtu,) = vjp_fn(u)
    lhs, rhs = (u * jv).sum(), _dot(jtu, v)
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_unfrozen_jvp_equals_frozen_jvp_at_the_point():
    theta, V, K = random_scene(1, 30, 2, 12, 12, seed=5)
    render = _frozen_fn(theta, V, K, 12, 12)
    v = {k: torch.randn_like(x) for k, x in theta.items()}
    _, frozen = torch.func.jvp(render, (theta,), (v,))

    def free(t):
        out = rasterize(t, V, K, 12, 12)
        return torch.cat([out.colors, out.alphas, out.depths], dim=-1)

    _, unfrozen = torch.func.jvp(free, (theta,), (v,))
    torch.testing.assert_close(frozen, unfrozen, rtol=1e-12, atol=1e-12)


def test_gradcheck_and_gradgradcheck_small_scene():
    theta, V, K = random_scene(1, 4, 1, 5, 4, seed=6, scale_px=1.5)
    render = _frozen_fn(theta, V, K, 5, 4)
    assert render(theta)[..., 3].max() > 0.3  # Gaussians are visible
    keys = list(theta)

    def fn(*tensors):
        return render(dict(zip(keys, tensors[:-1])), tensors[-1])

    inputs = tuple(theta[k].clone().requires_grad_() for k in keys) + (V.clone().requires_grad_(),)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    # Double backward (random projections keep it fast).
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4,
                                        fast_mode=True)


@settings(max_examples=5)
@given(seed=st.integers(0, 10_000))
def test_gradcheck_property(seed):
    theta, V, K = random_scene(1, 8, 2, 6, 6, seed=seed)
    render = _frozen_fn(theta, V, K, 6, 6)
    keys = list(theta)

    def fn(*tensors):
        return render(dict(zip(keys, tensors)))

    inputs = tuple(theta[k].clone().requires_grad_() for k in keys)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_gradient_reaches_cameras():
    theta, V, K = random_scene(1, 30, 2, 12, 12, seed=7)
    V = V.clone().requires_grad_()
    Kr = K.clone().requires_grad_()
    rasterize(theta, V, Kr, 12, 12).colors.sum().backward()
    assert V.grad.abs().sum() > 0 and Kr.grad.abs().sum() > 0


# --------------------------------------------------------------------------- degenerate input


def _assert_finite(out, *grads):
    for t in (out.colors, out.alphas, out.depths, *grads):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("case", ["zero_scales", "huge_scales", "zero_quats", "behind_camera",
                                  "on_camera_plane", "far_offscreen"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_degenerate_gaussians_give_finite_images_and_gradients(case, dtype):
    theta, V, K = degenerate_scene(1, 20, 1, 10, 10, case, seed=8, dtype=dtype, count=5)
    params = {k: v.requires_grad_() for k, v in theta.items()}
    out = rasterize(params, V, K, 10, 10)
    (out.colors.sum() + out.depths.sum()).backward()
    _assert_finite(out, *(p.grad for p in params.values()))


def test_no_gaussians_and_one_pixel():
    theta, V, K = random_scene(2, 0, 2, 8, 6)
    bg = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    out = rasterize(theta, V, K, 8, 6, background=bg, return_state=True)
    assert out.colors.shape == (2, 2, 6, 8, 3)
    torch.testing.assert_close(out.colors, bg.expand(2, 2, 6, 8, 3))
    assert (out.alphas == 0).all() and (out.depths == 0).all()
    _, jv = torch.func.jvp(lambda m: rasterize(dict(theta, means=m), V, K, 8, 6).colors,
                           (theta["means"],), (theta["means"],))
    assert jv.shape == (2, 2, 6, 8, 3)
    theta1, V1, K1 = random_scene(1, 10, 1, 1, 1, seed=9, scale_px=0.5)
    _assert_finite(rasterize(theta1, V1, K1, 1, 1))


def test_non_finite_parameters_raise_clearly():
    theta, V, K = random_scene(1, 5, 1, 8, 8)
    theta["means"] = theta["means"].clone()
    theta["means"][0, 2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"gaussians\['means'\] has 1 non-finite"):
        rasterize(theta, V, K, 8, 8)
    theta, V, K = random_scene(1, 5, 1, 8, 8)
    V = V.clone()
    V[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="viewmats has non-finite"):
        rasterize(theta, V, K, 8, 8)


# --------------------------------------------------------------------------- errors


def test_shape_errors_name_the_argument():
    theta, V, K = random_scene(2, 5, 3, 8, 8)
    bad = dict(theta, quats=theta["quats"][..., :3])
    with pytest.raises(ValueError, match=r"quats.*\(2, 5, 3\).*\[B, N, 4\]"):
        rasterize(bad, V, K, 8, 8)
    with pytest.raises(ValueError, match=r"viewmats has batch size B = 1.*B = 2"):
        rasterize(theta, V[:1], K[:1], 8, 8)
    with pytest.raises(ValueError, match=r"viewmats has shape \(2, 3, 3, 4\)"):
        rasterize(theta, V[..., :3, :], K, 8, 8)
    with pytest.raises(ValueError, match=r"disagree on \[B, C\]"):
        rasterize(theta, V, K[:, :2], 8, 8)
    with pytest.raises(KeyError, match="missing the group"):
        rasterize({k: v for k, v in theta.items() if k != "opacities"}, V, K, 8, 8)
    with pytest.raises(ValueError, match="exactly one of 'colors'"):
        rasterize({k: v for k, v in theta.items() if k != "colors"}, V, K, 8, 8)
    with pytest.raises(ValueError, match=r"opacities.*\[B, N\]"):
        rasterize(dict(theta, opacities=theta["opacities"][..., None]), V, K, 8, 8)
    with pytest.raises(ValueError, match="width and height"):
        rasterize(theta, V, K, 0, 8)
    with pytest.raises(ValueError, match="float32"):
        rasterize(theta, V.float(), K, 8, 8)
    with pytest.raises(ValueError, match="background has shape"):
        rasterize(theta, V, K, 8, 8, background=torch.zeros(4, dtype=F64))


def test_backend_selection_on_cpu():
    theta, V, K = random_scene(1, 5, 1, 8, 8)
    auto = rasterize(theta, V, K, 8, 8, backend="auto")
    torch.testing.assert_close(auto.colors, rasterize(theta, V, K, 8, 8, backend="torch").colors)
    with pytest.raises(RuntimeError, match="backend='gsplat' needs CUDA tensors"):
        rasterize(theta, V, K, 8, 8, backend="gsplat")
    with pytest.raises(ValueError, match="backend must be"):
        rasterize(theta, V, K, 8, 8, backend="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the gsplat backend needs a CUDA device")
def test_gsplat_backend_agrees_with_torch_backend():
    from difftto.problems.splatting import gsplat_available

    ok, why = gsplat_available()
    if not ok:
        pytest.skip(f"gsplat cannot run here: {why}")
    theta, V, K = random_scene(2, 200, 2, 32, 24, seed=10, dtype=torch.float32)
    cuda = {k: v.cuda() for k, v in theta.items()}
    bg = torch.rand(2, 2, 3)
    ours = rasterize(theta, V, K, 32, 24, background=bg, backend="torch")
    theirs = rasterize(cuda, V.cuda(), K.cuda(), 32, 24, background=bg.cuda(), backend="auto")
    torch.testing.assert_close(theirs.colors.cpu(), ours.colors, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(theirs.alphas.cpu(), ours.alphas, rtol=1e-3, atol=2e-3)
