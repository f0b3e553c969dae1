"""Implicit vs unrolled vs truncated vs straight-through backward, against the number of
inner steps K: forward time, backward time, peak memory of one training step, and the
cosine similarity of the gradient to a converged reference.

Two problems:

- ``3dgs``: pixel-aligned Gaussians from 2 context views (``--size`` × ``--size``, 32 by
  default, 64 with ``--large``; float32), perturbed from a ground-truth scene; the inner
  optimizer is Adam with gsplat's per-group learning rates (× 10 for colours, scales and
  rotations as InstantSplat does for few-view TTO); ``Λ`` = ``--lam-scale`` × the mean
  of ``diag(JᵀJ)`` of each group at ``θ0``, one weight per Gaussian and group. The
  outer loss is the MSE of a held-out target view rendered from ``θ*``.
- ``nls``: a nonlinear least squares registered here, ``tanh_smoothing``:
  ``r = [w ⊙ (tanh θ − y); s (θ_{i+1} − θ_i)]`` with ``n = 20 000`` (float64); the inner
  optimizer is gradient descent with ``lr = 1/L``. The outer loss is ``½‖θ* − θ_true‖²``.
  The problem states its exact ``diag(JᵀJ)`` (``Problem.gauss_newton_diagonal``:
  ``w² sech⁴θ`` plus ``s²`` per difference holding ``θ_j``); ``tanh_smoothing_probe`` is
  the same residuals without it (Jacobi from the 8-probe estimate), for the ``_probe`` modes.

Modes: ``implicit`` (IFT, Gauss-Newton ``JᵀJ + diag Λ``, PCG with its default
preconditioner ``"auto"``: block-Jacobi where the problem's linearization gives per-item
blocks of ``JᵀJ``, i.e. per Gaussian on ``3dgs``, else Jacobi, as on ``nls``; ``--rtol``),
``implicit_loose`` (the same at rtol 1e-2; 3DGS-LM runs its PCG at 5e-2). Suffixes name
the variant: ``_jacobi`` (Jacobi, the default before 2026-11-30), ``_block``
(``"block_jacobi"`` by name), ``_probe`` (``nls`` only: the problem without its exact
diagonal), e.g. ``implicit_jacobi``, ``implicit_jacobi_loose``. Then ``unrolled``,
``truncated`` (last ``--truncate`` steps) and ``straight_through``.

Reference gradients (the gradient of the *converged* solution map):

- ``nls``: backpropagation through gradient descent run to convergence (unrolled, until
  the relative stationarity is below 1e-10), as issue 8 asks; the script also reports its
  cosine with the IFT gradient at the same point (exact Hessian) as a cross-check.
- ``3dgs``: unrolling Adam to convergence is out of reach here (Adam with fixed learning
  rates does not reach a tight stationary point), and so is Gauss-Newton/LM to tight
  convergence on 2 cores. The reference point is Adam run in 4 stages with the learning
  rates × (1, 0.3, 0.1, 0.03) (relative stationarity about 1e-2, reported), and the
  reference gradient is the IFT gradient there with the **Gauss-Newton** Hessian, solved
  to rtol 1e-6 in float64. The exact Hessian (``∇²D + diag Λ``) is tried too and is
  indefinite at that point (PCG breaks down; the record says so), so no exact-Hessian
  reference exists there. This reference shares the Gauss-Newton approximation with
  ``implicit``, so it measures convergence in K and the effect of the backward's rtol, not
  the Gauss-Newton bias; ``unrolled`` at large K is the independent check.

Every case runs in two fresh subprocesses (one torch thread by default), as ``pcg.py``
does: one timed with the default allocator, one measured for memory. Peak memory is the
peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after set-up and
warm-up) minus the resident set before the step, with glibc's mmap threshold fixed
(``MALLOC_MMAP_THRESHOLD_=65536``) so that the resident set follows live memory.
Writes ``benchmarks/results/implicit_vs_unrolled.{jsonl,md,png}``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/implicit_vs_unrolled.py           # ~8 min
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/implicit_vs_unrolled.py --quick   # ~1-2 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
from pcg import MALLOC_ENV, _reset_peak, _status_kib  # noqa: E402

MODES = ("implicit", "implicit_loose", "implicit_jacobi", "implicit_jacobi_loose", "unrolled", "truncated",
         "straight_through")
IMPLICIT_VARIANTS = ("_jacobi", "_block", "_probe", "_loose")
GROUPS = ("means", "log_scales", "quats", "opacities", "colors")


# ----------------------------------------------------------------------------- problems
def _register_nls():
    import torch

    import difftto

    if "tanh_smoothing" in difftto.problems.available():
        return

    @difftto.problems.register("tanh_smoothing_probe")
    class TanhSmoothingProbe(difftto.Problem):
        """``r = [w ⊙ (tanh θ − y); s (θ_{i+1} − θ_i)]``; θ, y, w: ``[B, n]``."""

        def residuals(self, theta, data):
            fit = data["w"] * (torch.tanh(theta) - data["y"])
            smooth = data["s"] * (theta[:, 1:] - theta[:, :-1])
            return torch.cat([fit, smooth], dim=1)

    @difftto.problems.register("tanh_smoothing")
    class TanhSmoothing(TanhSmoothingProbe):
        """The same residuals with their exact ``diag(JᵀJ)``."""

        def gauss_newton_diagonal(self, theta, data):
            # Column j of J: w_j sech²θ_j in the fit rows; ±s in the one (j at an end) or
            # two differences that hold θ_j. sech² as cosh⁻² (1 − tanh² cancels at large |θ|).
            neighbours = torch.full_like(theta, 2.0)
            neighbours[:, 0] -= 1.0
            neighbours[:, -1] -= 1.0
            return (data["w"] * torch.cosh(theta).pow(-2)) ** 2 + data["s"] ** 2 * neighbours


def nls_setup(n: int, seed: int = 0):
    """``(theta0, lam, data, theta_true, lr)`` of the tanh-smoothing problem, float64."""
    import torch

    _register_nls()
    gen = torch.Generator().manual_seed(seed)
    dt = torch.float64
    # A smooth signal (cumulative sum of small steps) seen through tanh with noise.
    truth = 0.8 * torch.cumsum(0.05 * torch.randn(1, n, generator=gen, dtype=dt), dim=1)
    truth = truth - truth.mean() + 0.3 * torch.sin(torch.linspace(0, 20, n, dtype=dt))[None]
    y = torch.tanh(truth) + 0.05 * torch.randn(1, n, generator=gen, dtype=dt)
    w = 0.5 + 1.5 * torch.rand(1, n, generator=gen, dtype=dt)
    theta0 = truth + 0.3 * torch.randn(1, n, generator=gen, dtype=dt)
    lam = 10 ** (-1.5 + torch.rand(1, n, generator=gen, dtype=dt))  # [0.03, 0.3]
    data = {"y": y, "w": w, "s": 1.0}
    # L bounds the Hessian: |d²/dθ² ½w²(tanh θ − y)²| ≤ w² (1 + 2|r|·0.77), plus 4 s² and Λ.
    lipschitz = float((w * w).max()) * 2.0 + 4.0 + float(lam.max())
    return theta0, lam, data, truth, 1.0 / lipschitz


def gs_setup(size: int, lam_scale: float, seed: int = 0):
    """``(theta0, lam, data, target_cams, target_image, lr)`` of the 3DGS problem."""
    import torch

    from difftto import Layout
    from difftto.objective import InnerObjective
    from difftto.problems import get
    from difftto.problems.splatting import rasterize
    from difftto.problems.splatting.synthetic import pixel_aligned_scene

    truth, viewmats, ks = pixel_aligned_scene(1, 2, size, size, render_views=3, seed=seed)
    ctx = (viewmats[:, [0, 2]].contiguous(), ks[:, [0, 2]].contiguous())
    tgt = (viewmats[:, [1]].contiguous(), ks[:, [1]].contiguous())
    images = rasterize(truth, *ctx, size, size).colors
    target = rasterize(truth, *tgt, size, size).colors
    gen = torch.Generator().manual_seed(seed + 1)
    noise = {"means": 0.01, "log_scales": 0.1, "quats": 0.1, "opacities": 0.3, "colors": 0.1}
    theta0 = {k: v + noise[k] * torch.randn(v.shape, generator=gen, dtype=v.dtype)
              for k, v in truth.items()}
    data = {"viewmats": ctx[0], "Ks": ctx[1], "images": images}
    # Λ per Gaussian and group: lam_scale × the group's mean Gauss-Newton curvature at θ0.
    layout = Layout.of(theta0)
    objective = InnerObjective(get("gaussian_splatting"), layout, data, None)
    diag = layout.unflatten(objective.gauss_newton_operator(layout.flatten(theta0)).diagonal())
    lam = {k: torch.full(theta0[k].shape[:2], lam_scale * float(diag[k].mean()))
           for k in theta0}
    # gsplat's learning rates (scene scale: the camera distance 4), colour/scale/rotation × 10.
    lr = {"means": 1.6e-4 * 4.0, "log_scales": 5e-2, "quats": 1e-2, "opacities": 5e-2,
          "colors": 2.5e-2}
    return theta0, lam, data, tgt, target, lr


# ----------------------------------------------------------------------------- one case
def _leaves(theta0, lam):
    import torch

    if isinstance(theta0, dict):
        t0 = {k: v.detach().clone().requires_grad_(True) for k, v in theta0.items()}
        lm = {k: v.detach().clone().requires_grad_(True) for k, v in lam.items()}
        return t0, lm, [t0[k] for k in GROUPS], [lm[k] for k in GROUPS]
    t0 = theta0.detach().clone().requires_grad_(True)
    lm = lam.detach().clone().requires_grad_(True)
    del torch
    return t0, lm, [t0], [lm]


def _flat_grad(leaves):
    import torch

    if any(leaf.grad is None for leaf in leaves):
        return None
    return torch.cat([leaf.grad.reshape(-1) for leaf in leaves]).double()


def build(case: dict):
    """Everything a case needs: (theta0, lam, data, outer_loss(theta_star), inner factory)."""
    import difftto

    if case["problem"] == "3dgs":
        from difftto.problems.splatting import rasterize

        theta0, lam, data, tgt, target, lr = gs_setup(case["size"], case["lam_scale"])
        size = case["size"]

        def outer(star):
            return (rasterize(star, *tgt, size, size).colors - target).pow(2).mean()

        def inner(steps):
            return difftto.Adam(lr=lr, steps=steps)

        return theta0, lam, data, outer, inner, "gaussian_splatting"
    theta0, lam, data, truth, lr = nls_setup(case["n"])

    def outer(star):
        return 0.5 * (star - truth).pow(2).sum()

    def inner(steps):
        return difftto.GradientDescent(lr=lr, steps=steps)

    return theta0, lam, data, outer, inner, ("tanh_smoothing_probe" if "_probe" in case.get("mode", "")
                                             else "tanh_smoothing")


def _backward_mode(mode: str) -> str:
    """The layer's backward of a mode: the mode without its variant suffixes."""
    for suffix in IMPLICIT_VARIANTS:
        mode = mode.replace(suffix, "")
    return mode


