"""PCG's loop as one compiled program against the library's compiled calls, on
``peers.py``'s problems: does taking Python out from between the iterations pay?

For each problem and size: the backward operator of difftto's layer at a fixed point
(the exact Hessian + ``diag Λ``, the product compiled, as ``backward_profile.py`` and the
``difftto_exact_identity_compiled`` rows of ``peers.py``) and the right-hand side of the
outer loss. From the same start state (``pcg._start``), in turns, one process per case:

- ``calls``: the library's loop body, ``CompiledVectorOps.product_step(operator, k)``
  (``k`` iterations of ``q = A p`` and PCG's step per compiled call, a host look after
  each call) until no element is active, with the library's ``k``: ``steps_per_call``
  (8) up to ``steps_per_call_max_numel`` (32768) unknowns, else 1;
- ``program``: the same iteration (``pcg._step`` after the same product graph) inside
  ``torch._higher_order_ops.while_loop``, which tests "any element active" after every
  iteration, compiled by inductor with its C++ wrapper (with the Python wrapper, inductor
  does not compile this loop on the CPU), one call for the whole loop.

Prints one JSON line per case: median µs of each (the loop alone: start and finish, the
operator's set-up and the layer are not in either), iterations, and the largest
difference of the two solutions relative to the largest entry.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loop_program.py --sizes 10000,100000

A diagnostic script, not a timed test; its numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

def _operator_and_rhs(problem: str, n: int):
    """The backward's operator and right-hand side, taken from one backward of the layer."""
    from backward_profile import layer_at
    from peers import RTOL

    layer, data, theta0, lam, truth, star = layer_at(problem, n, compiled=True)
    made = []
    build = layer._backward_operator
    layer._backward_operator = lambda objective, point: made.append(build(objective, point)) or made[-1]
    t0, lm = theta0.clone().requires_grad_(True), lam.clone().requires_grad_(True)
    out, _ = layer(t0, lm, data)
    (0.5 * (out - truth).pow(2).sum()).backward()
    return made[-1], (star - truth).contiguous(), RTOL


def _program(module):
    """The while_loop over PCG's step with the product (identity preconditioner)."""
    import torch
    from torch._higher_order_ops.while_loop import while_loop

    from difftto.solvers import compiled

    def loop(limit, x, r, p, rz, rr, status, active, iterations, tol2, *constants):
        def more(count, x, r, p, rz, rr, status, active, iterations):
            return active.any() & (count < limit)

        def iteration(count, x, r, p, rz, rr, status, active, iterations):
            x, r, p = x.clone(), r.clone(), p.clone()  # a body may not update what it carries
            q = module(p, *constants)
            status, active, iterations, rz, rr = compiled._step(
                x, r, p, q, rz, rr, status, active, iterations, None, tol2)
            return count + 1, x, r, p, rz, rr, status, active, iterations

        # Carried values must not alias (under the identity rz is rr).
        return while_loop(more, iteration, (torch.zeros_like(limit), x, r, p, rz.clone(),
                                            rr.clone(), status, active, iterations))

    return loop


def run(problem: str, n: int, rounds: int) -> dict:
    import torch
    from torch._inductor import compile as inductor_compile
    from torch._inductor import config
    from torch.fx.experimental.proxy_tensor import make_fx

    from difftto.solvers import compiled, pcg

    operator, b, rtol = _operator_and_rhs(problem, n)
    module, constants = operator.graph()
    ops = compiled.vector_ops(b)
    tolerances = torch.tensor([rtol, 0.0], dtype=b.dtype)
    finite_b = torch.ones(b.shape[0], dtype=torch.bool)
    limit = torch.tensor(10_000)
    per_call = ops.steps_per_call if b.numel() <= ops.steps_per_call_max_numel else 1

    def start():
        r, p, rz, rr, _, _, tol2, status, active, iterations = pcg._start(
            b, finite_b, None, None, tolerances,
            precondition=lambda v: pcg._TorchVectorOps.precondition(v, None))
        return torch.zeros_like(b), r, p, rz, rr, status, active, iterations, tol2

    def calls():
        x, r, p, rz, rr, status, active, iterations, tol2 = start()
        step = ops.product_step(operator, per_call)
        begin = time.perf_counter()
        while bool(active.any()):
            status, active, iterations, rz, rr = step(x, r, p, rz, rr, status, active,
                                                      iterations, None, tol2)
        return time.perf_counter() - begin, x, iterations

    with torch.no_grad():
        example = (limit, *start(), *constants)
        try:
            with config.patch(cpp_wrapper=True):
                graph = make_fx(_program(module), tracing_mode="fake")(*example)
                program = inductor_compile(graph, list(example))
        except Exception as error:  # noqa: BLE001 - reported as this case's outcome
            first = (str(error).strip().splitlines() or [""])[0]
            return {"problem": problem, "n": n, "error": f"{type(error).__name__}: {first}"[:300]}

        def whole():
            state = start()
            begin = time.perf_counter()
            out = program(limit, *state, *constants)
            return time.perf_counter() - begin, out[1], out[8]

        times: dict[str, list[float]] = {"calls": [], "program": []}
        found = {}
        for k in range(rounds + 2):  # two untimed rounds (compilation, first use)
            for name, go in (("calls", calls), ("program", whole)) if k % 2 else (
                    ("program", whole), ("calls", calls)):
                seconds, x, iterations = go()
                if k >= 2:
                    times[name].append(seconds)
                found[name] = (x, iterations)
    (x_calls, it_calls), (x_program, it_program) = found["calls"], found["program"]
    return {"problem": problem, "n": n, "rounds": rounds, "iterations_per_call": per_call,
            "calls_us": round(1e6 * statistics.median(times["calls"]), 1),
            "program_us": round(1e6 * statistics.median(times["program"]), 1),
            "iterations_calls": it_calls.tolist(), "iterations_program": it_program.tolist(),
            "max_rel_diff": float((x_calls - x_program).abs().max() / x_calls.abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--problems", default="ridge,nls")
    parser.add_argument("--rounds", type=int, default=50, help="timed calls of each, in turns")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1 or args.threads < 1:
        parser.error(f"--rounds and --threads must be >= 1, got {args.rounds}, {args.threads}")
    if args.case:
        import torch

        torch.set_num_threads(args.threads)
        problem, n = args.case.split(",")
        print(json.dumps(run(problem, int(n), args.rounds)), flush=True)
        return
    # One process per case: in one process, inductor failed to compile a second
    # while_loop program ("A subgraph argument other than striding has been modified").
    for problem in args.problems.split(","):
        for n in args.sizes.split(","):
            done = subprocess.run([sys.executable, __file__, "--case", f"{problem},{n}",
                                   "--rounds", str(args.rounds), "--threads", str(args.threads)],
                                  capture_output=True, text=True)
            lines = done.stdout.strip().splitlines()
            if done.returncode != 0 or not lines:
                error = (done.stderr.strip().splitlines() or ["?"])[-1][:300]
                print(json.dumps({"problem": problem, "n": int(n), "error": error}), flush=True)
            else:
                print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
