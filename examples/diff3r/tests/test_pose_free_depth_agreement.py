"""Cross-view depth agreement of the pose-free model's depths
(``pose_free.cross_view_inverse_depth``, ``model.depth_agreement``): against the
closed form of a plane seen by two cameras, against finite differences, and its
training term."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difftto.problems.splatting.se3 import se3_exp
from examples.diff3r import pose_free
from examples.diff3r.testing import TINY_SIZE, tiny_dataset, tiny_pose_free_batch, tiny_pose_free_overrides
from examples.diff3r.train import build_model, compose_config, train

H, W = 10, 12


def _K(f: float, cx: float, cy: float) -> torch.Tensor:
    return torch.tensor([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]], dtype=torch.float64)


def _plane_depth(K: torch.Tensor, cam_to_ref: torch.Tensor, n: torch.Tensor, d: float, h: int = H,
                 w: int = W) -> torch.Tensor:
    """Closed form: the z-depth ``[h, w]`` at each pixel center of the camera
    ``cam_to_ref = [R t]`` (camera → reference frame) of the plane ``n·X = d`` (reference
    frame): along the ray ``r = K⁻¹p̃`` (z = 1), ``n·(s R r + t) = d``, so
    ``s = (d − n·t)/(n·R r)``."""
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5,
                          indexing="ij")
    rays = torch.stack([u, v, torch.ones_like(u)], dim=-1) @ torch.linalg.inv(K).T
    R, t = cam_to_ref[:3, :3], cam_to_ref[:3, 3]
    return (d - n @ t) / (rays @ R.T @ n)


_small = st.floats(-1.0, 1.0)


@settings(max_examples=40, deadline=None)
@given(nx=st.floats(-0.3, 0.3), ny=st.floats(-0.3, 0.3), d=st.floats(3.0, 8.0), f=st.floats(8.0, 14.0),
       w=st.tuples(_small, _small, _small), t=st.tuples(_small, _small, _small))
def test_a_plane_agrees_at_the_true_pose_against_its_closed_form(nx, ny, d, f, w, t):
    """Two cameras see the plane ``n·X = d``; their depth maps are the closed form. At
    the true relative pose the residual vanishes on every valid pixel (bilinear inverse
    depth is exact on a plane), and the valid pixels are those whose exact projection
    lies between the destination's pixel centers."""
    n = torch.tensor([nx, ny, 1.0], dtype=torch.float64)
    n = n / n.norm()
    xi = torch.tensor([0.2 * t[0], 0.2 * t[1], 0.1 * t[2], 0.05 * w[0], 0.05 * w[1], 0.05 * w[2]],
                      dtype=torch.float64)
    src_to_ref = se3_exp(xi)  # the destination is the reference frame
    K_src, K_dst = _K(f, W / 2, H / 2), _K(f * 1.1, W / 2 + 0.3, H / 2 - 0.2)
    depth_src = _plane_depth(K_src, src_to_ref, n, d)
    depth_dst = _plane_depth(K_dst, torch.eye(4, dtype=torch.float64), n, d)
    assert bool((depth_src > 0).all()) and bool((depth_dst > 0).all())
    res, valid = pose_free.cross_view_inverse_depth(depth_src[None], K_src[None], K_dst[None], src_to_ref[None],
                                                    depth_dst[None])
    assert float(valid.sum()) > 0.3 * H * W  # a small relative pose: most pixels project inside
    torch.testing.assert_close(res, torch.zeros_like(res), atol=1e-10, rtol=0)
    # The mask, from the exact projection of each source pixel's plane point.
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5,
                          indexing="ij")
    X = (torch.stack([u, v, torch.ones_like(u)], dim=-1) @ torch.linalg.inv(K_src).T) * depth_src[..., None]
    Y = X @ src_to_ref[:3, :3].T + src_to_ref[:3, 3]
    uv = (Y @ K_dst.T)[..., :2] / Y[..., 2:]
    margin = torch.minimum((uv - 0.5).amin(-1), torch.stack([W - 0.5 - uv[..., 0], H - 0.5 - uv[..., 1]], -1).amin(-1))
    clear = margin.abs() > 1e-9  # away from the boundary, where rounding decides
    assert bool(((margin[clear] >= 0).double() == valid[0][clear]).all())


