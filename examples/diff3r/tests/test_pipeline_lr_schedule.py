"""The training learning-rate schedule: linear warm-up, then constant or a cosine decay
to ``lr_final`` (examples/diff3r/train.py ``lr_schedule``), and a run's optimizer
ending on it."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from examples.diff3r.testing import tiny_dataset, tiny_overrides
from examples.diff3r.train import CHECKPOINT_NAME, compose_config, load_checkpoint, lr_schedule, train


@given(steps=st.integers(1, 500), warmup=st.integers(0, 50), s=st.integers(0, 600))
def test_without_final_the_lr_is_the_warm_up_then_constant(steps, warmup, s):
    assert lr_schedule(steps, warmup)(s) == min(1.0, (s + 1) / max(1, warmup))


@given(steps=st.integers(2, 400), final=st.floats(0.0, 1.0), data=st.data())
def test_cosine_decay_starts_at_one_ends_at_final_and_never_rises(steps, final, data):
    decay_from = data.draw(st.integers(0, steps - 1))
    f = lr_schedule(steps, 0, final, decay_from)
    values = [f(s) for s in range(steps + 5)]
    assert values[:decay_from + 1] == [1.0] * (decay_from + 1)
    assert values[steps] == pytest.approx(final, abs=1e-12)
    assert values[steps:] == [values[steps]] * 5  # held at final past the last step
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))


def test_the_decay_is_a_cosine():
    f = lr_schedule(100, 0, final=0.2, decay_from=20)
    for s, t in ((30, 0.125), (40, 0.25), (60, 0.5), (90, 0.875)):
        assert f(s) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * t)), abs=1e-12)


def test_warm_up_and_decay_multiply():
    f = lr_schedule(100, warmup=10, final=0.0, decay_from=0)
    assert f(4) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.04)))


@pytest.mark.parametrize("final, decay_from, match", [(1.5, 0, "lr_final"), (-0.1, 0, "lr_final"),
                                                       (0.1, 10, "lr_decay_from"), (0.1, -1, "lr_decay_from")])
def test_bad_schedules_are_named(final, decay_from, match):
    with pytest.raises(ValueError, match=match):
        lr_schedule(10, 0, final, decay_from)


def test_a_run_ends_on_the_decayed_lr(tmp_path):
    root = tiny_dataset(tmp_path / "data")
    out = tmp_path / "run"
    train(compose_config(tiny_overrides(root, out, "zero_shot") + ["steps=3", "lr=0.01", "lr_warmup=0",
                                                                     "lr_final=0.1", "lr_decay_from=1"]))
    lr = load_checkpoint(out / CHECKPOINT_NAME)["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(0.001)
