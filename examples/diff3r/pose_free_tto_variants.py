"""Context-pose errors of a pose-free checkpoint after TTO under variants of the inner
problem: why the rotation error rises after TTO (README, pose-free subsection).

For each held-out scene: the model's Θ0 and predicted Λ, then the TTO layer's forward
(no outer gradient) under each variant; printed as a Markdown table of the context
rotation and translation-direction errors (degrees, Θ0 → Θ*) and the context PSNR
after TTO, means over the scenes. Target PSNR is not computed here
(``pose_free_eval.py`` does that).

Variants: the checkpoint's TTO (Adam, pose lr 3e-3); the same started at the true
context poses; the rotation entries moved 10× less per Adam step (θ holds rotation /
0.1, so Λ also anchors them 100× more); the translation entries moved 10× more (θ
holds translation / 10, Λ anchors them 100× less), alone and with the rotation's 10×
less; poses frozen (pose lr 1e-12); Gaussians
frozen (their lr 1e-12: the poses alone fitted to the predicted Gaussians), from the
predicted and from the true poses; Levenberg-Marquardt, 5 and 20 steps; the
checkpoint's TTO started at the true rotations with the predicted translations, and
at the true translations with the predicted rotations (how much of the rotation's
rise comes from the translation error, with which a small rotation is confused). The layers
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
#: θ's translation entries are translation / TRANSLATION_UNIT in the translation-scaled variant.
TRANSLATION_UNIT = 10.0


class TwistScaledProblem(PosedSplattingProblem):
    """``gaussian_splatting_posed`` whose ``pose`` entries are in units of ``units``
    (translation, rotation): Adam's per-entry step moves them that much more or less."""

    def __init__(self, units: tuple[float, float], **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def render(self, theta, data, *, return_state=False):
        return super().render({**theta, "pose": _from_units(theta["pose"], self.units)}, data,
                              return_state=return_state)


def _to_units(pose: torch.Tensor, units: tuple[float, float]) -> torch.Tensor:
    return torch.cat([pose[..., :3] / units[0], pose[..., 3:] / units[1]], -1)


def _from_units(pose: torch.Tensor, units: tuple[float, float]) -> torch.Tensor:
    return torch.cat([pose[..., :3] * units[0], pose[..., 3:] * units[1]], -1)


def _start(which: bool | str, predicted: torch.Tensor, true_w2c: torch.Tensor) -> torch.Tensor:
    """The TTO's initial context twists: the predicted ones (``False``), the true ones
    (``True``), or world-to-camera matrices with the true rotation and the predicted
    translation (``"rotation"``) or the reverse (``"translation"``)."""
    if which is False:
        return predicted
    if which is True:
        return se3_log(true_w2c)
    mixed = se3_exp(predicted).clone()
    if which == "rotation":
        mixed[..., :3, :3] = true_w2c[..., :3, :3]
    else:
        mixed[..., :3, 3] = true_w2c[..., :3, 3]
    return se3_log(mixed)


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a pose-free checkpoint (model=pose_free)")
    p.add_argument("--max-scenes", type=int)
    p.add_argument("--only", action="append", default=None, metavar="TEXT",
                   help="run only the variants whose name contains TEXT (repeatable; default: all)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model, state = model_from_checkpoint(a.checkpoint)
    cfg = OmegaConf.create(state["config"])
    dataset = make_dataset(cfg, prepare_data(cfg.data), "test", evaluation=True)
    tto = OmegaConf.to_container(cfg.tto, resolve=True)
    pose_lr = float(cfg.model.tto_pose_lr)
    attach = getattr(model, "attach", "world")
    # The checkpoint's pose translation unit in θ (model.tto_pose_translation_unit): every variant's units
    # are relative to it (1: the checkpoint's).
    t_unit = float(getattr(model, "tto_pose_translation_unit", 1.0))

    def scaled_layer(units):
        units = (units[0] * t_unit, units[1])
        adam = difftto.Adam(lr=pose_free._by_group(tto["lr"], "tto.lr", pose_lr), steps=int(tto["steps"]))
        return difftto.ImplicitLayer(TwistScaledProblem(units, attach=attach), inner=adam, backward="implicit",
                                     hessian="gauss_newton", solver=difftto.solvers.PCG(rtol=1e-2, max_iter=15))

    lm = {"inner": "gauss_newton", "damping": 1e-3}
    ONE = (t_unit, 1.0)
    frozen_gaussians = {**tto, "lr": {g: 1e-12 for g in pose_free.GAUSSIAN_GROUPS}}

    def build(t, lr=pose_lr):
        return pose_free._layer_for(pose_free.build_layer(t, "implicit", lr, attach=attach), attach, t_unit)

    # name: (layer, θ's (translation, rotation) units, start: False (predicted), True (true poses),
    # "rotation" (true rotation, predicted translation) or "translation" (true translation, predicted rotation))
    variants = {
        f"Adam, pose lr {pose_lr:g} (the checkpoint's TTO)": (build(tto), ONE, False),
        "the same, started at the true context poses": (build(tto), ONE, True),
        f"Adam, rotation entries in units of {ROTATION_UNIT} rad": (scaled_layer((1.0, ROTATION_UNIT)),
                                                                    (t_unit, ROTATION_UNIT), False),
        f"Adam, translation entries in units of {TRANSLATION_UNIT:g}": (scaled_layer((TRANSLATION_UNIT, 1.0)),
                                                                       (TRANSLATION_UNIT * t_unit, 1.0), False),
        f"Adam, translation entries in units of {TRANSLATION_UNIT:g}, rotation in units of {ROTATION_UNIT} rad":
            (scaled_layer((TRANSLATION_UNIT, ROTATION_UNIT)), (TRANSLATION_UNIT * t_unit, ROTATION_UNIT), False),
        "Adam, poses frozen (pose lr 1e-12)": (build(tto, 1e-12), ONE, False),
        "Adam, Gaussians frozen (their lr 1e-12)": (build(frozen_gaussians), ONE, False),
        "Adam, Gaussians frozen, started at the true context poses": (build(frozen_gaussians), ONE, True),
        "Levenberg-Marquardt, 5 steps": (build({**tto, **lm, "steps": 5}), ONE, False),
        "Levenberg-Marquardt, 20 steps": (build({**tto, **lm, "steps": 20}), ONE, False),
        "the checkpoint's TTO, started at the true rotations (predicted translations)": (build(tto), ONE, "rotation"),
        "the checkpoint's TTO, started at the true translations (predicted rotations)":
            (build(tto), ONE, "translation"),
    }
    if a.only:
        variants = {name: v for name, v in variants.items() if any(text in name for text in a.only)}
    records: dict[str, list[tuple[float, ...]]] = {name: [] for name in variants}
    lam_pose = []
    started = time.perf_counter()
    n = len(dataset) if a.max_scenes is None else min(len(dataset), a.max_scenes)
    for i in range(n):
        batch = pose_free.first_view_frame(default_collate([dataset[i]]))
        true_w2c = torch.linalg.inv(batch["context_extrinsics"])
        with torch.no_grad():
            pred = pose_free.predict(model, batch)
            lam_pose.append(float(pred.lam["pose"][:, 1:].mean()))
            data = pose_free.context_data(pred, batch)
            for name, (layer, unit, from_truth) in variants.items():
                start = _start(from_truth, pred.theta["pose"], true_w2c)
                theta0 = {**pred.layer_theta, "pose": _to_units(start, unit)}
                star, _ = layer(theta0, pred.lam, data)
                pose = _from_units(star["pose"], unit)
                star = {**star, "pose": pose}
                if pred.attach == "camera":
                    star = pose_free.world_theta(star, pred.gaussian_view)
                rot0, tr0 = relative_pose_errors(se3_exp(start), true_w2c)
                rot1, tr1 = relative_pose_errors(se3_exp(pose), true_w2c)
                render = pose_free.render_targets(star, batch, "context", viewmats=se3_exp(pose))
                records[name].append((float(rot0.mean()), float(rot1.mean()), float(tr0.mean()), float(tr1.mean()),
                                      float(psnr(render.clamp(0, 1), batch["context_images"]).mean())))
    print(f"{n} scenes, attach={attach}, pose translation unit in θ {t_unit:g} (units below relative to it), "
          f"predicted Λ_pose (views 1..) mean {sum(lam_pose) / n:.3g}, "
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