@pytest.mark.parametrize("form", pose_free.DEPTH_AGREEMENT_FORMS)
@settings(max_examples=20, deadline=None)
@given(scale=st.floats(1.05, 1.5), nx=st.floats(-0.3, 0.3), d=st.floats(3.0, 8.0))
def test_a_wrong_depth_does_not_agree(form, scale, nx, d):
    """The destination's depth scaled by ``scale``: on each valid pixel the inverse-depth
    residual is ``1/z − 1/(scale·z)`` of the exact depth, so ``(1 − 1/scale)/z``; the
    scale-free ones depend only on the ratio ``scale``: ``log scale`` and
    ``(scale − 1)/((scale + 1)/2)``."""
    n = torch.tensor([nx, 0.0, 1.0], dtype=torch.float64)
    n = n / n.norm()
    src_to_ref = se3_exp(torch.tensor([0.1, 0.0, 0.0, 0.0, 0.02, 0.0], dtype=torch.float64))
    K = _K(10.0, W / 2, H / 2)
    depth_src = _plane_depth(K, src_to_ref, n, d)
    depth_dst = _plane_depth(K, torch.eye(4, dtype=torch.float64), n, d)
    res, valid = pose_free.cross_view_inverse_depth(depth_src[None], K[None], K[None], src_to_ref[None],
                                                    scale * depth_dst[None], form=form)
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5,
                          indexing="ij")
    X = (torch.stack([u, v, torch.ones_like(u)], dim=-1) @ torch.linalg.inv(K).T) * depth_src[..., None]
    z = (X @ src_to_ref[:3, :3].T + src_to_ref[:3, 3])[..., 2]
    per_pixel = {"inverse": (1 - 1 / scale) / z, "log": torch.full_like(z, math.log(scale)),
                 "relative": torch.full_like(z, (scale - 1) / ((scale + 1) / 2))}[form]
    expected = per_pixel * valid[0]
    assert float(valid.sum()) > 0
    torch.testing.assert_close(res[0], expected, atol=1e-10, rtol=0)


def _scaled_plane_pair(nx: float, ny: float, d: float, xi: torch.Tensor, c: float, form: str):
    """Both depth maps of the plane ``n·X = d`` (the destination is the reference frame)
    scaled by ``c`` towards far: the residual of ``form`` and the mask."""
    n = torch.tensor([nx, ny, 1.0], dtype=torch.float64)
    n = n / n.norm()
    src_to_ref = se3_exp(xi)
    K = _K(10.0, W / 2, H / 2)
    depth_src = _plane_depth(K, src_to_ref, n, d)
    depth_dst = _plane_depth(K, torch.eye(4, dtype=torch.float64), n, d)
    res, valid = pose_free.cross_view_inverse_depth(c * depth_src[None], K[None], K[None], src_to_ref[None],
                                                    c * depth_dst[None], form=form)
    return res[0], valid[0], float(n @ src_to_ref[:3, 3]) / d


def _mean_square(res: torch.Tensor, valid: torch.Tensor) -> float:
    return float((res ** 2).sum() / valid.sum())


_twist = st.tuples(*[st.floats(-0.25, 0.25)] * 3, *[st.floats(-0.05, 0.05)] * 3)


@pytest.mark.parametrize("form", ["log", "relative"])
@settings(max_examples=30, deadline=None)
@given(nx=st.floats(-0.3, 0.3), ny=st.floats(-0.3, 0.3), d=st.floats(3.0, 6.0), xi=_twist,
       scales=st.tuples(st.floats(1.0, 4.0), st.floats(1.0, 4.0)))
def test_scale_free_forms_do_not_decrease_as_consistent_depths_move_far(form, nx, ny, d, xi, scales):
    """The depths of one plane, consistent at the true pose, all scaled by ``c ≥ 1``
    towards far. Scaled, the source point is ``c·Y − (c − 1)t`` for the true ``Y`` on the
    plane, so on every valid pixel the ratio of the two inverse depths is
    ``1/(1 − (1 − 1/c)·a)``, ``a = n·t/d``: the scale-free residual is that ratio's log
    or relative difference, 0 at ``c = 1`` and growing in magnitude with ``c`` — moving
    every depth far cannot lower the scale-free loss (the inverse form's can, test
    below)."""
    xi = torch.tensor(xi, dtype=torch.float64)
    c1, c2 = sorted(scales)
    out = {}
    for c in (c1, c2):
        res, valid, a = _scaled_plane_pair(nx, ny, d, xi, c, form)
        assert float(valid.sum()) > 0.2 * H * W
        ratio = 1.0 / (1.0 - (1.0 - 1.0 / c) * a)
        closed = math.log(ratio) if form == "log" else (ratio - 1.0) / ((ratio + 1.0) / 2.0)
        torch.testing.assert_close(res, closed * valid, atol=1e-10, rtol=0)
        out[c] = _mean_square(res, valid)
    assert out[c2] >= out[c1] - 1e-15
    if c2 > 1.05 and abs(a) > 1e-3:  # a translation off the plane: scaled, the depths disagree
        assert out[c2] > 0


