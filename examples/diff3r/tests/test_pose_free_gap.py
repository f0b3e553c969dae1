"""Wider context baselines at evaluation (``pose_free_eval.py --min-context-gap``,
``pose_free_depth_errors.py --min-context-gap``): each evaluation-index context pair is
moved apart to at least the gap, around its center and within the scene, the targets
kept between the context views; on a generated split the dataset then yields those
views and the shape's parallax grows."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import default_collate

from examples.diff3r import pose_free
from examples.diff3r.data import generate_dataset
from examples.diff3r.pose_free_depth_errors import shape_parallax
from examples.diff3r.pose_free_eval import widened_context, with_min_context_gap
from examples.diff3r.train import compose_config, make_dataset


def test_widened_context_examples():
    assert widened_context([3, 7], 12, 8) == [1, 9]  # symmetric about the center 5
    assert widened_context([2, 8], 12, 8) == [1, 9]
    assert widened_context([0, 5], 12, 8) == [0, 8]  # no room below: all above
    assert widened_context([7, 11], 12, 8) == [3, 11]
    assert widened_context([0, 10], 12, 8) == [0, 10]  # already wide enough: unchanged
    assert widened_context([4, 8], 12, 20) == [0, 11]  # clipped to the whole scene
    assert widened_context([9, 2], 12, 9) == [10, 1]  # the first view keeps its place (the frame)
    assert widened_context([2, 5, 8], 12, 10) == [0, 5, 10]  # inner views stay
    with pytest.raises(ValueError, match="min_gap"):
        widened_context([2, 5], 12, 0)


@settings(max_examples=200, deadline=None)
@given(st.integers(3, 20).flatmap(lambda n: st.tuples(
    st.just(n), st.integers(0, n - 2), st.integers(1, n - 1), st.integers(1, 25))))
def test_widened_context_properties(case):
    n, lo, span, min_gap = case
    hi = min(lo + span, n - 1)
    new = widened_context([lo, hi], n, min_gap)
    new_lo, new_hi = new
    assert 0 <= new_lo <= lo and hi <= new_hi <= n - 1  # contains the old pair: targets stay inside
    assert new_hi - new_lo == max(hi - lo, min(min_gap, n - 1))  # exactly as wide as needed
    if new_lo > 0 and new_hi < n - 1:  # room on both sides: centered within half a frame
        assert abs((new_lo + new_hi) / 2 - (lo + hi) / 2) <= 0.5


def test_with_min_context_gap_on_a_generated_split(tmp_path):
    root = generate_dataset(tmp_path / "data", 1, 3, views_per_scene=12, image_size=16, seed=3)
    cfg = compose_config(["model=pose_free", f"data.root={root}", "data.image_size=16"])
    plain = make_dataset(cfg, root, "test", evaluation=True, load_depth=True)
    wide = with_min_context_gap(make_dataset(cfg, root, "test", evaluation=True, load_depth=True), 10)
    assert wide.evaluation_path is None
    for i in range(len(plain)):
        (context, target), (wide_context, wide_target) = plain.views(i), wide.views(i)
        assert wide_target == target
        assert wide_context[1] - wide_context[0] >= 10
        assert wide_context == widened_context(context, 12, 10)
        assert all(wide_context[0] < t < wide_context[1] for t in wide_target)
        sample = wide[i]
        assert sample["context_images"].shape[0] == 2
    # wider baselines: more parallax of the depths' shape (summed over the scenes)
    parallax = [sum(float(shape_parallax(pose_free.first_view_frame(default_collate([d[i]]))).sum())
                    for i in range(len(d))) for d in (plain, wide)]
    assert parallax[1] > parallax[0]
    assert torch.isfinite(torch.tensor(parallax)).all()