def run_case(case: dict) -> dict:
    import torch

    import difftto

    torch.set_num_threads(case["threads"])
    theta0, lam, data, outer, inner, problem = build(case)
    mode, steps = case["mode"], case["steps"]
    rtol = 1e-2 if mode.endswith("_loose") else case["rtol"]
    preconditioner = ("jacobi" if "_jacobi" in mode else "block_jacobi" if "_block" in mode
                      else "auto")
    layer = difftto.ImplicitLayer(
        problem, inner=inner(steps), backward=_backward_mode(mode),
        solver=difftto.solvers.PCG(rtol=rtol, max_iter=case["max_iter"], preconditioner=preconditioner),
        truncate=min(case["truncate"], steps), on_failure="warn")

    # Warm-up: one small training step of the same mode (kernels, allocator, lazy imports).
    warm = difftto.ImplicitLayer(problem, inner=inner(2), backward=layer.backward_mode,
                                 solver=difftto.solvers.PCG(rtol=1e-1, max_iter=5,
                                                            preconditioner=preconditioner),
                                 truncate=1, on_failure="zero")
    t0, lm, _, _ = _leaves(theta0, lam)
    star, _ = warm(t0, lm, data)
    outer(star).backward()
    del t0, lm, star

    t0, lm, theta_leaves, lam_leaves = _leaves(theta0, lam)
    baseline_kib = _status_kib("VmRSS")
    reset = _reset_peak()
    if not reset:
        baseline_kib = _status_kib("VmHWM")
    start = time.perf_counter()
    star, info = layer(t0, lm, data)
    forward_s = time.perf_counter() - start
    start = time.perf_counter()
    loss = outer(star)
    loss.backward()
    backward_s = time.perf_counter() - start
    peak_kib = _status_kib("VmHWM")
    # More forward+backward pairs (--repeats): on a loaded machine one pair's ratio moves
    # with the load; the median of the per-pair ratios does much less.
    pairs = [(forward_s, backward_s)]
    for _ in range(case.get("repeats", 1) - 1):
        t0r, lmr, _, _ = _leaves(theta0, lam)
        start = time.perf_counter()
        star_r, _ = layer(t0r, lmr, data)
        middle = time.perf_counter()
        outer(star_r).backward()
        pairs.append((middle - start, time.perf_counter() - middle))
    if len(pairs) > 1:
        forward_s = statistics.median(f for f, _ in pairs)
        backward_s = statistics.median(b for _, b in pairs)

    record = {
        "problem": case["problem"], "mode": mode, "steps": steps,
        "n": sum(leaf.numel() for leaf in theta_leaves),
        "forward_s": round(forward_s, 4), "backward_s": round(backward_s, 4),
        "backward_over_forward": round(statistics.median(b / f for f, b in pairs), 3),
        "repeats": len(pairs),
        "peak_memory_mb": round(max(peak_kib - baseline_kib, 0) / 1024, 1),
        "peak_reset": reset,
        "stationarity": float(info.forward.stationarity.max()),
        "outer_loss": float(loss),
        "threads": torch.get_num_threads(),
    }
    if info.backward is not None:
        record["pcg_iterations"] = int(info.backward.iterations.max())
        record["pcg_status"] = [int(s) for s in info.backward.status]
        record["pcg_relative_residual"] = float(info.backward.relative_residual.max())
    ref = torch.load(case["reference"]) if case.get("reference") else None
    for name, leaves in (("theta0", theta_leaves), ("lam", lam_leaves)):
        g = _flat_grad(leaves)
        if ref is None:
            continue
        record[f"cosine_{name}"] = (None if g is None else round(float(
            torch.nn.functional.cosine_similarity(g, ref[name], dim=0)), 5))
    return record


