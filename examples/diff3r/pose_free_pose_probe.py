"""How well each pose estimator of the pose-free model can learn the context poses,
apart from rendering: train only on the supervised twist error
(:func:`examples.diff3r.pose_free.pose_loss`) and report the mean rotation and
translation-direction errors on the training split (random view pairs) and on the
held-out evaluation index, against the trivial predictor (identity rotation, the
training split's mean translation direction).

Example::

    python examples/diff3r/pose_free_pose_probe.py --steps 600 --estimators head procrustes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, "") and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from examples.diff3r import pose_free  # noqa: E402
from examples.diff3r.pose_alignment import relative_pose_errors  # noqa: E402
from examples.diff3r.train import (  # noqa: E402
    batch_indices,
    build_model,
    compose_config,
    fetch_batch,
    make_dataset,
    prepare_data,
)

__all__ = ["probe"]


def _errors(model, batches) -> tuple[float, float]:
    rot, trans = [], []
    with torch.no_grad():
        for b in batches:
            pred = pose_free.predict(model, b)
            r, t = relative_pose_errors(pred.viewmats, torch.linalg.inv(b["context_extrinsics"]))
            rot.append(r.mean())
            trans.append(t.mean())
    return float(torch.stack(rot).mean()), float(torch.stack(trans).mean())


def _trivial(train_batches, test_batches) -> tuple[float, float]:
    """Identity rotation and the mean training translation direction."""
    dirs = []
    for b in train_batches:
        t = torch.linalg.inv(b["context_extrinsics"])[:, 1:, :3, 3]
        dirs.append((t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)).flatten(0, 1))
    mean_dir = torch.cat(dirs).mean(0)
    rot, trans = [], []
    for b in test_batches:
        truth = torch.linalg.inv(b["context_extrinsics"])
        pred = torch.eye(4).expand_as(truth).clone()
        pred[:, 1:, :3, 3] = mean_dir
        r, t = relative_pose_errors(pred, truth)
        rot.append(r.mean())
        trans.append(t.mean())
    return float(torch.stack(rot).mean()), float(torch.stack(trans).mean())


def probe(estimators=("head", "procrustes"), steps: int = 600, lr: float = 1e-3, eval_every: int = 200,
          overrides: tuple[str, ...] = (), seed: int = 0, train_batches: int = 12,
          rotation_weight: float = 1.0) -> dict:
    """Train one model per estimator on the pose loss alone; returns the errors by
    estimator and step (on ``train_batches`` fixed batches of random training view
    pairs, and on the test split's evaluation index) and the trivial predictor's test
    errors. ``rotation_weight``: the loss's weight on the rotation entries of the twist
    error (:func:`examples.diff3r.pose_free.pose_loss`)."""
    torch.set_num_threads(1)
    cfg = compose_config(["model=pose_free", *overrides])
    root = prepare_data(cfg.data)
    train_ds = make_dataset(cfg, root, "train")
    test_ds = make_dataset(cfg, root, "test", evaluation=True)
    test = [pose_free.first_view_frame(default_collate([test_ds[i]])) for i in range(len(test_ds))]
    fixed_train = [pose_free.first_view_frame(fetch_batch(train_ds, *batch_indices(len(train_ds), 2, 123, s),
                                                          torch.device("cpu"))) for s in range(train_batches)]
    out = {"trivial_test": _trivial(fixed_train, test), "steps": steps, "lr": lr, "rotation_weight": rotation_weight,
           "runs": {}}
    for est in estimators:
        torch.manual_seed(seed)
        model = build_model(compose_config(["model=pose_free", *overrides, f"model.pose_estimator={est}"]).model)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        log, started = [], time.perf_counter()
        for step in range(1, steps + 1):
            idx, epoch = batch_indices(len(train_ds), int(cfg.batch_size), seed, step)
            b = pose_free.first_view_frame(fetch_batch(train_ds, idx, epoch, torch.device("cpu")))
            pred = pose_free.predict(model, b)
            loss = pose_free.pose_loss(pred, b, rotation_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % eval_every == 0 or step == steps:
                rec = {"step": step, "train": _errors(model, fixed_train), "test": _errors(model, test),
                       "seconds": round(time.perf_counter() - started, 1)}
                log.append(rec)
                print(f"[{est}] step {step}: train rot {rec['train'][0]:.2f}° trans {rec['train'][1]:.1f}°, "
                      f"test rot {rec['test'][0]:.2f}° trans {rec['test'][1]:.1f}° ({rec['seconds']} s)", flush=True)
        out["runs"][est] = log
    print(f"trivial predictor (identity rotation, mean training direction), test: rot {out['trivial_test'][0]:.2f}° "
          f"trans {out['trivial_test'][1]:.1f}°")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--estimators", nargs="+", default=["head", "procrustes"])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--rotation-weight", type=float, default=1.0, help="weight of the twist error's rotation entries")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("overrides", nargs="*", help="hydra overrides (model.*, data.*)")
    a = p.parse_args(argv)
    result = probe(tuple(a.estimators), a.steps, a.lr, a.eval_every, tuple(a.overrides),
                   rotation_weight=a.rotation_weight)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
