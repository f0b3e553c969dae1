"""An ill-conditioned backward solve is reported by training, and the `on_failure`
policy set from hydra (tto.on_failure) decides what happens."""

import json

import pytest

import difftto
from examples.diff3r.testing import tiny_dataset, tiny_overrides
from examples.diff3r.train import compose_config, train

# One PCG iteration towards a 1e-12 tolerance, with Λ predicted near zero for the
# means: the backward system cannot converge, so every solve fails.
ILL_CONDITIONED = ["tto.pcg_max_iter=1", "tto.pcg_rtol=1e-12"]



@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny_failures") / "data")


def test_failed_backward_solves_are_counted_and_logged(root, tmp_path):
    out = tmp_path / "best"
    overrides = tiny_overrides(root, out, "diff3r") + ILL_CONDITIONED + ["tto.on_failure=best", "steps=2"]
    summary = train(compose_config(overrides))
    assert summary["pcg_failures"] == {"not_converged": 2, "solves": 2}
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["pcg_failures"] for rec in logged] == [1, 1]
    assert all(rec["pcg_iterations_max"] == 1 for rec in logged)


def test_on_failure_raise_from_hydra_stops_training(root, tmp_path):
    overrides = tiny_overrides(root, tmp_path / "raise", "diff3r") + ILL_CONDITIONED + ["tto.on_failure=raise"]
    cfg = compose_config(overrides)
    with pytest.raises(difftto.solvers.LinearSolveError, match="MAX_ITER_REACHED"):
        train(cfg)
