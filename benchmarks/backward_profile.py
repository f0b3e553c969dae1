"""Where one implicit backward's time goes, on ``peers.py``'s problems.

For each problem and size: difftto's layer over a fixed point ``θ*`` (a perturbed truth,
so the right-hand side is not zero), the exact Hessian and no preconditioner, as the
``difftto_exact_identity[_compiled]`` rows of ``peers.py``; ``loss.backward()`` timed
over ``--calls`` calls after ``--warmup`` untimed ones, split into the operator set-up
(``InnerObjective.hessian_operator``: trace look-up, constants, checks) and the PCG loop
(``solvers.pcg._pcg_loop``), both timed by wrapping them; the rest is the autograd glue.
On the compiled path the loop is split further: PCG's compiled start and finish, the
compiled step calls (one or several iterations with the product each; the first call of
a backward apart from the later ones) and the loop's other work (host looks, the true
residual at the end). Prints one JSON line per case (medians, ms; PCG iterations; µs per
iteration).

``--compare NAME`` runs each case in the same process, in turns (``--pairs`` times each,
fresh traces each time), with one of the library's speed-ups off and on, and prints both
lists of medians:

- ``check``: every trace treated as unproven (each solve then checks the product against
  the eager one, as before traces could be proven) against the proven trace, checked once;
- ``steps_per_call``: one compiled PCG call per iteration against several between two
  host looks (``CompiledVectorOps.steps_per_call``, small vectors only);
- ``compiled_edges``: PCG's work before and after the loop eager against compiled
  (``CompiledVectorOps.start`` / ``finish``);
- ``merged_diagonal``: the product's own ``+ v ⊙ c`` term kept against merged into the
  proximal diagonal input (``objective._merged_scaling``).

``--compare-check`` is ``--compare check``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/backward_profile.py --sizes 10000,100000
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/backward_profile.py --compare steps_per_call

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


def layer_at(problem: str, n: int, compiled: bool):
    """``(layer, data, θ0, Λ, truth, θ*)``: difftto's layer over the fixed point ``θ*`` (a
    perturbed truth) of ``peers.py``'s ``problem`` at size ``n``, the exact Hessian and no
    preconditioner; with ``compiled``, the compiled path."""
    import torch
    from implicit_vs_unrolled import _Fixed
    from peers import RTOL, _register, setup

    import difftto

    data, theta0, lam, truth = setup(problem, n)
    star = truth + 0.05 * torch.sin(torch.arange(n, dtype=truth.dtype))[None]
    layer = difftto.ImplicitLayer(
        _register(problem), inner=_Fixed(star), hessian="exact",
        jvp_mode="compile" if compiled else "auto",
        solver=difftto.solvers.PCG(rtol=RTOL, max_iter=min(2 * n, 10_000), preconditioner="identity",
                                   backend="compiled" if compiled else "auto"))
    return layer, data, theta0, lam, truth, star


def profile(problem: str, n: int, compiled: bool, calls: int, warmup: int) -> dict:
    import difftto.solvers.pcg as pcg_module
    from difftto.objective import InnerObjective

    layer, data, theta0, lam, truth, _ = layer_at(problem, n, compiled)
    spent: dict[str, list[float]] = {}
    restore = [_timed(pcg_module, "_pcg_loop", spent), _timed(InnerObjective, "hessian_operator", spent)]
    steps: list[list[float]] = []  # per backward: the time of each compiled step call
    if compiled:
        from difftto.solvers import compiled as compiled_module

        ops = compiled_module.vector_ops(theta0)
        restore += [_timed(ops, "start", spent), _timed(ops, "finish", spent),
                    _timed_calls(ops, "product_step", steps)]
    try:
        total, iterations = [], 0
        for k in range(warmup + calls):
            if k == warmup:
                spent.clear()
                steps.clear()
            t0, lm = theta0.clone().requires_grad_(True), lam.clone().requires_grad_(True)
            out, info = layer(t0, lm, data)
            steps.append([])
            start = time.perf_counter()
            (0.5 * (out - truth).pow(2).sum()).backward()
            if k >= warmup:
                total.append(time.perf_counter() - start)
            iterations = int(info.backward.iterations.max())
    finally:
        for undo in reversed(restore):
            undo()

    def ms(values):
        return round(1e3 * statistics.median(values), 3)

    loop = ms(spent["_pcg_loop"])
    record = {"problem": problem, "n": n, "compiled": compiled, "calls": calls,
              "backward_ms": ms(total), "operator_setup_ms": ms(spent["hessian_operator"]),
              "pcg_loop_ms": loop,
              "rest_ms": round(ms(total) - ms(spent["hessian_operator"]) - loop, 3),
              "pcg_iterations": iterations,
              "us_per_iteration": round(1e3 * loop / iterations, 1) if iterations else None}
    if compiled and all(steps) and "start" in spent and "finish" in spent:
        # Inside the loop: PCG's start and finish, and the compiled step calls (each one
        # or several iterations with the product), the first of a backward apart (it is
        # the slowest; at n = 10⁵ with glibc's trimming off less so: fresh memory is a
        # part of it).
        per_backward = [sum(s) for s in steps]
        record |= {"pcg_start_ms": ms(spent["start"]), "pcg_finish_ms": ms(spent["finish"]),
                   "step_calls": len(steps[-1]), "step_calls_ms": ms(per_backward),
                   "first_step_call_ms": ms([s[0] for s in steps]),
                   "later_step_call_ms": ms([t for s in steps for t in s[1:]]) if len(steps[-1]) > 1
                   else None,
                   "loop_other_ms": round(loop - ms(spent["start"]) - ms(spent["finish"])
                                          - ms(per_backward), 3)}
    return record


def _timed_calls(owner, name: str, calls: list[list[float]]):
    """Wraps the factory ``owner.name`` (``owner.product_step``) so that the functions it
    returns append each call's wall time to the last list of ``calls`` (the caller starts
    one per backward); returns a function restoring it."""
    original = getattr(owner, name)

    def factory(*args, **kwargs):
        made = original(*args, **kwargs)
        if made is None:
            return None

        def timed(*a):
            start = time.perf_counter()
            try:
                return made(*a)
            finally:
                calls[-1].append(time.perf_counter() - start)

        return timed

    setattr(owner, name, factory)
    return lambda: setattr(owner, name, original)


def _variants(name: str):
    """``(off, on)`` for ``--compare name``: functions that set the library up without and
    with that speed-up (module attributes, restored by :func:`compare`)."""
    import torch

    import difftto.objective as objective
    from difftto.solvers import compiled

    ops = compiled.vector_ops(torch.zeros(1))
    saved = {"proven": objective._holds_everywhere, "merge": objective._merged_scaling,
             "steps": compiled.CompiledVectorOps.steps_per_call,
             "edges": (ops.start, ops.finish)}

    def restore():
        objective._holds_everywhere, objective._merged_scaling = saved["proven"], saved["merge"]
        compiled.CompiledVectorOps.steps_per_call = saved["steps"]
        ops.start, ops.finish = saved["edges"]

    def set_check(on):
        objective._holds_everywhere = saved["proven"] if on else (lambda *a: False)

    def set_steps(on):
        compiled.CompiledVectorOps.steps_per_call = saved["steps"] if on else 1

    def set_edges(on):
        ops.start, ops.finish = saved["edges"] if on else (None, None)

    def set_merge(on):
        objective._merged_scaling = saved["merge"] if on else (lambda product: None)

    setters = {"check": set_check, "steps_per_call": set_steps, "compiled_edges": set_edges,
               "merged_diagonal": set_merge}
    if name not in setters:
        raise ValueError(f"--compare must be one of {sorted(setters)}, got {name!r}")
    return setters[name], restore


COMPARE = ("check", "steps_per_call", "compiled_edges", "merged_diagonal")


def compare(name: str, problem: str, n: int, compiled: bool, calls: int, warmup: int,
            pairs: int) -> dict:
    """Backward medians with the speed-up ``name`` off and on (see the module docstring),
    in turns, ``pairs`` times each (fresh traces each time)."""
    import difftto.objective as objective

    setting, restore = _variants(name)
    out: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for _ in range(pairs):
            for variant in out:
                objective._TRACES.clear()
                setting(variant == "on")
                out[variant].append(profile(problem, n, compiled, calls, warmup)["backward_ms"])
    finally:
        restore()
    return {"problem": problem, "n": n, "compiled": compiled, "calls": calls, "compare": name,
            "backward_ms_off": out["off"], "backward_ms_on": out["on"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--problems", default="ridge,nls")
    parser.add_argument("--eager", action="store_true", help="jvp_mode='auto' and PCG's default backend "
                        "instead of the compiled path")
    parser.add_argument("--calls", type=int, default=20, help="timed backwards per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed backwards first (compilation)")
    parser.add_argument("--compare", choices=COMPARE,
                        help="one speed-up off and on, in turns (see the module docstring)")
    parser.add_argument("--compare-check", action="store_true", help="--compare check")
    parser.add_argument("--pairs", type=int, default=2, help="turns per variant with --compare")
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
            name = "check" if args.compare_check else args.compare
            if name is not None:
                record = compare(name, problem, n, not args.eager, args.calls, args.warmup,
                                 args.pairs)
            else:
                record = profile(problem, n, not args.eager, args.calls, args.warmup)
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
