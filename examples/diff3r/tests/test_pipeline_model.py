"""The Diff3R encoder: output shapes, Λ > 0, pixel-aligned means on their rays,
scales in the configured footprint range, and input validation."""


import pytest
import torch
from torch.utils.data import default_collate

from examples.diff3r.data import RE10KDataset
from examples.diff3r.model import GROUPS, Diff3RModel, context_cameras
from examples.diff3r.testing import TINY_MODEL, TINY_SIZE, tiny_dataset


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tiny_dataset(tmp_path_factory.mktemp("tiny_model") / "data")
    ds = RE10KDataset(root, "train", TINY_SIZE, num_target_views=1, near=1.0, far=15.0)
    return default_collate([ds[0], ds[1]])


def _predict(model, batch):
    return model(batch["context_images"], batch["context_intrinsics"], batch["context_extrinsics"],
                 batch["context_near"], batch["context_far"])


def test_output_shapes_and_positive_lambda(batch):
    torch.manual_seed(0)
    model = Diff3RModel(**TINY_MODEL, lam_init={"means": 10.0, "log_scales": 1.0, "quats": 1.0,
                                                "opacities": 0.1, "colors": 0.1})
    with torch.no_grad():
        out = _predict(model, batch)
    B, V, H, W, N = 2, 2, TINY_SIZE, TINY_SIZE, 2 * TINY_SIZE**2
    shapes = {"means": (B, N, 3), "log_scales": (B, N, 3), "quats": (B, N, 4), "opacities": (B, N),
              "colors": (B, N, 3)}
    assert {k: tuple(v.shape) for k, v in out.theta.items()} == shapes
    assert set(out.lam) == set(GROUPS)
    for g in GROUPS:
        assert out.lam[g].shape == (B, N)
        assert bool((out.lam[g] > 0).all())
    assert out.depth.shape == (B, V, H, W) and bool((out.depth > 0).all())
    assert out.probabilities.shape == (B, V, TINY_MODEL["depth_candidates"], H, W)
    torch.testing.assert_close(out.probabilities.sum(2), torch.ones(B, V, H, W))
    # At initialization Λ starts near lam_init (softplus(bias) = 1).
    assert abs(float(out.lam["means"].mean()) / 10.0 - 1) < 0.05
    assert abs(float(out.lam["colors"].mean()) / 0.1 - 1) < 0.05
    for v in out.theta.values():
        assert bool(torch.isfinite(v).all())


def test_means_lie_within_their_pixel_at_the_predicted_depth(batch):
    torch.manual_seed(1)
    model = Diff3RModel(**TINY_MODEL)
    with torch.no_grad():
        model.head[-1].weight.normal_(std=0.5)  # large head outputs: offsets and scales near their bounds
        out = _predict(model, batch)
    H = W = TINY_SIZE
    K, w2c = context_cameras(batch["context_intrinsics"], batch["context_extrinsics"], H, W)
    means = out.theta["means"].reshape(2, 2, H * W, 3)
    cam = means @ w2c[:, :, :3, :3].transpose(-1, -2) + w2c[:, :, None, :3, 3]
    uv = (cam @ K.transpose(-1, -2))[..., :2] / cam[..., 2:3]
    v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    centers = torch.stack([u, v], -1).reshape(1, 1, H * W, 2)
    assert float((uv - centers).abs().max()) <= 0.5 + 1e-3  # sub-pixel offsets stay inside the pixel
    torch.testing.assert_close(cam[..., 2], out.depth.reshape(2, 2, H * W), rtol=1e-4, atol=1e-4)
    # Scales are (scale_min .. scale_max) pixel footprints at that depth.
    footprint = out.depth.reshape(2, 2, H * W, 1) / K[:, :, 0, 0, None, None]
    multiple = out.theta["log_scales"].reshape(2, 2, H * W, 3).exp() / footprint
    assert float(multiple.min()) >= model.scale_min - 1e-4 and float(multiple.max()) <= model.scale_max + 1e-4


def test_invalid_inputs_name_the_argument(batch):
    model = Diff3RModel(**TINY_MODEL)
    with pytest.raises(ValueError, match="images"):
        model(batch["context_images"][:, :1], batch["context_intrinsics"][:, :1], batch["context_extrinsics"][:, :1],
              batch["context_near"][:, :1], batch["context_far"][:, :1])
    with pytest.raises(ValueError, match="c2w"):
        model(batch["context_images"], batch["context_intrinsics"], batch["context_extrinsics"][:, :, :3],
              batch["context_near"], batch["context_far"])
    with pytest.raises(ValueError, match="lam_init"):
        Diff3RModel(lam_init={"means": 1.0})
    with pytest.raises(ValueError, match="scale_min"):
        Diff3RModel(scale_min=2.0, scale_init=1.0)


def test_bounded_lambda_starts_at_lam_init_and_stays_in_its_range(batch):
    torch.manual_seed(2)
    init = {"means": 10.0, "log_scales": 1.0, "quats": 1.0, "opacities": 0.1, "colors": 0.1}
    model = Diff3RModel(**TINY_MODEL, lam_init=init, lam_min=0.0, lam_log_range=1.0)
    with torch.no_grad():
        out = _predict(model, batch)
        assert abs(float(out.lam["means"].mean()) / 10.0 - 1) < 0.05
        model.head[-1].weight.normal_(std=5.0)  # saturating head outputs: Λ at the ends of its range
        out = _predict(model, batch)
    e = torch.e
    for g in GROUPS:
        lam = out.lam[g] / init[g]
        assert float(lam.min()) >= 1 / e - 1e-5 and float(lam.max()) <= e + 1e-5
        assert float(lam.max()) / float(lam.min()) > 2  # the range is used, not a constant
    with pytest.raises(ValueError, match="lam_log_range"):
        Diff3RModel(**TINY_MODEL, lam_log_range=-1.0)
