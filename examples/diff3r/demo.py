"""Diff3R end to end in a few minutes on a 2-core CPU.

1. Generate a small procedural dataset (24 train / 6 test scenes, 32×32 px) into the cache.
2. Pre-train the encoder feed-forward (``mode=zero_shot``) for ``--pretrain-steps``.
3. From that checkpoint, train three models for ``--steps`` more steps each, on the
   same batches: the zero-shot baseline (``mode=zero_shot``, resumed), Diff3R
   (``mode=diff3r``: through the TTO layer with the implicit backward; Λ bounded
   within e^1 of ``model.lam_init``, ``model.lam_log_range=1``) and the ablation
   ``mode=no_uncertainty`` (through the layer, Λ the constant ``model.lam_init``), with
   ``loss.theta0=1`` by default: the target loss of Θ0 is added to that of Θ*.
   Without it (``--theta0-weight 0``, the paper's loss) Θ0 drifts in these short
   runs: the implicit gradient assumes a converged inner solve, 20 Adam steps stop
   at relative stationarity ~0.2–0.5, so Θ0 gets little gradient and the model
   leaves the correction of its colors to the TTO.
4. Evaluate on the held-out scenes: zero-shot, zero-shot + naive TTO, Diff3R,
   Diff3R + TTO, no-uncertainty + TTO, with and without an exposure-corrupted
   context view, the context-view PSNR before/after TTO, and the target PSNR after
   0, 10, 20, 40 and 80 TTO steps (the models are trained with 20); write the table,
   JSON and figures.

Run::

    python examples/diff3r/demo.py                   # outputs in outputs/diff3r/demo
    python examples/diff3r/demo.py --out /tmp/d3 --pretrain-steps 100 --steps 20   # quicker

Every stage is an ordinary hydra run of ``train.py`` (composed here), so a stage
can be re-run or extended from the command line with the same overrides.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, "") and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


from examples.diff3r.evaluate import evaluate, markdown_table  # noqa: E402
from examples.diff3r.train import CHECKPOINT_NAME, compose_config, train  # noqa: E402

CONVERGENCE_STEPS = (0, 10, 20, 40, 80)

#: What each stage trained through the layer does, for the progress lines.
_THROUGH_LAYER = {
    "diff3r": "Diff3R: {steps} steps through the TTO layer from the pre-trained weights",
    "no_uncertainty": "no_uncertainty: {steps} steps through the TTO layer with a constant Λ (model.lam_init)",
}


def train_stages(out: Path, common: list[str], pretrain_steps: int, steps: int, theta0_weight: float,
                 modes: tuple[str, ...] = ("diff3r", "no_uncertainty"), label: str = "") -> dict[str, dict]:
    """The demo's training stages, each a ``train.py`` run with the overrides ``common``:
    pre-train ``zero_shot`` for ``pretrain_steps`` (its checkpoint copied to
    ``out/pretrain.pt``), continue it for ``steps`` more as the baseline, then train each
    of ``modes`` for ``steps`` from the pre-trained weights (``loss.theta0=theta0_weight``).
    Checkpoints go to ``out/<mode>/``; ``label`` prefixes the progress lines, which count
    an evaluation stage after these. Returns each stage's ``train`` summary by name
    (``pretrain``, ``zero_shot`` and the modes)."""
    n = len(modes) + 3
    total = pretrain_steps + steps
    print(f"== 1/{n} {label}pre-training zero_shot for {pretrain_steps} steps", flush=True)
    zs_dir = out / "zero_shot"
    runs = {"pretrain": train(compose_config([*common, "mode=zero_shot", f"steps={pretrain_steps}",
                                              f"out_dir={zs_dir}", "resume=true"]))}
    pretrain_ckpt = out / "pretrain.pt"
    if not pretrain_ckpt.is_file():
        shutil.copyfile(zs_dir / CHECKPOINT_NAME, pretrain_ckpt)

    print(f"== 2/{n} {label}zero_shot baseline: {steps} more steps (to {total})", flush=True)
    runs["zero_shot"] = train(compose_config([*common, "mode=zero_shot", f"steps={total}", f"out_dir={zs_dir}",
                                              "resume=true"]))
    for i, mode in enumerate(modes, start=3):
        print(f"== {i}/{n} {label}" + _THROUGH_LAYER[mode].format(steps=steps), flush=True)
        runs[mode] = train(compose_config([*common, f"mode={mode}", f"steps={steps}", f"out_dir={out / mode}",
                                           f"init_from={pretrain_ckpt}", "resume=true",
                                           f"loss.theta0={theta0_weight}"]))
    return runs


def convergence_table(results: dict) -> str:
    """Target (and context) PSNR of each TTO row after k test-time steps, as Markdown."""
    steps = list(next(iter(results["tto_convergence"].values())))
    lines = ["| target PSNR (context PSNR) after k TTO steps | " + " | ".join(f"k={k}" for k in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for name, c in results["tto_convergence"].items():
        lines.append(f"| {name} | " + " | ".join(f"{c[k]['target_psnr']:.2f} ({c[k]['context_psnr']:.1f})"
                                               for k in steps) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/diff3r/demo", help="output folder")
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=60, help="steps of each model after pre-training")
    parser.add_argument("--theta0-weight", type=float, default=1.0,
                        help="diff3r stage: weight of the Θ0 target loss (loss.theta0; 0 = the paper's loss)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    parser.add_argument("--progress", action="store_true", help="show tqdm progress bars")
    parser.add_argument("--model", choices=("small", "pose_free"), default="small",
                        help="pose_free: the pose-free variant's demo (examples/diff3r/pose_free_eval.py), "
                             "outputs in OUT/pose_free")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for every training stage")
    args = parser.parse_args(argv)
    if args.model == "pose_free":
        from examples.diff3r.pose_free_eval import demo as pose_free_demo

        return pose_free_demo(Path(args.out) / "pose_free", pretrain_steps=args.pretrain_steps, steps=args.steps,
                              theta0_weight=args.theta0_weight, threads=args.threads, progress=args.progress,
                              overrides=tuple(args.overrides))
    out = Path(args.out)
    started = time.perf_counter()
    common = [f"threads={args.threads}", f"progress={str(args.progress).lower()}", *args.overrides]
    runs = train_stages(out, common, args.pretrain_steps, args.steps, args.theta0_weight)
    pre, zs, d3, nu = runs["pretrain"], runs["zero_shot"], runs["diff3r"], runs["no_uncertainty"]
    zs_dir, d3_dir, nu_dir = out / "zero_shot", out / "diff3r", out / "no_uncertainty"

    print("== 5/5 evaluation on held-out scenes", flush=True)
    results = evaluate(zs_dir / CHECKPOINT_NAME, d3_dir / CHECKPOINT_NAME, out / "eval",
                       no_uncertainty=nu_dir / CHECKPOINT_NAME, threads=args.threads,
                       convergence_steps=CONVERGENCE_STEPS)
    seconds = round(time.perf_counter() - started, 1)
    summary = {
        "seconds": seconds,
        "data_root": pre["data_root"],
        "train_seconds": {"pretrain": pre["seconds"], "zero_shot": zs["seconds"], "diff3r": d3["seconds"],
                          "no_uncertainty": nu["seconds"]},
        "diff3r_pcg_failures": d3["pcg_failures"],
        "no_uncertainty_pcg_failures": nu["pcg_failures"],
        "results": str(out / "eval" / "results.md"),
        "figures": results["figures"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    with open(out / "eval" / "results.md", "a") as f:
        f.write("\nTTO run longer or shorter than in training (means over the same scenes):\n\n"
                + convergence_table(results))
    print()
    print(markdown_table(results))
    print(convergence_table(results))
    if "lambda_visibility" in results:
        v = results["lambda_visibility"]
        print(f"Λ_means where the other context view sees: {v['lam_means_seen']:.4g}; where it does not: "
              f"{v['lam_means_unseen']:.4g} (higher where unseen in {v['unseen_higher_in_scenes']}/{v['scenes']})")
        print(f"Λ_means on the image border (4 px): {v['lam_means_border']:.4g}; "
              f"interior: {v['lam_means_interior']:.4g}")
        if "lam_means_unseen_interior" in v:
            print(f"Λ_means in the interior, seen: {v['lam_means_seen_interior']:.4g}; unseen: "
                  f"{v['lam_means_unseen_interior']:.4g} (higher where unseen in "
                  f"{v['unseen_higher_interior_in_scenes']}/{v['interior_scenes']})")
    print(f"\nDone in {seconds} s. Outputs in {out}/:")
    print(f"  table    {out / 'eval' / 'results.md'}   (JSON: {out / 'eval' / 'results.json'})")
    for name, path in results["figures"].items():
        print(f"  figure   {path}   ({name})")
    print(f"  models   {zs_dir / CHECKPOINT_NAME}, {d3_dir / CHECKPOINT_NAME}, {nu_dir / CHECKPOINT_NAME} "
          "(metrics.jsonl beside them)")
    return summary


if __name__ == "__main__":
    main()
