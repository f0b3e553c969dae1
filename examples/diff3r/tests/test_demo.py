"""The demo end to end on a tiny config: five stages, the five evaluated rows, and
the table of PSNR against TTO steps."""

import json

import torch

from examples.diff3r import demo
from examples.diff3r.testing import tiny_dataset, tiny_overrides


def test_demo_trains_three_models_and_reports_five_rows(tmp_path, monkeypatch):
    root = tiny_dataset(tmp_path / "data")
    overrides = [o for o in tiny_overrides(root, tmp_path / "unused") if not o.startswith(("mode=", "out_dir=",
                                                                                           "steps="))]
    monkeypatch.setattr(demo, "CONVERGENCE_STEPS", (0, 2))
    summary = demo.main(["--out", str(tmp_path / "demo"), "--pretrain-steps", "1", "--steps", "1", *overrides])
    assert set(summary["train_seconds"]) == {"pretrain", "zero_shot", "diff3r", "no_uncertainty"}
    results = json.loads((tmp_path / "demo" / "eval" / "results.json").read_text())
    assert list(results["rows"]) == ["zero-shot", "zero-shot + TTO", "Diff3R", "Diff3R + TTO",
                                     "no-uncertainty + TTO"]
    for name in ("zero-shot + TTO", "Diff3R + TTO", "no-uncertainty + TTO"):
        assert "context_psnr_after" in results["rows"][name]["clean"]
        assert "context_psnr_after" in results["rows"][name]["exposure"]
    table = demo.convergence_table(results)
    assert "| k=0 | k=2 |" in table and "| no-uncertainty + TTO |" in table
    assert table in (tmp_path / "demo" / "eval" / "results.md").read_text()
    ckpt = torch.load(tmp_path / "demo" / "no_uncertainty" / "checkpoint.pt", weights_only=False)
    assert ckpt["config"]["mode"]["lam"] == "constant" and ckpt["step"] == 1
