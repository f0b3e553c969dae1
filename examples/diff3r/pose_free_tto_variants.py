"""Context-pose errors of a pose-free checkpoint after TTO under variants of the inner
problem: why the rotation error rises after TTO (README, pose-free subsection).

For each held-out scene: the model's Θ0 and predicted Λ, then the TTO layer's forward
(no outer gradient) under each variant; printed as a Markdown table of the context
rotation and translation-direction errors (degrees, Θ0 → Θ*) and the context PSNR
after TTO, means over the scenes. Target PSNR is not computed here
(``pose_free_eval.py`` does that).

Variants: the checkpoint's TTO (Adam, pose lr 3e-3); the same started at the true
context poses; the rotation entries moved 10× less per Adam step (θ holds rotation /
0.1, so Λ also anchors them 100× more); poses frozen (pose lr 1e-12); Gaussians
frozen (their lr 1e-12: the poses alone fitted to the predicted Gaussians), from the
predicted and from the true poses; Levenberg-Marquardt, 5 and 20 steps. The layers
use the checkpoint's ``model.attach`` (world or camera frame of the Gaussians).

Run::

    python examples/diff3r/pose_free_tto_variants.py outputs/diff3r/demo/pose_free/diff3r/checkpoint.pt
"""

from __future__ import annotations

import argparse
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
from difftto.problems.splatting.posed import PosedSplattingProblem  # noqa: E402
from difftto.problems.splatting.se3 import se3_exp, se3_log  # noqa: E402
from examples.diff3r import pose_free  # noqa: E402
from examples.diff3r.metrics import psnr  # noqa: E402
from examples.diff3r.pose_alignment import relative_pose_errors  # noqa: E402
from examples.diff3r.train import make_dataset, model_from_checkpoint, prepare_data  # noqa: E402

#: θ's rotation entries are rotation / ROTATION_UNIT in the scaled variant.
ROTATION_UNIT = 0.1


class RotationScaledProblem(PosedSplattingProblem):
    """``gaussian_splatting_posed`` whose ``pose`` rotation entries are in units of
    ``ROTATION_UNIT`` radians: Adam's per-entry step moves the rotation that much less."""

    def render(self, theta, data, *, return_state=False):
        p = theta["pose"]
        scaled = torch.cat([p[..., :3], p[..., 3:] * ROTATION_UNIT], -1)
        return super().render({**theta, "pose": scaled}, data, return_state=return_state)


def _to_rotation_units(pose: torch.Tensor, unit: float) -> torch.Tensor:
    return torch.cat([pose[..., :3], pose[..., 3:] / unit], -1)


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a pose-free checkpoint (model=pose_free)")
    p.add_argument("--max-scenes", type=int)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model, state = model_from_checkpoint(a.checkpoint)
    cfg = OmegaConf.create(state["config"])
    dataset = make_dataset(cfg, prepare_data(cfg.data), "test", evaluation=True)
    tto = OmegaConf.to_container(cfg.tto, resolve=True)
    pose_lr = float(cfg.model.tto_pose_lr)
    attach = getattr(model, "attach", "world")
    scaled_layer = difftto.ImplicitLayer(
        RotationScaledProblem(attach=attach), inner=difftto.Adam(lr=pose_free._by_group(tto["lr"], "tto.lr", pose_lr),
                                                    steps=int(tto["steps"])),
        backward="implicit", hessian="gauss_newton", solver=difftto.solvers.PCG(rtol=1e-2, max_iter=15))
    lm = {"inner": "gauss_newton", "damping": 1e-3}
    frozen_gaussians = {**tto, "lr": {g: 1e-12 for g in pose_free.GAUSSIAN_GROUPS}}

    def build(t, lr=pose_lr):
        return pose_free.build_layer(t, "implicit", lr, attach=attach)

    # name: (layer, θ's rotation unit, start at the true context poses)
    variants = {
        f"Adam, pose lr {pose_lr:g} (the checkpoint's TTO)": (build(tto), 1.0, False),
        "the same, started at the true context poses": (build(tto), 1.0, True),
        f"Adam, rotation entries in units of {ROTATION_UNIT} rad": (scaled_layer, ROTATION_UNIT, False),
        "Adam, poses frozen (pose lr 1e-12)": (build(tto, 1e-12), 1.0, False),
        "Adam, Gaussians frozen (their lr 1e-12)": (build(frozen_gaussians), 1.0, False),
        "Adam, Gaussians frozen, started at the true context poses": (build(frozen_gaussians), 1.0, True),
        "Levenberg-Marquardt, 5 steps": (build({**tto, **lm, "steps": 5}), 1.0, False),
        "Levenberg-Marquardt, 20 steps": (build({**tto, **lm, "steps": 20}), 1.0, False),
    }
    records: dict[str, list[tuple[float, ...]]] = {name: [] for name in variants}
    lam_pose = []
    started = time.perf_counter()
    n = len(dataset) if a.max_scenes is None else min(len(dataset), a.max_scenes)
    for i in range(n):
        batch = pose_free.first_view_frame(default_collate([dataset[i]]))
        true_w2c = torch.linalg.inv(batch["context_extrinsics"])
        with torch.no_grad():
            pred = model(batch["context_images"], batch["context_intrinsics"], batch["context_near"],
                         batch["context_far"])
            lam_pose.append(float(pred.lam["pose"][:, 1:].mean()))
            data = pose_free.context_data(pred, batch)
            for name, (layer, unit, from_truth) in variants.items():
                start = se3_log(true_w2c) if from_truth else pred.theta["pose"]
                theta0 = {**pred.layer_theta, "pose": _to_rotation_units(start, unit)}
                star, _ = layer(theta0, pred.lam, data)
                pose = _to_rotation_units(star["pose"], 1.0 / unit)
                star = {**star, "pose": pose}
                if pred.attach == "camera":
                    star = pose_free.world_theta(star, pred.gaussian_view)
                rot0, tr0 = relative_pose_errors(se3_exp(start), true_w2c)
                rot1, tr1 = relative_pose_errors(se3_exp(pose), true_w2c)
                render = pose_free.render_targets(star, batch, "context", viewmats=se3_exp(pose))
                records[name].append((float(rot0.mean()), float(rot1.mean()), float(tr0.mean()), float(tr1.mean()),
                                      float(psnr(render.clamp(0, 1), batch["context_images"]).mean())))
    print(f"{n} scenes, attach={attach}, predicted Λ_pose (views 1..) mean {sum(lam_pose) / n:.3g}, "
          f"{time.perf_counter() - started:.0f} s")
    print("| variant | rotation ° Θ0 → Θ* | translation direction ° Θ0 → Θ* | context PSNR after TTO |")
    print("|---|---|---|---|")
    means = {}
    for name, rows in records.items():
        m = means[name] = [sum(c) / len(c) for c in zip(*rows)]
        print(f"| {name} | {m[0]:.2f} → {m[1]:.2f} | {m[2]:.1f} → {m[3]:.1f} | {m[4]:.2f} |")
    return means


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", difftto.solvers.LinearSolveWarning)
        main()
