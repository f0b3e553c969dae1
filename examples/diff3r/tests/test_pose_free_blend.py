"""``pose_free_tto_sweep.py --gt-depth-blend``: Θ0's means back-projected from the
per-pixel geometric blend ``predicted^(1−α) · true^α`` of the depths. The blend is the
predicted depths at α = 0 and the true ones at α = 1 exactly, its log linear in α; the
script's α = 1 is its ``--gt-depth``, its α = 0 the model's own Θ0, and it prints each
blend's shape error (``pose_free_depth_errors.depth_errors``)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import default_collate

from examples.diff3r import pose_free
from examples.diff3r.pose_free_depth_errors import depth_errors
from examples.diff3r.pose_free_tto_sweep import blended_depths, camera_means, main, parse_alphas
from examples.diff3r.testing import tiny_dataset, tiny_pose_free_overrides
from examples.diff3r.train import compose_config, make_dataset, model_from_checkpoint, train


def _depths(seed: int, shape=(1, 2, 5, 4), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    pred = torch.exp(torch.empty(shape, dtype=torch.float64).uniform_(-3.0, 3.0, generator=g)).to(dtype)
    true = torch.exp(torch.empty(shape, dtype=torch.float64).uniform_(-3.0, 3.0, generator=g)).to(dtype)
    return pred, true


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blend_endpoints_are_exact(dtype):
    pred, true = _depths(0, dtype=dtype)
    assert torch.equal(blended_depths(pred, true, 0.0), pred)
    assert torch.equal(blended_depths(pred, true, 1.0), true)
    half = true.half()  # the data's stored depths: cast to the predicted dtype, exactly
    assert torch.equal(blended_depths(pred, half, 1.0), half.to(dtype))
    assert blended_depths(pred, half, 0.5).dtype == dtype
    with pytest.raises(ValueError, match="alpha"):
        blended_depths(pred, true, 1.5)
    with pytest.raises(ValueError, match="context_depths"):
        blended_depths(pred, true[:, :1], 0.5)


@settings(max_examples=100, deadline=None)
@given(alpha=st.floats(0.0, 1.0), beta=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_blend_log_is_linear_in_alpha(alpha, beta, seed):
    pred, true = _depths(seed, dtype=torch.float64)
    log = torch.log(blended_depths(pred, true, alpha))
    torch.testing.assert_close(log, (1 - alpha) * torch.log(pred) + alpha * torch.log(true), rtol=0, atol=1e-12)
    # between two α the log moves in proportion: the blend of blends is a blend
    log_beta = torch.log(blended_depths(pred, true, beta))
    mid = 0.5 * (alpha + beta)
    torch.testing.assert_close(torch.log(blended_depths(pred, true, mid)), 0.5 * (log + log_beta),
                               rtol=0, atol=1e-12)
    # the shape error (scale removed) of a blend of depths of the true shape is 0
    scaled = true * 3.7
    assert depth_errors(blended_depths(scaled, true, alpha), true)["shape"] == pytest.approx(0.0, abs=1e-12)


def test_parse_alphas():
    assert parse_alphas(["0,0.25", "1", "0.25"]) == [0.0, 0.25, 1.0]
    for bad in (["x"], ["0,2"], ["-0.1"]):
        with pytest.raises(ValueError, match="--gt-depth-blend"):
            parse_alphas(bad)


def test_sweep_script_blend_endpoints(tmp_path):
    root = tiny_dataset(tmp_path / "data")
    overrides = tiny_pose_free_overrides(root, tmp_path / "camera", "zero_shot") + ["model.attach=camera"]
    ckpt = str(train(compose_config(overrides))["checkpoint"])
    # α = 0: the model's own Θ0 means (its back-projected points) up to float rounding
    model, state = model_from_checkpoint(ckpt)
    dataset = make_dataset(compose_config(overrides), root, "test", evaluation=True, load_depth=True)
    batch = pose_free.first_view_frame(default_collate([dataset[0]]))
    with torch.no_grad():
        pred = pose_free.predict(model, batch)
    means = camera_means(blended_depths(pred.depth, batch["context_depths"], 0.0), batch["context_intrinsics"])
    torch.testing.assert_close(means.to(pred.depth.dtype), pred.layer_theta["means"], rtol=1e-4, atol=1e-4)

    args = [ckpt, "--max-scenes", "1", "--config", "1,2"]
    plain, gt = main(args), main(args + ["--gt-depth"])
    out = main(args + ["--gt-depth-blend", "0,0.5", "--gt-depth-blend", "1"])
    assert set(out) == {"alpha=0 1,2", "alpha=0.5 1,2", "alpha=1 1,2"}
    one = {k: v for k, v in out["alpha=1 1,2"].items() if k not in ("alpha", "shape", "shape_se", "rot_diff_se")}
    assert one == {k: v for k, v in gt["1,2"].items() if k != "rot_diff_se"}  # α = 1 is --gt-depth, bitwise
    assert out["alpha=1 1,2"]["shape"] == 0.0
    for k in ("rot_before", "rot_after", "trans_before", "trans_after"):
        assert out["alpha=0 1,2"][k] == pytest.approx(plain["1,2"][k], rel=1e-4, abs=1e-4)
    shape = depth_errors(pred.depth[0], batch["context_depths"][0])["shape"]  # pose_free_depth_errors.py's
    assert out["alpha=0 1,2"]["shape"] == pytest.approx(shape)
    # the blend's log error is (1 − α) times the prediction's: so is its shape error
    assert out["alpha=0.5 1,2"]["shape"] == pytest.approx(0.5 * out["alpha=0 1,2"]["shape"], rel=1e-5)
    assert all(math.isfinite(v) for r in out.values() for k, v in r.items() if k not in ("rot_diff_se", "shape_se"))
    with pytest.raises(SystemExit):  # argparse: not allowed with --gt-depth
        main(args + ["--gt-depth", "--gt-depth-blend", "0.5"])
    world = str(train(compose_config(tiny_pose_free_overrides(root, tmp_path / "world", "zero_shot")))["checkpoint"])
    with pytest.raises(ValueError, match="--gt-depth-blend needs a model.attach=camera"):
        main([world, "--config", "1,2", "--gt-depth-blend", "0.5"])
