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
scored both ways. For every checkpoint also the *pose reprojection error* (pixels):
how far each context pixel, at its true depth, lands in the other context view with
the predicted relative pose (its translation rescaled to the true baseline: a scale
error only rescales the depths) from where it lands with the true one; the epipolar
error a plane sweep with the predicted poses works with, to compare with the
reference's parallax of the shape.

``--reference`` (with ``--data-root``) scores two references on the data itself: a
constant depth map (its shape error is the true depths' own spread about their
median: what a flat prediction scores) and the *parallax of the shape*, how far (in
pixels of the other context view) each context pixel seen there moves between its true
depth and its view's median depth: what a two-view match must resolve to see the shape.

``--min-context-gap G`` widens each scene's context pair to at least ``G`` frames
first (``pose_free_eval.py``'s option of the same name), for the parallax of wider
baselines; the reference then also prints the context pairs' mean overlap.

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

from difftto.problems.splatting.se3 import se3_exp, se3_log  # noqa: E402
from examples.diff3r import pose_free  # noqa: E402
from examples.diff3r.data.sampler import pair_overlap  # noqa: E402
from examples.diff3r.pose_free_eval import with_min_context_gap  # noqa: E402
from examples.diff3r.train import compose_config, make_dataset, model_from_checkpoint, prepare_data  # noqa: E402

__all__ = ["depth_errors", "pose_reprojection_error", "shape_parallax", "true_sweep_pose"]

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


def _project(ray: torch.Tensor, depth: torch.Tensor, c2w_src: torch.Tensor, w2c_dst: torch.Tensor,
             K_dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays ``[H, W, 3]`` (camera z = 1) of a source camera cut at ``depth`` ``[H, W]``,
    projected into the destination: pixel coordinates ``[H, W, 2]`` and z ``[H, W]`` there."""
    X = (ray * depth[..., None]) @ c2w_src[:3, :3].T + c2w_src[:3, 3]
    Y = X @ w2c_dst[:3, :3].T + w2c_dst[:3, 3]
    return (Y @ K_dst.T)[..., :2] / Y[..., 2:3], Y[..., 2]


def shape_parallax(batch) -> torch.Tensor:
    """For a first-view-frame batch of one scene with ``context_depths``: for every ordered
    pair of context views ``(s, d)``, each pixel of ``s`` back-projected at its true depth
    and at view ``s``'s median true depth, both projected into ``d``; the distance between
    the two (pixels of ``d``) where the true point lands inside ``d`` in front of it. A
    1-D tensor over those pixels."""
    true, K, c2w, rays = _context_geometry(batch)
    w2c = torch.linalg.inv(c2w)

    def at_median(s, d, ray, valid, depth):
        flat = torch.full_like(depth, float(true[s][valid].median()))
        return _project(ray, flat, c2w[s], w2c[d], K[d])[0]

    return _displacements(true, K, c2w, rays, at_median)


def _context_geometry(batch):
    """``(true depths [V, H, W], pixel intrinsics [V, 3, 3], c2w [V, 4, 4], each view's
    pixel-centre rays [V, H, W, 3] at camera z = 1)`` of a one-scene batch, float64."""
    true = batch["context_depths"][0].double()
    V, H, W = true.shape
    K = (batch["context_intrinsics"][0].double()
         * torch.tensor([float(W), float(H), 1.0], dtype=torch.float64)[:, None])
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5,
                          indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1)
    rays = torch.stack([pix @ torch.linalg.inv(K[s]).T for s in range(V)])
    return true, K, batch["context_extrinsics"][0].double(), rays


def _displacements(true, K, c2w, rays, other) -> torch.Tensor:
    """For every ordered pair of context views ``(s, d)``: each pixel of ``s`` at its true
    depth projected into ``d`` with the true cameras, against ``other(s, d, ray, valid,
    depth)`` (``depth``: ``s``'s true depths, 1 where not ``valid``; pixel coordinates in
    ``d`` ``[H, W, 2]``); the distances (pixels of ``d``) where the
    true projection lands inside ``d`` in front of it, as one 1-D tensor."""
    V, H, W = true.shape
    w2c = torch.linalg.inv(c2w)
    out = []
    for s in range(V):
        valid = torch.isfinite(true[s]) & (true[s] > 0)
        depth = torch.where(valid, true[s], torch.ones_like(true[s]))
        for d in range(V):
            if d == s:
                continue
            at_true, z = _project(rays[s], depth, c2w[s], w2c[d], K[d])
            seen = valid & (z > 0) & (at_true[..., 0] >= 0) & (at_true[..., 0] <= W) & (at_true[..., 1] >= 0) \
                & (at_true[..., 1] <= H)
            out.append((at_true - other(s, d, rays[s], valid, depth)).norm(dim=-1)[seen])
    return torch.cat(out)


def pose_reprojection_error(batch, pose: torch.Tensor) -> torch.Tensor:
    """For a first-view-frame batch of one scene with ``context_depths`` and predicted
    twists ``pose [1, V, 6]`` (world-to-camera, first view's frame): for every ordered
    pair of context views ``(s, d)``, each pixel of ``s`` at its true depth projected into
    ``d`` with the true cameras and with the predicted ones (each predicted camera center
    rescaled to its true distance from view 0's); the distance between the two (pixels
    of ``d``) where the true projection lands inside ``d`` in front of it. 1-D."""
    true, K, c2w, rays = _context_geometry(batch)
    pred_c2w = se3_exp(-pose[0].double())
    norm_true, norm_pred = c2w[:, :3, 3].norm(dim=-1), pred_c2w[:, :3, 3].norm(dim=-1)
    factor = torch.where(norm_pred > 1e-12, norm_true / norm_pred.clamp_min(1e-12), torch.ones_like(norm_pred))
    pred_c2w = pred_c2w.clone()
    pred_c2w[:, :3, 3] = pred_c2w[:, :3, 3] * factor[:, None]
    pred_w2c = torch.linalg.inv(pred_c2w)

    def at_pred(s, d, ray, valid, depth):
        return _project(ray, depth, pred_c2w[s], pred_w2c[d], K[d])[0]

    return _displacements(true, K, c2w, rays, at_pred)


def reference(dataset, n: int) -> dict:
    """``--reference``: the constant depth map's errors and the shape's parallax (pixels)."""
    records, parallax, overlap, gaps = [], [], [], []
    for i in range(n):
        batch = pose_free.first_view_frame(default_collate([dataset[i]]))
        true = batch["context_depths"][0]
        records.append(depth_errors(torch.ones_like(true), true))
        parallax.append(shape_parallax(batch))
        H, W = true.shape[-2:]
        K = batch["context_intrinsics"][0] * torch.tensor([float(W), float(H), 1.0])[:, None]
        overlap.append(pair_overlap(true, K, batch["context_extrinsics"][0], 0, 1))
        context = dataset.views(i)[0]
        gaps.append(max(context) - min(context))
    x = torch.cat(parallax)
    out = {"constant_depth": {k: sum(r[k] for r in records) / n for k in ("shape", "shape_view")},
           "context_gap": {"mean": sum(gaps) / n, "min": min(gaps), "max": max(gaps)},
           "overlap_views_0_1": sum(overlap) / n,
           "parallax_px": {"median": float(x.median()), "mean": float(x.mean()), "q75": float(x.quantile(0.75)),
                           "q90": float(x.quantile(0.9)), "below_1px": float((x < 1).double().mean())}}
    c, q = out["constant_depth"], out["parallax_px"]
    print(f"reference, {n} scenes: a constant depth map's shape error {c['shape']:.3f} (per view "
          f"{c['shape_view']:.3f}); the shape's parallax in the other context view: median {q['median']:.2f} px, "
          f"mean {q['mean']:.2f}, 75% {q['q75']:.2f}, 90% {q['q90']:.2f}, below 1 px: {q['below_1px']:.0%}; "
          f"context gap {out['context_gap']['mean']:.1f} frames ({min(gaps)}-{max(gaps)}), overlap of views "
          f"0 and 1 {out['overlap_views_0_1']:.2f}", flush=True)
    return out


def _mean_se(x: list[float]) -> tuple[float, float]:
    m = sum(x) / len(x)
    se = math.sqrt(sum((a - m) ** 2 for a in x) / (len(x) - 1) / len(x)) if len(x) > 1 else float("nan")
    return m, se


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="*", help="pose-free checkpoints (model=pose_free)")
    p.add_argument("--data-root", help="test data with depth (default: each checkpoint's)")
    p.add_argument("--sweep-poses", choices=("predicted", "true", "both"), default="predicted",
                   help="depth_source=sweep checkpoints: the poses their plane sweep uses")
    p.add_argument("--reference", action="store_true",
                   help="also score a constant depth map and the shape's parallax on --data-root")
    p.add_argument("--max-scenes", type=int)
    p.add_argument("--min-context-gap", type=int,
                   help="widen each scene's context pair to at least this many frames (targets kept)")
    p.add_argument("--image-size", type=int,
                   help="--reference: the size the data is read at (default: the config's data.image_size, 32)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    if not a.checkpoints and not a.reference:
        p.error("give checkpoints, --reference or both")
    if a.reference and not a.data_root:
        p.error("--reference needs --data-root")
    torch.set_num_threads(1)

    def test_split(cfg, root):
        """The test split (pairs widened with ``--min-context-gap``) and how many scenes."""
        dataset = make_dataset(cfg, root, "test", evaluation=True, load_depth=True)
        if a.min_context_gap is not None:
            with_min_context_gap(dataset, a.min_context_gap)
        return dataset, len(dataset) if a.max_scenes is None else min(len(dataset), a.max_scenes)

    results = {}
    if a.reference:
        size = [] if a.image_size is None else [f"data.image_size={a.image_size}"]
        cfg = compose_config(["model=pose_free", *size])
        dataset, n = test_split(cfg, Path(a.data_root))
        results["reference"] = reference(dataset, n)
    for ckpt in a.checkpoints:
        model, state = model_from_checkpoint(ckpt)
        if not isinstance(model, pose_free.PoseFreeModel):
            raise ValueError(f"{ckpt}: not a pose-free checkpoint")
        cfg = OmegaConf.create(state["config"])
        root = Path(a.data_root) if a.data_root else prepare_data(cfg.data)
        dataset, n = test_split(cfg, root)
        sweep = getattr(model, "depth_source", "monocular") == "sweep"
        poses = {"predicted": ("predicted",), "true": ("true",), "both": ("predicted", "true")}[a.sweep_poses]
        for which in poses if sweep else ("predicted",):
            started = time.perf_counter()
            records, reprojection = [], []
            for i in range(n):
                batch = pose_free.first_view_frame(default_collate([dataset[i]]))
                with torch.no_grad():
                    sweep_pose = true_sweep_pose(batch) if which == "true" else None
                    pred = model(batch["context_images"], batch["context_intrinsics"], batch["context_near"],
                                 batch["context_far"], sweep_pose=sweep_pose)
                records.append(depth_errors(pred.depth[0], batch["context_depths"][0]))
                reprojection.append(pose_reprojection_error(batch, pred.theta["pose"]))
            px = torch.cat(reprojection)
            name = f"{ckpt}" + (f" (sweep with the {which} poses)" if sweep else "")
            mean = {k: sum(r[k] for r in records) / n for k in METRICS}
            results[name] = {"scenes": n, "depth_source": model.depth_source if sweep else "monocular",
                             "sweep_poses": which if sweep else None, **mean,
                             "shape_se": _mean_se([r["shape"] for r in records])[1],
                             "pose_reprojection_px": {"median": float(px.median()), "mean": float(px.mean())},
                             "per_scene": records}
            print(f"{name}: {n} scenes, relative {mean['relative']:.3f}, |log ratio| {mean['abs_log']:.3f}, "
                  f"shape {mean['shape']:.3f} (per view {mean['shape_view']:.3f}), mean depth "
                  f"{mean['mean_depth']:.2f} (true {mean['mean_true']:.2f}); pose reprojection error median "
                  f"{float(px.median()):.2f} px, mean {float(px.mean()):.2f} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
