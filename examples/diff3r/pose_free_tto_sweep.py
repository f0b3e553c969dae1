"""Context-pose errors of a pose-free checkpoint after TTO, swept over the pose
translation unit of the TTO's θ, the number of inner steps and the rotation Λ, on any
test split (README, pose-free subsection: what sets where the rotation goes).

For each held-out scene: the model's Θ0 and Λ (predicted, or the naive constant
1e-4 with ``--naive``), then the TTO layer's forward (Adam, the checkpoint's learning
rates) for each ``--config UNIT,STEPS[,LAM_ROT]``: θ holds the pose translation / UNIT,
STEPS inner steps, and the rotation Λ of views 1.. set to LAM_ROT when given. With
``--gt-depth`` (``model.attach=camera`` checkpoints, data that stores depth) the
Gaussians' means in Θ0 are the pixel centers back-projected with the *ground-truth*
depths instead of the predicted ones: the TTO with consistent depths. With
``--gt-depth-scale`` (the same checkpoints and data) they are back-projected with the
*predicted* depths of each context view times that view's median ratio true / predicted:
the true scale per view, the predicted shape. With ``--gt-depth-blend A[,A...]`` (the
same checkpoints and data) they are back-projected with the per-pixel geometric blend
``predicted^(1−α) · true^α`` for each α given (α = 1: ``--gt-depth``; α = 0: the
predicted depths), and the blend's shape error (``pose_free_depth_errors.py``'s
``shape``) is printed beside each α: how good the depths must be for the TTO. Prints the mean
rotation and translation-direction errors Θ0 → Θ* (degrees) with ± the standard error
of the per-scene difference and the scenes where the rotation error drops.
``--min-context-gap G`` first widens each scene's context pair to at least ``G`` frames
(``pose_free_eval.py``'s option of the same name).

Run::

    python examples/diff3r/pose_free_tto_sweep.py outputs/diff3r/demo/pose_free/diff3r/checkpoint.pt \\
        --data-root /tmp/extra24 --config 1,20 --config 10,20 --config 10,60,10
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, "") and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

import difftto  # noqa: E402
from difftto.problems.splatting.se3 import se3_exp  # noqa: E402
from examples.diff3r import pose_free  # noqa: E402
from examples.diff3r.pose_alignment import relative_pose_errors  # noqa: E402
from examples.diff3r.pose_free_depth_errors import depth_errors  # noqa: E402
from examples.diff3r.pose_free_eval import with_min_context_gap  # noqa: E402
from examples.diff3r.train import make_dataset, model_from_checkpoint, prepare_data  # noqa: E402


def parse_config(text: str) -> tuple[float, int, float | None]:
    """``"UNIT,STEPS[,LAM_ROT]"`` → ``(unit, steps, rotation Λ or None)``."""
    parts = text.split(",")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        unit, steps = float(parts[0]), int(parts[1])
        lam = float(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise ValueError(f"--config: expected UNIT,STEPS[,LAM_ROT], got {text!r}") from None
    if not (unit > 0 and steps > 0 and (lam is None or lam > 0)):
        raise ValueError(f"--config: expected UNIT > 0, STEPS > 0 and LAM_ROT > 0, got {text!r}")
    return unit, steps, lam


def camera_means(depths: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """Pixel centers back-projected with ``depths`` ``[B, V, H, W]`` in each view's own
    camera frame (normalized ``intrinsics`` ``[B, V, 3, 3]``), ``[B, V·H·W, 3]``: the
    layer's means with ``attach="camera"``."""
    B, V, H, W = depths.shape
    K = intrinsics * intrinsics.new_tensor([float(W), float(H), 1.0])[:, None]
    v, u = torch.meshgrid(torch.arange(H, dtype=K.dtype) + 0.5, torch.arange(W, dtype=K.dtype) + 0.5, indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1)
    cam = pix @ torch.linalg.inv(K)[:, :, None].transpose(-1, -2) * depths[..., None].to(K.dtype)
    return cam.reshape(B, V * H * W, 3)


def gt_depth_means(batch, depth_shape) -> torch.Tensor:
    """:func:`camera_means` of ``batch['context_depths']`` (``depth_shape``: the predicted
    depths' ``[B, V, H, W]``, checked against them)."""
    depths = batch["context_depths"]
    if tuple(depths.shape) != tuple(depth_shape):
        raise ValueError(f"context_depths {tuple(depths.shape)} != predicted depths {tuple(depth_shape)}")
    return camera_means(depths, batch["context_intrinsics"])


