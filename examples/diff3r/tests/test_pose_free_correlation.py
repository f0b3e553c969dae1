"""The pose-free model's local correlation volume (``model.correlation_radius``): the
correlation of a feature map with a shifted copy peaks at the shift, its shapes for 2
and 4 views, the model runs with it and trains its encoder through it, radius 0 is the
model without it, and the config checks and passes the option."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.diff3r import pose_free
from examples.diff3r.testing import (
    TINY_POSE_FREE,
    TINY_POSE_FREE_TTO,
    random_pose_free_inputs,
    tiny_dataset,
    tiny_pose_free_batch,
)
from examples.diff3r.train import build_model, compose_config


def _channel(dx: int, dy: int, r: int) -> int:
    return (dy + r) * (2 * r + 1) + (dx + r)


@settings(max_examples=30, deadline=None)
@given(r=st.integers(1, 3), data=st.data(), seed=st.integers(0, 2**16))
def test_correlation_with_a_shifted_copy_peaks_at_the_shift(r, data, seed):
    """View 1 is view 0 moved by ``(dx, dy)``: ``f_1(p + d) = f_0(p)``. Wherever
    ``p + d`` is inside the image, view 0's correlation is 1 at ``d`` and lower at every
    other displacement; view 1's peaks at ``−d`` likewise."""
    dx, dy = data.draw(st.integers(-r, r)), data.draw(st.integers(-r, r))
    H, W = 9, 11
    f0 = torch.randn(1, 1, 6, H, W, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    f1 = torch.roll(f0, shifts=(dy, dx), dims=(-2, -1))
    corr = pose_free.local_correlation(torch.cat([f0, f1], dim=1), r)  # [1, 2, (2r+1)², H, W]
    assert corr.shape == (1, 2, (2 * r + 1) ** 2, H, W)
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    inside0 = (ys + dy >= 0) & (ys + dy < H) & (xs + dx >= 0) & (xs + dx < W)  # p + d in view 1
    inside1 = (ys - dy >= 0) & (ys - dy < H) & (xs - dx >= 0) & (xs - dx < W)  # p − d in view 0
    for view, (sx, sy), inside in ((0, (dx, dy), inside0), (1, (-dx, -dy), inside1)):
        c = _channel(sx, sy, r)
        peak = corr[0, view, c][inside]
        torch.testing.assert_close(peak, torch.ones_like(peak))
        assert bool((corr[0, view].argmax(dim=0)[inside] == c).all())
        others = torch.cat([corr[0, view, :c], corr[0, view, c + 1:]])[:, inside]
        assert float(others.max()) < 1 - 1e-6


@pytest.mark.parametrize("V", [2, 4])
def test_correlation_shapes_and_mean_over_the_other_views(V):
    """``[B, V, (2r+1)², H, W]``, the mean over ``u ≠ v`` of the pairwise volume
    ``[B, V, V, (2r+1)², H, W]``; a view against itself is 1 at zero displacement;
    cosines lie in [−1, 1] and are 0 outside the image."""
    B, C, H, W, r = 2, 5, 7, 8, 2
    feats = torch.randn(B, V, C, H, W, generator=torch.Generator().manual_seed(V))
    pair = pose_free.local_correlation(feats, r, pairwise=True)
    mean = pose_free.local_correlation(feats, r)
    assert pair.shape == (B, V, V, (2 * r + 1) ** 2, H, W)
    assert mean.shape == (B, V, (2 * r + 1) ** 2, H, W)
    for v in range(V):
        expected = torch.stack([pair[:, v, u] for u in range(V) if u != v]).mean(dim=0)
        torch.testing.assert_close(mean[:, v], expected)
        torch.testing.assert_close(pair[:, v, v, _channel(0, 0, r)], torch.ones(B, H, W))
    assert float(pair.abs().max()) <= 1 + 1e-6
    assert bool((pair[..., _channel(-r, -r, r), 0, 0] == 0).all())  # top-left pixel, displaced up-left: outside


def test_correlation_gradcheck_and_radius_zero():
    feats = torch.randn(1, 2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: pose_free.local_correlation(f, 1), (feats,))
    zero = pose_free.local_correlation(feats, 0)  # the same pixel only: the cosine of the two views
    assert zero.shape == (1, 2, 1, 4, 5)
    cos = torch.nn.functional.cosine_similarity(feats[:, 0], feats[:, 1], dim=1)
    torch.testing.assert_close(zero[:, 0, 0], cos)


@pytest.mark.parametrize("V", [2, 4])
@pytest.mark.parametrize("estimator", ["head", "procrustes"])
def test_model_runs_with_correlation_and_its_gradient_reaches_the_encoder(V, estimator):
    """With ``correlation_radius = 2``: the outputs' shapes, finite; the first convs take
    the 25 extra channels; a loss on depth and pose reaches the encoder, and the head's
    and the pose net's correlation input weights."""
    torch.manual_seed(0)
    r, c = 2, 25
    model = pose_free.PoseFreeModel(**TINY_POSE_FREE, pose_estimator=estimator, correlation_radius=r)
    f = TINY_POSE_FREE["feature_channels"]
    assert model.head[0].in_channels == 3 + 3 * f + c
    assert model.pose_net[0].in_channels == 2 * (3 + f) + c
    B, H, W = 2, 12, 12
    images, K, near, far = random_pose_free_inputs(B, V, H, W)
    out = model(images, K, near, far)
    assert out.depth.shape == (B, V, H, W)
    assert out.theta["means"].shape == (B, V * H * W, 3) and out.theta["pose"].shape == (B, V, 6)
    assert all(bool(torch.isfinite(t).all()) for t in (*out.theta.values(), *out.lam.values(), out.depth))
    (torch.log(out.depth).square().mean() + out.theta["pose"][:, 1:].square().sum()).backward()
    for name, p in model.encoder.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert float(model.encoder.stem.weight.grad.abs().sum()) > 0
    assert float(model.head[0].weight.grad[:, -c:].abs().sum()) > 0  # the correlation channels are read
    if estimator == "head":
        assert float(model.pose_net[0].weight.grad[:, -c:].abs().sum()) > 0


@pytest.mark.filterwarnings("ignore::difftto.solvers.LinearSolveWarning")
def test_pipeline_through_the_layer_with_correlation(tmp_path):
    """The TTO pipeline on a real batch with ``correlation_radius = 1``: a render loss
    backpropagated through the layer reaches the encoder."""
    batch = tiny_pose_free_batch(tiny_dataset(tmp_path / "data"))
    torch.manual_seed(0)
    model = pose_free.PoseFreeModel(**TINY_POSE_FREE, correlation_radius=1)
    out = pose_free.run_pipeline(model, batch, pose_free.build_layer(TINY_POSE_FREE_TTO))
    (out.render - batch["target_images"]).square().mean().backward()
    grad = model.encoder.stem.weight.grad
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def test_radius_zero_is_the_model_without_correlation():
    """``correlation_radius=0`` (the default): the same parameters and, from the same
    seed, the same outputs as the model built without the option; its head reads
    ``[image, f_v, f_0, mean f]`` only."""
    images, K, near, far = random_pose_free_inputs(2, 3)
    outs = []
    for kwargs in ({}, {"correlation_radius": 0}):
        torch.manual_seed(3)
        model = pose_free.PoseFreeModel(**TINY_POSE_FREE, **kwargs)
        assert model.correlation_radius == 0
        outs.append((model(images, K, near, far), {k: v.shape for k, v in model.state_dict().items()}))
    (a, shapes_a), (b, shapes_b) = outs
    assert shapes_a == shapes_b
    f = TINY_POSE_FREE["feature_channels"]
    assert shapes_a["head.0.weight"][1] == 3 + 3 * f and shapes_a["pose_net.0.weight"][1] == 2 * (3 + f)
    for g in a.theta:
        assert torch.equal(a.theta[g], b.theta[g]), g
        assert torch.equal(a.lam[g], b.lam[g]), g
    assert torch.equal(a.depth, b.depth)


@pytest.mark.parametrize("value", [-1, 1.5, "2", True, None])
def test_bad_radius_is_rejected_naming_it(value):
    with pytest.raises(ValueError, match=rf"correlation_radius: expected an integer >= 0, got {value!r}"):
        pose_free.PoseFreeModel(**TINY_POSE_FREE, correlation_radius=value)
    with pytest.raises(ValueError, match=r"radius: expected an integer >= 0"):
        pose_free.local_correlation(torch.zeros(1, 2, 3, 4, 4), value)


def test_config_passes_the_radius_and_the_preset_is_off():
    cfg = compose_config(["model=pose_free"])
    assert cfg.model.correlation_radius == 0  # the preset: off
    assert build_model(cfg.model).correlation_radius == 0
    cfg = compose_config(["model=pose_free", "model.correlation_radius=3", "model.feature_channels=8",
                          "model.hidden_channels=8"])
    model = build_model(cfg.model)
    assert model.correlation_radius == 3 and model.head[0].in_channels == 3 + 3 * 8 + 49
    with pytest.raises(ValueError, match=r"correlation_radius: expected an integer >= 0, got -2"):
        build_model(compose_config(["model=pose_free", "model.correlation_radius=-2"]).model)