# ----------------------------------------------------------------------------- reference
STAGES = (1.0, 0.3, 0.1, 0.03)


def _staged_adam(problem, theta0, lam, data, steps):
    """Adam from θ0 with the learning rates decayed in stages: the 3DGS reference point.
    Returns the flat point and its relative stationarity ‖∇E‖/‖∇E(θ0)‖."""

    import difftto
    from difftto.objective import InnerObjective
    from difftto.regularizers import Proximal

    lr = {"means": 1.6e-4 * 4.0, "log_scales": 5e-2, "quats": 1e-2, "opacities": 5e-2,
          "colors": 2.5e-2}
    layout = difftto.Layout.of(theta0)
    flat0 = layout.flatten(theta0)
    objective = InnerObjective(difftto.problems.get(problem), layout, data,
                               Proximal(flat0, layout.expand(lam)))
    theta = flat0
    for factor in STAGES:
        adam = difftto.Adam(lr={k: v * factor for k, v in lr.items()}, steps=steps)
        theta, _ = adam.run(objective, theta)
    g0 = objective.value_and_grad(flat0)[1].norm()
    g = objective.value_and_grad(theta)[1].norm()
    return theta, float(g / g0)


class _Fixed:
    """An inner optimizer that returns a precomputed point (the reference's θ*)."""

    def __new__(cls, point):
        import difftto

        class Fixed(difftto.InnerOptimizer):
            steps, tol = 0, None

            def run(self, objective, theta_start, **_):
                e0, g0 = objective.value_and_grad(theta_start)
                e, g = objective.value_and_grad(point)
                gn = g.norm(dim=1)
                return point.clone(), difftto.InnerInfo(
                    gn.new_zeros(gn.shape, dtype=int), e, e0, gn / g0.norm(dim=1), gn,
                    gn.new_zeros(gn.shape, dtype=bool))

        return Fixed()


