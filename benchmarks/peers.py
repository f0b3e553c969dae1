"""difftto's implicit gradient against its peers' on the same problems, n = 10² … 10⁶.

Peers (benchmark-only dependencies, installed by ``benchmarks/setup_peers.sh`` into
``benchmarks/.venv-peers``; run this script with that environment's python):

- **TorchOpt 0.7.3**: ``torchopt.diff.implicit.custom_root`` on the optimality condition
  ``F(θ; θ0, Λ) = ∇θE = 0`` (``torch.func.grad`` of the data term: TorchOpt
  differentiates it with functorch transforms, which ``torch.autograd.grad`` breaks), with
  ``linear_solve.solve_cg`` and ``linear_solve.solve_normal_cg`` (its default). Its
  matrix-vector products ``∂F/∂θ · v`` are autograd products of ``F``, i.e. exact
  Hessian-vector products.
- **Theseus 0.2.3**: ``TheseusLayer`` over ``GaussNewton`` + ``CholeskyDenseSolver``,
  ``backward_mode="implicit"``; the data term is an ``AutoDiffCostFunction``
  (``autograd_mode="dense"``), the proximal term a ``Difference`` cost weighted by
  ``√Λ``. Its forward (its own Gauss-Newton) is timed separately.
- **JAXopt 0.8.5**: ``implicit_diff.custom_root`` with ``linear_solve.solve_cg``, if
  ``import jaxopt`` works in the environment (``WITH_JAX=1 setup_peers.sh``).

Problems, one batch element of n unknowns, float64, ``E = D + ½ Σ Λ (θ − θ0)²`` with
``Λ`` log-uniform in [0.03, 0.3]:

- ``ridge``: ``r = [w ⊙ θ − y; s (θ_{i+1} − θ_i)]`` (linear; ``w`` in [0.5, 2], ``s = 1``);
- ``nls``: ``r = [w ⊙ (tanh θ − y); s (θ_{i+1} − θ_i)]`` (``tanh_smoothing`` of
  ``implicit_vs_unrolled.py``).

Both are structured (``O(n)`` per product), so matrix-free methods reach n = 10⁶; a dense
method materializes ``n × n``. The outer loss is ``½‖θ* − θ_true‖²``; the gradient is with
respect to ``θ0`` and ``Λ``.

Per case, two fresh subprocesses (one timed with the default allocator, one measured for
peak memory with glibc's mmap threshold fixed, as ``pcg.py``): difftto's forward (its Gauss-Newton inner optimizer)
gives ``θ*``; TorchOpt and JAXopt differentiate *that* ``θ*`` (their solver function
returns it), so "gradient time" is the backward alone for every method (the best of
``--repeats`` calls, 3 by default, after one untimed warm-up call): difftto's
``loss.backward()`` (IFT + Jacobi PCG), TorchOpt's and JAXopt's VJP through
``custom_root``, Theseus's ``loss.backward()`` (implicit). All linear solves use rtol
1e-6 (TorchOpt/JAXopt: ``rtol``/``tol`` 1e-6, ``maxiter`` sized by numel). Gradient
agreement is ``max|g − g_difftto| / max|g_difftto|`` over ``θ0`` and ``Λ``, against
difftto with the matching Hessian: exact (``hessian="exact"``) for TorchOpt and JAXopt,
Gauss-Newton for Theseus (its implicit mode linearizes with ``JᵀJ``); on ``ridge`` they
coincide. ``difftto_diag`` is Gauss-Newton + Jacobi where the problem also states its exact
``diag(JᵀJ)`` (``Problem.gauss_newton_diagonal``, a formula for these residuals) instead of
the 8-probe estimate: extra problem knowledge the peers' CG does not use (none of them
preconditions), so it is a row of its own, never the one compared with a peer. A
``_compiled`` suffix (``difftto_exact_identity_compiled``, ``difftto_diag_compiled``) is the
same row with the opt-in compiled path: ``jvp_mode="compile"`` (the traced product compiled
by inductor) and ``PCG(backend="compiled")`` (PCG's vector work compiled); its compilation
happens in the untimed warm-up call, whose time is reported separately. Every
method gets one untimed warm-up call at the measured n (JAXopt's includes its compile).
A case past ``--case-timeout`` seconds, or one whose dense matrices would pass
``--dense-max-mb``, is recorded as skipped with the reason. Each case process is pinned to
``--threads`` CPUs (``--cpus``): torch runs that many threads, and XLA, which sizes its own
thread pool by the machine, then gets as many cores (unpinned, JAXopt used ~2 at n = 10⁶).

    bash benchmarks/setup_peers.sh
    OMP_NUM_THREADS=1 benchmarks/.venv-peers/bin/python benchmarks/peers.py          # ~8 min
    OMP_NUM_THREADS=1 benchmarks/.venv-peers/bin/python benchmarks/peers.py --quick  # n ≤ 10^4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from pcg import MALLOC_ENV, _reset_peak, _status_kib  # noqa: E402

METHODS = ("difftto", "difftto_exact", "difftto_identity", "difftto_exact_identity",
           "difftto_diag", "difftto_exact_identity_compiled", "difftto_diag_compiled",
           "torchopt_cg", "torchopt_normal_cg", "theseus", "jaxopt")
RTOL = 1e-6


def setup(problem: str, n: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    dt = torch.float64
    truth = 0.8 * torch.cumsum(0.05 * torch.randn(1, n, generator=gen, dtype=dt), dim=1)
    truth = truth - truth.mean() + 0.3 * torch.sin(torch.linspace(0, 20, n, dtype=dt))[None]
    w = 0.5 + 1.5 * torch.rand(1, n, generator=gen, dtype=dt)
    if problem == "ridge":
        y = w * truth + 0.05 * torch.randn(1, n, generator=gen, dtype=dt)
    else:
        y = torch.tanh(truth) + 0.05 * torch.randn(1, n, generator=gen, dtype=dt)
    theta0 = truth + 0.3 * torch.randn(1, n, generator=gen, dtype=dt)
    lam = 10 ** (-1.5 + torch.rand(1, n, generator=gen, dtype=dt))
    return {"y": y, "w": w, "s": 1.0}, theta0, lam, truth


def residuals_fn(problem: str):
    import torch

    def residuals(theta, y, w, s=1.0):
        fit = w * ((theta if problem == "ridge" else torch.tanh(theta)) - y)
        return torch.cat([fit, s * (theta[..., 1:] - theta[..., :-1])], dim=-1)

    return residuals


def _register(problem: str, with_diagonal: bool = False):
    """The problem for difftto: residuals only (autograd products, probe-estimated Jacobi
    diagonal), or ``with_diagonal`` also its exact ``diag(JᵀJ)`` (``difftto_diag``)."""
    import torch

    import difftto

    name = f"peers_{problem}" + ("_diag" if with_diagonal else "")
    if name not in difftto.problems.available():
        residuals = residuals_fn(problem)

        class Structured(difftto.Problem):
            def residuals(self, theta, data):
                return residuals(theta, data["y"], data["w"], data["s"])

        class WithDiagonal(Structured):
            def gauss_newton_diagonal(self, theta, data):
                # Column j of J: w_j f'(θ_j) in the fit block, ±s in the (one or two)
                # differences that hold θ_j.
                slope = torch.ones_like(theta) if problem == "ridge" else 1 - torch.tanh(theta) ** 2
                neighbours = torch.full_like(theta, 2.0)
                neighbours[..., 0] = neighbours[..., -1] = 1.0
                return (data["w"] * slope) ** 2 + data["s"] ** 2 * neighbours

        difftto.problems.register(name)(WithDiagonal if with_diagonal else Structured)
    return name


def _agreement(g, ref) -> float:
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(g, ref))


def _hessian(method: str) -> str:
    return "exact" if method.startswith(("difftto_exact", "torchopt", "jaxopt")) else "gauss_newton"


def _interleaved(case: dict, make_go, problem: str, n: int) -> dict:
    """Every method of ``case["interleave"]`` in this one process, called in turns (the
    order rotated each round) so that the load of a shared machine falls on all alike;
    the median time per method and the median per-round ratio to the first method."""
    import statistics

    methods = case["interleave"]
    gos, first = {}, {}
    for m in methods:  # each built and warmed up (one untimed call: jit / compile included)
        start = time.perf_counter()
        gos[m] = make_go(m)
        first[m] = round(time.perf_counter() - start, 3)
    times: dict[str, list[float]] = {m: [] for m in methods}
    # Process CPU time / wall time of each whole call (set-up included): ~1 for one core.
    cores: dict[str, list[float]] = {m: [] for m in methods}
    grads = {}
    for k in range(case["rounds"]):
        order = methods[k % len(methods):] + methods[:k % len(methods)]
        for m in order:
            wall, cpu = time.perf_counter(), time.process_time()
            grad, seconds, _ = gos[m]()
            cores[m].append((time.process_time() - cpu) / (time.perf_counter() - wall))
            times[m].append(seconds)
            grads[m] = grad
    base = methods[0]
    out = {"problem": problem, "n": n, "interleaved": methods, "rounds": case["rounds"],
           "median_s": {m: round(statistics.median(t), 4) for m, t in times.items()},
           "setup_and_first_call_s": first,
           "cpu_per_wall": {m: round(statistics.median(c), 2) for m, c in cores.items()},
           "median_ratio_to_" + base: {
               m: round(statistics.median(a / b for a, b in zip(times[m], times[base])), 3)
               for m in methods},
           "max_rel_diff_to_" + base: {m: _agreement(grads[m], grads[base]) for m in methods}}
    return out


def run_case(case: dict) -> dict:
    import torch

    import difftto

    torch.set_num_threads(case["threads"])
    problem, n, method = case["problem"], case["n"], case["method"]
    data, theta0, lam, truth = setup(problem, n)
    name = _register(problem)
    residuals = residuals_fn(problem)
    cache = Path(case["cache"])
    star_path = cache / f"{problem}-{n}-star.pt"

    if method == "forward":
        # difftto's forward (Gauss-Newton; identity-preconditioned inner PCG, see the notes),
        # once per (problem, n): every other case differentiates this θ*.
        inner = difftto.GaussNewton(
            steps=2 if problem == "ridge" else 12, damping=0.0 if problem == "ridge" else 1e-3,
            tol=1e-9, solver=difftto.solvers.PCG(rtol=1e-9, max_iter=500, preconditioner="identity",
                                                 on_failure="best"))
        layer = difftto.ImplicitLayer(name, inner=inner, backward="straight_through")
        start = time.perf_counter()
        with torch.no_grad():
            star, info = layer(theta0, lam, data)
        seconds = time.perf_counter() - start
        torch.save(star, star_path)
        return {"problem": problem, "n": n, "method": "forward", "forward_s": round(seconds, 3),
                "stationarity": float(info.forward.stationarity.max()),
                "inner_steps": int(info.forward.steps.max())}
    star = torch.load(star_path)

    def make_go(method: str):
        """The timed gradient call of ``method``: ``go() -> (grad, seconds, extra)``."""
        hessian = _hessian(method)
        name = _register(problem)
        if method.startswith("difftto"):
            from implicit_vs_unrolled import _Fixed

            variant = method.removesuffix("_compiled")
            compiled = variant != method  # products and PCG's vector work compiled
            preconditioner = "identity" if variant.endswith("identity") else "jacobi"
            if variant == "difftto_diag":
                name = _register(problem, with_diagonal=True)

            def layer_for(point, size):
                return difftto.ImplicitLayer(
                    name, inner=_Fixed(point), hessian=hessian,
                    jvp_mode="compile" if compiled else "auto",
                    solver=difftto.solvers.PCG(rtol=RTOL, max_iter=min(2 * size, 10_000),
                                               preconditioner=preconditioner,
                                               backend="compiled" if compiled else "auto"))

            layer = layer_for(star, n)

            def go():
                t0, lm = theta0.clone().requires_grad_(True), lam.clone().requires_grad_(True)
                out, info = layer(t0, lm, data)
                start = time.perf_counter()
                (0.5 * (out - truth).pow(2).sum()).backward()
                grad_s = time.perf_counter() - start
                return (t0.grad, lm.grad), grad_s, {
                    "iterations": int(info.backward.iterations.max()),
                    "status": [int(s) for s in info.backward.status]}

            # Warm-up at this n, as TorchOpt's and JAXopt's (its compile) get: torch.func's and
            # make_fx's first use cost ~1 s, and the products are traced once per problem and
            # shape (jvp_mode="auto" from 10^4 unknowns); the timed call reuses the trace
            # (and, for the _compiled rows, the code compiled for it and for PCG's steps).
            go()
        elif method.startswith("torchopt"):
            import torchopt

            def data_term(theta):
                return 0.5 * residuals(theta, data["y"], data["w"], data["s"]).pow(2).sum()

            def optimality(theta, t0, lm):
                # torch.func.grad: TorchOpt differentiates this with functorch transforms.
                return torch.func.grad(data_term)(theta) + lm * (theta - t0)

            solve = (torchopt.linear_solve.solve_cg if method == "torchopt_cg"
                     else torchopt.linear_solve.solve_normal_cg)(
                rtol=RTOL, atol=0.0, maxiter=min(2 * n, 10_000))

            @torchopt.diff.implicit.custom_root(optimality, argnums=(1, 2), solve=solve)
            def solver(theta_init, t0, lm):
                return star.clone()

            def go():
                t0, lm = theta0.clone().requires_grad_(True), lam.clone().requires_grad_(True)
                start = time.perf_counter()
                out = solver(theta0.clone(), t0, lm)
                (0.5 * (out - truth).pow(2).sum()).backward()
                return (t0.grad, lm.grad), time.perf_counter() - start, {}

            go()  # warm-up
        elif method == "theseus":
            import theseus as th

            dt = torch.float64
            x = th.Vector(n, name="x", dtype=dt)
            x0 = th.Vector(n, name="x0", dtype=dt)
            yv = th.Variable(data["y"], name="y")
            wv = th.Variable(data["w"], name="w")
            sqrt_lam = th.Variable(lam.sqrt(), name="sqrt_lam")

            def err(optim_vars, aux_vars):
                return residuals(optim_vars[0].tensor, aux_vars[0].tensor, aux_vars[1].tensor)

            objective = th.Objective(dtype=dt)
            one = th.ScaleCostWeight(torch.tensor(1.0, dtype=dt), name="one")
            objective.add(th.AutoDiffCostFunction([x], err, 2 * n - 1, aux_vars=[yv, wv],
                                                  cost_weight=one, name="data",
                                                  autograd_mode="dense"))
            objective.add(th.Difference(x, x0, th.DiagonalCostWeight(sqrt_lam), name="prior"))
            optimizer = th.GaussNewton(objective, th.CholeskyDenseSolver,
                                       max_iterations=2 if problem == "ridge" else 12, step_size=1.0,
                                       abs_err_tolerance=1e-12, rel_err_tolerance=1e-12)
            layer = th.TheseusLayer(optimizer)

            def go():  # no warm-up: its forward is the expensive part
                t0, lm = theta0.clone().requires_grad_(True), lam.clone().requires_grad_(True)
                start = time.perf_counter()
                out, _ = layer.forward({"x": theta0.clone(), "x0": t0, "sqrt_lam": lm.sqrt(),
                                        "y": data["y"], "w": data["w"]},
                                       optimizer_kwargs={"backward_mode": "implicit", "damping": 0.0})
                forward_s = time.perf_counter() - start
                start = time.perf_counter()
                (0.5 * (out["x"] - truth).pow(2).sum()).backward()
                grad_s = time.perf_counter() - start
                return (t0.grad, lm.grad), grad_s, {
                    "forward_s": round(forward_s, 4),
                    "solution_max_abs_diff": float((out["x"].detach() - star).abs().max())}
        elif method == "jaxopt":
            import jax
            import jax.numpy as jnp
            from jaxopt import implicit_diff, linear_solve

            jax.config.update("jax_enable_x64", True)
            y, w = jnp.asarray(data["y"].numpy()[0]), jnp.asarray(data["w"].numpy()[0])
            star_j, truth_j = jnp.asarray(star.numpy()[0]), jnp.asarray(truth.numpy()[0])

            def energy(theta, t0, lm):
                fit = w * ((theta if problem == "ridge" else jnp.tanh(theta)) - y)
                r = jnp.concatenate([fit, theta[1:] - theta[:-1]])
                return 0.5 * jnp.sum(r * r) + 0.5 * jnp.sum(lm * (theta - t0) ** 2)

            optimality = jax.grad(energy)
            solve = lambda matvec, b: linear_solve.solve_cg(  # noqa: E731
                matvec, b, tol=RTOL, maxiter=min(2 * n, 10_000))

            @implicit_diff.custom_root(optimality, solve=solve)
            def solver(init, t0, lm):
                return jax.lax.stop_gradient(star_j)

            def loss(t0, lm):
                return 0.5 * jnp.sum((solver(None, t0, lm) - truth_j) ** 2)

            grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
            t0_j, lm_j = jnp.asarray(theta0.numpy()[0]), jnp.asarray(lam.numpy()[0])
            start = time.perf_counter()
            jax.block_until_ready(grad_fn(t0_j, lm_j))  # compiles (not in the peak memory)
            first = {"first_call_s_with_compile": round(time.perf_counter() - start, 4)}

            def go():
                start = time.perf_counter()
                g = jax.block_until_ready(grad_fn(t0_j, lm_j))
                grad_s = time.perf_counter() - start
                return tuple(torch.from_numpy(jax.device_get(gi).copy())[None] for gi in g), \
                    grad_s, first
        else:
            raise ValueError(method)
        return go

    if case.get("interleave"):
        return _interleaved(case, make_go, problem, n)
    hessian = _hessian(method)
    ref_path = cache / f"{problem}-{n}-{hessian}-grad.pt"
    record = {"problem": problem, "n": n, "method": method}
    go = make_go(method)
    baseline_kib = _status_kib("VmRSS")
    reset = _reset_peak()
    if not reset:
        baseline_kib = _status_kib("VmHWM")
    grad, grad_s, extra = go()
    # The best of a few calls, for every method alike: single calls on this shared machine
    # move by tens of percent.
    times = [grad_s] + [go()[1] for _ in range(case.get("repeats", 1) - 1)]
    grad_s = min(times)
    if method in ("difftto", "difftto_exact"):
        torch.save(grad, ref_path)
    ref_grad = torch.load(ref_path) if ref_path.exists() else None
    peak_kib = _status_kib("VmHWM")
    record |= {"gradient_s": round(grad_s, 6),
               "peak_memory_mb": round(max(peak_kib - baseline_kib, 0) / 1024, 1),
               "peak_reset": reset,
               "agreement_vs": f"difftto ({hessian})",
               "max_rel_diff": None if ref_grad is None else _agreement(grad, ref_grad), **extra,
               "threads": torch.get_num_threads()}
    return record


def _skip_reason(method: str, n: int, args) -> str | None:
    if method == "theseus":
        # Dense (3n−1) × n Jacobian by n autograd passes, an n × n Cholesky: REFERENCES.md
        # measured 3.4 s at n = 1000 and 28 s at n = 2000 (~n³) on these machines.
        mb = 8 * (3 * n) * n / 2**20
        if mb > args.dense_max_mb:
            return (f"dense: a {3 * n - 1}x{n} Jacobian alone is {mb:,.0f} MB (> --dense-max-mb "
                    f"{args.dense_max_mb}); n^3 time (28 s at n = 2000)")
    if method == "jaxopt":
        try:
            import jaxopt  # noqa: F401
        except ImportError as err:
            return f"jaxopt not importable in this environment ({err})"
    if method.startswith("torchopt"):
        try:
            import torchopt  # noqa: F401
        except ImportError as err:
            return f"torchopt not importable in this environment ({err})"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="n ≤ 10^4")
    parser.add_argument("--sizes", default="100,1000,10000,100000,1000000")
    parser.add_argument("--problems", default="ridge,nls")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cpus", default="",
                        help="comma-separated CPUs each case process is pinned to (default: the "
                             "first --threads of those this process may use; 'none': no "
                             "pinning). torch runs --threads threads, but XLA (JAXopt) sizes "
                             "its own thread pool by the machine: pinned, every method gets "
                             "the same cores")
    parser.add_argument("--interleave", default="",
                        help="comma-separated methods to time in one process per (problem, n), "
                             "in turns (ratios that a loaded machine's drift cannot bias; no "
                             "memory); the first is the baseline of the ratios")
    parser.add_argument("--rounds", type=int, default=5, help="turns per method with --interleave")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed gradient calls per case (the best is reported; the memory "
                             "process makes one)")
    parser.add_argument("--case-timeout", type=float, default=120.0)
    parser.add_argument("--dense-max-mb", type=float, default=300.0)
    parser.add_argument("--out", default=str(HERE / "results" / "peers"))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes = [s for s in sizes if s <= 10_000]
    records = []
    timed_out: set[tuple[str, str]] = set()
    cache = tempfile.mkdtemp(prefix="difftto-peers-")
    if args.interleave:
        interleaved(args, sizes, cache)
        return
    for problem in args.problems.split(","):
        for n in sizes:
            for method in ["forward"] + args.methods.split(","):
                record = {"problem": problem, "n": n, "method": method}
                reason = _skip_reason(method, n, args)
                if method != "forward" and not (Path(cache) / f"{problem}-{n}-star.pt").exists():
                    reason = "difftto's forward (which gives the θ* every method differentiates) did not run"
                if reason is None and (problem, method) in timed_out:
                    reason = "a smaller n already passed the per-case time cap"
                if reason is None:
                    case = record | {"threads": args.threads, "cache": cache}
                    # Two fresh processes: one timed (default allocator), one measured for
                    # memory (mmap threshold fixed, which costs page faults), as pcg.py does.
                    runs = {}
                    purposes = (("time", {}),) if method == "forward" else (
                        ("time", {}), ("memory", MALLOC_ENV))
                    for purpose, extra_env in purposes:
                        env = os.environ | extra_env | {"OMP_NUM_THREADS": str(args.threads)}
                        repeats = args.repeats if purpose == "time" else 1
                        try:
                            done = subprocess.run(
                                [sys.executable, __file__, "--case",
                                 json.dumps(case | {"repeats": repeats})],
                                capture_output=True, text=True, env=env,
                                timeout=args.case_timeout, preexec_fn=_pin(args))
                        except subprocess.TimeoutExpired:
                            reason = f"over the {args.case_timeout:.0f} s per-case cap"
                            timed_out.add((problem, method))
                            break
                        if done.returncode != 0:
                            lines = done.stderr.strip().splitlines() or ["?"]
                            record["error"] = lines[-1][:300]
                            break
                        runs[purpose] = json.loads(done.stdout.strip().splitlines()[-1])
                    if "time" in runs and reason is None and "error" not in record:
                        record = runs["time"]
                        if "memory" in runs:
                            record["peak_memory_mb"] = runs["memory"]["peak_memory_mb"]
                if reason is not None:
                    record["skipped"] = reason
                records.append(record)
                print(json.dumps(record), flush=True)

    out = Path(args.out)
    commit = write_records(out, records)
    import torch

    versions = [f"torch {torch.__version__}"]
    for mod in ("torchopt", "theseus", "jaxopt", "jax"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001 - a missing peer is reported in the table
            pass
    lines = [f"## peers ({time.strftime('%Y-%m-%d')}, commit {commit}, {args.threads} thread(s), "
             f"{_pinned_to(args)}, "
             f"{', '.join(versions)}, `{' '.join(sys.argv[1:]) or '(defaults)'}`)", "",
             "| problem | n | method | gradient time (s) | forward (s) | peak memory (MB) "
             "| max rel. diff vs difftto | notes |", "|---|---:|---|---:|---:|---:|---:|---|"]
    for r in records:
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['problem']} | {r['n']:,} | {r['method']} | – | – | – | – | "
                         f"{r.get('skipped') or 'error: ' + r['error']} |")
            continue
        notes = []
        if "iterations" in r:
            notes.append(f"PCG {r['iterations']} it, status {r['status']}")
        if "first_call_s_with_compile" in r:
            notes.append(f"first call with jit {r['first_call_s_with_compile']:.2f} s")
        if r["method"] == "forward":
            lines.append(f"| {r['problem']} | {r['n']:,} | difftto forward (GaussNewton) | – | "
                         f"{r['forward_s']:.3f} | – | – | {r['inner_steps']} steps, stationarity "
                         f"{r['stationarity']:.1e} |")
            continue
        if "stationarity" in r:
            notes.append(f"stationarity {r['stationarity']:.1e}")
        fwd = f"{r['forward_s']:.3f}" if "forward_s" in r else "–"
        diff = ("(reference)" if r["method"] in ("difftto", "difftto_exact") else
                "–" if r["max_rel_diff"] is None else f"{r['max_rel_diff']:.1e}")
        lines.append(f"| {r['problem']} | {r['n']:,} | {r['method']} | {r['gradient_s']:.4g} | "
                     f"{fwd} | {r['peak_memory_mb']:.1f} | {diff} | {'; '.join(notes)} |")
    lines.append("")
    lines += summary(records)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(json.dumps({"written": [str(out.with_suffix(".md")), str(out.with_suffix(".jsonl"))]}))


def _cpus(args) -> list[int] | None:
    """The CPUs case processes are pinned to (``--cpus``), ``None`` for no pinning."""
    if args.cpus == "none" or not hasattr(os, "sched_setaffinity"):
        return None
    if args.cpus:
        return [int(c) for c in args.cpus.split(",")]
    return sorted(os.sched_getaffinity(0))[:args.threads]


def _pin(args):
    """A ``preexec_fn`` pinning the case process (all its threads: set before exec) to
    :func:`_cpus`, or ``None``."""
    cpus = _cpus(args)
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def _pinned_to(args) -> str:
    cpus = _cpus(args)
    return "not pinned" if cpus is None else f"pinned to CPU {','.join(map(str, cpus))}"


def write_records(out: Path, records: list[dict]) -> str:
    """Writes ``records`` as JSON lines to ``<out>.jsonl``; returns the short commit hash."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=HERE).stdout.strip()


