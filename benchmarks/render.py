"""Rendering and Gauss-Newton products, pure-PyTorch vs compiled CPU kernels, side by side.

One JSON line per case, both backends measured in the same process, interleaved: every
repeat of a quantity times each backend once, in turn. Cases are pixel-aligned scenes (one
Gaussian per pixel of 2 source views, what a feed-forward model predicts) rendered into the
same 2 views:
2 × 32² = 2048 Gaussians → 32×32, 2 × 64² = 8192 → 64×64, 2 × 128² = 32768 → 128×128.

Fields per backend (milliseconds, minimum over ``--repeats``):
- ``forward``: a full render (projection, binning, compositing);
- ``fwd_bwd``: full render + backward of a random cotangent to every parameter group;
- ``linearize``: what a Gauss-Newton solve pays once (freeze excluded): torch builds its
  reverse-mode function; the kernels build the per-pixel cache and the projection
  Jacobian (in closed form, compiled);
- ``jvp``, ``vjp``: ``J·v`` and ``Jᵀ·w`` of the problem's residuals at the frozen state
  (torch: a fresh ``torch.func.jvp``, a reused ``torch.func.vjp`` function, as the layer
  does; kernels: :class:`KernelLinearization`);
- ``gn_product``: ``Jᵀ(J·v)``, one PCG iteration's operator product;
- ``diag``: the exact ``diag(JᵀJ)`` (kernels only; torch has only probe estimates).
- ``linearize_blocks``: ``linearize`` plus the per-Gaussian blocks of ``JᵀJ`` (the Gram
  matrices and ``gauss_newton_blocks``): what the block-Jacobi preconditioner reads from
  the problem (kernels only).
- ``linearize_jacobian``: the kernels' linearization build timed twice, interleaved:
  ``kernel`` with the compiled closed-form projection Jacobian (the default, = ``linearize``
  above up to noise) and ``torch_func`` with the Jacobian by ``torch.func`` forward mode on
  the pure-torch projection (the twin; how it was built before); ``speedup_linearize`` =
  torch_func / kernel. ``--no-torch-func-jacobian`` skips it (slow at 128²).
- ``peak_rss_mb``: the process's peak resident memory once the case has run (cases run
  in increasing size, so it is the largest case's peak so far; both backends included).
Ratios: ``speedup_*`` = torch / kernels; ``gn_over_fwd_bwd`` = the kernels' gn_product /
their fwd_bwd (the issue's target: ≤ 2.5; and ≥ 5× speedup of fwd_bwd at 64² and 128²).

With ``--gsplat-baseline`` a second line per case times an outside baseline on the same
scene: gsplat's pure-torch reference projection (``gsplat.cuda._torch_impl``:
``_quat_scale_to_covar_preci`` and ``_fully_fused_projection``, which run on CPU) followed by
a straightforward per-pixel compositing in torch (:func:`per_pixel_render`, this file:
every pixel's Gaussians in a padded ``[pixels, K]`` matrix, front to back). The two images
are compared first (``max_abs_diff_*``; the script stops if they disagree beyond 1e-4),
then ``forward`` and ``fwd_bwd`` of the baseline and of the CPU kernels are timed side by
side; ``speedup_*`` = baseline / kernels.

Run with glibc's malloc told to keep freed memory (1.5–2.8× on these machines for the
torch path's large temporaries, see REFERENCES.md), once with the default threads and once
with ``--threads 1`` (the machines are shared, so 1 thread is the steadier measurement):

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 \\
        .venv/bin/python benchmarks/render.py [--threads 2] [--sizes 32 64 128] [--dtype float32] \\
        [--gsplat-baseline] [--no-torch-func-jacobian]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time

import torch

from difftto.problems.splatting import GaussianSplattingProblem, rasterize
from difftto.problems.splatting.cpu_kernels import cpu_kernels_available
from difftto.problems.splatting.kernel_linearization import KernelLinearization
from difftto.problems.splatting.synthetic import pixel_aligned_scene


def _best_ms(fns: dict, repeats: int) -> dict:
    """``{name: best milliseconds}`` of the callables ``fns``, timed in turn within every
    repeat (interleaved, so that the load of a shared machine falls on all of them alike)."""
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: round(1e3 * t, 2) for name, t in best.items()}


def _quantities(backend: str, theta, data, size: int, gen, info: dict):
    """Yields ``(quantity, callable)`` in the same order for both backends (torch stops
    before ``diag``); a callable may use what an earlier one made once it has run."""
    V, K = data["viewmats"], data["Ks"]
    dtype = theta["means"].dtype
    cotangent = torch.randn(data["images"].shape, generator=gen, dtype=dtype)
    tangent = {k: torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in theta.items()}
    params = {k: v.clone().requires_grad_() for k, v in theta.items()}
    problem = GaussianSplattingProblem(backend=backend)
    frozen = problem.freeze(theta, data)
    yield "forward", lambda: rasterize(theta, V, K, size, size, backend=backend)

    def fwd_bwd():
        colors = rasterize(params, V, K, size, size, backend=backend).colors
        torch.autograd.backward(colors, cotangent)

    yield "fwd_bwd", fwd_bwd
    w = cotangent.reshape(cotangent.shape[0], -1)
    holder = {}
    if backend == "torch":
        def residual(t):
            return problem.residuals(t, frozen)

        def linearize():
            holder["vjp"] = torch.func.vjp(residual, theta)[1]

        yield "linearize", linearize
        vjp_fn = holder["vjp"]

        def jvp():
            return torch.func.jvp(residual, (theta,), (tangent,))[1]

        yield "jvp", jvp
        yield "vjp", lambda: vjp_fn(w)[0]
        yield "gn_product", lambda: vjp_fn(jvp())[0]
    else:
        def linearize():
            holder["lin"] = problem.linearize(theta, frozen)

        yield "linearize", linearize
        lin = holder["lin"]
        info["pairs"] = int(lin._structure.pair_gauss.numel())
        yield "jvp", lambda: lin.jvp(tangent)
        yield "vjp", lambda: lin.vjp(w)
        yield "gn_product", lambda: lin.vjp(lin.jvp(tangent))
        yield "diag", lin.gauss_newton_diagonal
        # From scratch (a fresh linearization, so no cache of the lines above is reused).
        yield "linearize_blocks", lambda: problem.linearize(theta, frozen).gauss_newton_blocks()


def run_case(size: int, dtype: torch.dtype, repeats: int, torch_func_jacobian: bool = True) -> dict:
    theta, viewmats, Ks = pixel_aligned_scene(1, 2, size, size, dtype=dtype)
    images = rasterize(theta, viewmats, Ks, size, size, backend="torch").colors.detach()
    data = {"viewmats": viewmats, "Ks": Ks, "images": (images + 0.02).clamp(0, 1)}
    result = {
        "case": f"{2 * size * size}->{size}x{size}",
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "malloc_tuned": os.environ.get("MALLOC_MMAP_MAX_") == "0",
    }
    backends = ("torch", "cpu_kernels")
    info = {b: {} for b in backends}
    steps = {b: _quantities(b, theta, data, size, torch.Generator().manual_seed(0), info[b]) for b in backends}
    while True:  # one quantity at a time, both backends interleaved
        step = {b: item for b in backends if (item := next(steps[b], None)) is not None}
        if not step:
            break
        times = _best_ms({b: fn for b, (_, fn) in step.items()}, repeats)
        for b, (quantity, _) in step.items():
            info[b][quantity] = times[b]
    result.update(info)
    t, k = result["torch"], result["cpu_kernels"]
    for name in ("forward", "fwd_bwd", "jvp", "vjp", "gn_product"):
        result[f"speedup_{name}"] = round(t[name] / k[name], 2)
    result["gn_over_fwd_bwd"] = round(k["gn_product"] / k["fwd_bwd"], 2)
    if torch_func_jacobian:
        problem = GaussianSplattingProblem(backend="cpu_kernels")
        frozen = problem.freeze(theta, data)
        builds = {name: (lambda j=j: KernelLinearization(problem, theta, frozen, jacobian=j))
                  for name, j in (("kernel", "kernel"), ("torch_func", "torch.func"))}
        result["linearize_jacobian"] = _best_ms(builds, repeats)
        result["speedup_linearize"] = round(result["linearize_jacobian"]["torch_func"]
                                            / result["linearize_jacobian"]["kernel"], 2)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


# ----------------------------------------------------------------------------- gsplat baseline


def per_pixel_render(theta, viewmats, Ks, width, height):
    """Colours ``[B, C, H, W, D]`` and alphas ``[B, C, H, W, 1]`` from gsplat's pure-torch
    projection and a per-pixel compositing in torch (differentiable in every group).

    Conventions as gsplat's: α = min(0.999, o·exp(−σ)), pairs with α < 1/255 skipped, a pixel
    stops (exclusive) once its transmittance would reach 1e-4, pixel centres at +0.5.
    """
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    means, quats = theta["means"], theta["quats"]
    covars, _ = _quat_scale_to_covar_preci(quats, torch.exp(theta["log_scales"]), compute_preci=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(means, covars, viewmats, Ks, width, height)
    B, C, N = depths.shape
    I, D, HW = B * C, theta["colors"].shape[-1], height * width
    opacity = torch.sigmoid(theta["opacities"]).unsqueeze(1).expand(B, C, N).reshape(I * N)
    colors = theta["colors"].unsqueeze(1).expand(B, C, N, D).reshape(I * N, D)
    means2d, conics, depths = means2d.reshape(I * N, 2), conics.reshape(I * N, 3), depths.reshape(I, N)
    with torch.no_grad():  # every (pixel, Gaussian) pair of the footprint boxes, front to back
        valid = (radii.reshape(I, N, 2) > 0).any(dim=-1)
        order = torch.argsort(depths.masked_fill(~valid, math.inf), dim=1, stable=True)
        gauss = (order + N * torch.arange(I).unsqueeze(1)).reshape(-1)
        gauss = gauss[valid.reshape(-1)[gauss]]
        m2, r = means2d.detach()[gauss], radii.reshape(I * N, 2)[gauss].to(means2d.dtype)
        x0 = torch.floor(m2[:, 0] - r[:, 0]).clamp(0, width).long()
        x1 = torch.ceil(m2[:, 0] + r[:, 0]).clamp(0, width).long()
        y0 = torch.floor(m2[:, 1] - r[:, 1]).clamp(0, height).long()
        y1 = torch.ceil(m2[:, 1] + r[:, 1]).clamp(0, height).long()
        span = x1 - x0
        counts = span * (y1 - y0)
        src = torch.repeat_interleave(torch.arange(gauss.numel()), counts)
        local = torch.arange(src.numel()) - (torch.cumsum(counts, 0) - counts)[src]
        px, py = x0[src] + local % span[src], y0[src] + torch.div(local, span[src], rounding_mode="floor")
        pair_gauss = gauss[src]
        pixel = torch.div(pair_gauss, N, rounding_mode="floor") * HW + py * width + px
        pixel, perm = torch.sort(pixel, stable=True)  # stable: each pixel's pairs stay front to back
        pair_gauss, px, py = pair_gauss[perm], px[perm], py[perm]
        per_pixel = torch.bincount(pixel, minlength=I * HW)
        K = max(int(per_pixel.max()) if pixel.numel() else 0, 1)
        slot = torch.arange(pixel.numel()) - (torch.cumsum(per_pixel, 0) - per_pixel)[pixel]
        ids = torch.full((I * HW, K), I * N, dtype=torch.long)  # padding: an extra Gaussian, α = 0
        ids[pixel, slot] = pair_gauss
        pix = torch.arange(I * HW) % HW
        centre_x = (pix % width).to(means2d.dtype).unsqueeze(1) + 0.5
        centre_y = torch.div(pix, width, rounding_mode="floor").to(means2d.dtype).unsqueeze(1) + 0.5
    pad = means2d.new_zeros(1)
    dx = centre_x - torch.cat([means2d[:, 0], pad])[ids]
    dy = centre_y - torch.cat([means2d[:, 1], pad])[ids]
    a, b, c = (torch.cat([conics[:, k], pad])[ids] for k in range(3))
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    alpha = (torch.cat([opacity, pad])[ids] * torch.exp(-sigma)).clamp(max=0.999)
    keep = alpha >= 1.0 / 255.0
    alpha = torch.where(keep, alpha, 0.0)
    with torch.no_grad():
        keep = keep & (torch.cumsum(torch.log1p(-alpha), dim=1) > math.log(1e-4))
    alpha = torch.where(keep, alpha, 0.0)
    log_t = torch.log1p(-alpha)
    weights = alpha * torch.exp(torch.cumsum(log_t, dim=1) - log_t)  # α · T before the pair
    padded_colors = torch.cat([colors, colors.new_zeros(1, D)])
    rgb = torch.einsum("pk,pkd->pd", weights, padded_colors[ids])
    return rgb.view(B, C, height, width, D), weights.sum(dim=1).view(B, C, height, width, 1)


def run_gsplat_baseline(size: int, dtype: torch.dtype, repeats: int) -> dict:
    """The gsplat-reference baseline against the CPU kernels on :func:`run_case`'s scene."""
    theta, viewmats, Ks = pixel_aligned_scene(1, 2, size, size, dtype=dtype)
    ours = rasterize(theta, viewmats, Ks, size, size, backend="cpu_kernels")
    ref_rgb, ref_alpha = per_pixel_render(theta, viewmats, Ks, size, size)
    diff_rgb = float((ours.colors - ref_rgb).abs().max())
    diff_alpha = float((ours.alphas - ref_alpha).abs().max())
    if max(diff_rgb, diff_alpha) > 1e-4:
        raise SystemExit(f"the gsplat baseline renders another image: max |Δ| colour {diff_rgb:.2e}, "
                         f"alpha {diff_alpha:.2e}")
    params = {k: v.clone().requires_grad_() for k, v in theta.items()}
    cotangent = torch.randn(ours.colors.shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    result = {"case": f"{2 * size * size}->{size}x{size}", "baseline": "gsplat._torch_impl projection + "
              "per-pixel torch compositing", "dtype": str(dtype).removeprefix("torch."),
              "threads": torch.get_num_threads(), "max_abs_diff_colors": diff_rgb, "max_abs_diff_alphas": diff_alpha}
    renders = {"gsplat_torch_reference": lambda p: per_pixel_render(p, viewmats, Ks, size, size)[0],
               "cpu_kernels": lambda p: rasterize(p, viewmats, Ks, size, size, backend="cpu_kernels").colors}
    forward = _best_ms({name: lambda r=render: r(theta) for name, render in renders.items()}, repeats)
    fwd_bwd = _best_ms({name: lambda r=render: torch.autograd.backward(r(params), cotangent)
                        for name, render in renders.items()}, repeats)
    for name in renders:
        result[name] = {"forward": forward[name], "fwd_bwd": fwd_bwd[name]}
    for field in ("forward", "fwd_bwd"):
        result[f"speedup_{field}"] = round(result["gsplat_torch_reference"][field] / result["cpu_kernels"][field], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "float64", "both"], default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--no-torch-func-jacobian", action="store_true",
                        help="skip timing the linearization built with the torch.func projection Jacobian")
    parser.add_argument("--gsplat-baseline", action="store_true",
                        help="also time gsplat's torch reference projection + per-pixel compositing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ok, why = cpu_kernels_available()
    if not ok:
        raise SystemExit(f"benchmarks/render.py compares against the CPU kernels: {why}")
    dtypes = ["float32", "float64"] if args.dtype == "both" else [args.dtype]
    for name in dtypes:
        for size in args.sizes:
            case = run_case(size, getattr(torch, name), args.repeats, not args.no_torch_func_jacobian)
            print(json.dumps(case), flush=True)
            if args.gsplat_baseline:
                print(json.dumps(run_gsplat_baseline(size, getattr(torch, name), args.repeats)), flush=True)


if __name__ == "__main__":
    main()
