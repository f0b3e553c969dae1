"""The compiled EWA projection (``csrc/project_cpu.cpp``) against its pure-torch twin
(:func:`cpu_kernels.projection_twin`, i.e. ``project_gaussians`` and the activations):
features, footprint radii and valid flags, the gradient of every input including the
cameras, shared and per-camera colours, degenerate Gaussians, gradcheck in float64,
forward mode, and the torch fallback when the intrinsics require grad."""

import pytest
import torch

from difftto.problems.splatting import cpu_kernels, project_gaussians, rasterize
from difftto.problems.splatting.gaussians import Gaussians
from difftto.problems.splatting.synthetic import degenerate_scene

_AVAILABLE, _WHY = cpu_kernels.cpu_kernels_available()  # compiles the kernels once, if needed
pytestmark = pytest.mark.skipif(not _AVAILABLE, reason=f"compiled CPU kernels unavailable: {_WHY}")

F64 = torch.float64
KEYS = ("means", "log_scales", "quats", "opacities", "colors")
# float32: the compiled and torch projections round in different orders
TOL = {F64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def _scene(B, N, C, W, H, dtype, seed=0, per_camera=False, case=None):
    theta, V, K = degenerate_scene(B, N, C, W, H, case, seed=seed, dtype=dtype)
    if per_camera:
        theta["colors"] = torch.rand(B, C, N, 3, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    return theta, V, K


def _inputs(theta, V, K):
    return [theta[k] for k in KEYS] + [V, K]


def _settings(W, H):
    return (W, H, 0.3, 0.01, 1e10)


def _compiled(theta, V, K, W, H):
    return cpu_kernels._ProjectFunction.apply(*_inputs(theta, V, K), _settings(W, H))


def _twin_radii(theta, V, K, W, H):
    g = Gaussians(theta["means"], theta["log_scales"], theta["quats"], theta["opacities"])
    proj = project_gaussians(g.means, g.covariance_factors(), V, K, W, H, opacities=g.opacity())
    return proj.radii, proj.valid


CASES = [None, "zero_scales", "huge_scales", "bound_scales", "zero_quats", "huge_quats", "behind_camera",
         "far_offscreen", "transparent"]


def over_cases(test):
    """Runs ``test`` for both dtypes, shared and per-camera colours and every case."""
    for name, values in (("case", CASES), ("per_camera", [False, True]), ("dtype", [torch.float32, F64])):
        test = pytest.mark.parametrize(name, values)(test)
    return test


@over_cases
def test_features_radii_and_valid_equal_the_twin(dtype, per_camera, case):
    W, H = 13, 11
    theta, V, K = _scene(2, 24, 3, W, H, dtype, seed=4, per_camera=per_camera, case=case)
    feats, radii, valid = _compiled(theta, V, K, W, H)
    ref = cpu_kernels.projection_twin(*_inputs(theta, V, K), _settings(W, H))
    ref_radii, ref_valid = _twin_radii(theta, V, K, W, H)
    # Culled Gaussians carry placeholder features that nothing reads; compare the rest.
    torch.testing.assert_close(feats[valid], ref[ref_valid], **TOL[dtype])
    assert torch.equal(valid, ref_valid)
    if dtype == F64:
        assert torch.equal(radii, ref_radii)
    else:  # ceil of a float32 may flip at an integer, and huge radii differ in their last bits
        slack = 1 + 1e-6 * ref_radii.double()
        assert ((radii.double() - ref_radii.double()).abs() <= slack).all()


@over_cases
def test_gradients_of_every_input_equal_the_twin(dtype, per_camera, case):
    W, H = 13, 11
    theta, V, K = _scene(1, 24, 2, W, H, dtype, seed=9, per_camera=per_camera, case=case)
    weights = torch.randn(1, 2, 24, 10, dtype=dtype, generator=torch.Generator().manual_seed(2))

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in _inputs(theta, V, K)[:6]]
        feats = fn(leaves)
        _, _, valid = _compiled(theta, V, K, W, H)
        # Culled Gaussians' placeholder rows get no cotangent, as in a render.
        loss = (weights * feats * valid.unsqueeze(-1)).sum()
        return torch.autograd.grad(loss, leaves)

    out = grads(lambda x: cpu_kernels._ProjectFunction.apply(*x, K, _settings(W, H))[0])
    ref = grads(lambda x: cpu_kernels.projection_twin(*x, K, _settings(W, H)))
    for name, a, b in zip([*KEYS, "viewmats"], ref, out):
        assert torch.isfinite(b).all(), name
        scale = a.abs().max().clamp_min(1.0)
        assert (a - b).abs().max() <= TOL[dtype]["rtol"] * 10 * scale, (name, (a - b).abs().max(), scale)


def test_gradcheck_float64_tiny_scene():
    W, H = 6, 5
    theta, V, K = _scene(1, 3, 2, W, H, F64, seed=1, per_camera=True)

    def fn(*x):
        return cpu_kernels._ProjectFunction.apply(*x, K, _settings(W, H))[0]

    inputs = tuple(t.clone().requires_grad_() for t in _inputs(theta, V, K)[:6])
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_forward_mode_equals_the_twin():
    W, H = 9, 7
    theta, V, K = _scene(1, 10, 2, W, H, F64, seed=2)
    inputs = tuple(_inputs(theta, V, K)[:6])
    tangents = tuple(torch.randn_like(t) for t in inputs)
    _, out = torch.func.jvp(lambda *x: cpu_kernels._ProjectFunction.apply(*x, K, _settings(W, H))[0],
                            inputs, tangents)
    _, ref = torch.func.jvp(lambda *x: cpu_kernels.projection_twin(*x, K, _settings(W, H)), inputs, tangents)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_intrinsics_requiring_grad_fall_back_to_the_torch_projection():
    W, H = 10, 9
    theta, V, K = _scene(1, 20, 2, W, H, F64, seed=7)
    grads = {}
    for backend in ("torch", "cpu_kernels"):
        ks = K.clone().requires_grad_()
        cams = V.clone().requires_grad_()
        out = rasterize(theta, cams, ks, W, H, backend=backend)
        grads[backend] = torch.autograd.grad(out.colors.sum() + out.depths.sum(), [ks, cams])
    for a, b in zip(grads["torch"], grads["cpu_kernels"]):
        assert a.abs().max() > 0
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
