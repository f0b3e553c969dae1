"""Gradients through the TTO layer: they reach the Λ head and the encoder, and the
implicit gradient of a training step agrees with the unrolled one when the inner
optimization converges."""


import pytest
import torch
from torch.utils.data import default_collate

from examples.diff3r.data import RE10KDataset
from examples.diff3r.model import GROUPS, Diff3RModel
from examples.diff3r.pipeline import build_layer, run_pipeline
from examples.diff3r.testing import TINY_MODEL, TINY_SIZE, tiny_dataset


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tiny_dataset(tmp_path_factory.mktemp("tiny_grad") / "data")
    ds = RE10KDataset(root, "train", TINY_SIZE, num_target_views=1, near=1.0, far=15.0)
    return default_collate([ds[0]])


def _lam_rows(model):
    """Rows of the last head conv that produce Λ (the last len(GROUPS) channels)."""
    return slice(model.head[-1].out_channels - len(GROUPS), None)


@pytest.mark.filterwarnings("ignore::difftto.solvers.LinearSolveWarning")  # a short PCG budget here
@pytest.mark.parametrize("lam_log_range", [0.0, 1.0])  # softplus Λ, bounded Λ
def test_gradients_reach_lambda_head_and_encoder_through_the_layer(batch, lam_log_range):
    torch.manual_seed(0)
    model = Diff3RModel(**TINY_MODEL, lam_log_range=lam_log_range)
    layer = build_layer({"inner": "adam", "steps": 5, "lr": {"means": 3e-3, "log_scales": 5e-2, "quats": 1e-2,
                                                             "opacities": 5e-2, "colors": 2.5e-2},
                         "pcg_rtol": 1e-3, "pcg_max_iter": 10}, "implicit")
    out = run_pipeline(model, batch, layer)
    torch.nn.functional.mse_loss(out.render, batch["target_images"]).backward()
    assert out.info.backward is not None and out.info.backward.iterations.numel() == 1
    head = model.head[-1]
    lam_w, lam_b = head.weight.grad[_lam_rows(model)], head.bias.grad[_lam_rows(model)]
    assert bool(torch.isfinite(head.weight.grad).all())
    # Λ is trained only through the implicit gradient: every group's head gets one.
    assert all(float(lam_w[i].abs().sum()) > 0 for i in range(len(GROUPS)))
    assert float(lam_b.abs().sum()) > 0
    assert float(model.features.stem.weight.grad.abs().sum()) > 0  # the encoder
    assert float(model.cost_refine[-1].weight.grad.abs().sum()) > 0  # the cost-volume refinement


def test_zero_shot_pass_gives_no_lambda_gradient(batch):
    model = Diff3RModel(**TINY_MODEL)
    out = run_pipeline(model, batch, None)
    torch.nn.functional.mse_loss(out.render, batch["target_images"]).backward()
    assert float(model.head[-1].weight.grad[_lam_rows(model)].abs().sum()) == 0
    assert float(model.features.stem.weight.grad.abs().sum()) > 0


def _model_grad(model, batch, layer):
    model.zero_grad(set_to_none=True)
    out = run_pipeline(model, batch, layer)
    torch.nn.functional.mse_loss(out.render, batch["target_images"]).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return grads, out.info


def test_implicit_gradient_matches_unrolled_at_convergence(batch):
    """Large Λ (relative to the data term's curvature) and gradient descent with step
    ``0.5/Λ`` per group: the inner optimization contracts by about half per step, so
    30 steps reach stationarity (to float32's floor); the implicit gradient (exact Hessian, tight PCG) then
    equals backpropagation through the 30 unrolled steps."""
    torch.manual_seed(0)
    lam_init = {"means": 1000.0, "log_scales": 50.0, "quats": 50.0, "opacities": 20.0, "colors": 20.0}
    model = Diff3RModel(**TINY_MODEL, lam_init=lam_init)
    with torch.no_grad():  # Λ that varies per Gaussian, so its gradient is not a trivial rescaling
        model.head[-1].weight[_lam_rows(model)].normal_(std=0.05)
    tto = {"inner": "gd", "steps": 30, "lr": {g: 0.5 / v for g, v in lam_init.items()},
           "pcg_rtol": 1e-6, "pcg_max_iter": 200, "on_failure": "raise"}
    g_implicit, info = _model_grad(model, batch, build_layer({**tto, "hessian": "exact"}, "implicit"))
    assert float(info.forward.stationarity.max()) < 1e-3, info
    assert int(info.backward.failures) == 0, info
    g_unrolled, _ = _model_grad(model, batch, build_layer(tto, "unrolled"))
    cosine = torch.nn.functional.cosine_similarity(g_implicit, g_unrolled, dim=0)
    assert float(cosine) >= 0.99, float(cosine)
    assert float((g_implicit.norm() / g_unrolled.norm() - 1).abs()) < 0.05