def interleaved(args, sizes: list[int], cache: str) -> None:
    """``--interleave``: per (problem, n), difftto's forward, then one process timing every
    listed method in turns; writes ``<out>_interleaved.{jsonl,md}``."""
    methods = args.interleave.split(",")
    records = []
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    for problem in args.problems.split(","):
        for n in sizes:
            for case in ({"method": "forward"}, {"method": methods[0], "interleave": methods,
                                                 "rounds": args.rounds}):
                case |= {"problem": problem, "n": n, "threads": args.threads, "cache": cache}
                try:
                    done = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)],
                                          capture_output=True, text=True, env=env,
                                          timeout=args.case_timeout, preexec_fn=_pin(args))
                except subprocess.TimeoutExpired:
                    record = {"problem": problem, "n": n, "skipped": f"over {args.case_timeout:.0f} s"}
                else:
                    record = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                              else {"problem": problem, "n": n,
                                    "error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]})
                records.append(record)
                print(json.dumps(record), flush=True)
                if "skipped" in record or "error" in record:
                    break
    out = Path(args.out + "_interleaved")
    commit = write_records(out, records)
    base = methods[0]
    lines = [f"## peers, interleaved ({time.strftime('%Y-%m-%d')}, commit {commit}, {_pinned_to(args)}, "
             f"{args.threads} thread(s), `{' '.join(sys.argv[1:])}`)", "",
             f"Median gradient time over {args.rounds} turns per method, all in one process per "
             f"(problem, n), called in rotating order; ratio = the median over turns of "
             f"time / time of `{base}` in the same turn (> 1: slower than `{base}`).", "",
             "| problem | n | " + " | ".join(methods) + " |",
             "|---|---:|" + "---:|" * len(methods)]
    for r in records:
        if "interleaved" not in r:
            continue
        cells = [f"{r['median_s'][m]:.4f} s ({r['median_ratio_to_' + base][m]:.2f}×)" for m in methods]
        lines.append(f"| {r['problem']} | {r['n']:,} | " + " | ".join(cells) + " |")
    lines += ["", "Set-up and first (untimed warm-up) call per method, s: JAXopt's jit and the "
              "`_compiled` rows' compilation happen here.", "",
              "| problem | n | " + " | ".join(methods) + " |", "|---|---:|" + "---:|" * len(methods)]
    for r in records:
        if "setup_and_first_call_s" in r:
            cells = [f"{r['setup_and_first_call_s'][m]:.2f}" for m in methods]
            lines.append(f"| {r['problem']} | {r['n']:,} | " + " | ".join(cells) + " |")
    lines += ["", "Cores used: process CPU time / wall time of each whole call (median; ~1: one "
              "core).", "", "| problem | n | " + " | ".join(methods) + " |",
              "|---|---:|" + "---:|" * len(methods)]
    for r in records:
        if "cpu_per_wall" in r:
            cells = [f"{r['cpu_per_wall'][m]:.2f}" for m in methods]
            lines.append(f"| {r['problem']} | {r['n']:,} | " + " | ".join(cells) + " |")
    lines.append("")
    for r in records:
        if "interleaved" in r:
            diffs = ", ".join(f"{m} {d:.1e}" for m, d in r["max_rel_diff_to_" + base].items() if m != base)
            lines.append(f"- {r['problem']}, n = {r['n']:,}: max rel. diff of the gradients to "
                         f"`{base}`: {diffs}")
        elif "forward_s" not in r:
            lines.append(f"- {r['problem']}, n = {r['n']:,}: {r.get('skipped') or r.get('error')}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(json.dumps({"written": [str(out.with_suffix(".md")), str(out.with_suffix(".jsonl"))]}))


def summary(records: list[dict]) -> list[str]:
    """The target: difftto faster than each peer at n ≥ 10^4, and running at 10^6."""
    ok = {(r["problem"], r["n"], r["method"]): r for r in records
          if "skipped" not in r and "error" not in r}
    out = []
    for (problem, n, method), r in sorted(ok.items()):
        if method.startswith("difftto") or method == "forward" or n < 10_000:
            continue
        base = "difftto_exact" if r["agreement_vs"].endswith("(exact)") else "difftto"
        parts = []
        for variant in (base, base + "_identity"):
            mine = ok.get((problem, n, variant))
            if mine:
                speed = r["gradient_s"] / mine["gradient_s"]
                parts.append(f"{variant}: {speed:.2f}× ({'faster' if speed > 1 else 'NOT faster'})")
        if parts:
            out.append(f"- {problem}, n = {n:,}: {method} time / difftto time — " + "; ".join(parts))
    for problem in sorted({r["problem"] for r in records}):
        big = ok.get((problem, 1_000_000, "difftto"))
        out.append(f"- {problem}: difftto at n = 10^6: "
                   + (f"ran, gradient {big['gradient_s']:.2f} s, {big['peak_memory_mb']:.0f} MB"
                      if big else "did not run"))
    return out


if __name__ == "__main__":
    main()
