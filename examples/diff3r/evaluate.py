"""Evaluate Diff3R models on held-out scenes (the test split's evaluation index).

Rows (each on clean inputs and with one context view's exposure scaled):

- ``zero-shot``: the zero-shot model's Θ0 rendered into the target views;
- ``zero-shot + TTO``: naive test-time optimization of those Gaussians on the
  context views with a small constant Λ (``--naive-lam``);
- ``Diff3R``: the Diff3R model's Θ0 (no TTO);
- ``Diff3R + TTO``: its Θ0 refined with its own predicted Λ (what it was trained for);
- ``no-uncertainty + TTO``, ``unrolled + TTO``: when those checkpoints are given.

Metrics (MVSplat's protocol): PSNR on clipped images, SSIM (scikit-image, 11-px
Gaussian window), LPIPS when a saved LPIPS module is given; averaged over each
scene's target views, then over scenes. Also the context-view PSNR before and after
TTO (the overfitting signature), Λ_means where the other context view does / does
not see (on generated data, which stores depth), and TTO convergence curves.

Outputs in ``--out``: ``results.json``, ``results.md`` and PNG figures
(``renders.png``, ``renders_exposure.png``, ``lambda_means.png``, ``tto_convergence.png``).

Example::

    python examples/diff3r/evaluate.py --zero-shot outputs/diff3r/zero_shot/checkpoint.pt \\
        --diff3r outputs/diff3r/diff3r/checkpoint.pt --out outputs/diff3r/eval
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, "") and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

import difftto  # noqa: E402
from examples.diff3r.data import covisibility, normalized_to_pixel_intrinsics  # noqa: E402
from examples.diff3r.figures import colorize, image_grid, line_plot  # noqa: E402
from examples.diff3r.metrics import finite_mean, load_lpips, lpips_distance, psnr, ssim  # noqa: E402
from examples.diff3r.pipeline import build_layer, render_views, run_pipeline  # noqa: E402
from examples.diff3r.train import make_dataset, model_from_checkpoint, prepare_data  # noqa: E402

__all__ = ["Row", "corrupt_exposure", "evaluate", "markdown_table"]


@dataclass
class Row:
    """One evaluated configuration: a model, with or without TTO, and the Λ it uses
    (``"predicted"`` or a constant)."""

    name: str
    model: torch.nn.Module  # a Diff3RModel (the pose-free evaluation: a PoseFreeModel)
    tto: bool
    lam: Any = "predicted"


def checkpoint_rows(zero_shot: str | Path, diff3r: str | Path | None = None, *,
                    no_uncertainty: str | Path | None = None, unrolled: str | Path | None = None,
                    naive_lam: float = 1e-4) -> tuple[list[Row], dict]:
    """The rows of the given checkpoints: ``zero-shot`` and ``zero-shot + TTO`` (constant
    Λ ``naive_lam``), ``Diff3R`` and ``Diff3R + TTO`` (its predicted Λ), ``no-uncertainty
    + TTO`` and ``unrolled + TTO`` (the Λ they were trained with). Returns the rows and
    the checkpoint state whose config the evaluation reads (Diff3R's, else zero-shot's)."""
    zs_model, ref_state = model_from_checkpoint(zero_shot)
    rows = [Row("zero-shot", zs_model, False), Row("zero-shot + TTO", zs_model, True, float(naive_lam))]
    if diff3r is not None:
        d_model, ref_state = model_from_checkpoint(diff3r)
        rows += [Row("Diff3R", d_model, False), Row("Diff3R + TTO", d_model, True)]
    for name, path in (("no-uncertainty + TTO", no_uncertainty), ("unrolled + TTO", unrolled)):
        if path is not None:
            m, state = model_from_checkpoint(path)
            lam = "predicted" if state["config"]["mode"]["lam"] == "predicted" else state["config"]["model"]["lam_init"]
            rows.append(Row(name, m, True, lam))
    return rows, ref_state


def corrupt_exposure(images: torch.Tensor, view: int = 1, factor: float = 1.5) -> torch.Tensor:
    """Scale the brightness of context ``view`` of ``images [B, V, 3, H, W]`` by
    ``factor`` (clipped to ``[0, 1]``); returns a new tensor."""
    if not 0 <= view < images.shape[1]:
        raise ValueError(f"view: expected an index in [0, {images.shape[1]}), got {view}")
    if factor <= 0:
        raise ValueError(f"factor: expected > 0, got {factor}")
    out = images.clone()
    out[:, view] = (out[:, view] * factor).clamp(0, 1)
    return out


def _scene_metrics(render, target, lpips_module) -> dict[str, float]:
    out = {"psnr": float(psnr(render, target).mean()), "ssim": float(ssim(render, target).mean())}
    if lpips_module is not None:
        out["lpips"] = float(lpips_distance(lpips_module, render, target).mean())
    return out


def _run_row(row: Row, batch, layer, context_images, lpips_module) -> tuple[dict, Any]:
    with torch.no_grad():
        out = run_pipeline(row.model, batch, layer if row.tto else None, lam=row.lam, context_images=context_images)
    metrics = _scene_metrics(out.render, batch["target_images"], lpips_module)
    if row.tto:
        ctx = batch["context_images"] if context_images is None else context_images
        with torch.no_grad():
            before = render_views(out.prediction.theta, batch, "context")
            after = render_views(out.theta, batch, "context")
        metrics["context_psnr_before"] = float(psnr(before, ctx).mean())
        metrics["context_psnr_after"] = float(psnr(after, ctx).mean())
        metrics["stationarity"] = float(out.info.forward.stationarity.mean())
    return metrics, out


def _lam_visibility(out, batch, border: int = 4) -> dict[str, float] | None:
    """Mean Λ_means over context pixels the other context view sees / does not see
    (also on the interior, ``border`` px away from the image edges, and on the border)."""
    if "context_depths" not in batch:
        return None
    depths = batch["context_depths"][0]
    H, W = depths.shape[-2:]
    K = normalized_to_pixel_intrinsics(batch["context_intrinsics"][0], H, W)
    c2w = batch["context_extrinsics"][0]
    lam = out.lam["means"][0].reshape(2, H, W)
    seen = torch.stack([covisibility(depths[0], K[0], c2w[0], depths[1], K[1], c2w[1]),
                        covisibility(depths[1], K[1], c2w[1], depths[0], K[0], c2w[0])])
    if seen.all() or not seen.any():
        return None
    out = {"lam_means_seen": float(lam[seen].mean()), "lam_means_unseen": float(lam[~seen].mean()),
           "seen_mask": seen}
    # Λ is also high along every image border, where the unseen pixels cluster: compare
    # seen/unseen again on the interior only (pixels >= border from every edge).
    interior = torch.zeros_like(seen)
    interior[:, border:H - border, border:W - border] = True
    out["lam_means_border"] = float(lam[~interior].mean())
    out["lam_means_interior"] = float(lam[interior].mean())
    if (seen & interior).any() and (~seen & interior).any():
        out["lam_means_seen_interior"] = float(lam[seen & interior].mean())
        out["lam_means_unseen_interior"] = float(lam[~seen & interior].mean())
    return out


def markdown_table(results: dict) -> str:
    """The results as a Markdown table (means over scenes)."""
    lp = results["lpips"]["available"]
    head = "| row | PSNR ↑ | SSIM ↑ | LPIPS ↓ | PSNR, exposure ×{f} view {v} | drop | context PSNR before → after TTO |"
    lines = [head.format(f=results["exposure"]["factor"], v=results["exposure"]["view"]),
             "|---|---|---|---|---|---|---|"]
    for name, r in results["rows"].items():
        clean, exp = r["clean"], r["exposure"]
        lpips_text = f"{clean['lpips']:.4f}" if lp and "lpips" in clean else "n/a"
        ctx = (f"{clean['context_psnr_before']:.2f} → {clean['context_psnr_after']:.2f}"
               if "context_psnr_after" in clean else "—")
        lines.append(f"| {name} | {clean['psnr']:.2f} | {clean['ssim']:.4f} | {lpips_text} | {exp['psnr']:.2f} | "
                     f"{clean['psnr'] - exp['psnr']:.2f} | {ctx} |")
    return "\n".join(lines) + "\n"


def evaluation_split(ref_state: dict, data_root: str | Path | None = None, tto_steps: int | None = None,
               load_depth: bool = False) -> tuple[Any, Path, Any, dict]:
    """What an evaluation reads from a checkpoint's config: the config (``data.root``
    replaced by ``data_root`` when given), the prepared data root, the test split's
    evaluation dataset and the TTO config as a dict (``steps`` replaced by ``tto_steps``
    when given)."""
    cfg = OmegaConf.create(ref_state["config"])
    if data_root is not None:
        cfg.data.root = str(data_root)
    root = prepare_data(cfg.data)
    dataset = make_dataset(cfg, root, "test", evaluation=True, load_depth=load_depth)
    tto_cfg = OmegaConf.to_container(cfg.tto, resolve=True)
    if tto_steps is not None:
        tto_cfg["steps"] = int(tto_steps)
    return cfg, root, dataset, tto_cfg


def evaluate(
    zero_shot: str | Path,
    diff3r: str | Path | None = None,
    out_dir: str | Path = "outputs/diff3r/eval",
    *,
    no_uncertainty: str | Path | None = None,
    unrolled: str | Path | None = None,
    data_root: str | Path | None = None,
    naive_lam: float = 1e-4,
    exposure: float = 1.5,
    exposure_view: int = 1,
    tto_steps: int | None = None,
    lpips_checkpoint: str | None = None,
    max_scenes: int | None = None,
    convergence_steps: tuple[int, ...] = (0, 5, 10, 20, 40),
    figure_scenes: int = 4,
    threads: int = 1,
) -> dict:
    """Evaluate the given checkpoints; writes ``results.json``, ``results.md`` and
    figures into ``out_dir`` and returns the results dict (means over scenes and the
    per-scene values)."""
    torch.set_num_threads(int(threads))
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, ref_state = checkpoint_rows(zero_shot, diff3r, no_uncertainty=no_uncertainty, unrolled=unrolled,
                                      naive_lam=naive_lam)
    _, root, dataset, tto_cfg = evaluation_split(ref_state, data_root, tto_steps, load_depth=True)
    layer = build_layer(tto_cfg, "implicit")
    lpips_module, lpips_message = load_lpips(lpips_checkpoint)
    print(f"[eval] {lpips_message}", flush=True)

    n = len(dataset) if max_scenes is None else min(len(dataset), int(max_scenes))
    per_scene: dict[str, dict] = {r.name: {"clean": [], "exposure": []} for r in rows}
    lam_vis: list[dict] = []
    figure_rows, figure_rows_exp, lam_rows = [], [], []
    curves = {r.name: {k: {"target": [], "context": []} for k in convergence_steps} for r in rows if r.tto}
    keys = []
    for i in range(n):
        batch = default_collate([dataset[i]])
        keys.append(batch["key"][0])
        corrupted = corrupt_exposure(batch["context_images"], exposure_view, exposure)
        outs, outs_exp = {}, {}
        for row in rows:
            m_clean, outs[row.name] = _run_row(row, batch, layer, None, lpips_module)
            m_exp, outs_exp[row.name] = _run_row(row, batch, layer, corrupted, lpips_module)
            per_scene[row.name]["clean"].append(m_clean)
            per_scene[row.name]["exposure"].append(m_exp)
            if row.tto and row.lam == "predicted" and row.name.startswith("Diff3R"):
                vis = _lam_visibility(outs[row.name], batch)
                if vis is not None:
                    seen = vis.pop("seen_mask")
                    lam_vis.append(vis)
                    if len(lam_rows) < figure_scenes:
                        H, W = batch["context_images"].shape[-2:]
                        lam = outs[row.name].lam["means"][0].reshape(2, H, W)
                        lo, hi = float(lam.min()), float(lam.max())
                        ctx = batch["context_images"][0]
                        lam_rows.append([ctx[0], colorize(lam[0], lo, hi, log=True), seen[0].float(),
                                         ctx[1], colorize(lam[1], lo, hi, log=True), seen[1].float()])
        for row in rows:
            if not row.tto:
                continue
            for k in convergence_steps:
                if k == 0:
                    o = outs[row.name]
                    tgt = float(psnr(render_views(o.prediction.theta, batch), batch["target_images"]).mean())
                    ctx_psnr = per_scene[row.name]["clean"][-1]["context_psnr_before"]
                else:
                    kl = build_layer({**tto_cfg, "steps": int(k)}, "implicit")
                    with torch.no_grad():
                        o = run_pipeline(row.model, batch, kl, lam=row.lam)
                        tgt = float(psnr(o.render, batch["target_images"]).mean())
                        ctx_psnr = float(psnr(render_views(o.theta, batch, "context"), batch["context_images"]).mean())
                curves[row.name][k]["target"].append(tgt)
                curves[row.name][k]["context"].append(ctx_psnr)
        if len(figure_rows) < figure_scenes:
            ctx = batch["context_images"][0]
            figure_rows.append([ctx[0], ctx[1], batch["target_images"][0, 0]]
                               + [outs[r.name].render[0, 0] for r in rows])
            figure_rows_exp.append([corrupted[0, 0], corrupted[0, 1], batch["target_images"][0, 0]]
                                   + [outs_exp[r.name].render[0, 0] for r in rows])
        print(f"[eval] scene {i + 1}/{n} {keys[-1]}: "
              + ", ".join(f"{r.name} {per_scene[r.name]['clean'][-1]['psnr']:.2f}" for r in rows), flush=True)

    def mean_of(records: list[dict]) -> dict[str, float]:
        return {k: finite_mean([r[k] for r in records]) for k in records[0]}

    results: dict[str, Any] = {
        "scenes": n,
        "keys": keys,
        "data_root": str(root),
        "image_size": list(dataset.image_size),
        "tto": tto_cfg,
        "naive_lam": naive_lam,
        "exposure": {"factor": exposure, "view": exposure_view},
        "lpips": {"available": lpips_module is not None, "message": lpips_message},
        "checkpoints": {"zero_shot": str(zero_shot), "diff3r": None if diff3r is None else str(diff3r),
                        "no_uncertainty": None if no_uncertainty is None else str(no_uncertainty),
                        "unrolled": None if unrolled is None else str(unrolled)},
        "rows": {name: {"clean": mean_of(v["clean"]), "exposure": mean_of(v["exposure"])}
                 for name, v in per_scene.items()},
        "per_scene": per_scene,
        "tto_convergence": {name: {str(k): {"target_psnr": finite_mean(v["target"]),
                                            "context_psnr": finite_mean(v["context"])} for k, v in c.items()}
                            for name, c in curves.items()},
    }
    if lam_vis:
        results["lambda_visibility"] = {
            "scenes": len(lam_vis),
            "lam_means_seen": finite_mean([v["lam_means_seen"] for v in lam_vis]),
            "lam_means_unseen": finite_mean([v["lam_means_unseen"] for v in lam_vis]),
            "unseen_higher_in_scenes": sum(v["lam_means_unseen"] > v["lam_means_seen"] for v in lam_vis),
            "lam_means_border": finite_mean([v["lam_means_border"] for v in lam_vis]),
            "lam_means_interior": finite_mean([v["lam_means_interior"] for v in lam_vis]),
        }
        inner = [v for v in lam_vis if "lam_means_unseen_interior" in v]
        if inner:
            results["lambda_visibility"].update({
                "interior_scenes": len(inner),
                "lam_means_seen_interior": finite_mean([v["lam_means_seen_interior"] for v in inner]),
                "lam_means_unseen_interior": finite_mean([v["lam_means_unseen_interior"] for v in inner]),
                "unseen_higher_interior_in_scenes": sum(v["lam_means_unseen_interior"] > v["lam_means_seen_interior"]
                                                        for v in inner),
            })
    labels = ["context 0", "context 1", "target"] + [r.name for r in rows]
    figures = {"renders": str(image_grid(figure_rows, out_dir / "renders.png", col_labels=labels)),
               "renders_exposure": str(image_grid(figure_rows_exp, out_dir / "renders_exposure.png",
                                                  col_labels=labels))}
    if lam_rows:
        figures["lambda_means"] = str(image_grid(
            lam_rows, out_dir / "lambda_means.png",
            col_labels=["context 0", "Lambda_means 0 (log)", "seen by 1", "context 1", "Lambda_means 1", "seen by 0"]))
    if curves:
        series_t = {f"{name} target": ([float(k) for k in c], [results["tto_convergence"][name][str(k)]["target_psnr"]
                                                                for k in c]) for name, c in curves.items()}
        series_c = {f"{name} context": ([float(k) for k in c],
                                        [results["tto_convergence"][name][str(k)]["context_psnr"] for k in c])
                    for name, c in curves.items()}
        figures["tto_convergence"] = str(line_plot({**series_t, **series_c}, out_dir / "tto_convergence.png",
                                                   title="PSNR vs TTO steps (mean over scenes)",
                                                   xlabel="TTO steps", ylabel="PSNR dB", size=(640, 360)))
    results["figures"] = figures
    results["seconds"] = round(time.perf_counter() - started, 1)
    table = markdown_table(results)
    (out_dir / "results.md").write_text(
        f"Held-out scenes: {n} ({dataset.image_size[0]}×{dataset.image_size[1]} px), TTO: {tto_cfg['inner']} "
        f"{tto_cfg['steps']} steps; naive TTO Λ = {naive_lam}; {lpips_message}.\n\n" + table)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zero-shot", required=True, help="checkpoint of a zero_shot run")
    parser.add_argument("--diff3r", help="checkpoint of a diff3r run")
    parser.add_argument("--no-uncertainty", help="checkpoint of a no_uncertainty run")
    parser.add_argument("--unrolled", help="checkpoint of an unrolled run")
    parser.add_argument("--out", default="outputs/diff3r/eval")
    parser.add_argument("--data-root", help="dataset root (default: the one the checkpoint was trained with)")
    parser.add_argument("--naive-lam", type=float, default=1e-4, help="constant Λ of naive TTO")
    parser.add_argument("--exposure", type=float, default=1.5)
    parser.add_argument("--exposure-view", type=int, default=1)
    parser.add_argument("--tto-steps", type=int, help="inner steps (default: the training config's)")
    parser.add_argument("--lpips-checkpoint", help="a saved LPIPS module (torch.save or TorchScript)")
    parser.add_argument("--max-scenes", type=int)
    parser.add_argument("--convergence-steps", default="0,5,10,20,40")
    parser.add_argument("--figure-scenes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    steps = tuple(int(s) for s in args.convergence_steps.split(",") if s.strip())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", difftto.solvers.LinearSolveWarning)  # no backward solves here anyway
        results = evaluate(
            args.zero_shot, args.diff3r, args.out, no_uncertainty=args.no_uncertainty, unrolled=args.unrolled,
            data_root=args.data_root, naive_lam=args.naive_lam, exposure=args.exposure,
            exposure_view=args.exposure_view, tto_steps=args.tto_steps, lpips_checkpoint=args.lpips_checkpoint,
            max_scenes=args.max_scenes, convergence_steps=steps, figure_scenes=args.figure_scenes,
            threads=args.threads,
        )
    print(markdown_table(results))
    print(f"[eval] results: {Path(args.out) / 'results.md'}, {Path(args.out) / 'results.json'}; "
          f"figures: {', '.join(results['figures'].values())} ({results['seconds']} s)")
    if "lambda_visibility" in results:
        v = results["lambda_visibility"]
        print(f"[eval] Λ_means where the other view sees: {v['lam_means_seen']:.4g}, where it does not: "
              f"{v['lam_means_unseen']:.4g} (higher unseen in {v['unseen_higher_in_scenes']}/{v['scenes']} scenes)")
    return results


if __name__ == "__main__":
    main()