def run_reference(case: dict) -> dict:
    """Computes the converged reference gradient and saves it to ``case['out']``."""
    import torch

    import difftto

    torch.set_num_threads(case["threads"])
    start = time.perf_counter()
    if case["problem"] == "3dgs":
        theta0, lam, data, outer, _, problem = build(case)
        # The point: Adam with decaying learning rates (float32, as the cases run).
        point, stationarity = _staged_adam(problem, theta0, lam, data, case["ref_steps"])
        # The solves in float64: the reference must be tighter than what it judges.
        theta0 = {k: v.double() for k, v in theta0.items()}
        lam = {k: v.double() for k, v in lam.items()}
        data = {k: (v.double() if torch.is_tensor(v) else v) for k, v in data.items()}
        outer32 = outer

        def outer(star):  # noqa: F811 - the target render in float32, as in the cases
            return outer32({k: v.float() for k, v in star.items()}).double()

        inner = _Fixed(point.double())
        grads = {}
        for hessian, max_iter in (("gauss_newton", 3000), ("exact", 300)):
            t0, lm, tl, ll = _leaves(theta0, lam)
            layer = difftto.ImplicitLayer(problem, inner=inner, hessian=hessian,
                                          solver=difftto.solvers.PCG(rtol=1e-6, max_iter=max_iter),
                                          on_failure="zero")
            star, info = layer(t0, lm, data)
            outer(star).backward()
            grads[hessian] = {"theta0": _flat_grad(tl), "lam": _flat_grad(ll), "info": info}
        ref = grads["gauss_newton"]
        info = ref["info"]
        exact = grads["exact"]["info"].backward
        record = {
            "reference": (f"IFT with the Gauss-Newton Hessian (PCG rtol 1e-6, float64) at the "
                          f"point of Adam run {len(STAGES)} x {case['ref_steps']} steps with the "
                          f"learning rates x {STAGES}"),
            "stationarity": stationarity,
            "pcg_iterations": int(info.backward.iterations.max()),
            "pcg_status": [int(s) for s in info.backward.status],
            "exact_hessian_pcg_status": [int(s) for s in exact.status],
            "exact_hessian_pcg_iterations": int(exact.iterations.max()),
        }
        if int(exact.status.max()) == 0:
            record["gn_vs_exact_cosine_theta0"] = float(torch.nn.functional.cosine_similarity(
                grads["exact"]["theta0"], ref["theta0"], dim=0))
    else:
        theta0, lam, data, outer, inner, problem = build(case)
        # Unrolled gradient descent to convergence: chunks of steps until stationary.
        # Find the step count without a graph first, then unroll once.
        steps = case["ref_steps"]
        while steps < 64 * case["ref_steps"]:
            probe = difftto.ImplicitLayer(problem, inner=inner(steps), backward="straight_through")
            with torch.no_grad():
                _, info = probe(theta0, lam, data)
            if float(info.forward.stationarity.max()) < 1e-10:
                break
            steps *= 2
        t0, lm, tl, ll = _leaves(theta0, lam)
        star, info = difftto.ImplicitLayer(problem, inner=inner(steps), backward="unrolled")(
            t0, lm, data)
        outer(star).backward()
        ref = {"theta0": _flat_grad(tl), "lam": _flat_grad(ll)}
        t0, lm, tl2, ll2 = _leaves(theta0, lam)
        ift = difftto.ImplicitLayer(problem, inner=inner(steps), hessian="exact",
                                    solver=difftto.solvers.PCG(rtol=1e-10, max_iter=5000))
        star2, _ = ift(t0, lm, data)
        outer(star2).backward()
        record = {
            "reference": f"unrolled gradient descent to convergence ({steps} steps, float64)",
            "stationarity": float(info.forward.stationarity.max()),
            "ift_exact_cosine_theta0": float(torch.nn.functional.cosine_similarity(
                _flat_grad(tl2), ref["theta0"], dim=0)),
            "ift_exact_cosine_lam": float(torch.nn.functional.cosine_similarity(
                _flat_grad(ll2), ref["lam"], dim=0)),
        }
    torch.save({"theta0": ref["theta0"], "lam": ref["lam"]}, case["out"])
    record |= {"problem": case["problem"], "seconds": round(time.perf_counter() - start, 1)}
    return record


