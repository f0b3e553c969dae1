"""Fuzzing ``rasterize`` (backends "torch" and "cpu_kernels") with bad and extreme
scenes: zero / huge / negative log-scales, unnormalized or zero quaternions, Gaussians
behind or on the camera plane, NaN/Inf in any field, empty scenes, 1×1 images.

Every case ends in finite colours, alphas, depths and gradients (where the exact
gradient fits the dtype: see ``_gradient_representable``), or in an error whose message
names the offending argument."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difftto.problems.splatting import rasterize
from difftto.problems.splatting.cpu_kernels import cpu_kernels_available
from difftto.problems.splatting.synthetic import orbit_cameras

FIELDS = ("means", "log_scales", "quats", "opacities", "colors", "viewmats", "Ks")
BAD = (float("nan"), float("inf"), float("-inf"))


def _backends():
    ok, reason = cpu_kernels_available()
    return ["torch", pytest.param("cpu_kernels", marks=pytest.mark.skipif(not ok, reason=reason))]


extreme = st.sampled_from([0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, 50.0, -50.0, 1e300, -1e300])


@st.composite
def scenes(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    batch, n, views = draw(st.integers(1, 2)), draw(st.integers(0, 5)), draw(st.integers(1, 2))
    width, height = draw(st.sampled_from([1, 2, 5])), draw(st.sampled_from([1, 3, 6]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    v, k = orbit_cameras(views, width, height, dtype=dtype)
    theta = {
        "means": (torch.rand(batch, n, 3, generator=gen, dtype=dtype) * 2 - 1) * 0.8,
        "log_scales": torch.full((batch, n, 3), -2.0, dtype=dtype)
        + 0.3 * torch.randn(batch, n, 3, generator=gen, dtype=dtype),
        "quats": torch.randn(batch, n, 4, generator=gen, dtype=dtype),
        "opacities": torch.randn(batch, n, generator=gen, dtype=dtype),
        "colors": torch.rand(batch, n, 3, generator=gen, dtype=dtype),
    }
    viewmats = v.unsqueeze(0).expand(batch, views, 4, 4).contiguous()
    Ks = k.unsqueeze(0).expand(batch, views, 3, 3).contiguous()
    if n:
        # extreme but finite values in a few entries of the Gaussian fields
        for _ in range(draw(st.integers(0, 4))):
            field = draw(st.sampled_from(["log_scales", "quats", "opacities", "means", "colors"]))
            flat = theta[field].view(-1)
            big = torch.finfo(dtype).max  # 1e300 saturates to the largest float32
            flat[draw(st.integers(0, flat.numel() - 1))] = max(-big, min(big, draw(extreme)))
        if draw(st.booleans()):  # zero quaternions
            theta["quats"][:, : draw(st.integers(1, n))] = 0.0
        if draw(st.booleans()):  # unnormalized quaternions
            scaled = theta["quats"] * draw(st.sampled_from([1e-20, 1e-3, 1e3, 1e20]))
            if torch.isfinite(scaled).all():  # the inputs stay finite (an overflow is another test's case)
                theta["quats"] = scaled
        # Gaussians behind, on, or just in front of the first camera's plane: the camera sits at
        # distance 4 from the origin, looking at it; put the point at depth z along its axis
        if draw(st.booleans()):
            z = draw(st.sampled_from([-4.0, -1e-3, 0.0, 1e-9, 1e-3, 0.01]))
            center = -v[0, :3, :3].T @ v[0, :3, 3]
            axis = v[0, 2, :3]
            theta["means"][:, 0] = center + z * axis
    return theta, viewmats, Ks, width, height


def _finite(*tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


def _gradient_representable(theta) -> bool:
    """Whether the exact gradients of the test's loss fit the dtype, with a 10^6 margin.

    A normalized quaternion's derivative scales as 1 / ‖q‖, and the loss's derivative
    with respect to a Gaussian's opacity and shape as its colour and depth: the
    gradient of an unnormalized quaternion of norm 1e-20 under a colour of 1e30 is
    ~1e50, beyond float32, so its Inf is the correctly rounded value, not a fault.
    Quaternions of norm ≥ 1e-3 are always checked (the domain before unnormalized
    quaternions of norm 1e-20 met colours of 1e30)."""
    norms = theta["quats"].detach().norm(dim=-1)
    norms = norms[norms > 0]  # a zero quaternion is the identity rotation
    if norms.numel() == 0 or float(norms.min()) >= 1e-3:
        return True
    largest = max(float(t.detach().abs().max()) for t in theta.values())
    return largest / float(norms.min()) < torch.finfo(norms.dtype).max * 1e-6


@pytest.mark.parametrize("backend", _backends())
@settings(max_examples=30)
@given(scene=scenes())
def test_extreme_scenes_render_finite(backend, scene):
    theta, viewmats, Ks, width, height = scene
    leaves = {k: t.clone().requires_grad_() for k, t in theta.items()}
    out = rasterize(leaves, viewmats, Ks, width, height, backend=backend)
    assert out.colors.shape[2:4] == (height, width)
    assert _finite(out.colors, out.alphas, out.depths), "non-finite render from finite inputs"
    loss = out.colors.sum() + out.alphas.sum() + out.depths.sum()
    if loss.requires_grad and _gradient_representable(theta):
        loss.backward()
        for k, t in leaves.items():
            assert t.grad is None or _finite(t.grad), f"non-finite gradient for {k}"


@pytest.mark.parametrize("backend", _backends())
@settings(max_examples=20)
@given(scene=scenes(), field=st.sampled_from(FIELDS), bad=st.sampled_from(BAD), data=st.data())
def test_non_finite_field_is_named(backend, scene, field, bad, data):
    theta, viewmats, Ks, width, height = scene
    fields = dict(theta, viewmats=viewmats, Ks=Ks)
    target = fields[field].clone()
    if target.numel() == 0:  # an empty scene has no entry to spoil
        return
    target.view(-1)[data.draw(st.integers(0, target.numel() - 1))] = bad
    fields[field] = target
    cams = fields.pop("viewmats"), fields.pop("Ks")
    with pytest.raises(ValueError) as err:
        rasterize(fields, *cams, width, height, backend=backend)
    assert field in str(err.value), str(err.value)


@pytest.mark.parametrize("backend", _backends())
@settings(max_examples=15)
@given(
    scene=scenes(),
    fault=st.sampled_from(["means_rank", "quats_width", "opacities_batch", "no_colors", "cam_batch",
                           "Ks_shape", "width0", "height_float"]),
)
def test_malformed_arguments_are_named(backend, scene, fault):
    theta, viewmats, Ks, width, height = scene
    words = {"means_rank": "means", "quats_width": "quats", "opacities_batch": "opacities",
             "no_colors": "colors", "cam_batch": "viewmats", "Ks_shape": "Ks", "width0": "width",
             "height_float": "height"}[fault]
    if fault == "means_rank":
        theta["means"] = theta["means"][0]
    elif fault == "quats_width":
        theta["quats"] = theta["quats"][..., :3]
    elif fault == "opacities_batch":
        theta["opacities"] = torch.cat([theta["opacities"], theta["opacities"]])
    elif fault == "no_colors":
        theta.pop("colors")
    elif fault == "cam_batch":
        viewmats = torch.cat([viewmats, viewmats])
    elif fault == "Ks_shape":
        Ks = Ks[..., :2]
    elif fault == "width0":
        width = 0
    else:
        height = float(height)
    with pytest.raises((ValueError, TypeError, KeyError)) as err:
        rasterize(theta, viewmats, Ks, width, height, backend=backend)
    assert words in str(err.value), str(err.value)
