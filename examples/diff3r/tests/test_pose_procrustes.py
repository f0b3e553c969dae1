"""The weighted Procrustes pose estimator (examples/diff3r/procrustes.py): it recovers
rigid motions, its guarded backward agrees with finite differences (hypothesis), stays
finite on degenerate point sets where the SVD's own backward does not, and the
pose-free model's ``pose_estimator="procrustes"`` passes gradients to its point-map head."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difftto.problems.splatting.se3 import se3_exp
from examples.diff3r import pose_free
from examples.diff3r.procrustes import procrustes_rotation, weighted_procrustes
from examples.diff3r.testing import TINY_POSE_FREE_TTO, TINY_SIZE, tiny_dataset, tiny_pose_free_batch

seeds = st.integers(0, 2**31 - 1)


def _random_set(seed: int, n: int = 12, noise: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    xi = torch.randn(6, generator=g, dtype=torch.float64)
    xi[3:] *= 0.8
    T = se3_exp(xi)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.7, 2.0], dtype=torch.float64)
    y = x @ T[:3, :3].T + T[:3, 3] + noise * torch.randn(n, 3, generator=g, dtype=torch.float64)
    w = 0.1 + torch.rand(n, generator=g, dtype=torch.float64)
    return x, y, w, T


@settings(max_examples=25, deadline=None)
@given(seeds)
def test_recovers_a_rigid_motion_whatever_the_weights(seed):
    x, y, w, T = _random_set(seed)
    torch.testing.assert_close(weighted_procrustes(x, y, w), T, atol=1e-10, rtol=0)
    # An outlier with zero weight changes nothing.
    y_out = torch.cat([y, y[:1] + 5.0])
    w_out = torch.cat([w, torch.zeros(1, dtype=w.dtype)])
    torch.testing.assert_close(weighted_procrustes(torch.cat([x, x[:1]]), y_out, w_out), T, atol=1e-10, rtol=0)


@settings(max_examples=15, deadline=None)
@given(seeds)
def test_gradient_matches_finite_differences_on_a_random_weighted_set(seed):
    """The oracle: central differences of the forward (gradcheck), in points and weights."""
    x, y, w, _ = _random_set(seed, n=8, noise=0.3)
    inputs = tuple(t.clone().requires_grad_() for t in (x, y, w))
    assert torch.autograd.gradcheck(weighted_procrustes, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@settings(max_examples=15, deadline=None)
@given(seeds)
def test_rotation_gradient_is_right_at_repeated_singular_values(seed):
    """M = c·I (+ a symmetric part with a repeated eigenvalue): R is smooth there, the
    SVD's U and V are not, and the guarded backward still matches finite differences."""
    g = torch.Generator().manual_seed(seed)
    c = 0.5 + float(torch.rand(1, generator=g))
    M = c * torch.eye(3, dtype=torch.float64)
    M[2, 2] += float(torch.rand(1, generator=g))
    Q = se3_exp(torch.cat([torch.zeros(3, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)]))
    M = (Q[:3, :3] @ M @ Q[:3, :3].T).requires_grad_()
    assert torch.autograd.gradcheck(procrustes_rotation, (M,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_svd_backward_is_not_finite_where_the_guarded_one_is():
    """The reason for the custom backward: ``U Vᵀ`` through torch.linalg.svd has no
    finite gradient at repeated singular values."""
    M = torch.eye(3, dtype=torch.float64, requires_grad=True)
    U, _, Vh = torch.linalg.svd(M)
    (U @ Vh)[0, 1].backward()
    assert not bool(torch.isfinite(M.grad).all())
    M2 = torch.eye(3, dtype=torch.float64, requires_grad=True)
    procrustes_rotation(M2)[0, 1].backward()
    assert bool(torch.isfinite(M2.grad).all())
    # dR = Ω with Ω_01 = (dM_01 − dM_10)/2 at M = I.
    expected = torch.zeros(3, 3, dtype=torch.float64)
    expected[0, 1], expected[1, 0] = 0.5, -0.5
    torch.testing.assert_close(M2.grad, expected)


@pytest.mark.parametrize("case", ["collinear", "single_point", "all_equal", "reflection_tie"])
def test_degenerate_point_sets_give_finite_gradients(case):
    g = torch.Generator().manual_seed(0)
    d = torch.float64
    if case == "collinear":  # rank 1: the rotation about the line is free
        x = torch.linspace(-1, 1, 9, dtype=d)[:, None] * torch.tensor([1.0, 2.0, 3.0], dtype=d)
        y = x + 0.01 * torch.randn(9, 3, generator=g, dtype=d)
    elif case == "single_point":  # all weight on one point: M = 0
        x, y = torch.randn(5, 3, generator=g, dtype=d), torch.randn(5, 3, generator=g, dtype=d)
    elif case == "all_equal":  # M = 0 as well
        x = torch.ones(6, 3, dtype=d)
        y = torch.zeros(6, 3, dtype=d)
    else:  # a planar set mirrored: s2 = s3 with det(UVᵀ) = −1
        x = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0]], dtype=d)
        y = x * torch.tensor([-1.0, 1.0, 1.0], dtype=d)
    w = torch.zeros(x.shape[0], dtype=d) if case == "single_point" else torch.ones(x.shape[0], dtype=d)
    if case == "single_point":
        w[0] = 1.0
    x, y, w = (t.clone().requires_grad_() for t in (x, y, w))
    T = weighted_procrustes(x, y, w)
    assert bool(torch.isfinite(T).all())
    torch.testing.assert_close(T[:3, :3] @ T[:3, :3].T, torch.eye(3, dtype=d), atol=1e-10, rtol=0)
    assert float(torch.linalg.det(T[:3, :3].detach())) == pytest.approx(1.0, abs=1e-10)
    probe = torch.randn(4, 4, generator=g, dtype=d)
    (T * probe).sum().backward()
    for t in (x, y, w):
        assert bool(torch.isfinite(t.grad).all()), case


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="expected"):
        weighted_procrustes(torch.zeros(4, 3), torch.zeros(5, 3), torch.ones(4))
    with pytest.raises(ValueError, match="M has shape"):
        procrustes_rotation(torch.zeros(2, 3))


