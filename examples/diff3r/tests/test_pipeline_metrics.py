"""Evaluation pieces: PSNR/SSIM sanity, LPIPS reported unavailable without weights,
exposure corruption, figures, and an end-to-end evaluation of tiny checkpoints."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from examples.diff3r.evaluate import corrupt_exposure, evaluate
from examples.diff3r.figures import colorize, image_grid, line_plot
from examples.diff3r.metrics import MAX_PSNR, load_lpips, psnr, ssim
from examples.diff3r.testing import tiny_dataset, tiny_overrides
from examples.diff3r.train import CHECKPOINT_NAME, train


def test_psnr_and_ssim_of_identical_images():
    img = torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(psnr(img, img), torch.full((2, 3), MAX_PSNR))
    torch.testing.assert_close(ssim(img, img), torch.ones(2, 3))
    noisy = (img + 0.1 * torch.randn(img.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    p = psnr(noisy, img)
    assert bool((p > 15).all() and (p < 25).all())
    assert bool((ssim(noisy, img) < 0.99).all())


def test_psnr_clips_images_and_ssim_handles_small_images():
    a = torch.full((3, 8, 8), 1.5)
    b = torch.ones(3, 8, 8)
    assert float(psnr(a, b)) == MAX_PSNR  # clipped to [0, 1] first
    assert float(psnr(torch.zeros(3, 8, 8), b)) == pytest.approx(0.0)
    assert float(ssim(b * 0.5, b * 0.5)) == pytest.approx(1.0)  # 8 px < 11: the window shrinks to 7
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, b[:, :4])


def test_lpips_without_weights_is_unavailable_with_a_reason(tmp_path):
    module, message = load_lpips(None)
    assert module is None and "unavailable" in message
    module, message = load_lpips(tmp_path / "nope.pt")
    assert module is None and "nope.pt" in message


def test_exposure_corruption_scales_one_view():
    images = torch.full((1, 2, 3, 4, 4), 0.5)
    out = corrupt_exposure(images, view=1, factor=1.5)
    assert torch.equal(out[:, 0], images[:, 0]) and torch.allclose(out[:, 1], torch.full((1, 3, 4, 4), 0.75))
    assert float(corrupt_exposure(images, 0, 3.0)[:, 0].max()) == 1.0
    with pytest.raises(ValueError, match="view"):
        corrupt_exposure(images, view=2)


def test_figures_are_pngs(tmp_path):
    img = torch.rand(3, 8, 8)
    p = image_grid([[img, colorize(torch.rand(8, 8), log=True)], [img]], tmp_path / "g.png", col_labels=["a", "b"])
    assert Image.open(p).size[0] > 2 * 8 * 4
    q = line_plot({"x": ([0, 1, 2], [1.0, 2.0, 1.5])}, tmp_path / "l.png", title="t")
    assert Image.open(q).format == "PNG"


def test_evaluate_end_to_end_on_tiny_checkpoints(tmp_path_factory, tmp_path):
    root = tiny_dataset(tmp_path_factory.mktemp("tiny_eval") / "data")
    conf = Path(__file__).resolve().parents[1] / "conf"
    ckpts = {}
    for mode in ("zero_shot", "diff3r"):
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose(config_name="config", overrides=tiny_overrides(root, tmp_path / mode, mode))
        train(cfg)
        ckpts[mode] = tmp_path / mode / CHECKPOINT_NAME
    results = evaluate(ckpts["zero_shot"], ckpts["diff3r"], tmp_path / "eval", convergence_steps=(0, 2),
                       figure_scenes=1)
    assert list(results["rows"]) == ["zero-shot", "zero-shot + TTO", "Diff3R", "Diff3R + TTO"]
    assert results["scenes"] == 2 and not results["lpips"]["available"]
    for row in results["rows"].values():
        assert 0 < row["clean"]["psnr"] < MAX_PSNR and -1 <= row["clean"]["ssim"] <= 1
        assert 0 < row["exposure"]["psnr"] < MAX_PSNR
    assert "context_psnr_after" in results["rows"]["Diff3R + TTO"]["clean"]
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["rows"] == results["rows"]
    assert "| Diff3R + TTO |" in (tmp_path / "eval" / "results.md").read_text()
    for path in results["figures"].values():
        assert Image.open(path).format == "PNG"


def test_lambda_visibility_separates_the_border_from_the_interior(tmp_path):
    from types import SimpleNamespace

    from torch.utils.data import default_collate

    from examples.diff3r.data import RE10KDataset
    from examples.diff3r.evaluate import _lam_visibility

    root = tiny_dataset(tmp_path / "data")
    ds = RE10KDataset(root, "test", 16, evaluation_index=root / "evaluation_index.json", load_depth=True)
    found = 0
    for i in range(len(ds)):
        batch = default_collate([ds[i]])
        lam = torch.ones(2, 16, 16)
        lam[:, :4], lam[:, -4:], lam[:, :, :4], lam[:, :, -4:] = 5.0, 5.0, 5.0, 5.0  # high along the border only
        vis = _lam_visibility(SimpleNamespace(lam={"means": lam.reshape(1, -1)}), batch, border=4)
        if vis is None:
            continue
        found += 1
        assert vis["lam_means_border"] == pytest.approx(5.0) and vis["lam_means_interior"] == pytest.approx(1.0)
        seen = vis["seen_mask"]
        assert vis["lam_means_seen"] == pytest.approx(float(lam[seen].mean()))
        if "lam_means_unseen_interior" in vis:  # Λ flat inside: no seen/unseen difference left there
            assert vis["lam_means_unseen_interior"] == pytest.approx(1.0)
            assert vis["lam_means_seen_interior"] == pytest.approx(1.0)
    assert found >= 1
