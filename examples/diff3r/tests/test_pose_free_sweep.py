"""The pose-free model's two-stage depth (``model.depth_source=sweep``): the predicted
poses first, then a plane-sweep cost volume of each view against the other views with
those poses. Shapes for 2 and 4 views; on a generated textured plane the sweep with
the true pose peaks at the plane's depth, and with a wrong pose it does not; the
volume is the mean of ``model.py``'s pairwise sweep over the other views; gradients
reach the encoder and (unless detached) the pose head, through the layer too; the
option off is the model without it; the config passes and checks the options."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difftto.problems.splatting.se3 import se3_exp, se3_log
from examples.diff3r import pose_free
from examples.diff3r.model import pixel_rays, sweep_correlation
from examples.diff3r.pose_free_depth_errors import depth_errors, true_sweep_pose
from examples.diff3r.testing import (
    TINY_POSE_FREE,
    TINY_POSE_FREE_TTO,
    random_pose_free_inputs,
    tiny_dataset,
    tiny_pose_free_batch,
)
from examples.diff3r.train import build_model, compose_config

SWEEP = {**TINY_POSE_FREE, "depth_source": "sweep", "depth_candidates": 8}


def _rot_y(deg: float) -> torch.Tensor:
    a = math.radians(deg)
    return torch.tensor([[math.cos(a), 0.0, math.sin(a)], [0.0, 1.0, 0.0], [-math.sin(a), 0.0, math.cos(a)]],
                        dtype=torch.float64)


def _plane_scene(depth: float, c2w1: torch.Tensor, size: int, focal: float, seed: int, channels: int = 8):
    """Two views of the fronto-parallel plane ``z = depth`` (view 0's frame, view 0 the
    identity camera, view 1 at ``c2w1``), textured by a smooth random feature field on
    the plane (sums of sinusoids with periods of 3–8 pixels at the plane's depth),
    sampled exactly at the pixel centers and normalized per pixel. Returns features
    ``[1, 2, C, H, W]``, pixel intrinsics ``[1, 2, 3, 3]``, ``c2w [1, 2, 4, 4]`` and view 0's
    pixels whose true match lies inside view 1 by a margin of 1.5 px ``[H, W]``."""
    g = torch.Generator().manual_seed(seed)
    n = 4
    angles = torch.rand(channels, n, generator=g, dtype=torch.float64) * 2 * math.pi
    periods = (3 + 5 * torch.rand(channels, n, generator=g, dtype=torch.float64)) * depth / focal  # world units
    phases = torch.rand(channels, n, generator=g, dtype=torch.float64) * 2 * math.pi
    dirs = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1) * (2 * math.pi / periods)[..., None]

    K = torch.tensor([[focal, 0.0, size / 2], [0.0, focal, size / 2], [0.0, 0.0, 1.0]], dtype=torch.float64)
    c2w = torch.stack([torch.eye(4, dtype=torch.float64), c2w1])
    v, u = torch.meshgrid(torch.arange(size, dtype=torch.float64) + 0.5,
                          torch.arange(size, dtype=torch.float64) + 0.5, indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1)
    feats = []
    for cam in c2w:
        ray = pix @ torch.linalg.inv(K).T @ cam[:3, :3].T  # world directions
        lam = (depth - cam[2, 3]) / ray[..., 2]
        X = cam[:3, 3] + lam[..., None] * ray  # on the plane
        arg = torch.einsum("cnk,hwk->chwn", dirs, X[..., :2]) + phases[:, None, None, :]
        f = torch.sin(arg).sum(-1)  # [C, H, W]
        feats.append(f / f.norm(dim=0, keepdim=True))
    # view 0's points on the plane, projected into view 1
    X0 = (pix @ torch.linalg.inv(K).T) * depth
    w2c1 = torch.linalg.inv(c2w1)
    Y = X0 @ w2c1[:3, :3].T + w2c1[:3, 3]
    uv = (Y @ K.T)[..., :2] / Y[..., 2:3]
    inside = (Y[..., 2] > 0) & (uv >= 1.5).all(-1) & (uv <= size - 1.5).all(-1)
    return torch.stack(feats)[None], K.expand(1, 2, 3, 3), c2w[None], inside


@settings(max_examples=20, deadline=None)
@given(k=st.integers(3, 9), seed=st.integers(0, 2**16), baseline=st.floats(0.25, 0.5),
       lift=st.floats(-0.1, 0.1), yaw=st.floats(-3.0, 3.0))
def test_sweep_with_the_true_pose_peaks_at_the_plane_depth(k, seed, baseline, lift, yaw):
    """The plane ``z = 1/inv_k`` (one of the sweep's candidates) seen by two views. With
    the true pose the sweep's best candidate is within one of the plane's, ``k``, on
    ≥ 90% of view 0's pixels whose match is inside view 1 (neighbouring candidates are
    0.4–0.7 px of disparity apart, the texture bilinear between pixel centers); with
    the translation reversed (a wrong pose: the epipolar search goes the other way) on
    at most half of them, and its mean error in candidates is larger."""
    size, focal, D = 24, 24.0, 16
    model = pose_free.PoseFreeModel(**TINY_POSE_FREE, depth_source="sweep", depth_candidates=D)
    near, far = torch.full((1, 2), 1.0, dtype=torch.float64), torch.full((1, 2), 10.0, dtype=torch.float64)
    inv = 1.0 + (k / (D - 1)) * (0.1 - 1.0)
    depth = 1.0 / inv
    c2w1 = torch.eye(4, dtype=torch.float64)
    c2w1[:3, :3] = _rot_y(yaw)
    c2w1[:3, 3] = torch.tensor([baseline, lift, 0.05], dtype=torch.float64)
    feats, K, c2w, inside = _plane_scene(depth, c2w1, size, focal, seed)
    assert int(inside.sum()) >= 50

    true_pose = se3_log(torch.linalg.inv(c2w))  # [1, 2, 6], view 0: zero
    wrong_c2w = c2w.clone()
    wrong_c2w[:, 1, :3, 3] = -c2w[:, 1, :3, 3]
    wrong_pose = se3_log(torch.linalg.inv(wrong_c2w))
    results = {}
    for name, pose in (("true", true_pose), ("wrong", wrong_pose)):
        cost, inv_cand = model.sweep(feats, K, pose, near, far)
        assert cost.shape == (1, 2, D, size, size)
        assert math.isclose(float(inv_cand[0, 0, k]), inv, rel_tol=1e-9)
        best = cost[0, 0].argmax(dim=0)[inside]
        results[name] = (float(((best - k).abs() <= 1).double().mean()), float((best - k).abs().double().mean()))
    assert results["true"][0] >= 0.9, results
    assert results["wrong"][0] <= 0.5, results
    assert results["wrong"][1] > 2 * results["true"][1], results


@pytest.mark.parametrize("V", [2, 4])
def test_sweep_is_the_mean_of_the_pairwise_sweeps_over_the_other_views(V):
    """``sweep`` = the mean over ``u ≠ v`` of ``model.py``'s pairwise
    ``sweep_correlation`` with the poses' cameras (``c2w = exp(−ξ)``); 2 views: the
    pose-given model's single partner."""
    torch.manual_seed(V)
    B, C, H, W, D = 2, 5, 7, 9, 6
    model = pose_free.PoseFreeModel(**TINY_POSE_FREE, depth_source="sweep", depth_candidates=D)
    feats = torch.randn(B, V, C, H, W, dtype=torch.float64)
    K = torch.tensor([[9.0, 0.0, 4.5], [0.0, 9.0, 3.5], [0.0, 0.0, 1.0]], dtype=torch.float64).expand(B, V, 3, 3)
    pose = torch.cat([torch.zeros(B, 1, 6, dtype=torch.float64), 0.2 * torch.randn(B, V - 1, 6, dtype=torch.float64)],
                     dim=1)
    near, far = torch.full((B, V), 1.0, dtype=torch.float64), torch.full((B, V), 8.0, dtype=torch.float64)
    cost, inv_cand = model.sweep(feats, K, pose, near, far)
    assert cost.shape == (B, V, D, H, W) and inv_cand.shape == (B, V, D)
    torch.testing.assert_close(inv_cand[..., 0], 1.0 / near)
    torch.testing.assert_close(inv_cand[..., -1], 1.0 / far)
    c2w, w2c = se3_exp(-pose), se3_exp(pose)
    dirs = pixel_rays(K, c2w, H, W)
    expected = torch.zeros_like(cost)
    for v in range(V):
        for u in range(V):
            if u == v:
                continue
            pair = sweep_correlation(feats[:, v:v + 1], feats[:, u:u + 1], dirs[:, v:v + 1], c2w[:, v:v + 1, :3, 3],
                                     1.0 / inv_cand[:, v:v + 1], K[:, u:u + 1], w2c[:, u:u + 1])
            expected[:, v] += pair[:, 0] / (V - 1)
    torch.testing.assert_close(cost, expected)


@pytest.mark.parametrize("V", [2, 4])
def test_sweep_model_shapes_and_its_initial_depth(V):
    """Outputs for 2 and 4 views: shapes and finiteness as the monocular model's; the
    head reads ``D + 1`` more channels (the distribution and its mean); at
    initialization (cost refinement and the head's depth output near 0) the depth is
    the sweep's: within the candidates' range."""
    torch.manual_seed(0)
    model = pose_free.PoseFreeModel(**SWEEP)
    f, D = TINY_POSE_FREE["feature_channels"], SWEEP["depth_candidates"]
    assert model.head[0].in_channels == 3 + 3 * f + D + 1
    assert model.cost_refine[0].in_channels == D + f and model.cost_refine[-1].out_channels == D
    B, H, W = 2, 12, 12
    images, K, near, far = random_pose_free_inputs(B, V, H, W)
    out = model(images, K, near, far)
    assert out.depth.shape == (B, V, H, W)
    assert out.theta["means"].shape == (B, V * H * W, 3) and out.theta["pose"].shape == (B, V, 6)
    assert out.lam["pose"].shape == (B, V) and all(out.lam[g].shape == (B, V * H * W)
                                                    for g in pose_free.GAUSSIAN_GROUPS)
    assert all(bool(torch.isfinite(t).all()) for t in (*out.theta.values(), *out.lam.values(), out.depth))
    depth = out.depth.detach()
    assert float(depth.min()) >= 1.0 * math.exp(-0.01) and float(depth.max()) <= 10.0 * math.exp(0.01)
    assert bool((out.theta["pose"][:, 0] == 0).all())


@pytest.mark.parametrize("pose_gradient", [True, False])
def test_gradients_reach_the_encoder_and_the_pose_head_unless_detached(pose_gradient):
    """A loss on the depths alone reaches the encoder and the cost refinement; it
    reaches the pose head (through the sweep's cameras) only with
    ``sweep_pose_gradient=True``. The poses' own outputs are the same either way."""
    torch.manual_seed(0)
    model = pose_free.PoseFreeModel(**SWEEP, sweep_pose_gradient=pose_gradient)
    with torch.no_grad():  # non-trivial poses and a cost refinement that is not zero
        model.pose_out.bias[:6] = torch.tensor([0.3, -0.2, 0.1, 0.05, -0.04, 0.03])
        torch.nn.init.normal_(model.cost_refine[-1].weight, std=0.1)
    images, K, near, far = random_pose_free_inputs(2, 3)
    out = model(images, K, near, far)
    torch.log(out.depth).square().mean().backward()
    for name, p in model.encoder.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert float(model.encoder.stem.weight.grad.abs().sum()) > 0
    assert float(model.cost_refine[0].weight.grad.abs().sum()) > 0
    head = [p.grad for p in (*model.pose_net.parameters(), *model.pose_out.parameters())]
    if pose_gradient:
        assert float(model.pose_out.weight.grad[:6].abs().sum()) > 0
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in head)
    else:
        assert all(g is None or float(g.abs().sum()) == 0 for g in head)


