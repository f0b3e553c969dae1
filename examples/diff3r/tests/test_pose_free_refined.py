"""The pose-free variant's training term on the refined context poses Θ*
(``model.pose_supervision_refined``): its gradient reaches the pose head, Λ and the
depth head through the layer, it is off by default, and the config checks it."""

import math

import pytest
import torch

from difftto.problems import get as get_problem
from difftto.problems.splatting.se3 import se3_exp, se3_log
from examples.diff3r import pose_free
from examples.diff3r.testing import (
    TINY_POSE_FREE,
    TINY_POSE_FREE_TTO,
    tiny_dataset,
    tiny_pose_free_batch,
    tiny_pose_free_overrides,
)
from examples.diff3r.train import build_model, compose_config, train


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny_pose_free_refined") / "data")


@pytest.fixture(scope="module")
def batch(root):
    return tiny_pose_free_batch(root)


@pytest.mark.filterwarnings("ignore::difftto.solvers.LinearSolveWarning")
@pytest.mark.parametrize(("backward", "attach"), [("implicit", "world"), ("implicit", "camera"),
                                                  ("unrolled", "world")])
def test_refined_pose_loss_reaches_pose_head_lambda_and_depth_through_the_layer(batch, backward, attach):
    """The loss on Θ*'s poses alone, backpropagated through the layer: nonzero, finite
    gradients on the pose head's twist and on both pose Λ outputs (split Λ; Λ is
    reached only through the layer) and on the per-pixel head's depth channel (through
    the Gaussians' Θ0, the means)."""
    torch.manual_seed(0)
    model = pose_free.PoseFreeModel(**TINY_POSE_FREE, pose_lam="split", lam_pose_rotation=10.0,
                                    pose_supervision_refined=1.0, pose_supervision_rotation=100.0, attach=attach)
    with torch.no_grad():  # a non-trivial Θ0 pose, off the true one
        model.pose_out.bias[:6] = torch.tensor([0.05, -0.03, 0.02, 0.03, -0.02, 0.01])
    layer = pose_free.build_layer(TINY_POSE_FREE_TTO, backward)
    out = pose_free.run_pipeline(model, batch, layer)
    assert float((out.theta["pose"] - out.prediction.theta["pose"]).detach().abs().max()) > 0  # TTO moved them
    loss = pose_free.refined_pose_loss(out, batch)
    assert out.prediction.refined_rotation_weight == 100.0  # default: pose_supervision_rotation
    torch.testing.assert_close(loss, pose_free.pose_loss(out.prediction, batch, 100.0, pose=out.theta["pose"]))
    loss.backward()
    grad = model.pose_out.weight.grad
    assert bool(torch.isfinite(grad).all())
    assert float(grad[:6].abs().sum()) > 0  # the twist (Θ0 of the poses)
    assert float(grad[6].abs().sum()) > 0 and float(grad[7].abs().sum()) > 0  # Λ translation, Λ rotation
    depth_rows = model._slices()["depth"]
    head_grad = model.head[-1].weight.grad[depth_rows]
    assert bool(torch.isfinite(head_grad).all()) and float(head_grad.abs().sum()) > 0


def test_the_same_term_on_theta0_does_not_reach_lambda(batch):
    """Without the layer the pose Λ gets no gradient from the pose term: the Λ
    gradient above comes from the refined poses only."""
    torch.manual_seed(0)
    model = pose_free.PoseFreeModel(**TINY_POSE_FREE, pose_lam="split")
    out = pose_free.run_pipeline(model, batch, None)
    pose_free.pose_loss(out.prediction, batch).backward()
    assert float(model.pose_out.weight.grad[6:].abs().sum()) == 0
    with pytest.raises(ValueError, match="without the TTO layer"):
        pose_free.refined_pose_loss(out, batch)


