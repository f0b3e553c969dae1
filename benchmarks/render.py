"""Rendering and Gauss-Newton products, pure-PyTorch vs compiled CPU kernels, side by side.

One JSON line per case, both backends measured in the same process, one after the
other for every quantity. Cases are pixel-aligned scenes (one Gaussian per pixel of 2
source views, what a feed-forward model predicts) rendered into the same 2 views:
2 × 32² = 2048 Gaussians → 32×32, 2 × 64² = 8192 → 64×64, 2 × 128² = 32768 → 128×128.

Fields per backend (milliseconds, minimum over ``--repeats``):
- ``forward``: a full render (projection, binning, compositing);
- ``fwd_bwd``: full render + backward of a random cotangent to every parameter group;
- ``linearize``: what a Gauss-Newton solve pays once (freeze excluded): torch builds its
  reverse-mode function; the kernels build the per-pixel cache and the projection
  Jacobian;
- ``jvp``, ``vjp``: ``J·v`` and ``Jᵀ·w`` of the problem's residuals at the frozen state
  (torch: a fresh ``torch.func.jvp``, a reused ``torch.func.vjp`` function, as the layer
  does; kernels: :class:`KernelLinearization`);
- ``gn_product``: ``Jᵀ(J·v)``, one PCG iteration's operator product;
- ``diag``: the exact ``diag(JᵀJ)`` (kernels only; torch has only probe estimates).
- ``peak_rss_mb``: the process's peak resident memory once the case has run (cases run
  in increasing size, so it is the largest case's peak so far; both backends included).
Ratios: ``speedup_*`` = torch / kernels; ``gn_over_fwd_bwd`` = the kernels' gn_product /
their fwd_bwd (the issue's target: ≤ 2.5; and ≥ 5× speedup of fwd_bwd at 64² and 128²).

Run with glibc's malloc told to keep freed memory (1.5–2.8× on these machines for the
torch path's large temporaries, see REFERENCES.md), once with the default threads and once
with ``--threads 1`` (the machines are shared, so 1 thread is the steadier measurement):

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 \\
        .venv/bin/python benchmarks/render.py [--threads 2] [--sizes 32 64 128] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

from difftto.problems.splatting import GaussianSplattingProblem, rasterize
from difftto.problems.splatting.cpu_kernels import cpu_kernels_available
from difftto.problems.splatting.synthetic import pixel_aligned_scene


def _best_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return round(1e3 * best, 2)


def _backend_timings(backend: str, theta, data, size: int, repeats: int, gen) -> dict:
    V, K = data["viewmats"], data["Ks"]
    dtype = theta["means"].dtype
    cotangent = torch.randn(data["images"].shape, generator=gen, dtype=dtype)
    tangent = {k: torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in theta.items()}
    params = {k: v.clone().requires_grad_() for k, v in theta.items()}
    problem = GaussianSplattingProblem(backend=backend)
    frozen = problem.freeze(theta, data)
    out = {}
    out["forward"] = _best_ms(lambda: rasterize(theta, V, K, size, size, backend=backend), repeats)

    def fwd_bwd():
        colors = rasterize(params, V, K, size, size, backend=backend).colors
        torch.autograd.backward(colors, cotangent)

    out["fwd_bwd"] = _best_ms(fwd_bwd, repeats)
    w = cotangent.reshape(cotangent.shape[0], -1)
    if backend == "torch":
        def residual(t):
            return problem.residuals(t, frozen)

        holder = {}

        def linearize():
            holder["vjp"] = torch.func.vjp(residual, theta)[1]

        out["linearize"] = _best_ms(linearize, repeats)
        vjp_fn = holder["vjp"]

        def jvp():
            return torch.func.jvp(residual, (theta,), (tangent,))[1]

        def vjp():
            return vjp_fn(w)[0]

        out["jvp"] = _best_ms(jvp, repeats)
        out["vjp"] = _best_ms(vjp, repeats)
        out["gn_product"] = _best_ms(lambda: vjp_fn(jvp())[0], repeats)
    else:
        holder = {}

        def linearize():
            holder["lin"] = problem.linearize(theta, frozen)

        out["linearize"] = _best_ms(linearize, repeats)
        lin = holder["lin"]
        out["jvp"] = _best_ms(lambda: lin.jvp(tangent), repeats)
        out["vjp"] = _best_ms(lambda: lin.vjp(w), repeats)
        out["gn_product"] = _best_ms(lambda: lin.vjp(lin.jvp(tangent)), repeats)
        out["diag"] = _best_ms(lin.gauss_newton_diagonal, repeats)
        out["pairs"] = int(lin._structure.pair_gauss.numel())
    return out


def run_case(size: int, dtype: torch.dtype, repeats: int) -> dict:
    theta, viewmats, Ks = pixel_aligned_scene(1, 2, size, size, dtype=dtype)
    images = rasterize(theta, viewmats, Ks, size, size, backend="torch").colors.detach()
    data = {"viewmats": viewmats, "Ks": Ks, "images": (images + 0.02).clamp(0, 1)}
    result = {
        "case": f"{2 * size * size}->{size}x{size}",
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "malloc_tuned": os.environ.get("MALLOC_MMAP_MAX_") == "0",
    }
    for backend in ("torch", "cpu_kernels"):
        result[backend] = _backend_timings(backend, theta, data, size, repeats, torch.Generator().manual_seed(0))
    t, k = result["torch"], result["cpu_kernels"]
    for name in ("forward", "fwd_bwd", "jvp", "vjp", "gn_product"):
        result[f"speedup_{name}"] = round(t[name] / k[name], 2)
    result["gn_over_fwd_bwd"] = round(k["gn_product"] / k["fwd_bwd"], 2)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "float64", "both"], default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ok, why = cpu_kernels_available()
    if not ok:
        raise SystemExit(f"benchmarks/render.py compares against the CPU kernels: {why}")
    dtypes = ["float32", "float64"] if args.dtype == "both" else [args.dtype]
    for name in dtypes:
        for size in args.sizes:
            print(json.dumps(run_case(size, getattr(torch, name), args.repeats)), flush=True)


if __name__ == "__main__":
    main()