@pytest.mark.filterwarnings("ignore::difftto.solvers.LinearSolveWarning")
def test_pipeline_through_the_layer_reaches_encoder_and_pose_head(tmp_path):
    """The TTO pipeline on a real batch with the sweep: a render loss backpropagated
    through the layer reaches the encoder, the cost refinement and the pose head."""
    batch = tiny_pose_free_batch(tiny_dataset(tmp_path / "data"))
    torch.manual_seed(0)
    model = pose_free.PoseFreeModel(**SWEEP)
    out = pose_free.run_pipeline(model, batch, pose_free.build_layer(TINY_POSE_FREE_TTO))
    (out.render - batch["target_images"]).square().mean().backward()
    for p in (model.encoder.stem.weight, model.cost_refine[-1].weight, model.pose_out.weight):
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and float(p.grad.abs().sum()) > 0


def test_sweep_pose_replaces_the_predicted_poses_in_the_sweep_only(tmp_path):
    """``sweep_pose`` (e.g. the true poses) changes the depths, not the returned poses
    or Λ_pose; the true poses as twists give view 0 the identity; the depth errors of
    a depth map against itself are 0, against a scaled copy 0 in shape only."""
    batch = tiny_pose_free_batch(tiny_dataset(tmp_path / "data"))
    torch.manual_seed(0)
    model = pose_free.PoseFreeModel(**SWEEP)
    with torch.no_grad():
        model.pose_out.bias[:6] = torch.tensor([0.3, -0.2, 0.1, 0.05, -0.04, 0.03])
        pred = pose_free.predict(model, batch)
        true = true_sweep_pose(batch)
        torch.testing.assert_close(true[:, 0], torch.zeros_like(true[:, 0]), atol=1e-5, rtol=0)
        with_true = model(batch["context_images"], batch["context_intrinsics"], batch["context_near"],
                          batch["context_far"], sweep_pose=true)
    assert torch.equal(with_true.theta["pose"], pred.theta["pose"]) and torch.equal(with_true.lam["pose"],
                                                                                     pred.lam["pose"])
    assert not torch.equal(with_true.depth, pred.depth)
    d = pred.depth[0]
    same, scaled = depth_errors(d, d), depth_errors(2.0 * d, d)
    assert same["relative"] == 0 and same["shape"] == 0 and same["shape_view"] == 0
    assert math.isclose(scaled["relative"], 1.0, rel_tol=1e-9) and scaled["shape"] < 1e-12
    with pytest.raises(ValueError, match=r"sweep_pose: expected shape"):
        model(batch["context_images"], batch["context_intrinsics"], batch["context_near"], batch["context_far"],
              sweep_pose=true[:, :1])
    mono = pose_free.PoseFreeModel(**TINY_POSE_FREE)
    with pytest.raises(ValueError, match=r"sweep_pose: given to a model without the sweep"):
        mono(batch["context_images"], batch["context_intrinsics"], batch["context_near"], batch["context_far"],
             sweep_pose=true)


