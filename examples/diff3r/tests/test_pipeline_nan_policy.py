"""Training faults: a non-finite loss or gradient is detected, reported with the step
and scene key, and handled by ``nan_policy`` (stop: raise; skip: the batch changes
neither the weights nor the optimizer state)."""

import dataclasses
import json

import pytest
import torch

import examples.diff3r.train as train_module
from examples.diff3r.testing import tiny_dataset, tiny_overrides
from examples.diff3r.train import CHECKPOINT_NAME, compose_config, load_checkpoint, train


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny_nan") / "data")


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _inject(monkeypatch, at_call: int, kind: str) -> list:
    """Spoils the ``at_call``-th pipeline run (1-based): a NaN render (NaN loss) or a
    NaN gradient flowing back from a finite render. Returns the scene keys seen."""
    real = train_module.run_pipeline
    seen: list = []

    def spoiled(model, batch, layer, **kw):
        out = real(model, batch, layer, **kw)
        seen.append(list(batch["key"]))
        if len(seen) != at_call:
            return out
        if kind == "loss":
            return dataclasses.replace(out, render=out.render * float("nan"))
        render = out.render * 1.0
        render.register_hook(lambda g: g * float("nan"))
        return dataclasses.replace(out, render=render)

    monkeypatch.setattr(train_module, "run_pipeline", spoiled)
    return seen


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_stop_policy_names_step_and_scene(root, tmp_path, monkeypatch, kind):
    seen = _inject(monkeypatch, 2, kind)
    with pytest.raises(FloatingPointError) as err:
        train(compose_config(tiny_overrides(root, tmp_path, "diff3r") + ["steps=3", "nan_policy=stop"]))
    message = str(err.value)
    assert "step 2" in message and kind in message and str(seen[1]) in message, message
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 1  # the last good checkpoint stays


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_skip_policy_leaves_weights_and_optimizer_untouched(root, tmp_path, monkeypatch, kind):
    clean = train(compose_config(tiny_overrides(root, tmp_path / "clean", "diff3r") + ["steps=1"]))
    seen = _inject(monkeypatch, 2, kind)
    summary = train(compose_config(tiny_overrides(root, tmp_path / "skip", "diff3r") + ["steps=2", "nan_policy=skip"]))
    assert [(s["step"], s["keys"]) for s in summary["skipped"]] == [(2, seen[1])]
    assert kind in summary["skipped"][0]["problem"]
    a = load_checkpoint(tmp_path / "clean" / CHECKPOINT_NAME)
    b = load_checkpoint(tmp_path / "skip" / CHECKPOINT_NAME)
    assert b["step"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), f"{k} changed by a skipped batch"
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, st in a["optimizer"]["state"].items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][i][name]))
    logged = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 2 and logged[-1]["skipped"] and logged[-1]["keys"] == seen[1]
    assert clean["parameter_checksum"] == summary["parameter_checksum"]


def test_unknown_nan_policy_is_named(root, tmp_path):
    with pytest.raises(ValueError, match="nan_policy"):
        train(compose_config(tiny_overrides(root, tmp_path, "diff3r") + ["nan_policy=ignore"]))