def test_refined_rotation_weight_of_the_model_and_its_override(batch):
    """A pure rotation error δ of Θ*: the term is ``w·‖ω_δ‖²``, ``w`` the model's
    ``pose_supervision_refined_rotation`` (or the call's ``rotation_weight``)."""
    model = pose_free.PoseFreeModel(**TINY_POSE_FREE, pose_supervision_rotation=3.0,
                                    pose_supervision_refined_rotation=50.0)
    with torch.no_grad():
        pred = pose_free.predict(model, batch)
    true = se3_log(torch.linalg.inv(batch["context_extrinsics"]))
    off = se3_log(se3_exp(torch.tensor([0.0, 0.0, 0.0, 0.02, -0.01, 0.03])) @ se3_exp(true))
    # A pipeline output with Θ* = the prediction, its poses replaced by ``off`` (``info``:
    # any object marks it as refined by the layer).
    out = pose_free.PoseFreePipelineOutput(pred, {**pred.theta, "pose": off}, pred.lam, torch.empty(0), info=object())
    assert float(pose_free.refined_pose_loss(out, batch)) == pytest.approx(50.0 * 0.0014, rel=1e-3)
    assert float(pose_free.refined_pose_loss(out, batch, rotation_weight=1.0)) == pytest.approx(0.0014, rel=1e-3)
    assert float(pose_free.pose_loss(pred, batch, pose=off)) == pytest.approx(3.0 * 0.0014, rel=1e-3)


def test_refined_term_is_off_by_default():
    assert pose_free.PoseFreeModel(**TINY_POSE_FREE).pose_supervision_refined == 0.0
    cfg = compose_config(["model=pose_free"])
    assert float(cfg.model.pose_supervision_refined) == 0.0  # the preset: off (README, pose-free: measured)
    model = build_model(cfg.model)
    assert model.pose_supervision_refined == 0.0
    assert model.pose_supervision_refined_rotation == (
        float(cfg.model.pose_supervision_rotation) if cfg.model.pose_supervision_refined_rotation is None
        else float(cfg.model.pose_supervision_refined_rotation))


@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf"), "much"])
@pytest.mark.parametrize("key", ["pose_supervision_refined", "pose_supervision_refined_rotation"])
def test_config_rejects_a_bad_weight_naming_it(key, value):
    with pytest.raises(ValueError, match=rf"{key}: expected a finite number >= 0, got {value!r}"):
        pose_free.PoseFreeModel(**TINY_POSE_FREE, **{key: value})
    cfg = compose_config(["model=pose_free", f"model.{key}={value}"])
    with pytest.raises(ValueError, match=rf"{key}: expected a finite number >= 0"):
        build_model(cfg.model)


@pytest.mark.filterwarnings("ignore::difftto.solvers.LinearSolveWarning")
def test_training_adds_the_term_through_the_layer_and_logs_pose_errors(root, tmp_path):
    """One diff3r step, the same weights and batch: the loss with the term is larger by
    its weight × the refined pose loss (> 0); the log holds Θ0 and Θ* pose errors.
    zero_shot (no Θ*) ignores the weight."""
    base = train(compose_config(tiny_pose_free_overrides(root, tmp_path / "off", "diff3r")))
    on = train(compose_config(tiny_pose_free_overrides(root, tmp_path / "on", "diff3r")
                              + ["model.pose_supervision_refined=1000"]))
    assert on["last"]["loss"] > base["last"]["loss"]
    for key in ("rot_err_deg_theta0", "rot_err_deg_theta_star", "trans_err_deg_theta0", "trans_err_deg_theta_star"):
        assert math.isfinite(on["last"][key]), key
    assert on["last"]["rot_err_deg_theta0"] == pytest.approx(base["last"]["rot_err_deg_theta0"])
    zs_off = train(compose_config(tiny_pose_free_overrides(root, tmp_path / "zs_off", "zero_shot")))
    zs_on = train(compose_config(tiny_pose_free_overrides(root, tmp_path / "zs_on", "zero_shot")
                                 + ["model.pose_supervision_refined=1000"]))
    assert zs_on["last"]["loss"] == zs_off["last"]["loss"]
    assert "rot_err_deg_theta_star" not in zs_on["last"]


# ------------------------------------------------- pose translation unit in the TTO's θ


