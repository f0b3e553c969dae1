"""Training through hydra's compose API on a tiny config: one step in every mode,
checkpoint/resume continuing from the saved step (and matching an uninterrupted
run), atomic checkpoint writes, and the data cache."""

import json
import pickle

import pytest
import torch

from examples.diff3r.testing import tiny_dataset, tiny_overrides
from examples.diff3r.train import (
    CHECKPOINT_NAME,
    batch_indices,
    compose_config,
    load_checkpoint,
    prepare_data,
    save_checkpoint,
    train,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny_train") / "data")


@pytest.mark.parametrize("mode", ["zero_shot", "diff3r", "unrolled", "no_uncertainty"])
def test_one_training_step_per_mode(root, tmp_path, mode):
    summary = train(compose_config(tiny_overrides(root, tmp_path / mode, mode)))
    rec = summary["last"]
    assert rec["step"] == 1 and rec["loss"] > 0 and torch.isfinite(torch.tensor(rec["loss"]))
    ckpt = load_checkpoint(tmp_path / mode / CHECKPOINT_NAME)
    assert ckpt["step"] == 1 and ckpt["mode"] == mode
    logged = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1]
    if mode == "zero_shot":
        assert "stationarity_mean" not in rec
    else:
        assert 0 <= rec["stationarity_mean"] < 10
    if mode in ("diff3r", "no_uncertainty"):  # implicit backward: PCG diagnostics are logged
        assert rec["pcg_iterations_max"] >= 1 and rec["pcg_failures"] in (0, 1)
    if mode == "no_uncertainty":  # the constant Λ is model.lam_init
        assert rec["lam_means"] == pytest.approx(10.0) and rec["lam_colors"] == pytest.approx(0.1)


def test_resume_continues_from_the_saved_step(root, tmp_path):
    def overrides(out, steps, resume=False):
        return tiny_overrides(root, out, "diff3r") + [f"steps={steps}", f"resume={str(resume).lower()}"]

    train(compose_config(overrides(tmp_path / "a", 2)))
    first = load_checkpoint(tmp_path / "a" / CHECKPOINT_NAME)
    assert first["step"] == 2
    summary = train(compose_config(overrides(tmp_path / "a", 3, resume=True)))
    assert summary["start_step"] == 2 and summary["last"]["step"] == 3
    steps = [json.loads(line)["step"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    # The same three steps without interruption give the same weights (seeded data order, Adam state restored).
    train(compose_config(overrides(tmp_path / "b", 3)))
    resumed = load_checkpoint(tmp_path / "a" / CHECKPOINT_NAME)["model"]
    straight = load_checkpoint(tmp_path / "b" / CHECKPOINT_NAME)["model"]
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-5, atol=1e-6)


def test_checkpoint_write_is_atomic_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "step": 1, "config": {}})
    save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "step": 2, "config": {}})
    assert load_checkpoint(path)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]
    with pytest.raises((TypeError, AttributeError, pickle.PicklingError)):  # unpicklable: old checkpoint kept
        save_checkpoint(path, {"model": {}, "step": 3, "config": {}, "bad": lambda: None})
    assert load_checkpoint(path)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_batches_are_a_function_of_the_step():
    a = [batch_indices(10, 3, seed=0, step=s) for s in range(7)]
    b = [batch_indices(10, 3, seed=0, step=s) for s in range(7)]
    assert a == b
    epoch0 = [i for idx, ep in a[:3] for i in idx]
    assert len(set(epoch0)) == 9 and a[3][1] == 1
    with pytest.raises(ValueError, match="num_items"):
        batch_indices(0, 1, 0, 0)


def test_data_generated_into_the_cache_once(tmp_path):
    cfg = compose_config([f"data.cache_dir={tmp_path}", "data.generate.n_train=1", "data.generate.n_test=1",
                "data.generate.views_per_scene=5", "data.generate.image_size=8"])
    root = prepare_data(cfg.data)
    assert root.parent == tmp_path and (root / "meta.json").is_file() and (root / "evaluation_index.json").is_file()
    stamp = (root / "meta.json").stat().st_mtime_ns
    assert prepare_data(cfg.data) == root and (root / "meta.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileNotFoundError, match="data.root"):
        prepare_data(compose_config([f"data.root={tmp_path / 'nothing'}", "data.generate=null"]).data)


def test_tensorboard_holds_the_logged_numbers_and_images(root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(compose_config(tiny_overrides(root, out, "diff3r") + ["steps=2", "log_every=1",
                                                                  "tensorboard_image_every=2"]))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [r["step"] for r in logged] == [1, 2]
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in logged], rel=1e-6)
    assert "train/pcg_iterations_mean" in events.Tags()["scalars"]
    images = events.Images("train/targets_over_renders")  # image steps only: every 2nd
    assert [e.step for e in images] == [2]
    assert images[0].height == 2 * 16 and images[0].width == 16  # targets over renders, one view across


def test_tensorboard_off(root, tmp_path):
    out = tmp_path / "off"
    train(compose_config(tiny_overrides(root, out, "zero_shot") + ["tensorboard=false"]))
    assert (out / "metrics.jsonl").is_file() and not (out / "tensorboard").exists()
