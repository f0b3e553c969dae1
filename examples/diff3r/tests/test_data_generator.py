"""The procedural generator: determinism, disjoint photo splits, exact images,
depth range, and the evaluation index."""

import json

import numpy as np
import pytest
import torch

from examples.diff3r.data import (
    build_scene,
    generate_dataset,
    load_chunk,
    load_scene,
    pair_overlap,
    read_evaluation_index,
    read_index,
    render_view,
    scene_key,
    validate_evaluation_entry,
)
from examples.diff3r.data.textures import (
    PROCEDURAL,
    TEST_PHOTOS,
    TRAIN_PHOTOS,
    load_photo,
    procedural_texture,
)

SEED, N_TRAIN, N_TEST, VIEWS, SIZE = 7, 3, 3, 8, 24


def _generate(root, seed=SEED):
    return generate_dataset(root, N_TRAIN, N_TEST, VIEWS, SIZE, seed, scenes_per_chunk=2, supersample=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _generate(tmp_path_factory.mktemp("gen"))


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_layout(dataset):
    files = {str(p) for p in _files(dataset)}
    assert {
        "meta.json",
        "evaluation_index.json",
        "train/index.json",
        "test/index.json",
        "train/000000.torch",
        "train/000001.torch",
        "test/000000.torch",
    } <= files
    for split, count in (("train", N_TRAIN), ("test", N_TEST)):
        index = read_index(dataset / split / "index.json")
        assert sorted(index) == sorted(scene_key(SEED, split, i) for i in range(count))
        for name in set(index.values()):
            for scene in load_chunk(dataset / split / name):
                assert index[scene["key"]] == name
                assert scene["cameras"].dtype == torch.float32
                assert scene["cameras"].shape == (VIEWS, 18)
                assert scene["timestamps"].dtype == torch.int64
                assert torch.all(scene["timestamps"].diff() > 0)
                assert len(scene["images"]) == VIEWS
                assert scene["depths"].dtype == torch.float16
                assert scene["depths"].shape == (VIEWS, SIZE, SIZE)


def test_same_seed_gives_identical_bytes(dataset, tmp_path):
    again = _generate(tmp_path / "again")
    assert _files(again) == _files(dataset)
    for rel in _files(dataset):
        if rel.name == "meta.json":
            a, b = json.loads((dataset / rel).read_text()), json.loads((again / rel).read_text())
            a.pop("seconds"), b.pop("seconds")
            assert a == b
        else:
            assert (dataset / rel).read_bytes() == (again / rel).read_bytes(), rel
    # a second call with the same configuration is a no-op; another one is refused
    assert generate_dataset(again, N_TRAIN, N_TEST, VIEWS, SIZE, SEED, scenes_per_chunk=2, supersample=1) == again
    with pytest.raises(FileExistsError, match="meta.json"):
        generate_dataset(again, N_TRAIN, N_TEST, VIEWS, SIZE, SEED + 1, scenes_per_chunk=2, supersample=1)


def test_other_seed_gives_other_scenes(dataset, tmp_path):
    other = generate_dataset(tmp_path / "other", 1, 0, VIEWS, SIZE, SEED + 1, supersample=1)
    a = load_chunk(dataset / "train" / "000000.torch")[0]
    b = load_chunk(other / "train" / "000000.torch")[0]
    assert a["key"] != b["key"]
    assert not torch.equal(a["cameras"], b["cameras"])


def test_photo_splits_are_disjoint(dataset):
    assert not set(TRAIN_PHOTOS) & set(TEST_PHOTOS)

    # no photograph is (nearly) the same picture as one of the other split
    def thumb(name):
        img = load_photo(name).astype(np.float32).mean(axis=2)
        ys = np.linspace(0, img.shape[0] - 1, 16).astype(int)
        xs = np.linspace(0, img.shape[1] - 1, 16).astype(int)
        return img[np.ix_(ys, xs)] / 255.0

    for a in TRAIN_PHOTOS:
        for b in TEST_PHOTOS:
            assert np.abs(thumb(a) - thumb(b)).mean() > 0.05, (a, b)
    for split, allowed in (("train", TRAIN_PHOTOS), ("test", TEST_PHOTOS)):
        used = set()
        index = read_index(dataset / split / "index.json")
        for name in set(index.values()):
            for scene in load_chunk(dataset / split / name):
                used.update(scene["sources"])
        photos = {s for s in used if not s.startswith("procedural:")}
        assert photos <= set(allowed), photos - set(allowed)
        assert {s.split(":")[1] for s in used - photos} <= set(PROCEDURAL)


def test_procedural_textures_have_contrast():
    rng = np.random.default_rng(0)
    for kind in PROCEDURAL:
        tex = procedural_texture(kind, rng, 32)
        assert tex.shape == (32, 32, 3) and tex.dtype == np.float32
        assert 0 <= tex.min() and tex.max() <= 1 and tex.std() > 0.03, kind


def test_stored_images_and_depth_are_the_renders(dataset):
    key = scene_key(SEED, "test", 1)
    scene = build_scene(SEED, "test", 1, VIEWS, SIZE)
    views = load_scene(dataset / "test", key)
    meta = json.loads((dataset / "meta.json").read_text())
    for v in (0, VIEWS // 2, VIEWS - 1):
        color, depth = render_view(scene, scene.cameras[v], supersample=1)
        expected = np.rint(color * 255).astype(np.uint8)
        got = np.rint(views.images[v].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        assert np.array_equal(got, expected)  # PNG is lossless
        assert np.allclose(views.depths[v].numpy(), depth, rtol=1e-3)
        assert meta["near"] < depth.min() and depth.max() < meta["far"]


def test_evaluation_index_is_valid(dataset):
    ev = read_evaluation_index(dataset / "evaluation_index.json")
    test_index = read_index(dataset / "test" / "index.json")
    assert sorted(ev) == sorted(test_index)
    overlaps = json.loads((dataset / "meta.json").read_text())["evaluation_overlap"]
    for key, entry in ev.items():
        context, target = validate_evaluation_entry(entry, VIEWS, key)
        assert len(context) == 2 and len(target) == 3
        i, j = context
        assert i < j and all(i < t < j for t in target)
        views = load_scene(dataset / "test", key)
        overlap = pair_overlap(views.depths, views.intrinsics_px, views.c2w, i, j)
        assert overlap > 0.3
        assert abs(overlap - overlaps[key]) < 0.05