def test_translation_scaled_problem_is_the_posed_problem_at_the_scaled_pose(batch):
    """θ holding translation / unit renders (residuals) as the plain problem at the
    scene-unit pose."""
    torch.manual_seed(0)
    model = pose_free.PoseFreeModel(**TINY_POSE_FREE)
    with torch.no_grad():
        model.pose_out.bias[:6] = torch.tensor([0.2, -0.1, 0.05, 0.03, -0.02, 0.01])
        pred = pose_free.predict(model, batch)
        data = pose_free.context_data(pred, batch)
        plain = get_problem("gaussian_splatting_posed")
        scaled = pose_free.TranslationScaledProblem(10.0)
        theta_scaled = {**pred.theta, "pose": pose_free.scale_translation(pred.theta["pose"], 0.1)}
        torch.testing.assert_close(scaled.residuals(theta_scaled, data), plain.residuals(pred.theta, data))
        assert float((scaled.residuals(pred.theta, data) - plain.residuals(pred.theta, data)).abs().max()) > 1e-3


@pytest.mark.filterwarnings("ignore::difftto.solvers.LinearSolveWarning")
def test_translation_unit_steps_the_translation_more_and_returns_scene_units(batch):
    """Adam's per-entry steps: with the translation in units of 10 the TTO moves it ~10×
    further (in scene units) than with 1, the rotation about as far; with the pose lr
    ~0, Θ* pose is Θ0's in scene units (the scaling round trip). The gradient still
    reaches the pose head."""
    moves = {}
    for unit in (1.0, 10.0):
        torch.manual_seed(0)
        model = pose_free.PoseFreeModel(**TINY_POSE_FREE, tto_pose_translation_unit=unit)
        out = pose_free.run_pipeline(model, batch, pose_free.build_layer(TINY_POSE_FREE_TTO, "implicit", pose_lr=1e-3))
        delta = (out.theta["pose"] - out.prediction.theta["pose"])[:, 1:].detach()
        moves[unit] = (float(delta[..., :3].norm()), float(delta[..., 3:].norm()))
        if unit == 10.0:
            pose_free.refined_pose_loss(out, batch, rotation_weight=1.0).backward()
            grad = model.pose_out.weight.grad[:6]
            assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
            frozen_layer = pose_free.build_layer(TINY_POSE_FREE_TTO, "implicit", pose_lr=1e-12)
            frozen = pose_free.run_pipeline(model, batch, frozen_layer)
            torch.testing.assert_close(frozen.theta["pose"], frozen.prediction.theta["pose"], atol=1e-7, rtol=0)
    assert moves[10.0][0] > 5 * moves[1.0][0]
    assert 0.2 * moves[1.0][1] < moves[10.0][1] < 5 * moves[1.0][1]


@pytest.mark.parametrize("value", [0.0, -2.0, float("nan"), "ten"])
def test_config_rejects_a_bad_translation_unit_naming_it(value):
    with pytest.raises(ValueError, match=rf"tto_pose_translation_unit: expected a finite number > 0, got {value!r}"):
        pose_free.PoseFreeModel(**TINY_POSE_FREE, tto_pose_translation_unit=value)
    with pytest.raises(ValueError, match=r"tto_pose_translation_unit: expected a finite number > 0"):
        build_model(compose_config(["model=pose_free", f"model.tto_pose_translation_unit={value}"]).model)


@pytest.mark.filterwarnings("ignore::difftto.solvers.LinearSolveWarning")
def test_evaluation_overrides_the_translation_unit(root, tmp_path):
    from examples.diff3r import pose_free_eval

    summary = train(compose_config(tiny_pose_free_overrides(root, tmp_path / "zs", "zero_shot")))
    results = pose_free_eval.main(["--zero-shot", str(summary["checkpoint"]), "--out", str(tmp_path / "eval"),
                                   "--max-scenes", "1", "--align-steps", "2", "--tto-steps", "2",
                                   "--tto-pose-translation-unit", "10"])
    assert results["tto_pose_translation_unit"] == {"zero-shot": 10.0, "zero-shot + TTO": 10.0}
    assert "translation in θ in units of 10" in (tmp_path / "eval" / "results.md").read_text()
    assert math.isfinite(results["rows"]["zero-shot + TTO"]["clean"]["trans_err_deg_after"])