def test_monocular_is_the_model_without_the_option():
    """``depth_source="monocular"`` (the default; the sweep's other options then unused):
    the same parameters (no cost refinement, the head's input as before) and, from the
    same seed, the same outputs and gradients as the model built without the options."""
    images, K, near, far = random_pose_free_inputs(2, 3)
    outs = []
    for kwargs in ({}, {"depth_source": "monocular", "depth_candidates": 5, "sweep_depth_refine": 0.1,
                        "sweep_pose_gradient": False}):
        torch.manual_seed(3)
        model = pose_free.PoseFreeModel(**TINY_POSE_FREE, **kwargs)
        out = model(images, K, near, far)
        (torch.log(out.depth).square().mean() + out.theta["pose"].square().sum()).backward()
        outs.append((out, model.state_dict(), {n: p.grad for n, p in model.named_parameters()}))
    (a, state_a, grad_a), (b, state_b, grad_b) = outs
    assert list(state_a) == list(state_b) and not any(k.startswith("cost_refine") for k in state_a)
    f = TINY_POSE_FREE["feature_channels"]
    assert state_a["head.0.weight"].shape[1] == 3 + 3 * f
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    for g in a.theta:
        assert torch.equal(a.theta[g], b.theta[g]), g
        assert torch.equal(a.lam[g], b.lam[g]), g
    assert torch.equal(a.depth, b.depth)
    assert all(torch.equal(grad_a[n], grad_b[n]) for n in grad_a if grad_a[n] is not None)


