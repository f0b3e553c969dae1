"""RE10K chunk format: round trip, real-RE10K-like chunks (JPEG, 16:9, no depth),
malformed chunks, the dataset's samples and the bounded view sampler."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from examples.diff3r.data import (
    BoundedViewSampler,
    ChunkFormatError,
    PinholeCamera,
    RE10KDataset,
    decode_scene,
    encode_image,
    generate_dataset,
    load_chunk,
    load_scene,
    matrices_to_cameras,
    read_index,
    render_view,
    sample_scene,
    write_chunk,
    write_index,
)

VIEWS, SIZE = 8, 24


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunks")
    return generate_dataset(root, 2, 2, VIEWS, SIZE, 11, supersample=1)


def _scene_dict(num_views=3, size=(8, 12), key="abc", fmt="PNG", seed=0):
    rng = np.random.default_rng(seed)
    k = torch.tensor([[0.9, 0, 0.5], [0, 1.2, 0.5], [0, 0, 1.0]]).expand(num_views, 3, 3)
    w2c = torch.eye(4).repeat(num_views, 1, 1)
    w2c[:, :3, 3] = torch.from_numpy(rng.normal(size=(num_views, 3))).float()
    images = [encode_image(rng.integers(0, 256, (*size, 3), dtype=np.uint8), fmt) for _ in range(num_views)]
    return {
        "key": key,
        "url": "https://example.invalid/" + key,
        "timestamps": torch.arange(num_views, dtype=torch.int64) * 1000,
        "cameras": matrices_to_cameras(k, w2c),
        "images": images,
    }


def test_write_load_round_trip(tmp_path):
    scenes = [_scene_dict(key="a", seed=1), _scene_dict(key="b", num_views=4, seed=2)]
    write_chunk(tmp_path / "000000.torch", scenes)
    write_index(tmp_path / "index.json", {"a": "000000.torch", "b": "000000.torch"})
    loaded = load_chunk(tmp_path / "000000.torch")
    assert [s["key"] for s in loaded] == ["a", "b"]
    for orig, got in zip(scenes, loaded):
        assert torch.equal(orig["cameras"], got["cameras"])
        assert torch.equal(orig["timestamps"], got["timestamps"])
        assert all(torch.equal(x, y) for x, y in zip(orig["images"], got["images"]))
    views = load_scene(tmp_path, "b")
    assert views.images.shape == (4, 3, 8, 12) and views.depths is None
    assert torch.allclose(views.intrinsics_px[0, 0], torch.tensor([0.9 * 12, 0, 6]))
    assert torch.allclose(views.intrinsics_px[0, 1], torch.tensor([0, 1.2 * 8, 4]))
    assert torch.allclose(views.c2w @ views.w2c, torch.eye(4).expand(4, 4, 4), atol=1e-6)
    assert torch.allclose(views.c2w[:, :3, 3], -views.w2c[:, :3, 3], atol=1e-6)


def test_generated_chunk_round_trip(dataset, tmp_path):
    """Re-writing a generated chunk gives the same cameras, images and depths."""
    scenes = load_chunk(dataset / "train" / "000000.torch")
    write_chunk(tmp_path / "copy.torch", scenes)
    for a, b in zip(scenes, load_chunk(tmp_path / "copy.torch")):
        da, db = decode_scene(a), decode_scene(b)
        assert torch.equal(da.images, db.images)
        assert torch.equal(da.w2c, db.w2c) and torch.equal(da.intrinsics, db.intrinsics)
        assert torch.equal(da.depths, db.depths)


def test_real_re10k_like_chunk_through_the_dataset(tmp_path):
    """16:9 JPEG frames without depth or meta.json, as in real RE10K; the
    dataset's resize + center crop keeps cameras and pixels consistent: rendering
    the scene with the sample's cameras reproduces the sample's images."""
    height, width = 72, 128
    scene = sample_scene(np.random.default_rng(5), "train", 4, width, height)
    entry = {
        "key": "0123456789abcdef",
        "url": "https://www.youtube.com/watch?v=example",
        "timestamps": torch.arange(4, dtype=torch.int64) * 33_367,
        "cameras": torch.stack(
            [
                torch.tensor([*c.normalized_intrinsics(), 0, 0, *c.world_to_camera()[:3].ravel()], dtype=torch.float32)
                for c in scene.cameras
            ]
        ),
        "images": [encode_image(render_view(scene, c, 2)[0], "JPEG") for c in scene.cameras],
    }
    (tmp_path / "test").mkdir()
    write_chunk(tmp_path / "test" / "000000.torch", [entry])
    write_index(tmp_path / "test" / "index.json", {entry["key"]: "000000.torch"})
    ev = {entry["key"]: {"context": [0, 3], "target": [1, 2]}}
    (tmp_path / "evaluation_index.json").write_text(json.dumps(ev))
    data = RE10KDataset(tmp_path, "test", 32, evaluation_index=tmp_path / "evaluation_index.json", load_depth=True)
    assert len(data) == 1
    sample = data[0]
    assert sample["context_images"].shape == (2, 3, 32, 32)
    assert sample["target_images"].shape == (2, 3, 32, 32)
    assert "context_depths" not in sample  # real chunks have none; not required
    assert torch.all(sample["context_near"] == 1.0) and torch.all(sample["context_far"] == 100.0)
    assert sample["context_index"].tolist() == [0, 3]
    for v, img in zip([1, 2], sample["target_images"]):
        k = sample["target_intrinsics"][[1, 2].index(v)].double().numpy()
        c2w = sample["target_extrinsics"][[1, 2].index(v)].double().numpy()
        cam = PinholeCamera(k[0, 0] * 32, k[1, 1] * 32, k[0, 2] * 32, k[1, 2] * 32, 32, 32, c2w[:3, :3], c2w[:3, 3])
        expected, _ = render_view(scene, cam, 4)
        err = np.abs(img.permute(1, 2, 0).numpy() - expected).mean()
        assert err < 0.05, err


def _corrupt(path, mutate):
    scenes = [_scene_dict(key="good"), _scene_dict(key="bad")]
    mutate(scenes[1])
    torch.save(scenes, path)


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda s: s.update(cameras=s["cameras"][:, :17]), r"'bad'.*'cameras'.*\[3, 17\]"),
        (lambda s: s.update(cameras=s["cameras"][:2]), r"'bad'.*'timestamps'"),
        (lambda s: s["cameras"].__setitem__((1, slice(6, 18)), 2.0), r"'bad'.*'cameras' row 1"),
        (lambda s: s["cameras"].__setitem__((0, 0), float("nan")), r"'bad'.*non-finite"),
        (lambda s: s.pop("timestamps"), r"'bad'.*missing field.*timestamps"),
        (lambda s: s["images"].pop(), r"'bad'.*'images' has 2 entries"),
        (lambda s: s["images"].__setitem__(0, torch.zeros(3, 3)), r"'bad'.*'images'\[0\]"),
    ],
)
def test_malformed_chunk_names_file_key_and_field(tmp_path, mutate, pattern):
    path = tmp_path / "000007.torch"
    _corrupt(path, mutate)
    with pytest.raises(ChunkFormatError, match=pattern) as info:
        load_chunk(path)
    assert str(path) in str(info.value)


def test_truncated_chunk_names_the_file(tmp_path):
    path = tmp_path / "000003.torch"
    torch.save([_scene_dict()], path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ChunkFormatError, match="cannot read chunk") as info:
        load_chunk(path)
    assert str(path) in str(info.value)
    path.write_bytes(b"")
    with pytest.raises(ChunkFormatError, match="000003.torch"):
        load_chunk(path)


def test_not_a_list_names_the_file(tmp_path):
    path = tmp_path / "x.torch"
    torch.save({"key": "a"}, path)
    with pytest.raises(ChunkFormatError, match=r"x\.torch.*expected a list"):
        load_chunk(path)


def test_undecodable_image_names_file_key_and_view(tmp_path):
    scene = _scene_dict(key="broken")
    scene["images"][2] = torch.tensor(list(b"not an image at all"), dtype=torch.uint8)
    (tmp_path / "train").mkdir()
    path = tmp_path / "train" / "000000.torch"
    torch.save([scene], path)
    write_index(tmp_path / "train" / "index.json", {"broken": "000000.torch"})
    data = RE10KDataset(tmp_path, "train", 8, sampler=BoundedViewSampler(2, 1, min_gap=2, max_gap=2))
    with pytest.raises(ChunkFormatError, match=r"'broken'.*'images'\[2\] cannot be decoded") as info:
        data[0]
    assert str(path) in str(info.value)


def test_dataset_samples(dataset):
    data = RE10KDataset(
        dataset, "train", 16, load_depth=True, seed=3, sampler=BoundedViewSampler(2, 3, min_gap=2, max_gap=5)
    )
    assert len(data) == 2
    sample = data[1]
    for prefix, count in (("context", 2), ("target", 3)):
        assert sample[f"{prefix}_images"].shape == (count, 3, 16, 16)
        assert sample[f"{prefix}_images"].dtype == torch.float32
        assert 0 <= sample[f"{prefix}_images"].min() and sample[f"{prefix}_images"].max() <= 1
        assert sample[f"{prefix}_extrinsics"].shape == (count, 4, 4)
        assert sample[f"{prefix}_intrinsics"].shape == (count, 3, 3)
        assert sample[f"{prefix}_depths"].shape == (count, 16, 16)
        assert sample[f"{prefix}_near"].shape == (count,)
    i, j = sample["context_index"].tolist()
    assert 2 <= j - i <= 5
    assert all(i <= t <= j for t in sample["target_index"].tolist())
    # extrinsics are camera-to-world of the chunk's cameras; intrinsics stay normalized
    views = load_scene(dataset / "train", sample["key"])
    assert torch.allclose(sample["context_extrinsics"], views.c2w[[i, j]])
    assert torch.allclose(sample["context_intrinsics"], views.intrinsics[[i, j]])  # 24 -> 16
    meta = json.loads((dataset / "meta.json").read_text())
    assert torch.all(sample["context_near"] == meta["near"])
    # same seed and epoch: same views; the epoch changes them eventually
    again = RE10KDataset(dataset, "train", 16, seed=3, sampler=BoundedViewSampler(2, 3, min_gap=2, max_gap=5))
    assert again.views(1) == data.views(1)
    choices = set()
    for epoch in range(8):
        again.set_epoch(epoch)
        choices.add(str(again.views(1)))
    assert len(choices) > 1
    batch = next(iter(DataLoader(data, batch_size=2)))
    assert batch["context_images"].shape == (2, 2, 3, 16, 16) and len(batch["key"]) == 2


def test_dataset_evaluation_index_and_baseline(dataset):
    data = RE10KDataset(
        dataset, "test", SIZE, evaluation_index=dataset / "evaluation_index.json", make_baseline_1=True, load_depth=True
    )
    ev = json.loads((dataset / "evaluation_index.json").read_text())
    assert data.keys == sorted(ev) and data.missing_keys == []
    sample = data[0]
    assert sample["context_index"].tolist() == ev[sample["key"]]["context"]
    assert sample["target_index"].tolist() == ev[sample["key"]]["target"]
    t = sample["context_extrinsics"][:, :3, 3]
    assert torch.isclose((t[0] - t[1]).norm(), torch.tensor(1.0), atol=1e-5)
    views = load_scene(dataset / "test", sample["key"])
    scale = float(sample["scale"])
    assert torch.allclose(sample["context_depths"], views.depths[ev[sample["key"]]["context"]] * scale)
    assert torch.allclose(sample["context_far"], torch.full((2,), data.far * scale))


def test_dataset_reports_bad_evaluation_entries(dataset):
    key = sorted(read_index(dataset / "test" / "index.json"))[0]
    data = RE10KDataset(dataset, "test", SIZE, evaluation_index={key: {"context": [0, VIEWS], "target": [1]}})
    with pytest.raises(ChunkFormatError, match=rf"{key}.*'context'.*outside \[0, {VIEWS}\)"):
        data[0]
    with pytest.raises(ChunkFormatError, match="none of"):
        RE10KDataset(dataset, "test", SIZE, evaluation_index={"nope": {"context": [0, 1], "target": [0]}})


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 60),
    st.integers(1, 20),
    st.integers(0, 20),
    st.integers(2, 4),
    st.integers(1, 4),
    st.integers(0, 2**31 - 1),
)
def test_bounded_sampler_law(num_views, min_gap, extra, n_context, n_target, seed):
    sampler = BoundedViewSampler(n_context, n_target, min_gap=min_gap, max_gap=min_gap + extra)
    if num_views < n_context:
        with pytest.raises(ValueError, match="num_views"):
            sampler.sample(num_views, np.random.default_rng(seed))
        return
    context, target = sampler.sample(num_views, np.random.default_rng(seed))
    assert len(context) == n_context and len(target) == n_target
    assert len(set(context)) == n_context  # distinct context views
    left, right = context[0], context[-1]
    assert 0 <= left < right < num_views
    assert right - left <= max(min_gap + extra, n_context - 1)
    assert right - left >= min(min_gap, num_views - 1)
    assert context == sorted(context) and all(left <= t <= right for t in target)


def test_sampler_warmup_widens_gaps():
    sampler = BoundedViewSampler(min_gap=10, max_gap=20, warmup_steps=100, initial_min_gap=2, initial_max_gap=4)
    assert sampler.gap_range(0) == (2, 4)
    assert sampler.gap_range(50) == (6, 12)
    assert sampler.gap_range(100) == (10, 20)
    with pytest.raises(ValueError, match="min_gap"):
        BoundedViewSampler(min_gap=5, max_gap=3)
