"""Two-process data-parallel training under torchrun (gloo, CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from examples.diff3r.testing import tiny_dataset, tiny_overrides

REPO = Path(__file__).resolve().parents[3]


def _json_objects(text):
    """Every JSON object in ``text``: the two ranks' summary lines may share a line."""
    decoder, found, i = json.JSONDecoder(), [], text.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            found.append(obj)
        i = text.find("{", end)
    return found


def test_two_process_gloo_run_keeps_the_replicas_in_sync(tmp_path_factory, tmp_path):
    root = tiny_dataset(tmp_path_factory.mktemp("tiny_ddp") / "data")
    overrides = [o for o in tiny_overrides(root, tmp_path / "run", mode="diff3r") if not o.startswith("steps=")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "examples" / "diff3r" / "train.py"), *overrides, "steps=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = [s for s in _json_objects(proc.stdout) if "parameter_checksum" in s]
    assert sorted(s["rank"] for s in summaries) == [0, 1]
    assert all(s["world_size"] == 2 and s["steps"] == 2 for s in summaries)
    # DistributedDataParallel averaged the gradients: both replicas hold the same weights.
    assert summaries[0]["parameter_checksum"] == summaries[1]["parameter_checksum"]
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in logged] == [1, 2]  # written once, by rank 0