def test_config_passes_the_options_and_the_preset_is_monocular():
    cfg = compose_config(["model=pose_free"])
    assert cfg.model.depth_source == "monocular" and cfg.model.sweep_pose_gradient is True
    assert build_model(cfg.model).depth_source == "monocular"
    cfg = compose_config(["model=pose_free", "model.depth_source=sweep", "model.depth_candidates=6",
                          "model.sweep_pose_gradient=false", "model.feature_channels=8", "model.hidden_channels=8"])
    model = build_model(cfg.model)
    assert model.depth_source == "sweep" and model.depth_candidates == 6 and model.sweep_pose_gradient is False
    assert model.head[0].in_channels == 3 + 3 * 8 + 7
    assert model.sweep_training_poses == "predicted"
    cfg = compose_config(["model=pose_free", "model.depth_source=sweep", "model.sweep_training_poses=ground_truth"])
    assert build_model(cfg.model).sweep_training_poses == "ground_truth"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"depth_source": "stereo"}, r"depth_source: expected one of 'monocular', 'sweep', got 'stereo'"),
    ({"depth_source": "sweep", "depth_candidates": 1}, r"depth_candidates: expected an integer >= 2, got 1"),
    ({"depth_source": "sweep", "depth_candidates": 4.0}, r"depth_candidates: expected an integer >= 2, got 4.0"),
    ({"depth_source": "sweep", "pose_estimator": "procrustes"}, r"depth_source='sweep' needs pose_estimator='head'"),
    ({"depth_source": "sweep", "sweep_pose_gradient": 1}, r"sweep_pose_gradient: expected true or false, got 1"),
    ({"depth_source": "sweep", "sweep_depth_refine": -0.1}, r"sweep_depth_refine: expected a finite number >= 0"),
])
def test_bad_options_are_rejected_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pose_free.PoseFreeModel(**TINY_POSE_FREE, **kwargs)