# ------------------------------------------------------------------ in the model


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tiny_dataset(tmp_path_factory.mktemp("tiny_procrustes") / "data")
    return tiny_pose_free_batch(root)


def _model(**kw):
    torch.manual_seed(0)
    return pose_free.PoseFreeModel(feature_channels=8, hidden_channels=8, pose_estimator="procrustes", **kw)


def test_procrustes_pose_is_the_motion_between_the_point_maps(batch):
    """The model's pose of view 1 is the inverse of the weighted Procrustes between
    view 1's own back-projected pixels (its predicted depth) and the point-map head's
    points in the first view's frame (captured with a hook), and it starts near the
    identity (the head's offsets start near zero)."""
    model = _model()
    with torch.no_grad():  # a non-trivial point map
        model.xview[-1].bias[:3] = torch.tensor([0.05, -0.03, 0.02])
    captured = {}
    model.xview.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    with torch.no_grad():
        pred = pose_free.predict(model, batch)
    assert pred.theta["pose"].shape == (1, 2, 6) and float(pred.theta["pose"][:, 0].abs().max()) == 0
    out = captured["out"][0].permute(1, 2, 0).reshape(-1, 4)  # view 1's pixels
    H, W = batch["context_images"].shape[-2:]
    depth = pred.depth[0, 1]
    # Own-frame points: the means of view 1 seen from view 1's predicted camera.
    w2c = pred.viewmats[0, 1]
    means = pred.theta["means"].reshape(2, H * W, 3)[1]
    own = means @ w2c[:3, :3].T + w2c[:3, 3]
    torch.testing.assert_close(own[:, 2], depth.reshape(-1), rtol=1e-4, atol=1e-4)
    in_first = own + depth.reshape(-1, 1) * out[:, :3]
    c2w = weighted_procrustes(own, in_first, torch.nn.functional.softplus(out[:, 3]) + 1e-4)
    torch.testing.assert_close(torch.linalg.inv(c2w), w2c, atol=2e-4, rtol=0)
    assert 1e-3 < float(pred.theta["pose"][0, 1].abs().max()) < 0.1


def test_pose_loss_reaches_the_point_map_head_through_procrustes(batch):
    model = _model()
    pred = pose_free.predict(model, batch)
    pose_free.pose_loss(pred, batch).backward()
    grad = model.xview[-1].weight.grad
    assert bool(torch.isfinite(grad).all())
    assert float(grad[:3].abs().sum()) > 0 and float(grad[3].abs().sum()) > 0  # point map and weights
    assert model.pose_out.weight.grad is None  # the pose head's twist is not used
    assert float(model.pose_net[0].weight.grad.abs().sum()) > 0  # its pooled features feed the point map


@pytest.mark.filterwarnings("ignore::difftto.solvers.LinearSolveWarning")
def test_split_pose_lambda_reaches_both_parts_through_the_layer(batch):
    """pose_lam="split": Λ_pose is [B, V, 6], translation entries one value, rotation
    entries another, both trained through the implicit gradient only."""
    model = _model(pose_lam="split", lam_pose_rotation=100.0)
    out = pose_free.run_pipeline(model, batch, pose_free.build_layer(TINY_POSE_FREE_TTO, "implicit"))
    lam = out.lam["pose"].detach()
    assert lam.shape == (1, 2, 6)
    assert lam[0, 1, :3].unique().numel() == 1 and lam[0, 1, 3:].unique().numel() == 1
    # At initialization softplus(raw) ≈ 1: Λ ≈ its initial value, lam_init (1) and 100.
    assert float(lam[0, 1, 0]) == pytest.approx(1.0, rel=0.05)
    assert float(lam[0, 1, 3]) == pytest.approx(100.0, rel=0.05)
    torch.nn.functional.mse_loss(out.render, batch["target_images"]).backward()
    grad = model.pose_out.weight.grad
    assert float(grad[6].abs().sum()) > 0 and float(grad[7].abs().sum()) > 0
    assert float(model.xview[-1].weight.grad.abs().sum()) > 0


def test_pose_probe_script_trains_both_estimators_on_the_pose_loss(tmp_path):
    from examples.diff3r import pose_free_pose_probe

    root = tiny_dataset(tmp_path / "data")
    out = pose_free_pose_probe.probe(("head", "procrustes"), steps=2, eval_every=2, train_batches=1, overrides=(
        f"data.root={root}", f"data.image_size={TINY_SIZE}", "data.gap=[2,4]", "data.num_target_views=1",
        "model.feature_channels=8", "model.hidden_channels=8", "batch_size=1"))
    assert set(out["runs"]) == {"head", "procrustes"}
    for log in out["runs"].values():
        assert [r["step"] for r in log] == [2]
        assert all(0 <= e < 180 for r in log for e in (*r["train"], *r["test"]))
    assert 0 <= out["trivial_test"][0] < 180