# ----------------------------------------------------------------------------- output
def markdown(records: list[dict], refs: dict, header: str) -> str:
    lines = [header, ""]
    for problem in ("3dgs", "nls"):
        rows = [r for r in records if r["problem"] == problem and "error" not in r]
        if not rows:
            continue
        ref = refs.get(problem, {})
        lines += [f"### {problem} (n = {rows[0]['n']:,})", "",
                  f"Reference: {ref.get('reference', '–')}; " + ", ".join(
                      f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in ref.items() if k not in ("reference", "problem")), "",
                  "| K | mode | forward (s) | backward (s) | backward / forward | peak memory (MB) "
                  "| PCG iterations | stationarity | cosine ∂L/∂θ0 | cosine ∂L/∂Λ |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            cos_l = r.get("cosine_lam")
            lines.append(
                f"| {r['steps']} | {r['mode']} | {r['forward_s']:.3f} | {r['backward_s']:.3f} | "
                f"{r['backward_over_forward']:.2f} | {r['peak_memory_mb']:.1f} | "
                f"{r.get('pcg_iterations', '')} | {r['stationarity']:.2e} | "
                f"{r.get('cosine_theta0', float('nan')):.4f} | "
                f"{'–' if cos_l is None else f'{cos_l:.4f}'} |")
        lines.append("")
        lines += targets(rows)
    return "\n".join(lines) + "\n"


def targets(rows: list[dict]) -> list[str]:
    """Issue 8's three targets, read from one problem's rows."""
    by = {(r["mode"], r["steps"]): r for r in rows}
    out = []
    k = 100 if ("implicit", 100) in by else max((s for m, s in by if m == "implicit"), default=None)
    if k is None:
        return out
    imp, unr = by.get(("implicit", k)), by.get(("unrolled", k))
    if imp and unr and unr["peak_memory_mb"] > 0:
        ratio = imp["peak_memory_mb"] / unr["peak_memory_mb"]
        out.append(f"- K = {k}: implicit peak memory / unrolled = {ratio:.3f} "
                   f"(target ≤ 0.25: {'met' if ratio <= 0.25 else 'NOT met'})")
    for mode in sorted({m for m, _ in by if m.startswith("implicit")}, key=lambda m: (len(m), m)):
        r = by.get((mode, k))
        if r:
            out.append(f"- K = {k}: {mode} backward / forward = {r['backward_over_forward']:.2f} "
                       f"(target ≤ 0.5: {'met' if r['backward_over_forward'] <= 0.5 else 'NOT met'})")
    times = [by[("implicit", s)]["backward_s"] for m, s in by if m == "implicit"]
    if len(times) > 1:
        spread = max(times) / min(times)
        out.append(f"- implicit backward time over K: {min(times):.3f}–{max(times):.3f} s "
                   f"(max/min {spread:.2f}; K-independent within 1.5×: "
                   f"{'yes' if spread <= 1.5 else 'NO'})")
    return out + [""]


def plot(records: list[dict], path: Path) -> None:
    """Peak memory and forward/backward time against K, log-log, one panel pair per problem."""
    from PIL import Image, ImageDraw

    problems = [p for p in ("3dgs", "nls") if any(r["problem"] == p for r in records)]
    colors = {"implicit": (31, 119, 180), "implicit_loose": (148, 103, 189),
              "implicit_jacobi": (23, 190, 207), "implicit_jacobi_loose": (140, 86, 75),
              "implicit_block": (188, 189, 34), "implicit_probe": (127, 127, 127),
              "unrolled": (214, 39, 40), "truncated": (255, 127, 14),
              "straight_through": (44, 160, 44)}
    pw, ph, margin = 420, 300, 60
    img = Image.new("RGB", (3 * pw, len(problems) * ph + 40), "white")
    draw = ImageDraw.Draw(img)
    x = 10
    for mode, c in colors.items():
        draw.line([(x, 20), (x + 20, 20)], fill=c, width=3)
        draw.text((x + 24, 14), mode, fill="black")
        x += 150
    draw.text((x + 10, 14), "solid: forward, dashed: backward (time panel)", fill="black")
    for row, problem in enumerate(problems):
        rows = [r for r in records if r["problem"] == problem and "error" not in r]
        panels = [("peak memory (MB)", lambda r: [("peak_memory_mb", r["peak_memory_mb"])]),
                  ("time (s)", lambda r: [("forward_s", r["forward_s"]),
                                          ("backward_s", r["backward_s"])]),
                  ("cosine dL/dtheta0 to reference", lambda r: [("cos", r.get("cosine_theta0"))])]
        for col, (title, get) in enumerate(panels):
            ox, oy = col * pw + margin, 40 + row * ph + 20
            w, h = pw - margin - 20, ph - 70
            pts = [(r["steps"], v) for r in rows for _, v in get(r) if v is not None]
            if not pts:
                continue
            logy = col < 2
            ks = sorted({p[0] for p in pts})
            vals = [max(p[1], 1e-3) if logy else p[1] for p in pts]
            lo, hi = min(vals), max(vals)
            if logy:
                lo, hi = math.log10(lo) - 0.1, math.log10(hi) + 0.1
            else:
                lo, hi = min(lo, 0.0), 1.0
            kx = [math.log10(k) for k in ks]
            kl, kh = min(kx) - 0.1, max(kx) + 0.1

            def to_xy(k, v, kl=kl, kh=kh, lo=lo, hi=hi, ox=ox, oy=oy, w=w, h=h, logy=logy):
                yv = math.log10(max(v, 1e-3)) if logy else v
                return (ox + (math.log10(k) - kl) / (kh - kl) * w,
                        oy + h - (yv - lo) / (hi - lo) * h)

            draw.rectangle([ox, oy, ox + w, oy + h], outline="black")
            draw.text((ox, oy - 16), f"{problem}: {title}" + (" (log)" if logy else ""),
                      fill="black")
            for k in ks:
                px, _ = to_xy(k, 1.0 if not logy else 10 ** lo)
                draw.text((px - 8, oy + h + 4), str(k), fill="black")
            draw.text((ox + w / 2 - 30, oy + h + 18), "inner steps K", fill="black")
            for t in range(math.floor(lo), math.ceil(hi) + 1) if logy else [0.0, 0.5, 1.0]:
                v = 10 ** t if logy else t
                if lo <= (t if logy else v) <= hi:
                    _, py = to_xy(ks[0], v)
                    draw.line([(ox - 4, py), (ox, py)], fill="black")
                    draw.text((ox - 44, py - 6), f"{v:g}", fill="black")
            for mode, c in colors.items():
                for key, dashed in (("peak_memory_mb", False), ("forward_s", False),
                                    ("backward_s", True), ("cos", False)):
                    series = [(r["steps"], v) for r in rows if r["mode"] == mode
                              for kk, v in get(r) if kk == key and v is not None]
                    series.sort()
                    xy = [to_xy(k, v) for k, v in series]
                    for a, b in zip(xy, xy[1:]):
                        if dashed:
                            for s in range(0, 10, 2):
                                p0 = (a[0] + (b[0] - a[0]) * s / 10, a[1] + (b[1] - a[1]) * s / 10)
                                p1 = (a[0] + (b[0] - a[0]) * (s + 1) / 10,
                                      a[1] + (b[1] - a[1]) * (s + 1) / 10)
                                draw.line([p0, p1], fill=c, width=2)
                        else:
                            draw.line([a, b], fill=c, width=2)
                    for p in xy:
                        draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=c)
    img.save(path)


