"""PCG (identity vs Jacobi) against the dense Cholesky solve, n up to 10^6.

The system per batch element is ``A = diag(d) + U Uᵀ``: a badly scaled diagonal
(``d`` spread log-uniformly over ``[1, 10^6]``) plus a rank-``k`` term, applied
matrix-free (``O(n k)`` per product). The dense solve materializes ``A`` and runs only
where that fits (``n ≤ 4096`` by default).

Each case runs in two fresh subprocesses, one timed and one measured, so its peak
memory is its own: the peak resident set (``VmHWM`` of ``/proc/self/status``, reset through
``/proc/self/clear_refs`` after the set-up) minus the resident set before the solve.
tracemalloc cannot see torch's allocations; the resident set does (with glibc's
mmap threshold fixed, see ``MALLOC_ENV``). Torch runs on one thread per case by
default, for timings that hold on a shared machine.

Prints one JSON line per case, then a summary line with the least-squares slope of
PCG's peak memory against n (bytes per unknown) and the log-log exponent (1 means
linear), for PCG and for the dense solve.

    .venv/bin/python benchmarks/pcg.py             # the full table (a few minutes)
    .venv/bin/python benchmarks/pcg.py --quick     # n ≤ 10^5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

# glibc raises its mmap threshold after large frees, then serves later large blocks
# from a heap it does not give back: the resident set would then hide reused memory.
# A fixed threshold keeps every block >= 64 KiB in its own mapping, returned on free,
# so the resident set follows what is live.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Resets VmHWM to the current resident set (Linux >= 4.0); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_case(case: dict) -> dict:
    """Runs one case in this process and returns its JSON record."""
    import torch

    from difftto.operators import FunctionOperator
    from difftto.solvers import PCG, DenseCholesky

    torch.set_num_threads(case["threads"])
    torch.manual_seed(case["seed"])
    dtype = getattr(torch, case["dtype"])
    batch, n, rank = case["batch"], case["n"], case["rank"]
    d = 10 ** (6 * torch.rand(batch, n, dtype=dtype))
    u = torch.randn(batch, n, rank, dtype=dtype) * (10.0 / math.sqrt(n))
    b = torch.randn(batch, n, dtype=dtype)

    def mv(v):
        return d * v + torch.bmm(u, torch.bmm(u.transpose(1, 2), v[..., None]))[..., 0]

    operator = FunctionOperator(mv, (batch, n), dtype, diagonal=d + (u * u).sum(-1),
                                symmetric=True, positive_definite=True)
    mv(b)  # warm up torch's kernels outside the measurement
    baseline_kib = _status_kib("VmRSS")
    reset = _reset_peak()
    if not reset:
        baseline_kib = _status_kib("VmHWM")
    start = time.perf_counter()
    if case["method"] == "dense":
        result = DenseCholesky(on_failure="warn").solve(operator, b)
    else:
        result = PCG(rtol=case["rtol"], max_iter=case["max_iter"], on_failure="warn").solve(
            operator, b, preconditioner=case["method"])
    seconds = time.perf_counter() - start
    peak_kib = _status_kib("VmHWM")
    iterations = int(result.iterations.max())
    return {
        "n": n,
        "batch": batch,
        "rank": rank,
        "dtype": case["dtype"],
        "method": "dense_cholesky" if case["method"] == "dense" else "pcg",
        "preconditioner": None if case["method"] == "dense" else case["method"],
        "iterations": iterations,
        "status": [int(s) for s in result.status],
        "relative_residual": float(result.relative_residual.max()),
        "time_s": round(seconds, 4),
        "time_per_iteration_ms": (round(1e3 * seconds / iterations, 4) if iterations else None),
        "peak_memory_bytes": max(peak_kib - baseline_kib, 0) * 1024,
        "peak_reset": reset,
        "threads": torch.get_num_threads(),
    }


def fit(records: list[dict]) -> dict:
    """Least-squares slope of memory vs n·batch, and the log-log exponent over
    n·batch ≥ 10^5 (below that, the resident set's page-level floor of a few MB
    dominates)."""
    xs = [r["n"] * r["batch"] for r in records]
    ys = [r["peak_memory_bytes"] for r in records]
    if len(xs) < 2:
        return {"points": len(xs)}
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    ss_res = sum((y - (my + slope * (x - mx))) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys) or 1.0
    big = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x >= 100_000 and y > 0]
    exponent = None
    if len(big) >= 2:
        lx = sum(p[0] for p in big) / len(big)
        ly = sum(p[1] for p in big) / len(big)
        exponent = sum((p[0] - lx) * (p[1] - ly) for p in big) / sum(
            (p[0] - lx) ** 2 for p in big)
    return {
        "points": len(xs),
        "bytes_per_unknown": round(slope, 2),
        "r_squared": round(1 - ss_res / ss_tot, 5),
        "loglog_exponent_n_ge_1e5": None if exponent is None else round(exponent, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="n up to 10^5 only")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per case (1: stable timings on a shared machine)")
    parser.add_argument("--dense-max-n", type=int, default=4096)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case
    args = parser.parse_args()

    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return

    sizes = [1_000, 4_096, 10_000, 100_000] + ([] if args.quick else [300_000, 1_000_000])
    cases = []
    for n in sizes:
        for batch in (1, 4) if n <= 100_000 else (1,):
            for method in ("identity", "jacobi"):
                cases.append({"n": n, "batch": batch, "method": method})
            if n <= args.dense_max_n:
                cases.append({"n": n, "batch": batch, "method": "dense"})
    records = []
    for case in cases:
        case |= {"rank": args.rank, "dtype": args.dtype, "rtol": args.rtol,
                 "max_iter": args.max_iter, "seed": 0, "threads": args.threads}
        # Two fresh processes per case: one times it with the default allocator, one
        # measures its memory with the mmap threshold fixed (which costs page faults).
        runs = {}
        for purpose, env in (("time", os.environ), ("memory", os.environ | MALLOC_ENV)):
            done = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)],
                                  capture_output=True, text=True, env=env)
            if done.returncode != 0:
                runs = None
                print(json.dumps({"case": case, "error": done.stderr.strip().splitlines()[-1:]}),
                      flush=True)
                break
            runs[purpose] = json.loads(done.stdout.strip().splitlines()[-1])
        if runs is None:
            continue
        record = runs["time"] | {"peak_memory_bytes": runs["memory"]["peak_memory_bytes"],
                                 "peak_reset": runs["memory"]["peak_reset"]}
        records.append(record)
        print(json.dumps(record), flush=True)

    summary = {"summary": "peak memory vs n (bytes per unknown = slope over n·batch)"}
    for name, keep in (
        ("pcg_jacobi", lambda r: r["preconditioner"] == "jacobi"),
        ("pcg_identity", lambda r: r["preconditioner"] == "identity"),
        ("dense_cholesky", lambda r: r["method"] == "dense_cholesky"),
    ):
        summary[name] = fit([r for r in records if keep(r)])
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