@settings(max_examples=20, deadline=None)
@given(baseline=st.floats(0.1, 1.0), near_depth=st.floats(1.0, 3.0), far_depth=st.floats(3.5, 8.0))
def test_shape_parallax_of_a_two_depth_scene(baseline, near_depth, far_depth):
    """Two fronto-parallel views ``baseline`` apart along x, view 0's depth map
    ``near_depth`` on fewer than half of its columns (on the right, which view 1, to the
    right, still sees) and ``far_depth`` elsewhere (the median): a pixel at depth ``z``
    moves by ``f · b · |1/z − 1/z_med|`` against the median depth, 0 at the median. A
    constant depth map's shape error is the true depths' spread about their median."""
    from examples.diff3r.pose_free_depth_errors import shape_parallax

    H, W, f = 6, 16, 8.0
    depth = torch.full((1, 2, H, W), far_depth, dtype=torch.float64)
    depth[0, 0, :, W // 2 + 1:] = near_depth  # fewer than half: the median is far_depth
    c2w = torch.eye(4, dtype=torch.float64).repeat(1, 2, 1, 1)
    c2w[0, 1, 0, 3] = baseline
    K = torch.tensor([[f / W, 0.0, 0.5], [0.0, f / H, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64).expand(1, 2, 3, 3)
    batch = {"context_depths": depth, "context_extrinsics": c2w, "context_intrinsics": K}
    x = shape_parallax(batch)
    expected = f * baseline * abs(1 / near_depth - 1 / far_depth)
    near_px = x[x > 1e-9]
    assert near_px.numel() > 0
    torch.testing.assert_close(near_px, torch.full_like(near_px, expected))
    errs = depth_errors(torch.ones_like(depth[0]), depth[0])
    log_d = torch.log(depth[0])
    assert math.isclose(errs["shape"], float((log_d - log_d.median()).abs().mean()), rel_tol=1e-9)


def test_teacher_forced_sweep_uses_the_true_poses_in_training_only(tmp_path):
    """``sweep_training_poses="ground_truth"``: in training mode ``predict`` gives the sweep the
    batch's true context poses (the depths equal the model's with ``sweep_pose`` = the
    true twists), in eval mode the predicted ones; the returned poses are the predicted
    ones either way."""
    batch = tiny_pose_free_batch(tiny_dataset(tmp_path / "data"))
    torch.manual_seed(0)
    model = pose_free.PoseFreeModel(**SWEEP, sweep_training_poses="ground_truth")
    with torch.no_grad():
        model.pose_out.bias[:6] = torch.tensor([0.3, -0.2, 0.1, 0.05, -0.04, 0.03])
        args = (batch["context_images"], batch["context_intrinsics"], batch["context_near"], batch["context_far"])
        train_pred = pose_free.predict(model.train(), batch)
        forced = model(*args, sweep_pose=true_sweep_pose(batch))
        eval_pred = pose_free.predict(model.eval(), batch)
        own = model(*args)
    assert torch.equal(train_pred.depth, forced.depth) and torch.equal(eval_pred.depth, own.depth)
    assert not torch.equal(train_pred.depth, eval_pred.depth)
    assert torch.equal(train_pred.theta["pose"], eval_pred.theta["pose"])
    with pytest.raises(ValueError, match=r"sweep_training_poses: expected 'predicted' or 'ground_truth', got True"):
        pose_free.PoseFreeModel(**SWEEP, sweep_training_poses=True)


@settings(max_examples=20, deadline=None)
@given(baseline=st.floats(0.2, 1.0), scale=st.floats(0.3, 3.0), yaw=st.floats(0.5, 3.0))
def test_pose_reprojection_error_ignores_the_translation_scale(baseline, scale, yaw):
    """The true relative pose, or its translation scaled by any factor (a scale error
    only rescales the depths), reprojects every seen pixel exactly (0 px); a yaw error
    of ``yaw``° moves the pixels near the image center by about ``f · tan(yaw)``."""
    from examples.diff3r.pose_free_depth_errors import pose_reprojection_error

    H, W, f = 8, 8, 8.0
    depth = torch.full((1, 2, H, W), 4.0, dtype=torch.float64)
    c2w = torch.eye(4, dtype=torch.float64).repeat(1, 2, 1, 1)
    c2w[0, 1, 0, 3] = baseline
    K = torch.tensor([[f / W, 0.0, 0.5], [0.0, f / H, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64).expand(1, 2, 3, 3)
    batch = {"context_depths": depth, "context_extrinsics": c2w, "context_intrinsics": K}
    true = se3_log(torch.linalg.inv(c2w))
    scaled = true.clone()
    scaled[..., :3] *= scale  # the twist's translation part: exp scales the translation with it
    for pose in (true, scaled):
        x = pose_reprojection_error(batch, pose)
        assert x.numel() > 0 and float(x.abs().max()) < 1e-9
    wrong_c2w = c2w.clone()
    wrong_c2w[0, 1, :3, :3] = _rot_y(yaw)
    x = pose_reprojection_error(batch, se3_log(torch.linalg.inv(wrong_c2w)))
    assert float(x.median()) == pytest.approx(f * math.tan(math.radians(yaw)), rel=0.25)