# ----------------------------------------------------------------------------- driver
def _subprocess(flag: str, case: dict, timeout: float, env_extra: dict) -> dict:
    env = os.environ | env_extra | {"OMP_NUM_THREADS": str(case["threads"])}
    try:
        done = subprocess.run([sys.executable, __file__, flag, json.dumps(case)],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _case(case: dict, timeout: float) -> dict:
    """Two fresh processes: timed with the default allocator, and measured for memory
    with the mmap threshold fixed (which costs page faults), as pcg.py does."""
    timed = _subprocess("--case", case, timeout, {})
    if "error" in timed:
        return timed
    memory = _subprocess("--case", case | {"repeats": 1}, timeout, MALLOC_ENV)
    if "error" in memory:
        return memory
    return timed | {"peak_memory_mb": memory["peak_memory_mb"], "peak_reset": memory["peak_reset"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="K in {10, 30}, n = 5000 for nls")
    parser.add_argument("--problem", choices=["3dgs", "nls", "both"], default="both")
    parser.add_argument("--steps", default="10,30,100,300", help="comma-separated K values")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--size", type=int, default=32, help="3DGS image size (2 views)")
    parser.add_argument("--large", action="store_true", help="3DGS at 64x64 (8192 Gaussians)")
    parser.add_argument("--nls-n", type=int, default=20_000)
    parser.add_argument("--lam-scale", type=float, default=1.0,
                        help="3DGS Λ = this × each group's mean diag(JᵀJ) at θ0")
    parser.add_argument("--rtol", type=float, default=1e-4, help="PCG rtol of 'implicit'")
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--truncate", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1,
                        help="forward+backward pairs per timed case (medians reported; the "
                             "ratio is the median of the per-pair ratios)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--case-timeout", type=float, default=300.0)
    parser.add_argument("--out", default=str(RESULTS / "implicit_vs_unrolled"),
                        help="prefix of the .jsonl / .md / .png outputs")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    if args.reference:
        print(json.dumps(run_reference(json.loads(args.reference))))
        return

    steps = [int(s) for s in args.steps.split(",")]
    if args.quick:
        steps = [s for s in steps if s <= 30] or steps[:2]
        args.nls_n = min(args.nls_n, 5000)
    size = 64 if args.large else args.size
    modes = args.modes.split(",")
    problems = ["3dgs", "nls"] if args.problem == "both" else [args.problem]
    common = {"threads": args.threads, "size": size, "n": args.nls_n, "lam_scale": args.lam_scale,
              "rtol": args.rtol, "max_iter": args.max_iter, "truncate": args.truncate,
              "repeats": args.repeats}
    tmp = tempfile.mkdtemp(prefix="difftto-ivu-")
    records, refs = [], {}
    for problem in problems:
        ref_path = os.path.join(tmp, f"{problem}.pt")
        ref = _subprocess("--reference", common | {
            "problem": problem, "out": ref_path,
            "ref_steps": 150 if problem == "3dgs" else 500}, timeout=3 * args.case_timeout,
            env_extra={})
        ref["problem"] = problem
        refs[problem] = ref
        print(json.dumps({"reference": ref}), flush=True)
        for k in steps:
            for mode in modes:
                case = common | {"problem": problem, "mode": mode, "steps": k,
                                 "reference": ref_path if "error" not in ref else None}
                record = _case(case, args.case_timeout)
                if "error" in record:
                    record |= {"problem": problem, "mode": mode, "steps": k}
                records.append(record)
                print(json.dumps(record), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".jsonl"), "w") as f:
        for r in [{"reference": v} for v in refs.values()] + records:
            f.write(json.dumps(r) + "\n")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=HERE).stdout.strip()
    header = (f"## implicit vs unrolled ({time.strftime('%Y-%m-%d')}, commit {commit}, "
              f"{args.threads} torch thread(s), `{' '.join(sys.argv[1:]) or '(defaults)'}`)")
    out.with_suffix(".md").write_text(markdown(records, refs, header))
    plot(records, out.with_suffix(".png"))
    print(json.dumps({"written": [str(out.with_suffix(s)) for s in (".jsonl", ".md", ".png")]}))


if __name__ == "__main__":
    main()
