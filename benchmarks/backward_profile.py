"""Where one implicit backward's time goes, on ``peers.py``'s problems.

For each problem and size: difftto's layer over a fixed point ``θ*`` (a perturbed truth,
so the right-hand side is not zero), the exact Hessian and no preconditioner, as the
``difftto_exact_identity[_compiled]`` rows of ``peers.py``; ``loss.backward()`` timed
over ``--calls`` calls after ``--warmup`` untimed ones, split into the operator set-up
(``InnerObjective.hessian_operator``: trace look-up, constants, checks) and the PCG loop
(``solvers.pcg._pcg_loop``), both timed by wrapping them; the rest is the autograd glue.
Prints one JSON line per case (medians, ms; PCG iterations; µs per iteration).

``--compare-check`` runs each case twice more in the same process, in turns: once as
usual and once with every trace treated as unproven (each solve then checks the product
against the eager one, as before traces could be proven), and prints both medians.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/backward_profile.py --sizes 10000,100000
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/backward_profile.py --compare-check

Not a timed test: a script, whose numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _timed(owner, name: str, spent: dict[str, list[float]]):
    """Wraps ``owner.name`` so that each call's wall time is appended to ``spent[name]``;
    returns a function restoring it."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent.setdefault(name, []).append(time.perf_counter() - start)

    setattr(owner, name, wrapper)
    return lambda: setattr(owner, name, original)


def profile(problem: str, n: int, compiled: bool, calls: int, warmup: int) -> dict:
    import torch
    from implicit_vs_unrolled import _Fixed
    from peers import RTOL, _register, setup

    import difftto
    import difftto.solvers.pcg as pcg_module
    from difftto.objective import InnerObjective

    data, theta0, lam, truth = setup(problem, n)
    star = truth + 0.05 * torch.sin(torch.arange(n, dtype=truth.dtype))[None]
    layer = difftto.ImplicitLayer(
        _register(problem), inner=_Fixed(star), hessian="exact",
        jvp_mode="compile" if compiled else "auto",
        solver=difftto.solvers.PCG(rtol=RTOL, max_iter=min(2 * n, 10_000), preconditioner="identity",
                                   backend="compiled" if compiled else "auto"))
    spent: dict[str, list[float]] = {}
    restore = [_timed(pcg_module, "_pcg_loop", spent), _timed(InnerObjective, "hessian_operator", spent)]
    try:
        total, iterations = [], 0
        for k in range(warmup + calls):
            if k == warmup:
                spent.clear()
            t0, lm = theta0.clone().requires_grad_(True), lam.clone().requires_grad_(True)
            out, info = layer(t0, lm, data)
            start = time.perf_counter()
            (0.5 * (out - truth).pow(2).sum()).backward()
            if k >= warmup:
                total.append(time.perf_counter() - start)
            iterations = int(info.backward.iterations.max())
    finally:
        for undo in restore:
            undo()

    def ms(values):
        return round(1e3 * statistics.median(values), 3)

    loop = ms(spent["_pcg_loop"])
    return {"problem": problem, "n": n, "compiled": compiled, "calls": calls,
            "backward_ms": ms(total), "operator_setup_ms": ms(spent["hessian_operator"]),
            "pcg_loop_ms": loop, "rest_ms": round(ms(total) - ms(spent["hessian_operator"]) - loop, 3),
            "pcg_iterations": iterations,
            "us_per_iteration": round(1e3 * loop / iterations, 1) if iterations else None}


def compare_check(problem: str, n: int, compiled: bool, calls: int, warmup: int, pairs: int) -> dict:
    """Backward medians with the proven-trace check (as shipped) and with every trace
    checked on every solve, in turns, ``pairs`` times each (fresh traces each time)."""
    import difftto.objective as objective

    proven = objective._holds_everywhere
    out: dict[str, list[float]] = {"proven": [], "check_every_solve": []}
    try:
        for _ in range(pairs):
            for variant in out:
                objective._TRACES.clear()
                objective._holds_everywhere = proven if variant == "proven" else (lambda *a: False)
                out[variant].append(profile(problem, n, compiled, calls, warmup)["backward_ms"])
    finally:
        objective._holds_everywhere = proven
    return {"problem": problem, "n": n, "compiled": compiled, "calls": calls,
            "backward_ms_proven": out["proven"], "backward_ms_check_every_solve": out["check_every_solve"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--problems", default="ridge,nls")
    parser.add_argument("--eager", action="store_true", help="jvp_mode='auto' and PCG's default backend "
                        "instead of the compiled path")
    parser.add_argument("--calls", type=int, default=20, help="timed backwards per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed backwards first (compilation)")
    parser.add_argument("--compare-check", action="store_true",
                        help="the proven-trace check against a check on every solve, in turns")
    parser.add_argument("--pairs", type=int, default=2, help="turns per variant with --compare-check")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    for name, value in (("--calls", args.calls), ("--pairs", args.pairs), ("--threads", args.threads)):
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")

    import torch

    torch.set_num_threads(args.threads)
    for problem in args.problems.split(","):
        for n in (int(s) for s in args.sizes.split(",")):
            if args.compare_check:
                record = compare_check(problem, n, not args.eager, args.calls, args.warmup, args.pairs)
            else:
                record = profile(problem, n, not args.eager, args.calls, args.warmup)
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
