"""``benchmarks/backward_profile.py`` still runs and its split adds up (a smoke test of a
diagnostic script that wraps library internals by name: a renamed function or a changed
signature would otherwise only show when someone next profiles).

One small case on the compiled path (the one with the finest split), in a subprocess as
a user runs it; about 20 s, most of it inductor compiling for the new shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_backward_profile_runs_and_its_parts_fit_in_the_whole():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "backward_profile.py"), "--sizes", "300",
         "--problems", "ridge", "--calls", "2", "--warmup", "1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert (record["problem"], record["n"], record["compiled"]) == ("ridge", 300, True)
    assert record["pcg_iterations"] > 0
    # The compiled path's split was recorded (the wrapped names still exist and are used)
    # and its parts are no larger than the loop they are part of.
    for key in ("pcg_start_ms", "pcg_finish_ms", "step_calls_ms", "first_step_call_ms"):
        assert record[key] > 0, key
    assert record["step_calls"] >= 1
    assert record["first_step_call_ms"] <= record["step_calls_ms"]
    assert record["pcg_start_ms"] + record["pcg_finish_ms"] + record["step_calls_ms"] \
        <= record["pcg_loop_ms"] + 1e-3
    assert record["operator_setup_ms"] + record["pcg_loop_ms"] <= record["backward_ms"] + 1e-3
