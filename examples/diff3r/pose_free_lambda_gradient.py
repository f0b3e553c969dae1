"""Which way the outer loss pushes the pose Λ of a pose-free checkpoint trained with
``model.pose_lam=split``: the implicit gradient of the target MSE (the ``diff3r``
training loss without its Θ0 term) with respect to log Λ of the context poses'
translation and rotation entries, on training batches.

A negative value means the outer loss wants a larger Λ (the TTO should move those
entries less). Printed per batch, then the means and how many batches were negative.

Run::

    python examples/diff3r/pose_free_lambda_gradient.py outputs/diff3r/demo/pose_free/diff3r/checkpoint.pt --batches 12
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, "") and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import difftto  # noqa: E402
from examples.diff3r import pose_free  # noqa: E402
from examples.diff3r.train import batch_indices, fetch_batch, make_dataset, model_from_checkpoint, prepare_data  # noqa: E402

__all__ = ["pose_lambda_gradients"]


def pose_lambda_gradients(checkpoint: str | Path, batches: int = 12, seed: int = 7,
                          batch_size: int = 2) -> list[tuple[float, float]]:
    """``(∂L/∂log Λ_translation, ∂L/∂log Λ_rotation)`` per training batch, each summed
    over the batch's non-frame cameras and the three entries.

    Raises:
        ValueError: the checkpoint's model predicts one Λ per camera (``pose_lam=camera``).
    """
    torch.set_num_threads(1)
    model, state = model_from_checkpoint(checkpoint)
    if getattr(model, "pose_lam", None) != "split":
        raise ValueError(f"{checkpoint}: expected a pose-free model with pose_lam=split")
    cfg = OmegaConf.create(state["config"])
    dataset = make_dataset(cfg, prepare_data(cfg.data), "train")
    layer = pose_free.build_layer(OmegaConf.to_container(cfg.tto, resolve=True), "implicit",
                                  float(cfg.model.tto_pose_lr))
    out = []
    for step in range(batches):
        idx, epoch = batch_indices(len(dataset), batch_size, seed, step)
        batch = pose_free.first_view_frame(fetch_batch(dataset, idx, epoch, torch.device("cpu")))
        model.zero_grad()
        result = pose_free.run_pipeline(model, batch, layer)
        lam = result.lam["pose"]
        lam.retain_grad()
        torch.nn.functional.mse_loss(result.render, batch["target_images"]).backward()
        g = (lam.grad * lam.detach())[:, 1:]  # ∂L/∂log Λ per entry
        out.append((float(g[..., :3].sum()), float(g[..., 3:].sum())))
    return out


def main(argv: list[str] | None = None) -> list[tuple[float, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", difftto.solvers.LinearSolveWarning)
        grads = pose_lambda_gradients(a.checkpoint, a.batches, a.seed)
    for i, (t, r) in enumerate(grads):
        print(f"batch {i}: dL/dlogΛ translation {t:+.3e}, rotation {r:+.3e}")
    n = len(grads)
    print(f"mean: translation {sum(t for t, _ in grads) / n:+.3e}, rotation {sum(r for _, r in grads) / n:+.3e}; "
          f"negative (the loss wants a larger Λ) in {sum(t < 0 for t, _ in grads)} / "
          f"{sum(r < 0 for _, r in grads)} of {n} batches")
    return grads


if __name__ == "__main__":
    main()
