"""Jacobi vs block-Jacobi vs identity PCG on the 3DGS Gauss-Newton system, and the cost
of one PCG iteration relative to one forward+backward render.

The system is the implicit backward's: ``(JᵀJ + diag Λ) u = ḡ`` at a test-time
optimization point ``θ*`` (Adam, ``--tto-steps`` steps from perturbed pixel-aligned
Gaussians, the scene of ``implicit_vs_unrolled.py``: 2 context views of
``--size``² pixels, one Gaussian per pixel, float32), with ``ḡ = ∂L/∂θ*`` for the MSE of
a held-out target view. ``Λ`` is one weight per Gaussian and group, ``lam_scale`` × the
group's mean ``diag(JᵀJ)`` at ``θ0``; several scales are run since the iteration count
depends on them. The operator is difftto's public
``InnerObjective(...).gauss_newton_operator(θ*)`` (tile bins and depth order frozen at
``θ*``), solved by ``difftto.solvers.PCG(rtol=1e-4)``. With ``--backend auto`` (the
default: the compiled CPU kernels on CPU) ``J·v``, ``Jᵀw`` and the exact ``diag(JᵀJ)``
come from the kernels' linearization, and so do the exact per-Gaussian 14×14 blocks of
``JᵀJ`` that ``block_jacobi`` factors once per solve; with ``--backend torch`` they come
from autograd (no blocks: ``block_jacobi`` falls back to Jacobi) and ``diag(JᵀJ)`` for
Jacobi is estimated from ``diagonal_probes`` Rademacher probes (``--probes``; they matter
only there). ``auto`` (PCG's default) is ``block_jacobi`` where the operator has blocks,
else ``jacobi``; the table says which preconditioner each spec picked.

Each solve runs on an operator of its own, built just before it, so that a solve's time
includes what its preconditioner reads (the diagonal, the blocks, their factorization);
the cases of one Λ run ``--solve-repeats`` times in turns and the median time is reported.

Per-iteration cost: the minimum over repeats of one operator product ``(JᵀJ + Λ)·v``
(what one PCG iteration does, besides O(n) vector updates) and of one render
forward+backward of the 2 context views (``rasterize`` + ``backward`` of a cotangent, a
fresh raster state each time, as an inner Adam step does), and their ratio. The solves'
own time per iteration is also given.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/preconditioning.py           # ~4 min
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/preconditioning.py --quick   # ~1 min
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from implicit_vs_unrolled import gs_setup  # noqa: E402

import difftto  # noqa: E402
from difftto.objective import InnerObjective  # noqa: E402
from difftto.problems.splatting import rasterize  # noqa: E402
from difftto.regularizers import Proximal  # noqa: E402
from difftto.solvers.preconditioners import make_preconditioner  # noqa: E402


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def tto_point(size: int, steps: int):
    """θ0, the scene, and θ* after ``steps`` Adam steps (Λ at scale 1), with ḡ = ∂L/∂θ*."""
    theta0, lam, data, tgt, target, lr = gs_setup(size, 1.0)
    layer = difftto.ImplicitLayer("gaussian_splatting", inner=difftto.Adam(lr=lr, steps=steps),
                                  backward="straight_through")
    star, info = layer(theta0, lam, data)
    star = {k: v.detach().requires_grad_(True) for k, v in star.items()}
    loss = (rasterize(star, *tgt, size, size).colors - target).pow(2).mean()
    loss.backward()
    grad = {k: v.grad for k, v in star.items()}
    return theta0, data, {k: v.detach() for k, v in star.items()}, grad, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Λ scale 1 only, max_iter 500")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--large", action="store_true", help="64x64 (8192 Gaussians)")
    parser.add_argument("--tto-steps", type=int, default=100)
    parser.add_argument("--lam-scales", default="0.1,1,10")
    parser.add_argument("--probes", default="8,64",
                        help="diagonal probes for Jacobi (the first is the library default)")
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--max-iter", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7, help="repeats of the per-iteration costs")
    parser.add_argument("--solve-repeats", type=int, default=3,
                        help="solves per case, the cases of one Λ in turns (median time reported)")
    parser.add_argument("--preconditioners", default="jacobi,block_jacobi,identity",
                        help="PCG preconditioner specs to compare ('auto', PCG's default, is "
                             "block_jacobi where the operator has blocks, else jacobi)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="auto",
                        help="rasterizer backend of the operator: 'auto' (the compiled CPU "
                             "kernels on CPU, with the exact diag(JᵀJ)) or 'torch' (autograd "
                             "products, probe-estimated diagonal)")
    parser.add_argument("--out", default=str(HERE / "results" / "preconditioning"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = 64 if args.large else args.size
    scales = [float(s) for s in args.lam_scales.split(",")]
    probes = [int(p) for p in args.probes.split(",")]
    preconditioners = args.preconditioners.split(",")
    if args.quick:
        scales, probes, args.max_iter, args.solve_repeats = [1.0], probes[:1], 500, 1

    theta0, data, star, grad, info = tto_point(size, args.tto_steps)
    problem = difftto.problems.get("gaussian_splatting", backend=args.backend)
    layout = difftto.Layout.of(theta0)
    flat0, flat_star, rhs = layout.flatten(theta0), layout.flatten(star), layout.flatten(grad)
    print(json.dumps({"tto": {"steps": args.tto_steps, "gaussians": star["means"].shape[1],
                              "n": flat_star.shape[1], "image": f"2 x {size}x{size}",
                              "stationarity": float(info.forward.stationarity.max())}}),
          flush=True)

    # Group means of diag(JᵀJ) at θ0 set Λ (as in implicit_vs_unrolled.py).
    base = InnerObjective(problem, layout, data, None)
    diag0 = layout.unflatten(base.gauss_newton_operator(flat0).diagonal())
    records = []
    for scale in scales:
        lam = {k: torch.full(theta0[k].shape[:2], scale * float(diag0[k].mean())) for k in theta0}
        prox = Proximal(flat0, layout.expand(lam))
        # The cases of this Λ in turns (the first one rotating), each solve on an operator of
        # its own, built just before it: every preconditioner pays for what it reads (the
        # diagonal, the blocks and their set-up) inside its solve's time, as in a backward.
        cases = [(pre, n_probes) for n_probes in probes for pre in preconditioners
                 if pre == "jacobi" or n_probes == probes[0]]  # the others read no probes
        times = {case: [] for case in cases}
        last = {}
        for turn in range(args.solve_repeats):
            for pre, n_probes in cases[turn % len(cases):] + cases[:turn % len(cases)]:
                objective = InnerObjective(problem, layout, data, prox, diagonal_probes=n_probes)
                start = time.perf_counter()
                op = objective.gauss_newton_operator(flat_star)
                build_s = time.perf_counter() - start
                solver = difftto.solvers.PCG(rtol=args.rtol, max_iter=args.max_iter,
                                             preconditioner=pre, on_failure="warn")
                start = time.perf_counter()
                result = solver.solve(op, rhs)
                times[(pre, n_probes)].append(time.perf_counter() - start)
                last[(pre, n_probes)] = (result, build_s, op)
        for pre, n_probes in cases:
            result, build_s, op = last[(pre, n_probes)]
            seconds = statistics.median(times[(pre, n_probes)])
            its = int(result.iterations.max())
            record = {"backend": args.backend, "lam_scale": scale, "preconditioner": pre,
                      "picked": type(make_preconditioner(pre, op)).__name__,
                      "diagonal_probes": n_probes if pre != "identity" else None,
                      "iterations": its, "status": [int(s) for s in result.status],
                      "relative_residual": float(result.relative_residual.max()),
                      "time_s": round(seconds, 3),
                      "times_s": [round(t, 3) for t in times[(pre, n_probes)]],
                      "ms_per_iteration": round(1e3 * seconds / max(its, 1), 2),
                      "operator_build_s": round(build_s, 3)}
            records.append(record)
            print(json.dumps(record), flush=True)

    # One PCG iteration's operator product vs one render forward+backward (2 views).
    lam = {k: torch.full(theta0[k].shape[:2], float(diag0[k].mean())) for k in theta0}
    op = InnerObjective(problem, layout, data, Proximal(flat0, layout.expand(lam))
                        ).gauss_newton_operator(flat_star)
    v = torch.randn(flat_star.shape, generator=torch.Generator().manual_seed(0))
    params = {k: t.clone().requires_grad_(True) for k, t in star.items()}
    cot = torch.randn(data["images"].shape, generator=torch.Generator().manual_seed(1))

    def fwd_bwd():  # with the operator's backend, a fresh raster state each time
        colors = problem.render(params, data).colors
        torch.autograd.backward(colors, cot)

    def forward():
        with torch.no_grad():
            problem.render(star, data)

    product_s = _best(lambda: op.mv(v), args.repeats)
    render_s = _best(fwd_bwd, args.repeats)
    forward_s = _best(forward, args.repeats)
    solve_ms = [r["ms_per_iteration"] for r in records if r["iterations"] >= 20]
    cost = {"cost": {"operator_product_ms": round(1e3 * product_s, 2),
                     "render_fwd_bwd_ms": round(1e3 * render_s, 2),
                     "render_forward_ms": round(1e3 * forward_s, 2),
                     "product_over_fwd_bwd": round(product_s / render_s, 2),
                     "solve_ms_per_iteration_median": (sorted(solve_ms)[len(solve_ms) // 2]
                                                       if solve_ms else None),
                     "threads": torch.get_num_threads(), "backend": args.backend}}
    if solve_ms:
        cost["cost"]["solve_iteration_over_fwd_bwd"] = round(
            cost["cost"]["solve_ms_per_iteration_median"] / (1e3 * render_s), 2)
    print(json.dumps(cost), flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=HERE).stdout.strip()
    lines = [f"## preconditioning ({time.strftime('%Y-%m-%d')}, commit {commit}, "
             f"{torch.get_num_threads()} torch thread(s), "
             f"`{' '.join(sys.argv[1:]) or '(defaults)'}`)", "",
             f"3DGS Gauss-Newton system at a TTO point ({args.tto_steps} Adam steps, "
             f"{star['means'].shape[1]} Gaussians, n = {flat_star.shape[1]:,}, 2 views "
             f"{size}×{size}, float32), rasterizer backend `{problem.backend}` for the "
             f"operator, rtol {args.rtol:g}, max_iter {args.max_iter}; each solve on its own "
             f"operator, the cases of one Λ in turns, median of {args.solve_repeats} solves.", "",
             "| Λ scale | preconditioner | picked | diag probes | iterations | status | rel. residual "
             "| time (s) | solves (s) | ms / iteration |", "|---:|---|---|---:|---:|---|---:|---:|---|---:|"]
    status_name = {0: "converged", 1: "max_iter", 2: "breakdown", 3: "non-finite"}
    for r in records:
        lines.append(f"| {r['lam_scale']:g} | {r['preconditioner']} | {r['picked']} | "
                     f"{r['diagonal_probes'] or '–'} | {r['iterations']} | "
                     f"{status_name.get(r['status'][0], r['status'][0])} | "
                     f"{r['relative_residual']:.1e} | {r['time_s']:.3f} | "
                     f"{', '.join(f'{t:.3f}' for t in r['times_s'])} | "
                     f"{r['ms_per_iteration']:.1f} |")
    lines.append("")
    for scale in scales:
        jac = next((r for r in records if r["lam_scale"] == scale and r["preconditioner"] ==
                    "jacobi" and r["diagonal_probes"] == probes[0]), None)
        ide = next((r for r in records if r["lam_scale"] == scale and
                    r["preconditioner"] == "identity"), None)
        for blk in (r for r in records if r["lam_scale"] == scale and
                    r["preconditioner"] in ("block_jacobi", "auto")):
            if jac:
                lines.append(f"- Λ scale {scale:g}: {blk['preconditioner']} ({blk['picked']}) / "
                             f"Jacobi iterations = {blk['iterations'] / jac['iterations']:.2f}, "
                             f"median time = {blk['time_s'] / jac['time_s']:.2f}")
        if jac and ide:
            both = jac["status"][0] == 0 and ide["status"][0] == 0
            ratio = jac["iterations"] / ide["iterations"]
            note = "" if both else " (at least one run stopped at max_iter: a bound, not a ratio)"
            lines.append(f"- Λ scale {scale:g}: Jacobi / identity iterations = {ratio:.2f} "
                         f"(target ≤ 0.5: {'met' if ratio <= 0.5 else 'NOT met'}){note}")
    c = cost["cost"]
    lines += [f"- one operator product (JᵀJ + Λ)·v: {c['operator_product_ms']} ms; one render "
              f"forward+backward (2 views): {c['render_fwd_bwd_ms']} ms; ratio "
              f"{c['product_over_fwd_bwd']} (target ≤ 2.5: "
              f"{'met' if c['product_over_fwd_bwd'] <= 2.5 else 'NOT met'})"]
    if "solve_iteration_over_fwd_bwd" in c:
        lines.append(f"- whole-solve time per iteration (median over solves with ≥ 20 "
                     f"iterations): {c['solve_ms_per_iteration_median']} ms = "
                     f"{c['solve_iteration_over_fwd_bwd']}× a render forward+backward")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    with open(out.with_suffix(".jsonl"), "w") as f:
        for r in records + [cost]:
            f.write(json.dumps(r) + "\n")
    print(json.dumps({"written": [str(out.with_suffix(".md")), str(out.with_suffix(".jsonl"))]}))


if __name__ == "__main__":
    main()
