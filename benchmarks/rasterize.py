"""Timings of the pure-PyTorch rasterizer: one JSON line per case.

Cases are pixel-aligned scenes (one Gaussian per pixel of 2 source views, what a
feed-forward model predicts), rendered into the same 2 views:
2 × 32² = 2048 Gaussians → 32×32 and 2 × 64² = 8192 Gaussians → 64×64
(``--large`` adds 2 × 128² = 32768 → 128×128).

Fields (milliseconds, minimum over ``--repeats``):
- ``forward``: a full render (projection, tile binning, compositing);
- ``forward_frozen``: a render that reuses a frozen :class:`RasterState`;
- ``fwd_bwd``: full render + backward of a random cotangent;
- ``jvp``: ``J·v`` by ``torch.func.jvp`` on the frozen render;
- ``vjp``: ``Jᵀ·w`` with a reverse-mode function built once (``torch.func.vjp``) and
  reused, as a PCG solve does;
- ``gn_product``: ``Jᵀ(J·v)``, one fresh jvp plus one reused vjp (one PCG iteration);
- ``peak_rss_mb``: the process's peak resident memory after the case.

Run with glibc's malloc told to keep freed memory, which the prototype measured
1.5–2.8× faster on these machines (see REFERENCES.md):

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 \
        .venv/bin/python benchmarks/rasterize.py [--threads 2] [--dtype float32|float64|both]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

from difftto.problems.splatting import rasterize
from difftto.problems.splatting.synthetic import pixel_aligned_scene


def _best_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def run_case(size: int, dtype: torch.dtype, repeats: int) -> dict:
    theta, viewmats, Ks = pixel_aligned_scene(1, 2, size, size, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    tangent = {k: torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in theta.items()}
    out = rasterize(theta, viewmats, Ks, size, size, return_state=True)
    state = out.state
    cotangent = torch.randn(out.colors.shape, generator=gen, dtype=dtype)

    def forward():
        rasterize(theta, viewmats, Ks, size, size)

    def forward_frozen():
        rasterize(theta, viewmats, Ks, size, size, state=state)

    params = {k: v.clone().requires_grad_() for k, v in theta.items()}

    def fwd_bwd():
        colors = rasterize(params, viewmats, Ks, size, size).colors
        torch.autograd.backward(colors, cotangent)

    def render(t):
        return rasterize(t, viewmats, Ks, size, size, state=state).colors

    def jvp():
        return torch.func.jvp(render, (theta,), (tangent,))[1]

    _, vjp_fn = torch.func.vjp(render, theta)

    def vjp():
        return vjp_fn(cotangent)

    def gn_product():
        return vjp_fn(jvp())

    timings = {name: _best_ms(fn, repeats) for name, fn in [
        ("forward", forward), ("forward_frozen", forward_frozen), ("fwd_bwd", fwd_bwd),
        ("jvp", jvp), ("vjp", vjp), ("gn_product", gn_product)]}
    return {
        "case": f"{2 * size * size}->{size}x{size}",
        "gaussians": 2 * size * size,
        "views": 2,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "pairs": state.num_pairs,
        "padded_pairs": state.num_padded,
        **{k: round(v, 2) for k, v in timings.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "malloc_tuned": os.environ.get("MALLOC_MMAP_MAX_") == "0",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "float64", "both"], default="float32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--large", action="store_true", help="add 32k Gaussians at 128x128")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtypes = {"float32": [torch.float32], "float64": [torch.float64],
              "both": [torch.float32, torch.float64]}[args.dtype]
    sizes = [32, 64] + ([128] if args.large else [])
    for dtype in dtypes:
        for size in sizes:
            print(json.dumps(run_case(size, dtype, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
