"""Fuzzing the RE10K chunk loader: truncated files, random bytes, wrong camera rows,
undecodable images. ``load_chunk``, ``decode_scene`` and ``RE10KDataset`` must either
load or raise ``ChunkFormatError`` naming the file, never another exception."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from examples.diff3r.data import (
    ChunkFormatError,
    RE10KDataset,
    decode_scene,
    encode_image,
    load_chunk,
    matrices_to_cameras,
    write_index,
)

VIEWS, SIZE = 4, (8, 12)
fuzz_settings = settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])


def _scene(key="abc", seed=0, fmt="PNG"):
    rng = np.random.default_rng(seed)
    k = torch.tensor([[0.9, 0, 0.5], [0, 1.2, 0.5], [0, 0, 1.0]]).expand(VIEWS, 3, 3)
    w2c = torch.eye(4).repeat(VIEWS, 1, 1)
    w2c[:, :3, 3] = torch.from_numpy(rng.normal(size=(VIEWS, 3))).float()
    return {
        "key": key,
        "url": "https://example.invalid/" + key,
        "timestamps": torch.arange(VIEWS, dtype=torch.int64) * 1000,
        "cameras": matrices_to_cameras(k, w2c),
        "images": [encode_image(rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8), fmt) for _ in range(VIEWS)],
    }


def _load_everything(path):
    """load_chunk, then decode every scene; returns the number of decoded views."""
    scenes = load_chunk(path)
    return sum(decode_scene(s, path).num_views for s in scenes)


@fuzz_settings
@given(cut=st.floats(0.0, 0.999), seed=st.integers(0, 2**16))
def test_truncated_chunk_names_the_file(tmp_path_factory, cut, seed):
    path = tmp_path_factory.mktemp("trunc") / "000000.torch"
    torch.save([_scene(seed=seed)], path)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(cut * len(raw))])
    with pytest.raises(ChunkFormatError) as err:
        _load_everything(path)
    assert str(path) in str(err.value)


@fuzz_settings
@given(raw=st.binary(max_size=512))
def test_random_bytes_name_the_file(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("bytes") / "000000.torch"
    path.write_bytes(raw)
    with pytest.raises(ChunkFormatError) as err:
        _load_everything(path)
    assert str(path) in str(err.value)


camera_faults = st.sampled_from(["columns", "rows_missing", "nan", "inf", "focal", "not_rotation", "int",
                                 "not_tensor", "empty"])


@fuzz_settings
@given(fault=camera_faults, row=st.integers(0, VIEWS - 1), col=st.integers(0, 17),
       value=st.sampled_from([float("nan"), float("inf"), -1.0, 0.0, 5.0, 1e30]))
def test_wrong_camera_rows_name_file_and_field(tmp_path_factory, fault, row, col, value):
    scene = _scene()
    cams = scene["cameras"].clone()
    if fault == "columns":
        cams = cams[:, :col] if col < 17 else torch.cat([cams, cams[:, :1]], 1)  # 0-16 or 19 columns
    elif fault == "rows_missing":
        cams = cams[: row]  # fewer rows than images (none at all for row 0)
    elif fault == "nan":
        cams[row, col] = float("nan")
    elif fault == "inf":
        cams[row, col] = float("inf")
    elif fault == "focal":
        cams[row, col % 2] = -abs(value) if value == value else 0.0
    elif fault == "not_rotation":
        cams[row, 6 + 4 * (col % 3) + col % 3] = 5.0  # a diagonal rotation entry
    elif fault == "int":
        cams = cams.to(torch.int64)
    elif fault == "not_tensor":
        cams = cams.tolist()
    else:
        cams = cams[:0]
    scene["cameras"] = cams
    path = tmp_path_factory.mktemp("cams") / "000000.torch"
    torch.save([scene], path)
    with pytest.raises(ChunkFormatError) as err:
        _load_everything(path)
    assert str(path) in str(err.value) and "'abc'" in str(err.value)
    assert "cameras" in str(err.value) or "images" in str(err.value), str(err.value)


@fuzz_settings
@given(view=st.integers(0, VIEWS - 1), fault=st.sampled_from(["random", "truncated", "empty", "other_size"]),
       raw=st.binary(min_size=0, max_size=64), fmt=st.sampled_from(["PNG", "JPEG"]))
def test_undecodable_image_names_file_key_and_view(tmp_path_factory, view, fault, raw, fmt):
    scene = _scene(fmt=fmt)
    good = scene["images"][view]
    if fault == "random":
        bad = torch.frombuffer(bytearray(b"\x00garbage" + raw), dtype=torch.uint8)
    elif fault == "truncated":
        bad = good[: max(1, good.numel() // 3)].clone()
    elif fault == "empty":
        bad = torch.zeros(0, dtype=torch.uint8)
    else:
        bad = encode_image(np.zeros((SIZE[0] + 1, SIZE[1], 3), dtype=np.uint8), fmt)
    scene["images"][view] = bad
    path = tmp_path_factory.mktemp("imgs") / "000000.torch"
    torch.save([scene], path)
    with pytest.raises(ChunkFormatError) as err:
        _load_everything(path)
    message = str(err.value)
    assert str(path) in message and "'abc'" in message and "images" in message, message


@fuzz_settings
@given(cut=st.floats(0.0, 0.999), which=st.integers(0, 1))
def test_dataset_reports_a_truncated_chunk(tmp_path_factory, cut, which):
    """Through RE10KDataset: the good chunk loads, the damaged one names its file."""
    root = tmp_path_factory.mktemp("ds")
    split = root / "train"
    split.mkdir()
    for i, key in enumerate(("a", "b")):
        torch.save([_scene(key=key, seed=i)], split / f"{i:06d}.torch")
    damaged = split / f"{which:06d}.torch"
    raw = damaged.read_bytes()
    damaged.write_bytes(raw[: int(cut * len(raw))])
    write_index(split / "index.json", {"a": "000000.torch", "b": "000001.torch"})
    ds = RE10KDataset(root, "train", image_size=8, num_context_views=2, num_target_views=1)
    good = ds[1 - which]
    assert torch.isfinite(good["context_images"]).all()
    with pytest.raises(ChunkFormatError) as err:
        ds[which]
    assert str(damaged) in str(err.value)
