"""Time per PCG iteration: the torch backend against the fused CuPy kernels, on CUDA.

The operator is ``diag(d) + (shift left + shift right) / 4`` (``d ≥ 1``, so SPD), with
its diagonal ``d`` known: products cost two rolls and an add, the same for both
backends, so the difference per iteration is the vector work the backends differ in
(updates, the Jacobi step, per-element reductions). Each case runs a fixed number
of iterations (``rtol = atol = 0``; the ``warn`` policy silenced) after a warm-up,
timed with CUDA events; the best of a few repeats is kept.

Prints one JSON line per (n, batch, dtype, backend). On a machine without CUDA or
cupy it prints one JSON line saying it was skipped and why, and exits 0.

    .venv/bin/python benchmarks/pcg_backends.py
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch


def skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "CUDA is not available to torch (a CPU-only build, or no GPU)"
    from difftto.solvers import cupy_kernels

    return cupy_kernels.unavailable_reason(torch.empty(1, device="cuda"))


def time_per_iteration(backend: str, batch: int, n: int, dtype: torch.dtype,
                       iterations: int, repeats: int) -> float:
    from difftto.operators import FunctionOperator
    from difftto.solvers import PCG, LinearSolveWarning

    g = torch.Generator(device="cuda").manual_seed(0)
    d = 10 ** (3 * torch.rand(batch, n, generator=g, device="cuda", dtype=dtype))
    b = torch.randn(batch, n, generator=g, device="cuda", dtype=dtype)

    def mv(v):
        return d * v + 0.25 * (torch.roll(v, 1, dims=1) + torch.roll(v, -1, dims=1))

    operator = FunctionOperator(mv, (batch, n), dtype, "cuda", diagonal=d, symmetric=True,
                                positive_definite=True)
    solver = PCG(rtol=0.0, atol=0.0, max_iter=iterations, check_every=iterations,
                 on_failure="warn", backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LinearSolveWarning)
        solver.solve(operator, b, preconditioner="jacobi")  # warm-up: compiles the kernels, fills the caches
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = solver.solve(operator, b, preconditioner="jacobi")
            end.record()
            torch.cuda.synchronize()
            its = max(int(result.iterations.max()), 1)
            best = min(best, start.elapsed_time(end) / its)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    why = skip_reason()
    if why is not None:
        print(json.dumps({"benchmark": "pcg_backends", "skipped": True, "reason": why}))
        return
    device = torch.cuda.get_device_name()
    for dtype in (torch.float32, torch.float64):
        for batch, n in ((1, 10_000), (1, 1_000_000), (8, 100_000), (1, 10_000_000),
                         (64, 4_096)):
            row = {"benchmark": "pcg_backends", "device": device, "n": n, "batch": batch,
                   "dtype": str(dtype).removeprefix("torch."), "preconditioner": "jacobi"}
            times = {}
            for backend in ("torch", "cupy"):
                times[backend] = time_per_iteration(backend, batch, n, dtype,
                                                    args.iterations, args.repeats)
                print(json.dumps(row | {"backend": backend,
                                        "ms_per_iteration": round(times[backend], 5)}),
                      flush=True)
            print(json.dumps(row | {"speedup_cupy_over_torch":
                                    round(times["torch"] / times["cupy"], 3)}), flush=True)


if __name__ == "__main__":
    main()
