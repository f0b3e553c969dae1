"""Training-time exposure jitter of the context views: which views change, by how
much, reproducibility by (seed, step), and that training with it stays deterministic."""

import math

import pytest
import torch

from examples.diff3r.data.augment import augment_context, exposure_jitter


def test_exposure_jitter_scales_one_view_per_hit_scene():
    images = torch.full((64, 2, 3, 4, 4), 0.4)
    out, factors = exposure_jitter(images, 0.5, 0.5, 2.0, torch.Generator().manual_seed(0))
    changed = factors != 1
    assert changed.sum(1).max() == 1  # at most one view per scene
    assert 10 < int(changed.any(1).sum()) < 54  # about half the scenes
    f = factors[changed]
    assert bool((f >= 0.5).all() and (f <= 2.0).all())
    expected = (images * factors[:, :, None, None, None]).clamp(0, 1)
    torch.testing.assert_close(out, expected)
    assert bool((out[~changed] == 0.4).all()) and float(out.max()) <= 1.0
    assert (images == 0.4).all()  # the input is not modified


def test_exposure_jitter_factors_are_log_uniform():
    _, factors = exposure_jitter(torch.rand(4000, 2, 3, 2, 2), 1.0, 0.5, 2.0, torch.Generator().manual_seed(1))
    logs = factors[factors != 1].log()
    assert logs.numel() > 3900
    assert abs(float(logs.mean())) < 0.05  # symmetric in log around 1
    assert float(logs.min()) >= math.log(0.5) - 1e-6 and float(logs.max()) <= math.log(2.0) + 1e-6


def test_augment_context_is_off_by_default_and_seeded_by_step():
    images = torch.rand(2, 2, 3, 4, 4)
    assert augment_context(images, None, 0, 3) is None
    assert augment_context(images, {"exposure_prob": 0.0}, 0, 3) is None
    cfg = {"exposure_prob": 1.0, "exposure_range": [0.5, 2.0]}
    a, b = augment_context(images, cfg, 0, 3), augment_context(images, cfg, 0, 3)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, images)
    assert not torch.equal(a, augment_context(images, cfg, 0, 4))
    with pytest.raises(ValueError, match="exposure_range"):
        augment_context(images, {"exposure_prob": 1.0, "exposure_range": [0.5]}, 0, 3)
    with pytest.raises(ValueError, match="prob"):
        exposure_jitter(images, 1.5, 0.5, 2.0)


def test_training_with_exposure_jitter_changes_the_loss_and_is_reproducible(tmp_path):
    from examples.diff3r.testing import tiny_dataset, tiny_overrides
    from examples.diff3r.train import compose_config, train

    root = tiny_dataset(tmp_path / "data")
    base = tiny_overrides(root, tmp_path / "plain", "diff3r")
    plain = train(compose_config(base))["last"]["loss"]
    jit = ["augment.exposure_prob=1.0", "augment.exposure_range=[1.8,2.0]"]
    a = train(compose_config(tiny_overrides(root, tmp_path / "a", "diff3r") + jit))["last"]["loss"]
    b = train(compose_config(tiny_overrides(root, tmp_path / "b", "diff3r") + jit))["last"]["loss"]
    assert a == b and a != plain