def blended_depths(pred: torch.Tensor, true: torch.Tensor, alpha: float) -> torch.Tensor:
    """The per-pixel geometric blend ``pred^(1−alpha) · true^alpha`` of depths ``pred`` and
    ``true`` (same shape, positive; ``true`` cast to ``pred``'s dtype): ``pred`` at
    ``alpha = 0`` and ``true`` at ``alpha = 1`` exactly, its log linear in ``alpha``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--gt-depth-blend: expected 0 <= alpha <= 1, got {alpha!r}")
    true = true.to(pred.dtype)
    if tuple(true.shape) != tuple(pred.shape):
        raise ValueError(f"context_depths {tuple(true.shape)} != predicted depths {tuple(pred.shape)}")
    return pred.pow(1.0 - alpha) * true.pow(alpha)


def parse_alphas(texts: list[str]) -> list[float]:
    """``--gt-depth-blend`` values (each a comma list, the option repeatable) → the α in
    order, each in ``[0, 1]``, duplicates dropped."""
    alphas: list[float] = []
    for text in texts:
        for part in text.split(","):
            try:
                alpha = float(part)
            except ValueError:
                raise ValueError(f"--gt-depth-blend: expected numbers in [0, 1], got {text!r}") from None
            if not 0.0 <= alpha <= 1.0:
                raise ValueError(f"--gt-depth-blend: expected numbers in [0, 1], got {text!r}")
            if alpha not in alphas:
                alphas.append(alpha)
    return alphas


def scale_corrected_depths(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """``pred`` ``[B, V, H, W]`` times each view's median of ``true / pred`` over its
    valid pixels (``true`` finite and > 0): the true median per view, the predicted shape
    (``result / pred`` constant per view)."""
    ratio = true.to(pred.dtype) / pred
    ratio = torch.where(torch.isfinite(true) & (true > 0) & torch.isfinite(ratio), ratio, torch.nan)
    scale = ratio.flatten(2).nanmedian(dim=-1).values
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("--gt-depth-scale: a context view without a valid ground-truth depth")
    return pred * scale[..., None, None]


def _mean_se(x: list[float]) -> tuple[float, float]:
    m = sum(x) / len(x)
    se = math.sqrt(sum((a - m) ** 2 for a in x) / (len(x) - 1) / len(x)) if len(x) > 1 else float("nan")
    return m, se


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a pose-free checkpoint (model=pose_free)")
    p.add_argument("--data-root", help="test data (default: the checkpoint's)")
    p.add_argument("--config", action="append", required=True, metavar="UNIT,STEPS[,LAM_ROT]")
    p.add_argument("--naive", action="store_true", help="Λ = 1e-4 on every group (the naive TTO)")
    depth = p.add_mutually_exclusive_group()
    depth.add_argument("--gt-depth", action="store_true",
                       help="Θ0 means back-projected with the ground-truth depths (attach=camera checkpoints, "
                            "data that stores depth)")
    depth.add_argument("--gt-depth-scale", action="store_true",
                       help="Θ0 means back-projected with the predicted depths, each context view's rescaled by "
                            "its median ratio ground-truth / predicted: the true scale per view, the predicted "
                            "shape (checkpoints and data as --gt-depth)")
    depth.add_argument("--gt-depth-blend", action="append", metavar="A[,A...]",
                       help="Θ0 means back-projected with predicted^(1-α) · ground-truth^α for each α in [0, 1] "
                            "(a comma list, repeatable; 1: --gt-depth, 0: the predicted depths), with the blend's "
                            "shape error (checkpoints and data as --gt-depth)")
    p.add_argument("--max-scenes", type=int)
    p.add_argument("--min-context-gap", type=int,
                   help="widen each scene's context pair to at least this many frames (targets kept)")
    a = p.parse_args(argv)
    configs = {c: parse_config(c) for c in a.config}
    alphas = parse_alphas(a.gt_depth_blend) if a.gt_depth_blend else None
    torch.set_num_threads(1)
    model, state = model_from_checkpoint(a.checkpoint)
    depth_option = ("--gt-depth" if a.gt_depth else "--gt-depth-scale" if a.gt_depth_scale
                    else "--gt-depth-blend" if alphas else None)
    if depth_option and model.attach != "camera":
        raise ValueError(f"{depth_option} needs a model.attach=camera checkpoint (the layer's means in each camera's "
                         f"frame); this one has attach={model.attach!r}")
    cfg = OmegaConf.create(state["config"])
    root = Path(a.data_root) if a.data_root else prepare_data(cfg.data)
    dataset = make_dataset(cfg, root, "test", evaluation=True, load_depth=depth_option is not None)
    if a.min_context_gap is not None:
        with_min_context_gap(dataset, a.min_context_gap)
    tto = OmegaConf.to_container(cfg.tto, resolve=True)
    lr = pose_free._by_group(tto["lr"], "tto.lr", float(cfg.model.tto_pose_lr))

    def layer(unit: float, steps: int) -> difftto.ImplicitLayer:
        return difftto.ImplicitLayer(pose_free.TranslationScaledProblem(unit, attach=model.attach),
                                     inner=difftto.Adam(lr=lr, steps=steps), backward="implicit")

    # one Θ0 variant (None: as the options above say) or one per blend α
    variants: list[float | None] = alphas if alphas else [None]
    records: dict[tuple[float | None, str], list[tuple[float, float, float, float]]] = {
        (v, c): [] for v in variants for c in configs}
    shape_errors: dict[float | None, list[float]] = {v: [] for v in variants}
    started = time.perf_counter()
    n = len(dataset) if a.max_scenes is None else min(len(dataset), a.max_scenes)
    for i in range(n):
        batch = pose_free.first_view_frame(default_collate([dataset[i]]))
        true_w2c = torch.linalg.inv(batch["context_extrinsics"])
        with torch.no_grad():
            pred = pose_free.predict(model, batch)
            data = pose_free.context_data(pred, batch)
            rot0, tr0 = relative_pose_errors(se3_exp(pred.theta["pose"]), true_w2c)
            for variant in variants:
                theta0 = dict(pred.layer_theta)
                if a.gt_depth:
                    theta0["means"] = gt_depth_means(batch, pred.depth.shape).to(pred.depth.dtype)
                elif a.gt_depth_scale:
                    depths = scale_corrected_depths(pred.depth, batch["context_depths"])
                    theta0["means"] = camera_means(depths, batch["context_intrinsics"]).to(pred.depth.dtype)
                elif variant is not None:
                    depths = blended_depths(pred.depth, batch["context_depths"], variant)
                    theta0["means"] = camera_means(depths, batch["context_intrinsics"]).to(pred.depth.dtype)
                    shape_errors[variant].append(depth_errors(depths[0], batch["context_depths"][0])["shape"])
                for name, (unit, steps, lam_rot) in configs.items():
                    lam = pose_free.constant_lam(pred, 1e-4) if a.naive else dict(pred.lam)
                    if lam_rot is not None:
                        pose_lam = lam["pose"].clone()
                        if pose_lam.dim() != 3:
                            raise ValueError("LAM_ROT needs a model.pose_lam=split checkpoint (a rotation Λ)")
                        pose_lam[:, 1:, 3:] = lam_rot
                        lam["pose"] = pose_lam
                    start = {**theta0, "pose": pose_free.scale_translation(theta0["pose"], 1.0 / unit)}
                    star, _ = layer(unit, steps)(start, lam, data)
                    rot1, tr1 = relative_pose_errors(se3_exp(pose_free.scale_translation(star["pose"], unit)),
                                                     true_w2c)
                    records[variant, name].append((float(rot0.mean()), float(rot1.mean()), float(tr0.mean()),
                                                   float(tr1.mean())))
    print(f"{n} scenes, attach={model.attach}, Λ: {'naive 1e-4' if a.naive else 'predicted'}"
          f"{', Θ0 means from the ground-truth depths' if a.gt_depth else ''}"
          f"{', Θ0 means from the predicted depths at the true median scale per view' if a.gt_depth_scale else ''}"
          f"{', Θ0 means from predicted^(1-α) · true^α' if alphas else ''}"
          f", {time.perf_counter() - started:.0f} s")
    blend = "| α | shape error (± SE) " if alphas else ""
    print(f"{blend}| UNIT,STEPS[,LAM_ROT] | rotation ° Θ0 → Θ* | Θ* − Θ0 | drops in "
          "| translation direction ° Θ0 → Θ* |")
    print("|---" * (7 if alphas else 5) + "|")
    out = {}
    for (variant, name), rows in records.items():
        r0, r1, t0, t1 = (sum(c) / len(c) for c in zip(*rows))
        diff = [b - a_ for a_, b, _, _ in rows]
        m, se = _mean_se(diff)
        key = name if variant is None else f"alpha={variant:g} {name}"
        out[key] = {"rot_before": r0, "rot_after": r1, "rot_diff": m, "rot_diff_se": se,
                    "rot_drops": sum(d < 0 for d in diff), "trans_before": t0, "trans_after": t1}
        row = ""
        if variant is not None:
            shape, shape_se = _mean_se(shape_errors[variant])
            out[key].update(alpha=variant, shape=shape, shape_se=shape_se)
            row = f"| {variant:g} | {shape:.3f} ± {shape_se:.3f} "
        print(f"{row}| {name} | {r0:.2f} → {r1:.2f} | {m:+.2f} ± {se:.2f} | {out[key]['rot_drops']}/{len(rows)} | "
              f"{t0:.1f} → {t1:.1f} |")
    return out


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", difftto.solvers.LinearSolveWarning)
        main()
