"""The pose-free model's monocular depth U-Net (``model.depth_net=unet``): the depths come
from it (within [near, far]; the head's depth channel unused), a depth loss and a render
loss through the layer reach it, ``head`` (the preset) is the model without it, and the
options are checked by name."""

import pytest
import torch

from examples.diff3r import pose_free
from examples.diff3r.testing import (
    TINY_POSE_FREE,
    TINY_POSE_FREE_TTO,
    random_pose_free_inputs,
    tiny_dataset,
    tiny_pose_free_batch,
)
from examples.diff3r.train import build_model, compose_config


@pytest.mark.parametrize("V", [2, 4])
def test_depths_come_from_the_unet_and_its_gradient_reaches_it(V):
    torch.manual_seed(0)
    model = pose_free.PoseFreeModel(**TINY_POSE_FREE, depth_net="unet", depth_net_width=4)
    images, K, near, far = random_pose_free_inputs(2, V)
    out = model(images, K, near, far)
    assert out.depth.shape == (2, V, 12, 12)
    depth = out.depth.detach()
    assert float(depth.min()) >= 1.0 - 1e-5 and float(depth.max()) <= 10.0 + 1e-4
    # The depth is the U-Net's: its logit through the head's inverse-depth range.
    with torch.no_grad():
        logit = model.depth_unet(images.flatten(0, 1)).unflatten(0, (2, V))
        expected = 1.0 / (0.1 + (1.0 - 0.1) * torch.sigmoid(logit))
    torch.testing.assert_close(out.depth, expected)
    torch.log(out.depth).square().mean().backward()
    for name, p in model.depth_unet.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert float(model.depth_unet.enc1[0].weight.grad.abs().sum()) > 0
    depth_row = model._slices()["depth"].start
    head_grad = model.head[-1].weight.grad
    assert head_grad is None or float(head_grad[depth_row].abs().sum()) == 0.0  # the head's channel is unused


@pytest.mark.filterwarnings("ignore::difftto.solvers.LinearSolveWarning")
def test_render_loss_through_the_layer_reaches_the_unet(tmp_path):
    """The TTO pipeline on a real batch: the Gaussians' means (Θ0) are back-projected with
    the U-Net's depths, so a render loss after the layer reaches its weights."""
    batch = tiny_pose_free_batch(tiny_dataset(tmp_path / "data"))
    torch.manual_seed(0)
    model = pose_free.PoseFreeModel(**TINY_POSE_FREE, depth_net="unet", depth_net_width=4)
    out = pose_free.run_pipeline(model, batch, pose_free.build_layer(TINY_POSE_FREE_TTO))
    (out.render - batch["target_images"]).square().mean().backward()
    grad = model.depth_unet.enc1[0].weight.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def test_head_is_the_model_without_the_unet():
    images, K, near, far = random_pose_free_inputs(2, 3)
    outs = []
    for kwargs in ({}, {"depth_net": "head", "depth_net_width": 7}):
        torch.manual_seed(3)
        model = pose_free.PoseFreeModel(**TINY_POSE_FREE, **kwargs)
        outs.append((model(images, K, near, far), {k: v.shape for k, v in model.state_dict().items()}))
    (a, shapes_a), (b, shapes_b) = outs
    assert shapes_a == shapes_b and not any(k.startswith("depth_unet") for k in shapes_a)
    assert torch.equal(a.depth, b.depth)
    for g in a.theta:
        assert torch.equal(a.theta[g], b.theta[g]), g


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"depth_net": "resnet"}, r"depth_net: expected one of 'head', 'unet', got 'resnet'"),
    ({"depth_net": None}, r"depth_net: expected one of 'head', 'unet', got None"),
    ({"depth_net": "unet", "depth_source": "sweep"},
     r"depth_net='unet' .* needs depth_source='monocular', got 'sweep'"),
    ({"depth_net": "unet", "depth_net_width": 0}, r"depth_net_width: expected an integer >= 1, got 0"),
    ({"depth_net_width": 2.5}, r"depth_net_width: expected an integer >= 1, got 2.5"),
])
def test_bad_options_are_rejected_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pose_free.PoseFreeModel(**TINY_POSE_FREE, **kwargs)


def test_image_size_not_divisible_by_four_is_named():
    model = pose_free.PoseFreeModel(**TINY_POSE_FREE, depth_net="unet", depth_net_width=2)
    with pytest.raises(ValueError, match=r"depth_net='unet': image height and width must be divisible by 4, got 10x12"):
        model(*random_pose_free_inputs(1, 2, H=10, W=12))


def test_config_passes_the_option_and_the_preset_is_the_head():
    cfg = compose_config(["model=pose_free"])
    assert cfg.model.depth_net == "head" and build_model(cfg.model).depth_net == "head"
    cfg = compose_config(["model=pose_free", "model.depth_net=unet", "model.depth_net_width=6",
                          "model.feature_channels=8", "model.hidden_channels=8"])
    model = build_model(cfg.model)
    assert model.depth_net == "unet" and model.depth_unet.enc1[0].out_channels == 6
