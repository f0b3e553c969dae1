"""Depth errors of pose-free checkpoints' predicted context depths against the true
ones, on a test split that stores depth (the procedural generator's): README,
pose-free, "What was tried for the poses (issue #7)".

Per scene (means over the scenes printed):

- ``relative``: mean ``|depth − true| / true``;
- ``abs_log``: mean ``|log(depth / true)|``;
- ``shape``: the same after the scene's median log ratio is removed (one factor per
  scene: the shape without the scale), the README's *shape error*;
- ``shape_view``: after each context view's median log ratio is removed;
- ``mean_depth`` and ``mean_true``.

With ``--sweep-poses true`` a ``model.depth_source=sweep`` checkpoint's plane sweep
uses the *true* relative context poses instead of its predicted ones (a diagnostic:
how much of the depth error is the poses'); with ``both``, each such checkpoint is
scored both ways.

Run::

    python examples/diff3r/pose_free_depth_errors.py <run>/pose_free/zero_shot/checkpoint.pt \\
        <run>/pose_free/diff3r/checkpoint.pt --data-root /tmp/pf/data_seed1_test24
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, "") and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from difftto.problems.splatting.se3 import se3_log  # noqa: E402
from examples.diff3r import pose_free  # noqa: E402
from examples.diff3r.train import make_dataset, model_from_checkpoint, prepare_data  # noqa: E402

__all__ = ["depth_errors", "true_sweep_pose"]

METRICS = ("relative", "abs_log", "shape", "shape_view", "mean_depth", "mean_true")


def depth_errors(depth: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """The metrics of :data:`METRICS` for one scene's predicted depths ``[V, H, W]``
    (or ``[1, V, H, W]``) against ``true`` (same shape; pixels with a non-finite or
    non-positive true depth left out)."""
    depth, true = depth.reshape(-1, *depth.shape[-2:]).double(), true.reshape(-1, *true.shape[-2:]).double()
    valid = torch.isfinite(true) & (true > 0)
    if not bool(valid.any()):
        raise ValueError("depth_errors: no valid true depth")
    d, t = depth[valid], true[valid]
    log_ratio = torch.log(d) - torch.log(t)
    per_view = []
    for v in range(depth.shape[0]):
        lr = (torch.log(depth[v]) - torch.log(true[v].clamp_min(1e-12)))[valid[v]]
        if lr.numel():
            per_view.append(lr - lr.median())
    return {"relative": float(((d - t).abs() / t).mean()), "abs_log": float(log_ratio.abs().mean()),
            "shape": float((log_ratio - log_ratio.median()).abs().mean()),
            "shape_view": float(torch.cat(per_view).abs().mean()),
            "mean_depth": float(d.mean()), "mean_true": float(t.mean())}


def true_sweep_pose(batch) -> torch.Tensor:
    """The true context poses of a first-view-frame batch as twists ``[B, V, 6]`` of the
    world-to-camera matrices (view 0: zero), as the model's ``theta["pose"]``."""
    return se3_log(torch.linalg.inv(batch["context_extrinsics"]))


def _mean_se(x: list[float]) -> tuple[float, float]:
    m = sum(x) / len(x)
    se = math.sqrt(sum((a - m) ** 2 for a in x) / (len(x) - 1) / len(x)) if len(x) > 1 else float("nan")
    return m, se


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="pose-free checkpoints (model=pose_free)")
    p.add_argument("--data-root", help="test data with depth (default: each checkpoint's)")
    p.add_argument("--sweep-poses", choices=("predicted", "true", "both"), default="predicted",
                   help="depth_source=sweep checkpoints: the poses their plane sweep uses")
    p.add_argument("--max-scenes", type=int)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for ckpt in a.checkpoints:
        model, state = model_from_checkpoint(ckpt)
        if not isinstance(model, pose_free.PoseFreeModel):
            raise ValueError(f"{ckpt}: not a pose-free checkpoint")
        cfg = OmegaConf.create(state["config"])
        root = Path(a.data_root) if a.data_root else prepare_data(cfg.data)
        dataset = make_dataset(cfg, root, "test", evaluation=True, load_depth=True)
        sweep = getattr(model, "depth_source", "monocular") == "sweep"
        poses = {"predicted": ("predicted",), "true": ("true",), "both": ("predicted", "true")}[a.sweep_poses]
        for which in poses if sweep else ("predicted",):
            started = time.perf_counter()
            n = len(dataset) if a.max_scenes is None else min(len(dataset), a.max_scenes)
            records = []
            for i in range(n):
                batch = pose_free.first_view_frame(default_collate([dataset[i]]))
                with torch.no_grad():
                    sweep_pose = true_sweep_pose(batch) if which == "true" else None
                    pred = model(batch["context_images"], batch["context_intrinsics"], batch["context_near"],
                                 batch["context_far"], sweep_pose=sweep_pose)
                records.append(depth_errors(pred.depth[0], batch["context_depths"][0]))
            name = f"{ckpt}" + (f" (sweep with the {which} poses)" if sweep else "")
            mean = {k: sum(r[k] for r in records) / n for k in METRICS}
            results[name] = {"scenes": n, "depth_source": model.depth_source if sweep else "monocular",
                             "sweep_poses": which if sweep else None, **mean,
                             "shape_se": _mean_se([r["shape"] for r in records])[1], "per_scene": records}
            print(f"{name}: {n} scenes, relative {mean['relative']:.3f}, |log ratio| {mean['abs_log']:.3f}, "
                  f"shape {mean['shape']:.3f} (per view {mean['shape_view']:.3f}), mean depth "
                  f"{mean['mean_depth']:.2f} (true {mean['mean_true']:.2f}) ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