def test_the_inverse_form_falls_as_consistent_depths_move_far_and_the_scale_free_ones_rise():
    """The collapse the scale-free forms avoid: the same scaled plane (``a = n·t/d ≠ 0``),
    ``c`` = 1.5, 3, 6: the inverse form's mean square falls with ``c`` after its
    maximum, its residual being ``(1/Y_z)·(1 − 1/c)·a/c``-like; log and relative rise."""
    xi = torch.tensor([0.1, 0.05, 0.2, 0.01, 0.02, -0.01], dtype=torch.float64)
    loss = {form: [_mean_square(*_scaled_plane_pair(0.1, -0.1, 4.0, xi, c, form)[:2]) for c in (1.5, 3.0, 6.0)]
            for form in pose_free.DEPTH_AGREEMENT_FORMS}
    assert loss["inverse"][2] < loss["inverse"][1]
    for form in ("log", "relative"):
        assert 0 < loss[form][0] < loss[form][1] < loss[form][2]


@pytest.mark.parametrize("form", pose_free.DEPTH_AGREEMENT_FORMS)
@settings(max_examples=20, deadline=None)
@given(c=st.floats(0.3, 5.0), seed=st.integers(0, 2**16), xi=_twist)
def test_scaling_the_depths_and_the_translation_together(form, c, seed, xi):
    """The scale law on generic depths: both depth maps and the relative translation
    scaled by ``c`` move every point to the same pixel, so the scale-free residuals are
    unchanged and the inverse-depth residual is divided by ``c``."""
    g = torch.Generator().manual_seed(seed)
    depth_src = 4.0 + torch.rand(1, H, W, dtype=torch.float64, generator=g)
    depth_dst = 4.0 + torch.rand(1, H, W, dtype=torch.float64, generator=g)
    K = _K(10.0, W / 2, H / 2)[None]
    # a generic offset: at the identity every pixel lands on a pixel center, the outer
    # ones on the mask edge
    offset = torch.tensor([0.0312, -0.0171, 0.0113, 0.0021, -0.0013, 0.0017], dtype=torch.float64)
    T = se3_exp(torch.tensor([xi], dtype=torch.float64) + offset)
    Tc = T.clone()
    Tc[:, :3, 3] *= c
    res, valid = pose_free.cross_view_inverse_depth(depth_src, K, K, T, depth_dst, form=form)
    res_c, valid_c = pose_free.cross_view_inverse_depth(c * depth_src, K, K, Tc, c * depth_dst, form=form)
    clear = torch.ones_like(valid, dtype=torch.bool)
    if not torch.equal(valid, valid_c):  # a projection on the mask edge, where rounding decides
        clear = valid == valid_c
        assert int((~clear).sum()) <= 2
    expected = res / c if form == "inverse" else res
    torch.testing.assert_close(res_c[clear], expected[clear], atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("form", pose_free.DEPTH_AGREEMENT_FORMS)
def test_gradient_against_finite_differences(form):
    """``gradcheck`` (float64) w.r.t. both depth maps and the relative pose's matrix, on
    generic depths whose projections stay clear of the bilinear kinks and the mask edge."""
    torch.manual_seed(0)
    K = _K(10.0, W / 2, H / 2)[None]
    T = se3_exp(torch.tensor([[0.13, 0.05, 0.02, 0.01, 0.03, -0.02]], dtype=torch.float64))
    depth_src = (4.0 + 0.5 * torch.rand(1, H, W, dtype=torch.float64)).requires_grad_()
    depth_dst = (4.0 + 0.5 * torch.rand(1, H, W, dtype=torch.float64)).requires_grad_()
    T = T.clone().requires_grad_()

    def f(a, b, m):
        return pose_free.cross_view_inverse_depth(a, K, K, m, b, form=form)[0]

    assert torch.autograd.gradcheck(f, (depth_src, depth_dst, T), eps=1e-7, atol=1e-6)


def _two_view_batch(c2w_1: torch.Tensor, f: float = 10.0) -> dict[str, torch.Tensor]:
    """A batch of two ``H×W`` context views in the first one's frame (float64):
    normalized intrinsics, camera-to-world poses, ``near`` 1 (what
    :func:`pose_free.depth_agreement_loss` reads)."""
    K = _K(f, W / 2, H / 2) / torch.tensor([float(W), float(H), 1.0], dtype=torch.float64)[:, None]
    return {"context_images": torch.zeros(1, 2, 3, H, W, dtype=torch.float64),
            "context_intrinsics": K.expand(1, 2, 3, 3).clone(),
            "context_extrinsics": torch.stack([torch.eye(4, dtype=torch.float64), c2w_1])[None],
            "context_near": torch.ones(1, 2, dtype=torch.float64)}


def _with_depth(depth: torch.Tensor) -> pose_free.PoseFreeOutput:
    return pose_free.PoseFreeOutput({}, {}, depth)


def _plane_pair_batch(nx: float, ny: float, d: float, xi) -> tuple[dict, torch.Tensor]:
    """The depth maps ``[1, 2, H, W]`` of the plane ``n·X = d`` (first view's frame) and
    the batch of the two cameras (view 1 at ``se3_exp(xi)``, camera → first view)."""
    n = torch.tensor([nx, ny, 1.0], dtype=torch.float64)
    n = n / n.norm()
    c2w_1 = se3_exp(torch.tensor(xi, dtype=torch.float64))
    K = _K(10.0, W / 2, H / 2)
    depths = torch.stack([_plane_depth(K, torch.eye(4, dtype=torch.float64), n, d), _plane_depth(K, c2w_1, n, d)])
    return _two_view_batch(c2w_1), depths[None]


@settings(max_examples=40, deadline=None)
@given(nx=st.floats(-0.3, 0.3), ny=st.floats(-0.3, 0.3), d=st.floats(3.0, 6.0), xi=_twist,
       scales=st.tuples(st.floats(1.0, 4.0), st.floats(1.0, 4.0)), contrast=st.floats(0.2, 0.6),
       one_sided=st.booleans())
def test_the_contrast_is_zero_at_the_truth_and_does_not_fall_towards_far(nx, ny, d, xi, scales, contrast,
                                                                          one_sided):
    """Two cameras on a plane, the depth maps scaled by ``c ≥ 1`` towards far. The
    contrast (the loss under the true translation over its mean under ``1 ± δ`` times
    it) is 0 at ``c = 1``; per pair of views it is a ratio of squares of functions of
    ``1 − τ/c`` (the scaled plane's closed form above), ≈ ``(c − 1)²/((c − 1)² + δ²)``
    for small motions: two-sided it does not fall as ``c`` grows. One-sided, which pair
    counts switches at ``c = 1 + δ`` under the translation ``1 + δ``, and the ratio
    is not exactly monotone (a 0.2% dip near 1 found), so only its range is checked."""
    batch, depths = _plane_pair_batch(nx, ny, d, xi)
    c1, c2 = sorted(scales)
    out = [float(pose_free.depth_agreement_loss(_with_depth(c * depths), batch, form="relative",
                                                one_sided=one_sided, contrast=contrast)) for c in (1.0, c1, c2)]
    assert out[0] < 1e-12
    assert 0 <= out[1] <= 1.5 and 0 <= out[2] <= 1.5
    if not one_sided:
        assert out[2] >= out[1] - 1e-12


@settings(max_examples=15, deadline=None)
@given(c=st.floats(0.3, 5.0), seed=st.integers(0, 2**16), xi=_twist, contrast=st.floats(0.0, 0.6),
       one_sided=st.booleans())
def test_the_contrast_is_scale_free(c, seed, xi, contrast, one_sided):
    """Generic depths: scaling the depth maps and the camera centers by ``c`` leaves the
    log-form loss, and its contrast, unchanged (the scale law, through the loss)."""
    g = torch.Generator().manual_seed(seed)
    depths = 4.0 + torch.rand(1, 2, H, W, dtype=torch.float64, generator=g)
    offset = torch.tensor([0.0312, -0.0171, 0.0113, 0.0021, -0.0013, 0.0017], dtype=torch.float64)
    c2w_1 = se3_exp(torch.tensor(xi, dtype=torch.float64) + offset)
    scaled = c2w_1.clone()
    scaled[:3, 3] *= c
    kw = {"form": "log", "one_sided": one_sided, "contrast": contrast}
    base = pose_free.depth_agreement_loss(_with_depth(depths), _two_view_batch(c2w_1), **kw)
    moved = pose_free.depth_agreement_loss(_with_depth(c * depths), _two_view_batch(scaled), **kw)
    torch.testing.assert_close(moved, base, atol=1e-12, rtol=1e-9)


def test_the_contrast_scores_far_depths_like_wrong_ones():
    """The collapse that the plain scale-free loss allows: depth maps at the far bound
    (15; constant) agree almost perfectly under a small translation, so the relative
    loss is tiny — smaller than for the true plane's depths 20% off — but they agree
    as well under a wrong translation, so their contrast is ≈ 1, and the true depths'
    is 0."""
    batch, depths = _plane_pair_batch(0.1, -0.1, 4.0, [0.2, 0.05, 0.1, 0.01, 0.02, -0.01])
    far = torch.full_like(depths, 15.0)
    off = depths * torch.tensor([1.0, 1.2], dtype=torch.float64).reshape(1, 2, 1, 1)

    def loss(x, contrast):
        return float(pose_free.depth_agreement_loss(_with_depth(x), batch, form="relative", contrast=contrast))

    assert loss(far, 0.0) < loss(off, 0.0)
    assert 0.7 < loss(far, 0.5) < 1.3
    assert loss(depths, 0.5) < 1e-12


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny_pose_free_depth") / "data")


@pytest.fixture(scope="module")
def depth_batch(root):
    """The first training scene with its context depths, in the first view's frame."""
    return tiny_pose_free_batch(root, load_depth=True)


@pytest.mark.parametrize("form,one_sided,contrast", [("inverse", False, 0.0), ("log", False, 0.0),
                                                      ("relative", False, 0.0), ("relative", True, 0.0),
                                                      ("log", True, 0.0), ("relative", True, 0.5),
                                                      ("log", False, 0.3)])
def test_depth_agreement_loss_is_zero_for_consistent_depths_and_positive_otherwise(root, form, one_sided, contrast):
    """On a tiny batch: the model's depths give a positive loss; depths of one plane in
    the first view's frame, computed for each context camera by the closed form, give 0;
    the loss reaches the depth head."""
    batch = tiny_pose_free_batch(root)
    torch.manual_seed(0)
    model = pose_free.PoseFreeModel(feature_channels=8, hidden_channels=8)
    pred = pose_free.predict(model, batch)

    def loss_of(p):
        return pose_free.depth_agreement_loss(p, batch, form=form, one_sided=one_sided, contrast=contrast)

    loss = loss_of(pred)
    assert float(loss.detach()) > 0
    loss.backward()
    assert float(model.head[-1].weight.grad[model._slices()["depth"]].abs().sum()) > 0
    K = (batch["context_intrinsics"][0] * torch.tensor([float(TINY_SIZE), float(TINY_SIZE), 1.0])[:, None]).double()
    n = torch.tensor([0.1, -0.05, 1.0], dtype=torch.float64)
    n = n / n.norm()
    planes = torch.stack([_plane_depth(K[v], batch["context_extrinsics"][0, v].double(), n, 6.0, TINY_SIZE, TINY_SIZE)
                          for v in range(K.shape[0])])
    plane = pose_free.PoseFreeOutput(pred.theta, pred.lam, planes[None].float())
    assert float(loss_of(plane)) < 1e-8
    far_second = planes[None] * torch.tensor([1.0, 1.2], dtype=torch.float64).reshape(1, 2, 1, 1)
    shifted = pose_free.PoseFreeOutput(pred.theta, pred.lam, far_second.float())  # view 1's depths 20% too far
    assert float(loss_of(shifted)) > 1e-4
    # every depth 2× and 3× too far: the scale-free forms do not fall (they rise)
    far = [float(loss_of(pose_free.PoseFreeOutput(pred.theta, pred.lam, (c * planes[None]).float())))
           for c in (2.0, 3.0)]
    if form != "inverse":
        assert 0 < far[0] <= far[1]
    # one-sided: only the points in front of the other view's surface
    if one_sided and contrast == 0:
        two_sided = pose_free.depth_agreement_loss(shifted, batch, form=form)
        assert 0 < float(loss_of(shifted)) < float(two_sided)


def test_config_rejects_a_bad_depth_agreement_form_or_side(root):
    with pytest.raises(ValueError, match=r"depth_agreement_form: expected one of 'inverse', 'log', 'relative', "
                                         r"got 'scale'$"):
        build_model(compose_config(["model=pose_free", "model.depth_agreement_form=scale"]).model)
    with pytest.raises(ValueError, match=r"depth_agreement_one_sided: expected true or false, got 1$"):
        build_model(compose_config(["model=pose_free", "model.depth_agreement_one_sided=1"]).model)
    for bad in ("-0.1", "1.0", "nan", "x"):
        with pytest.raises(ValueError, match=r"depth_agreement_contrast: expected a number in \[0, 1\), got "):
            build_model(compose_config(["model=pose_free", f"model.depth_agreement_contrast={bad}"]).model)
    model = build_model(compose_config(["model=pose_free", "model.depth_agreement_form=log",
                                        "model.depth_agreement_one_sided=true"]).model)
    assert model.depth_agreement_form == "log" and model.depth_agreement_one_sided is True
    preset = compose_config(["model=pose_free"]).model
    assert preset.depth_agreement_form == "inverse" and preset.depth_agreement_one_sided is False
    assert float(preset.depth_agreement_contrast) == 0.0
    depth, K, T = torch.ones(1, H, W), torch.eye(3)[None], torch.eye(4)[None]
    with pytest.raises(ValueError, match=r"form: expected one of 'inverse', 'log', 'relative', got 'Log'$"):
        pose_free.cross_view_inverse_depth(depth, K, K, T, depth, form="Log")
    batch = tiny_pose_free_batch(root)
    pred = pose_free.predict(pose_free.PoseFreeModel(feature_channels=8, hidden_channels=8), batch)
    with pytest.raises(ValueError, match=r"one_sided: expected true or false, got 'yes'$"):
        pose_free.depth_agreement_loss(pred, batch, one_sided="yes")
    with pytest.raises(ValueError, match=r"contrast: expected a number in \[0, 1\), got 1.5$"):
        pose_free.depth_agreement_loss(pred, batch, contrast=1.5)


@pytest.mark.parametrize("value", [-1.0, float("nan")])
def test_config_rejects_a_bad_depth_agreement_weight(value):
    with pytest.raises(ValueError, match=rf"depth_agreement: expected a finite number >= 0, got {value!r}"):
        build_model(compose_config(["model=pose_free", f"model.depth_agreement={value}"]).model)
    assert pose_free.PoseFreeModel().depth_agreement == 0.0
    preset = compose_config(["model=pose_free"]).model
    assert float(preset.depth_agreement) == 0.0 and float(preset.depth_supervision) == 0.0  # off in the preset


@pytest.mark.parametrize("extra", [[], ["model.depth_agreement_form=relative", "model.depth_agreement_one_sided=true"],
                                   ["model.depth_agreement_form=relative", "model.depth_agreement_contrast=0.5"]])
def test_training_adds_the_term_in_zero_shot(root, tmp_path, extra):
    def run(name, extra):
        return train(compose_config(tiny_pose_free_overrides(root, tmp_path / name, "zero_shot") + extra))

    off, on = run("off", []), run("on", ["model.depth_agreement=100", *extra])
    assert math.isfinite(on["last"]["loss"]) and on["last"]["loss"] > off["last"]["loss"]


# ------------------------------------------------------ supervised depth (training only)


def test_depth_loss_against_known_depths(depth_batch):
    batch = depth_batch
    torch.manual_seed(0)
    model = pose_free.PoseFreeModel(feature_channels=8, hidden_channels=8)
    pred = pose_free.predict(model, batch)
    gt = batch["context_depths"]
    exact = pose_free.PoseFreeOutput(pred.theta, pred.lam, gt.clone())
    assert float(pose_free.depth_loss(exact, batch)) < 1e-6
    # 1.5× too far everywhere: |log 1.5|, the invalid pixels (0, inf) left out
    holes = dict(batch, context_depths=gt.clone())
    holes["context_depths"][0, 0, :3] = 0.0
    holes["context_depths"][0, 1, :2] = float("inf")
    far = pose_free.PoseFreeOutput(pred.theta, pred.lam, 1.5 * gt)
    assert float(pose_free.depth_loss(far, holes)) == pytest.approx(math.log(1.5), rel=1e-4)
    loss = pose_free.depth_loss(pred, batch)
    loss.backward()
    assert float(model.head[-1].weight.grad[model._slices()["depth"]].abs().sum()) > 0
    with pytest.raises(KeyError, match="context_depths"):
        pose_free.depth_loss(pred, {k: v for k, v in batch.items() if k != "context_depths"})


@settings(max_examples=20, deadline=None)
@given(scale=st.floats(0.2, 5.0), lam=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_scale_invariant_depth_loss(depth_batch, scale, lam, seed):
    """λ = 1 ignores a per-view scale of the depths, λ = 0 is the absolute error, and a
    uniformly scaled map scores (1 − λ)|log s| (invalid pixels left out); against a direct
    per-view computation for random depths."""
    gt = depth_batch["context_depths"].double().clone()
    gt[0, 0, :2] = 0.0
    gt[0, 1, -1] = float("inf")
    batch = dict(depth_batch, context_depths=gt)
    g = torch.Generator().manual_seed(seed)
    depth = gt.clamp(0.5, 20.0) * torch.exp(0.3 * torch.randn(gt.shape, generator=g, dtype=torch.float64))
    per_view = scale * torch.exp(torch.randn(gt.shape[:2], generator=g, dtype=torch.float64))[..., None, None]

    def loss(d, invariance):
        return float(pose_free.depth_loss(pose_free.PoseFreeOutput({}, {}, d), batch, invariance))

    assert loss(per_view * depth, 1.0) == pytest.approx(loss(depth, 1.0), rel=1e-9, abs=1e-12)
    flat = torch.where(torch.isfinite(gt) & (gt > 0), gt, torch.ones_like(gt))
    assert loss(scale * flat, lam) == pytest.approx((1 - lam) * abs(math.log(scale)), rel=1e-9, abs=1e-12)
    valid = torch.isfinite(gt) & (gt > 0)
    r = torch.log(depth) - torch.log(flat)
    want = sum(float((r[0, v][valid[0, v]] - lam * r[0, v][valid[0, v]].mean()).abs().sum())
               for v in range(gt.shape[1])) / float(valid.sum())
    assert loss(depth, lam) == pytest.approx(want, rel=1e-9)


def test_scale_invariance_option_is_checked_and_reaches_the_loss(root, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="depth_supervision_scale_invariance"):
        pose_free.PoseFreeModel(feature_channels=8, hidden_channels=8, depth_supervision_scale_invariance=1.5)
    seen, depth_loss = [], pose_free.depth_loss

    def recording(pred, batch, scale_invariance=0.0):
        seen.append(scale_invariance)
        return depth_loss(pred, batch, scale_invariance)

    monkeypatch.setattr(pose_free, "depth_loss", recording)
    for name, lam in (("plain", 0.0), ("invariant", 0.75)):
        train(compose_config(tiny_pose_free_overrides(root, tmp_path / name, "zero_shot")
                             + ["model.depth_supervision=1", f"model.depth_supervision_scale_invariance={lam}"]))
    assert seen == [0.0, 0.75]


def test_training_with_depth_supervision_loads_depth(root, tmp_path):
    def run(name, extra):
        return train(compose_config(tiny_pose_free_overrides(root, tmp_path / name, "zero_shot") + extra))

    off, on = run("off", []), run("on", ["model.depth_supervision=1"])
    assert math.isfinite(on["last"]["loss"]) and on["last"]["loss"] > off["last"]["loss"]
    with pytest.raises(ValueError, match=r"depth_supervision: expected a finite number >= 0, got -1$"):
        run("bad", ["model.depth_supervision=-1"])


def test_tto_sweep_script_runs_with_predicted_and_ground_truth_depths(root, tmp_path):
    from examples.diff3r import pose_free_tto_sweep

    def run(name, extra):
        return train(compose_config(tiny_pose_free_overrides(root, tmp_path / name, "zero_shot") + extra))

    camera = run("camera", ["model.attach=camera"])["checkpoint"]
    args = [str(camera), "--max-scenes", "1", "--config", "1,2", "--config", "10,2,5"]
    outs = {}
    for extra in ([], ["--gt-depth"], ["--gt-depth-scale"], ["--naive"]):
        out = outs[" ".join(extra)] = pose_free_tto_sweep.main(args + extra)
        assert set(out) == {"1,2", "10,2,5"}
        assert all(math.isfinite(v) for r in out.values() for k, v in r.items() if k != "rot_diff_se")
    # the same Θ0 poses; other Gaussians (ground-truth depths) or Λ (naive): other Θ*
    assert outs["--gt-depth"]["1,2"]["rot_before"] == outs[""]["1,2"]["rot_before"]
    assert outs["--gt-depth"]["1,2"]["rot_after"] != outs[""]["1,2"]["rot_after"]
    assert outs["--gt-depth-scale"]["1,2"]["rot_before"] == outs[""]["1,2"]["rot_before"]
    assert outs["--gt-depth-scale"]["1,2"]["rot_after"] != outs["--gt-depth"]["1,2"]["rot_after"]
    with pytest.raises(SystemExit):  # argparse: not allowed with
        pose_free_tto_sweep.main(args + ["--gt-depth", "--gt-depth-scale"])
    assert outs["--naive"]["1,2"]["rot_after"] != outs[""]["1,2"]["rot_after"]
    world = run("world", [])["checkpoint"]
    for option in ("--gt-depth", "--gt-depth-scale"):
        with pytest.raises(ValueError, match=f"{option} needs a model.attach=camera"):
            pose_free_tto_sweep.main([str(world), "--config", "1,2", option])
    for bad in ("10", "0,20", "10,x", "10,20,-1"):
        with pytest.raises(ValueError, match=rf"--config: expected UNIT.*got '{bad}'"):
            pose_free_tto_sweep.parse_config(bad)
    assert pose_free_tto_sweep.parse_config("10,60,100") == (10.0, 60, 100.0)


def test_sweep_depth_helpers_scale_only_and_back_projection():
    from examples.diff3r import pose_free_tto_sweep as sweep

    g = torch.Generator().manual_seed(0)
    B, V, H_, W_ = 2, 3, 5, 4
    pred = 1.0 + 4.0 * torch.rand(B, V, H_, W_, generator=g, dtype=torch.float64)
    shape = torch.exp(0.3 * torch.randn(B, V, H_, W_, generator=g, dtype=torch.float64))  # not the predicted shape
    true = pred * shape * torch.tensor([[0.5, 2.0, 3.0], [1.0, 0.25, 7.0]], dtype=torch.float64)[..., None, None]
    true[0, 1, 0, :3] = 0.0  # invalid pixels: left out of the median
    true[1, 2, 4, :2] = float("inf")
    out = sweep.scale_corrected_depths(pred, true)
    ratio = (out / pred).flatten(2)
    # the predicted shape: one factor per view; the true scale: median true / out = 1 over the valid pixels
    assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-12)
    valid = torch.isfinite(true) & (true > 0)
    for b in range(B):
        for v in range(V):
            r = true[b, v][valid[b, v]] / out[b, v][valid[b, v]]
            assert float(r.median()) == pytest.approx(1.0, rel=1e-12)
    # depths off by a constant per view: the truth recovered exactly
    exact = pred * torch.tensor([[0.5, 2.0, 3.0], [1.0, 0.25, 7.0]], dtype=torch.float64)[..., None, None]
    assert torch.allclose(sweep.scale_corrected_depths(pred, exact), exact, rtol=1e-12)
    bad = true.clone()
    bad[1, 0] = 0.0
    with pytest.raises(ValueError, match="without a valid ground-truth depth"):
        sweep.scale_corrected_depths(pred, bad)
    # camera_means: pixel centers at z = depth, projecting back to themselves
    K = torch.tensor([[0.9, 0.0, 0.5], [0.0, 1.1, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
    Ks = K.expand(B, V, 3, 3)
    means = sweep.camera_means(out, Ks).reshape(B, V, H_, W_, 3)
    assert torch.allclose(means[..., 2], out, rtol=1e-12)
    pix = means @ (K * K.new_tensor([float(W_), float(H_), 1.0])[:, None]).T
    assert torch.allclose(pix[..., 0] / pix[..., 2], torch.arange(W_, dtype=torch.float64) + 0.5)
    assert torch.allclose(pix[..., 1] / pix[..., 2], torch.arange(H_, dtype=torch.float64)[:, None] + 0.5)
    batch = {"context_depths": true.clamp(max=10.0), "context_intrinsics": Ks}
    assert torch.equal(sweep.gt_depth_means(batch, pred.shape), sweep.camera_means(batch["context_depths"], Ks))
