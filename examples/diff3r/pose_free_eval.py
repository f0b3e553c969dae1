"""Evaluate the pose-free Diff3R variant (NoPoSplat's protocol) and run its demo.

Rows, as for the pose-given model: ``zero-shot`` (Θ0), ``zero-shot + TTO`` (naive:
a small constant Λ on Gaussians *and* poses), ``Diff3R`` (Θ0 of the model trained
through the layer), ``Diff3R + TTO`` (its predicted Λ), optionally
``no-uncertainty + TTO`` and ``unrolled + TTO``. Each on clean context views and with
one context view's exposure scaled.

Scoring: target poses are not given to the model. Each target camera starts from its
ground-truth pose relative to context view 0, its translation scaled by the ratio of
the predicted to the true context baseline, and is then optimized against the frozen
Gaussians (Adam, ``--align-steps`` 100, lr 5e-3) before PSNR / SSIM on the clipped
renders. Also reported: the context poses' errors (rotation, translation direction,
degrees) before and after TTO, and the context PSNR before/after TTO.

Example::

    python examples/diff3r/pose_free_eval.py --zero-shot outputs/diff3r/pose_free/zero_shot/checkpoint.pt \\
        --diff3r outputs/diff3r/pose_free/diff3r/checkpoint.pt --out outputs/diff3r/pose_free/eval
    python examples/diff3r/pose_free_eval.py demo --out outputs/diff3r/pose_free   # train + evaluate
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, "") and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

import difftto  # noqa: E402
from examples.diff3r import pose_free  # noqa: E402
from examples.diff3r.demo import train_stages  # noqa: E402
from examples.diff3r.evaluate import (  # noqa: E402
    Row,
    checkpoint_rows,
    corrupt_exposure,
    evaluation_split,
    markdown_table,
)
from examples.diff3r.figures import image_grid  # noqa: E402
from examples.diff3r.metrics import finite_mean, psnr, ssim  # noqa: E402
from examples.diff3r.pose_alignment import align_target_poses, relative_pose_errors, scale_aligned_targets  # noqa: E402
from examples.diff3r.train import CHECKPOINT_NAME  # noqa: E402

__all__ = ["evaluate_pose_free", "extended_context", "pose_table", "demo", "widened_context",
           "with_context_views", "with_min_context_gap"]


def _invert(T: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(T)


def _pixel_K(batch, prefix: str) -> torch.Tensor:
    H, W = batch[f"{prefix}_images"].shape[-2:]
    return batch[f"{prefix}_intrinsics"] * batch[f"{prefix}_intrinsics"].new_tensor([float(W), float(H), 1.0])[:, None]


def extended_context(context: list[int], target: list[int], num_views: int, count: int) -> list[int]:
    """``context`` (an evaluation-index entry's views, its first one the frame) with
    views added up to ``count``: first views strictly between the outer context views
    that are neither context nor target views (evenly spaced), then the nearest views
    outside that range, alternating below and above. Targets are never added.

    Raises:
        ValueError: when the scene's ``num_views`` views cannot provide ``count``.
    """
    if count <= len(context):
        return list(context[:count])
    need = count - len(context)
    taken = set(context) | set(target)
    lo, hi = min(context), max(context)
    interior = [v for v in range(lo + 1, hi) if v not in taken]
    if len(interior) >= need:  # a step ≥ 1 between picks, so they are distinct
        if need == 1:
            return [*context, interior[len(interior) // 2]]
        return [*context, *(interior[round(i * (len(interior) - 1) / (need - 1))] for i in range(need))]
    picks = list(interior)
    for d in range(1, num_views):
        for v in (lo - d, hi + d):
            if len(picks) < need and 0 <= v < num_views and v not in taken:
                picks.append(v)
    if len(picks) < need:
        raise ValueError(f"count: a scene of {num_views} views with context {context} and targets {target} "
                         f"has no {count} distinct non-target context views")
    return list(context) + sorted(picks)


def widened_context(context: list[int], num_views: int, min_gap: int) -> list[int]:
    """``context`` (an evaluation-index entry's views) with its outer pair moved apart
    until they are ``min_gap`` frames apart (at most the scene's ``num_views - 1``): one
    frame at a time, on the side that keeps the pair's center nearest the original
    one's (below first on a tie), within the scene. Views between the outer pair stay,
    so the targets stay between the context views; a pair already ``min_gap`` apart is
    returned as it is. The outer views keep their places in the list (the first view
    stays the frame)."""
    if min_gap < 1:
        raise ValueError(f"min_gap: expected >= 1, got {min_gap}")
    lo, hi = min(context), max(context)
    gap = min(int(min_gap), num_views - 1)
    center = (lo + hi) / 2
    new_lo, new_hi = lo, hi
    while new_hi - new_lo < gap:
        moves = [(abs((new_lo - 1 + new_hi) / 2 - center), 0)] if new_lo > 0 else []
        moves += [(abs((new_lo + new_hi + 1) / 2 - center), 1)] if new_hi < num_views - 1 else []
        if min(moves)[1] == 0:
            new_lo -= 1
        else:
            new_hi += 1
    return [new_lo if v == lo else new_hi if v == hi else v for v in context]


def with_min_context_gap(dataset, min_gap: int):
    """Set ``dataset``'s evaluation index (in place) to its context pairs widened to at
    least ``min_gap`` frames (:func:`widened_context`), the targets kept; returns the
    dataset. Wider context baselines: more parallax for the depths' shape (README,
    pose-free, issue #7)."""
    index = {}
    for i, key in enumerate(dataset.keys):
        context, target = dataset.views(i)
        num_views = dataset._scene(key)[0]["cameras"].shape[0]
        index[key] = {"context": widened_context(context, num_views, int(min_gap)), "target": target}
    dataset.evaluation_index = index
    dataset.evaluation_path = None
    return dataset


def with_context_views(dataset, count: int):
    """Set ``dataset``'s evaluation index (in place) to ``count`` context views per
    scene (:func:`extended_context`); returns the dataset."""
    index = {}
    for i, key in enumerate(dataset.keys):
        context, target = dataset.views(i)
        num_views = dataset._scene(key)[0]["cameras"].shape[0]
        index[key] = {"context": extended_context(context, target, num_views, count), "target": target}
    dataset.evaluation_index = index
    dataset.evaluation_path = None
    return dataset


def score_row(row: Row, batch, layer, context_images=None, *, align_steps: int = 100,
              align_lr: float = 5e-3, renders: list | None = None) -> dict[str, float]:
    """Metrics of one row on one (first-view-frame) batch: target PSNR/SSIM after
    target-pose alignment, context PSNR and pose errors before/after TTO, and the
    mean Λ of the context poses' translation and rotation entries (views ``1..``).
    The first target's aligned render ``[3, H, W]`` is appended to ``renders`` when given."""
    with torch.no_grad():
        out = pose_free.run_pipeline(row.model, batch, layer if row.tto else None, lam=row.lam,
                                     context_images=context_images)
    pred = out.prediction
    ctx_true = _invert(batch["context_extrinsics"])
    init = scale_aligned_targets(_invert(batch["target_extrinsics"]), ctx_true, pred.viewmats)
    aligned = align_target_poses(out.theta, init, _pixel_K(batch, "target"), batch["target_images"],
                                 steps=align_steps, lr=align_lr)
    with torch.no_grad():
        render = pose_free.render_targets(out.theta, batch, viewmats=aligned.viewmats).clamp(0, 1)
        if renders is not None:
            renders.append(render[0, 0])
        target = batch["target_images"]
        metrics = {"psnr": float(psnr(render, target).mean()), "ssim": float(ssim(render, target).mean()),
                   "psnr_before_alignment": float(-10 * torch.log10(aligned.mse_before.clamp_min(1e-12)).mean())}
        rot0, tr0 = relative_pose_errors(pred.viewmats, ctx_true)
        metrics["rot_err_deg_before"] = float(rot0.mean())
        metrics["trans_err_deg_before"] = float(tr0.mean())
        if row.tto:
            ctx = batch["context_images"] if context_images is None else context_images
            from difftto.problems.splatting.se3 import se3_exp

            before = pose_free.render_targets(pred.theta, batch, "context", viewmats=pred.viewmats)
            after = pose_free.render_targets(out.theta, batch, "context", viewmats=se3_exp(out.theta["pose"]))
            metrics["context_psnr_before"] = float(psnr(before.clamp(0, 1), ctx).mean())
            metrics["context_psnr_after"] = float(psnr(after.clamp(0, 1), ctx).mean())
            rot1, tr1 = relative_pose_errors(se3_exp(out.theta["pose"]), ctx_true)
            metrics["rot_err_deg_after"] = float(rot1.mean())
            metrics["trans_err_deg_after"] = float(tr1.mean())
            metrics["stationarity"] = float(out.info.forward.stationarity.mean())
            lam_pose = out.lam["pose"][:, 1:]
            lam_pose = lam_pose if lam_pose.dim() == 3 else lam_pose[..., None].expand(*lam_pose.shape, 6)
            metrics["lam_pose_translation"] = float(lam_pose[..., :3].mean())
            metrics["lam_pose_rotation"] = float(lam_pose[..., 3:].mean())
    return metrics


def pose_table(results: dict) -> str:
    """Context pose errors (mean over scenes) before → after TTO, clean inputs."""
    lines = ["| row | rotation error ° (Θ0 → Θ*) | translation direction error ° (Θ0 → Θ*) | "
             "Λ_pose translation, rotation |", "|---|---|---|---|"]
    for name, r in results["rows"].items():
        c = r["clean"]
        if "rot_err_deg_after" in c:
            lines.append(f"| {name} | {c['rot_err_deg_before']:.2f} → {c['rot_err_deg_after']:.2f} | "
                         f"{c['trans_err_deg_before']:.2f} → {c['trans_err_deg_after']:.2f} | "
                         f"{c['lam_pose_translation']:.3g}, {c['lam_pose_rotation']:.3g} |")
        else:
            lines.append(f"| {name} | {c['rot_err_deg_before']:.2f} | {c['trans_err_deg_before']:.2f} | — |")
    return "\n".join(lines) + "\n"


def evaluate_pose_free(zero_shot: str | Path, diff3r: str | Path | None = None,
                       out_dir: str | Path = "outputs/diff3r/pose_free/eval", *,
                       no_uncertainty: str | Path | None = None, unrolled: str | Path | None = None,
                       data_root: str | Path | None = None, naive_lam: float = 1e-4, exposure: float = 1.5,
                       exposure_view: int = 1, tto_steps: int | None = None, max_scenes: int | None = None,
                       align_steps: int = 100, align_lr: float = 5e-3, tto_pose_lr: float | None = None,
                       tto_pose_translation_unit: float | None = None,
                       num_context_views: int | None = None, min_context_gap: int | None = None,
                       figure_scenes: int = 4, threads: int = 1) -> dict:
    """Evaluate pose-free checkpoints on the test split's evaluation index; writes
    ``results.json`` and ``results.md`` into ``out_dir`` and returns the results.

    ``num_context_views``: context views per scene (default: the training config's
    ``data.num_context_views``, else 2); views beyond the index's are added by
    :func:`extended_context`. ``min_context_gap``: the index's context pairs first widened
    to at least this many frames (:func:`widened_context`; default: as in the index).
    ``renders.png``: for the first ``figure_scenes`` scenes,
    the context views, the first target and each row's render of it after target-pose
    alignment."""
    torch.set_num_threads(int(threads))
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, ref_state = checkpoint_rows(zero_shot, diff3r, no_uncertainty=no_uncertainty, unrolled=unrolled,
                                      naive_lam=naive_lam)
    if tto_pose_translation_unit is not None:  # every row's TTO with this unit of the pose translation in θ
        for r in rows:
            r.model.tto_pose_translation_unit = pose_free._non_negative(
                "tto_pose_translation_unit", tto_pose_translation_unit, positive=True)
    for r in rows:
        if not isinstance(r.model, pose_free.PoseFreeModel):
            raise ValueError(f"{r.name}: the checkpoint holds a {type(r.model).__name__}, expected a pose-free "
                             "model (trained with model=pose_free)")
    cfg, root, dataset, tto_cfg = evaluation_split(ref_state, data_root, tto_steps)
    if num_context_views is None:
        num_context_views = int(cfg.data.get("num_context_views", 2))
    if num_context_views < 2:
        raise ValueError(f"num_context_views: expected >= 2, got {num_context_views}")
    if min_context_gap is not None:
        with_min_context_gap(dataset, int(min_context_gap))
    with_context_views(dataset, int(num_context_views))
    pose_lr = float(cfg.model.tto_pose_lr) if tto_pose_lr is None else float(tto_pose_lr)
    layer = pose_free.build_layer(tto_cfg, "implicit", pose_lr)
    n = len(dataset) if max_scenes is None else min(len(dataset), int(max_scenes))
    per_scene: dict[str, dict] = {r.name: {"clean": [], "exposure": []} for r in rows}
    keys, contexts, figure_rows = [], [], []
    for i in range(n):
        contexts.append(dataset.views(i)[0])
        batch = pose_free.first_view_frame(default_collate([dataset[i]]))
        keys.append(batch["key"][0])
        corrupted = corrupt_exposure(batch["context_images"], exposure_view, exposure)
        tiles = [*batch["context_images"][0], batch["target_images"][0, 0]] if i < figure_scenes else None
        for row in rows:
            per_scene[row.name]["clean"].append(score_row(row, batch, layer, align_steps=align_steps,
                                                          align_lr=align_lr, renders=tiles))
            per_scene[row.name]["exposure"].append(score_row(row, batch, layer, corrupted, align_steps=align_steps,
                                                             align_lr=align_lr))
        if tiles is not None:
            figure_rows.append(tiles)
        print(f"[eval] scene {i + 1}/{n} {keys[-1]}: "
              + ", ".join(f"{r.name} {per_scene[r.name]['clean'][-1]['psnr']:.2f}" for r in rows), flush=True)

    def mean_of(records: list[dict]) -> dict[str, float]:
        return {k: finite_mean([r[k] for r in records]) for k in records[0]}

    results: dict[str, Any] = {
        "scenes": n, "keys": keys, "num_context_views": int(num_context_views), "context_views": contexts,
        "min_context_gap": min_context_gap,
        "data_root": str(root), "image_size": list(dataset.image_size),
        "tto": tto_cfg, "tto_pose_lr": pose_lr, "naive_lam": naive_lam,
        "tto_pose_translation_unit": {r.name: float(getattr(r.model, "tto_pose_translation_unit", 1.0))
                                      for r in rows},
        "exposure": {"factor": exposure, "view": exposure_view},
        "lpips": {"available": False, "message": "LPIPS not computed for the pose-free rows"},
        "target_alignment": {"steps": align_steps, "lr": align_lr, "optimizer": "adam",
                             "init": "true target pose relative to context 0, translation scaled by the "
                                     "predicted/true context baseline"},
        "checkpoints": {"zero_shot": str(zero_shot), "diff3r": None if diff3r is None else str(diff3r),
                        "no_uncertainty": None if no_uncertainty is None else str(no_uncertainty),
                        "unrolled": None if unrolled is None else str(unrolled)},
        "rows": {name: {"clean": mean_of(v["clean"]), "exposure": mean_of(v["exposure"])}
                 for name, v in per_scene.items()},
        "per_scene": per_scene,
    }
    labels = [f"context {v}" for v in range(int(num_context_views))] + ["target"] + [r.name for r in rows]
    if figure_rows:
        results["figures"] = {"renders": str(image_grid(figure_rows, out_dir / "renders.png", col_labels=labels))}
    results["seconds"] = round(time.perf_counter() - started, 1)
    text = (f"Pose-free, held-out scenes: {n} ({dataset.image_size[0]}×{dataset.image_size[1]} px), "
            f"{num_context_views} context views"
            + ("" if min_context_gap is None else f" (pairs widened to ≥ {min_context_gap} frames)") + ", TTO: "
            f"{tto_cfg['inner']} {tto_cfg['steps']} steps on Gaussians and context poses (pose lr {pose_lr}"
            + "".join(f", {name}: translation in θ in units of {u:g}"
                      for name, u in results["tto_pose_translation_unit"].items() if u != 1.0) + "); "
            f"naive TTO Λ = {naive_lam}; "
            f"target poses aligned ({align_steps} Adam steps, lr {align_lr}) before scoring.\n\n"
            + markdown_table(results) + "\nContext pose errors (clean inputs):\n\n" + pose_table(results))
    (out_dir / "results.md").write_text(text)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def demo(out: str | Path = "outputs/diff3r/pose_free", *, pretrain_steps: int = 300, steps: int = 60,
         theta0_weight: float = 1.0, threads: int = 1, progress: bool = False, max_scenes: int | None = None,
         overrides: tuple[str, ...] = ()) -> dict:
    """Pre-train the pose-free model feed-forward, continue it as the zero-shot baseline
    and train Diff3R through the layer for ``steps`` from the same weights, evaluate."""
    out = Path(out)
    started = time.perf_counter()
    common = ["model=pose_free", f"threads={threads}", f"progress={str(progress).lower()}", *overrides]
    runs = train_stages(out, common, pretrain_steps, steps, theta0_weight, modes=("diff3r",), label="pose-free ")
    pre, zs, d3 = runs["pretrain"], runs["zero_shot"], runs["diff3r"]
    zs_dir, d3_dir = out / "zero_shot", out / "diff3r"
    print("== 4/4 pose-free evaluation on held-out scenes", flush=True)
    results = evaluate_pose_free(zs_dir / CHECKPOINT_NAME, d3_dir / CHECKPOINT_NAME, out / "eval",
                                 threads=threads, max_scenes=max_scenes)
    summary = {"seconds": round(time.perf_counter() - started, 1), "data_root": pre["data_root"],
               "train_seconds": {"pretrain": pre["seconds"], "zero_shot": zs["seconds"], "diff3r": d3["seconds"]},
               "diff3r_pcg_failures": d3["pcg_failures"], "results": str(out / "eval" / "results.md"),
               "eval_seconds": results["seconds"], "figures": results.get("figures", {})}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print()
    print((out / "eval" / "results.md").read_text())
    for name, path in summary["figures"].items():
        print(f"  figure   {path}   ({name})")
    print(f"Done in {summary['seconds']} s. Outputs in {out}/")
    return summary


def main(argv: list[str] | None = None) -> dict:
    """Command line: ``evaluate`` checkpoints (default) or run the ``demo``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        p = argparse.ArgumentParser(description="pose-free Diff3R demo: train and evaluate")
        p.add_argument("--out", default="outputs/diff3r/pose_free")
        p.add_argument("--pretrain-steps", type=int, default=300)
        p.add_argument("--steps", type=int, default=60)
        p.add_argument("--theta0-weight", type=float, default=1.0)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--max-scenes", type=int)
        p.add_argument("--progress", action="store_true")
        p.add_argument("overrides", nargs="*")
        a = p.parse_args(argv[1:])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", difftto.solvers.LinearSolveWarning)
            return demo(a.out, pretrain_steps=a.pretrain_steps, steps=a.steps, theta0_weight=a.theta0_weight,
                        threads=a.threads, progress=a.progress, max_scenes=a.max_scenes, overrides=tuple(a.overrides))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zero-shot", required=True)
    p.add_argument("--diff3r")
    p.add_argument("--no-uncertainty")
    p.add_argument("--unrolled")
    p.add_argument("--out", default="outputs/diff3r/pose_free/eval")
    p.add_argument("--data-root")
    p.add_argument("--naive-lam", type=float, default=1e-4)
    p.add_argument("--exposure", type=float, default=1.5)
    p.add_argument("--exposure-view", type=int, default=1)
    p.add_argument("--tto-steps", type=int)
    p.add_argument("--max-scenes", type=int)
    p.add_argument("--align-steps", type=int, default=100)
    p.add_argument("--align-lr", type=float, default=5e-3)
    p.add_argument("--tto-pose-lr", type=float,
                   help="inner learning rate of the poses (default: the training config's)")
    p.add_argument("--tto-pose-translation-unit", type=float,
                   help="unit of the pose translation entries in the TTO's θ, for every row (default: each "
                        "model's model.tto_pose_translation_unit)")
    p.add_argument("--num-context-views", type=int,
                   help="context views per scene (default: the training config's, else 2; views are added to "
                        "the evaluation index's two)")
    p.add_argument("--min-context-gap", type=int,
                   help="widen each index context pair to at least this many frames, the targets kept "
                        "(default: the index's pairs)")
    p.add_argument("--figure-scenes", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", difftto.solvers.LinearSolveWarning)
        results = evaluate_pose_free(a.zero_shot, a.diff3r, a.out, no_uncertainty=a.no_uncertainty,
                                     unrolled=a.unrolled, data_root=a.data_root, naive_lam=a.naive_lam,
                                     exposure=a.exposure, exposure_view=a.exposure_view, tto_steps=a.tto_steps,
                                     max_scenes=a.max_scenes, align_steps=a.align_steps, align_lr=a.align_lr,
                                     tto_pose_lr=a.tto_pose_lr,
                                     tto_pose_translation_unit=a.tto_pose_translation_unit,
                                     num_context_views=a.num_context_views, min_context_gap=a.min_context_gap,
                                     figure_scenes=a.figure_scenes, threads=a.threads)
    print((Path(a.out) / "results.md").read_text())
    return results


if __name__ == "__main__":
    main()
