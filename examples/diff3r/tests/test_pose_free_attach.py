"""The pose-free model with ``attach="camera"``: each view's Gaussians in its own camera
frame in the layer's θ, carried into the first view's frame by the refined pose."""

import math

import pytest
import torch

from examples.diff3r import pose_free
from examples.diff3r.testing import (
    TINY_POSE_FREE,
    TINY_POSE_FREE_TTO,
    tiny_dataset,
    tiny_pose_free_batch,
    tiny_pose_free_overrides,
)
from examples.diff3r.train import compose_config, model_from_checkpoint, train

TWIST = torch.tensor([0.3, -0.2, 0.1, 0.5, -0.4, 0.3])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny_pose_free_attach") / "data")


@pytest.fixture(scope="module")
def batch(root):
    return tiny_pose_free_batch(root)


def _model(attach):
    torch.manual_seed(0)
    model = pose_free.PoseFreeModel(**TINY_POSE_FREE, attach=attach, pose_lam="split")
    with torch.no_grad():  # non-trivial poses, so a wrong frame would be visible
        model.pose_out.bias[:6] = TWIST
    return model


def _predict(model, batch):
    return pose_free.predict(model, batch)


def test_attached_gaussians_are_the_back_projections_and_place_the_same_world_means(batch):
    with torch.no_grad():
        world, attached = _predict(_model("world"), batch), _predict(_model("camera"), batch)
    B, V, _, H, W = batch["context_images"].shape
    assert attached.attach == "camera" and world.layer_theta is world.theta
    local = attached.layer_theta["means"].reshape(B, V, H * W, 3)
    torch.testing.assert_close(local[..., 2], attached.depth.reshape(B, V, H * W))  # z = depth in its own camera
    torch.testing.assert_close(attached.theta["means"], world.theta["means"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attached.layer_theta["pose"], world.theta["pose"])
    assert float(local[:, 1:].sub(attached.theta["means"].reshape(B, V, H * W, 3)[:, 1:]).abs().max()) > 1e-2
    assert attached.gaussian_view.tolist() == [v for v in range(V) for _ in range(H * W)]
    with pytest.raises(ValueError, match="attach"):
        pose_free.PoseFreeModel(**TINY_POSE_FREE, attach="rig")


@pytest.mark.filterwarnings("ignore::difftto.solvers.LinearSolveWarning")
def test_attached_pipeline_reaches_the_pose_head_and_returns_world_gaussians(batch):
    model = _model("camera")
    layer = pose_free.build_layer(TINY_POSE_FREE_TTO, "implicit")  # a world-frame layer: run_pipeline switches it
    out = pose_free.run_pipeline(model, batch, layer)
    assert layer.problem.attach == "world"
    assert float((out.theta["pose"][:, 1] - out.prediction.theta["pose"][:, 1]).detach().abs().max()) > 0
    # The returned Θ* is in the first view's frame: its view-1 Gaussians moved with the refined pose.
    again = pose_free.world_theta({**out.prediction.layer_theta, "pose": out.theta["pose"]},
                                  out.prediction.gaussian_view)
    assert float((again["means"] - out.prediction.theta["means"]).detach().abs().max()) > 0
    assert set(out.theta) == set(out.prediction.theta)
    torch.nn.functional.mse_loss(out.render, batch["target_images"]).backward()
    grad = model.pose_out.weight.grad
    assert float(grad[:6].abs().sum()) > 0 and float(grad[6:].abs().sum()) > 0  # twist, both pose Λ
    assert bool(torch.isfinite(grad).all())


@pytest.mark.filterwarnings("ignore::difftto.solvers.LinearSolveWarning")
def test_diff3r_training_with_attach_camera(root, tmp_path):
    cfg = compose_config(tiny_pose_free_overrides(root, tmp_path / "run", "diff3r") + ["model.attach=camera"])
    summary = train(cfg)
    assert math.isfinite(summary["last"]["loss"])
    model, _ = model_from_checkpoint(summary["checkpoint"])
    assert isinstance(model, pose_free.PoseFreeModel) and model.attach == "camera"
