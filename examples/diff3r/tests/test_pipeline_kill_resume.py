"""Training faults: ``train.py`` killed with SIGKILL at random moments after its first
checkpoint resumes with ``resume=true`` from the last checkpoint, losing at most the
steps since it, and ends where an uninterrupted run ends; a corrupt checkpoint file
gives a clear error."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from examples.diff3r.testing import tiny_dataset, tiny_overrides
from examples.diff3r.train import CHECKPOINT_NAME, load_checkpoint

TRAIN = Path(__file__).resolve().parents[1] / "train.py"
STEPS, KILLS = 40, 3


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny_kill") / "data")


def _start(root, out, resume):
    args = tiny_overrides(root, out, "diff3r") + [f"steps={STEPS}", "checkpoint_every=1", f"resume={resume}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(TRAIN), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _summary(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(root, tmp_path):
    rng = random.Random(10)
    out = tmp_path / "run"
    ckpt = out / CHECKPOINT_NAME
    kills = []
    for _ in range(KILLS):
        proc = _start(root, out, resume="true")
        before = load_checkpoint(ckpt)["step"] if ckpt.is_file() else 0
        deadline = time.monotonic() + 240
        while (not ckpt.is_file() or load_checkpoint(ckpt)["step"] <= before) and proc.poll() is None:
            assert time.monotonic() < deadline, "no new checkpoint within 240 s"
            time.sleep(0.05)
        if proc.poll() is not None:  # it finished before the kill: nothing left to interrupt
            _summary(proc)
            break
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        state = load_checkpoint(ckpt)  # never half-written: loads after every kill
        kills.append(int(state["step"]))
        assert before < state["step"] <= STEPS
    assert len(kills) == KILLS, f"the run finished after {len(kills)} kills; raise STEPS"
    assert kills == sorted(kills)
    print(f"killed after checkpoints at steps {kills}")
    resumed_from = load_checkpoint(ckpt)["step"]
    summary = _summary(_start(root, out, resume="true"))
    assert summary["start_step"] == resumed_from == kills[-1] < STEPS  # continues from the last checkpoint
    assert summary["last"]["step"] == STEPS
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # no step logged twice after resuming
    # An uninterrupted run ends with the same weights: nothing but re-done steps was lost.
    _summary(_start(root, tmp_path / "straight", resume="false"))
    a = load_checkpoint(ckpt)["model"]
    b = load_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)["model"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "not_a_dict"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, damage):
    from examples.diff3r.train import save_checkpoint

    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, {"model": {"w": torch.ones(100)}, "step": 3, "config": {}})
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(raw)))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save([1, 2, 3], path)
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    assert f"checkpoint {path}" in str(err.value)
