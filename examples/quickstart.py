"""difftto quickstart: train a network *through* a test-time optimization layer.

Task: each sample is an exponential decay y = a·exp(−k t) + c observed at 6 noisy
points on t ∈ [0, 1] (the "context"); the goal is the clean curve on t ∈ [0, 3]
(the "target", mostly extrapolation).

- A small network reads the context and predicts an initial guess θ0 = (a, k, c)
  and per-parameter uncertainty weights Λ (softplus).
- ``difftto.ImplicitLayer`` refines θ0 by Gauss-Newton on the context points,
  anchored by ½ Σ Λ (θ − θ0)².
- The target loss is backpropagated through the layer with the implicit (IFT + PCG)
  backward, so the network learns an initialization, and how much to trust it, that
  is good *after* the optimization.

Compared on held-out samples: the network alone (zero-shot), the network + the
optimization with a constant Λ, and the network trained through the layer.

Run: ``python examples/quickstart.py`` (about half a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

import difftto

T_CONTEXT = torch.linspace(0.0, 1.0, 6)
T_TARGET = torch.linspace(0.0, 3.0, 40)


def sample_batch(batch: int, generator: torch.Generator, noise: float = 0.05):
    """Context observations ``[B, 6]`` and clean targets ``[B, 40]`` of random curves."""
    a = 0.5 + 1.5 * torch.rand(batch, 1, generator=generator)
    k = 0.3 + 1.7 * torch.rand(batch, 1, generator=generator)
    c = 0.5 * torch.randn(batch, 1, generator=generator)
    context = a * torch.exp(-k * T_CONTEXT) + c + noise * torch.randn(batch, 6, generator=generator)
    target = a * torch.exp(-k * T_TARGET) + c
    return context, target


class Predictor(nn.Module):
    """Context ``[B, 6]`` → θ0 ``[B, 3]`` and Λ ``[B, 3]`` (positive)."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 6))

    def forward(self, context):
        out = self.net(context)
        return out[:, :3], nn.functional.softplus(out[:, 3:] - 2.0) + 1e-3


def curve(theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return theta[:, 0:1] * torch.exp(-theta[:, 1:2] * t) + theta[:, 2:3]


def evaluate(model, layer, context, target, constant_lam=None):
    theta0, lam = model(context)
    if layer is None:
        return nn.functional.mse_loss(curve(theta0, T_TARGET), target).item()
    data = {"t": T_CONTEXT.expand_as(context), "y": context}
    star, _ = layer(theta0, lam if constant_lam is None else constant_lam, data)
    return nn.functional.mse_loss(curve(star, T_TARGET), target).item()


def train(model, layer, steps, batch, generator, log_every, label):
    """Adam on the target MSE, through ``layer`` when given."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(1, steps + 1):
        context, target = sample_batch(batch, generator)
        theta0, lam = model(context)
        if layer is None:
            pred = theta0
        else:
            pred, info = layer(theta0, lam, {"t": T_CONTEXT.expand_as(context), "y": context})
        loss = nn.functional.mse_loss(curve(pred, T_TARGET), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps:
            extra = ""
            if layer is not None:
                b = info.backward
                extra = (f"  PCG iters max {int(b.iterations.max())}, failures {b.failures}, "
                         f"stationarity max {info.forward.stationarity.max():.1e}")
            print(f"[{label}] step {step:4d}  target MSE {loss.item():.4f}{extra}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    layer = difftto.ImplicitLayer(
        "exponential_fit",
        inner=difftto.GaussNewton(steps=8, damping=1e-3),
        # float32: a relative residual of 1e-4 is well above rounding and ample for a gradient.
        solver=difftto.solvers.PCG(rtol=1e-4, max_iter=50),
    )
    start = time.time()
    zero_shot = Predictor()
    through = Predictor()
    through.load_state_dict(zero_shot.state_dict())  # the same initial weights
    # The same number of steps on the same stream of training curves for both.
    train(zero_shot, None, args.steps, args.batch, torch.Generator().manual_seed(args.seed), 100, "zero-shot")
    train(through, layer, args.steps, args.batch, torch.Generator().manual_seed(args.seed), 100, "through layer")

    test_context, test_target = sample_batch(512, torch.Generator().manual_seed(10_000 + args.seed))
    results = {
        "zero_shot": evaluate(zero_shot, None, test_context, test_target),
        "zero_shot+TTO(lam=0.1)": evaluate(zero_shot, layer, test_context, test_target, constant_lam=0.1),
        "zero_shot+TTO(lam=1)": evaluate(zero_shot, layer, test_context, test_target, constant_lam=1.0),
        "trained_through_layer+TTO": evaluate(through, layer, test_context, test_target),
    }
    print("\nHeld-out target MSE (512 curves; lower is better):")
    for name, value in results.items():
        print(f"  {name:28s} {value:.4f}")
    print(json.dumps({"results": results, "seconds": round(time.time() - start, 1)}))
    return results


if __name__ == "__main__":
    main()
