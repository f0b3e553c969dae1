"""Generate a procedural multi-view dataset in the RE10K chunk format.

Layout written under ``root``::

    meta.json                 generator configuration, near/far, photo splits,
                              context overlap of every evaluation scene
    train/000000.torch ...    chunks (lists of scene dicts, see .chunks)
    train/index.json          {key: chunk file name}
    test/...                  the same for held-out scenes (disjoint photographs)
    evaluation_index.json     {key: {"context": [i, j], "target": [a, b, c]}} for test

Scene ``n`` of a split depends only on ``(seed, split, n)`` and the generator
parameters, so the same call writes byte-identical chunks.

Command line::

    python -m examples.diff3r.data.generate --root data/diff3r --n-train 200 --n-test 20
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import pickle
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .chunks import encode_image, write_chunk, write_index
from .sampler import choose_evaluation_views, write_evaluation_index
from .scene import Scene, render_view, sample_scene
from .textures import TEST_PHOTOS, TRAIN_PHOTOS

__all__ = ["GENERATOR_VERSION", "build_scene", "generate_dataset", "generate_scene", "scene_key"]

GENERATOR_VERSION = 1
NEAR, FAR = 0.4, 15.0  # depth bounds every generated view respects
_MAX_TRIES = 20
_SPLIT_IDS = {"train": 0, "test": 1}
_FRAME_US = 33_367  # ~30 fps timestamps in microseconds, like RE10K


def scene_key(seed: int, split: str, index: int) -> str:
    """16-hex-digit key of scene ``index`` of ``split`` (RE10K keys look alike)."""
    return hashlib.sha1(f"difftto-diff3r/{seed}/{split}/{index}".encode()).hexdigest()[:16]


def _depth_in_range(scene: Scene) -> bool:
    for cam in scene.cameras:
        dirs, z = cam.rays(1)
        t, _ = scene.cast(cam.position, dirs.reshape(-1, 3))
        depth = t.reshape(z.shape) * z
        if not (depth.min() > NEAR and depth.max() < FAR):
            return False
    return True


def _scene_and_rng(seed: int, split: str, index: int, views: int, image_size: int):
    if split not in _SPLIT_IDS:
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    seq = np.random.SeedSequence([int(seed), _SPLIT_IDS[split], int(index)])
    scene_seq, eval_seq = seq.spawn(2)
    rng = np.random.default_rng(scene_seq)
    # Scenes whose depth leaves [NEAR, FAR] in some view are drawn again (rare:
    # a camera close to a wall); the stream of draws stays a function of the seed.
    for _ in range(_MAX_TRIES):
        scene = sample_scene(rng, split, views, image_size)
        if _depth_in_range(scene):
            return scene, rng, eval_seq
    raise RuntimeError(
        f"scene {index} of {split} (seed {seed}): no draw in {_MAX_TRIES} keeps depth in [{NEAR}, {FAR}]"
    )


def build_scene(seed: int, split: str, index: int, views_per_scene: int = 16, image_size: int = 64) -> Scene:
    """The :class:`~.scene.Scene` (geometry, textures, cameras) behind scene ``index``
    of ``split`` in a dataset generated with these arguments, for ray casting
    beyond what the chunks store."""
    return _scene_and_rng(seed, split, index, views_per_scene, image_size)[0]


def generate_scene(
    seed: int,
    split: str,
    index: int,
    views_per_scene: int = 16,
    image_size: int = 64,
    supersample: int = 2,
    store_depth: bool = True,
    num_target_views: int = 3,
) -> tuple[dict, dict | None, float | None]:
    """Render scene ``index`` of ``split`` and return ``(chunk entry, evaluation
    entry or None, context overlap or None)``; the evaluation entry is made for
    the test split only."""
    scene, rng, eval_seq = _scene_and_rng(seed, split, index, views_per_scene, image_size)
    images, depths, rows = [], [], []
    for cam in scene.cameras:
        color, depth = render_view(scene, cam, supersample)
        if not (depth.min() > NEAR and depth.max() < FAR):
            raise RuntimeError(
                f"scene {index} of {split}: depth range [{depth.min():.3f}, {depth.max():.3f}] leaves [{NEAR}, {FAR}]"
            )
        images.append(encode_image(color))
        depths.append(depth)
        w2c = cam.world_to_camera()
        rows.append(np.concatenate([np.array(cam.normalized_intrinsics()), [0.0, 0.0], w2c[:3].reshape(-1)]))
    cameras = torch.from_numpy(np.stack(rows)).to(torch.float32)
    base_time = int(rng.integers(0, 10**9)) * 1000
    entry = {
        "key": scene_key(seed, split, index),
        "url": f"procedural://difftto/diff3r/{split}/{index}?seed={seed}",
        "timestamps": torch.arange(views_per_scene, dtype=torch.int64) * _FRAME_US + base_time,
        "cameras": cameras,
        "images": images,
        "sources": scene.sources,
    }
    depth_t = torch.from_numpy(np.stack(depths))
    if store_depth:
        entry["depths"] = depth_t.to(torch.float16)
    if split != "test":
        return entry, None, None
    intr = torch.stack([torch.from_numpy(np.array(c.intrinsics())) for c in scene.cameras])
    c2w = torch.stack([torch.from_numpy(c.camera_to_world()) for c in scene.cameras])
    ev, overlap = choose_evaluation_views(depth_t, intr, c2w, np.random.default_rng(eval_seq), num_target_views)
    return entry, ev, overlap


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run with ``n`` torch threads: the tensors here are tiny, and on a busy machine
    OpenMP threads spinning against other processes make small ops 1000x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _generate_one(args: tuple) -> bytes:
    # Pickled here and unpickled by the caller in every case, so that the object
    # graph torch.save sees (and the bytes it writes) does not depend on `workers`.
    with _torch_threads(1):
        return pickle.dumps(generate_scene(*args), protocol=pickle.HIGHEST_PROTOCOL)


def generate_dataset(
    root: str | os.PathLike,
    n_train: int,
    n_test: int,
    views_per_scene: int = 16,
    image_size: int = 64,
    seed: int = 0,
    *,
    scenes_per_chunk: int = 32,
    supersample: int = 2,
    store_depth: bool = True,
    num_target_views: int = 3,
    workers: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write a procedural dataset under ``root`` (layout in the module docstring)
    and return ``root``.

    ``views_per_scene`` frames of ``image_size x image_size`` pixels per scene,
    rendered with ``supersample**2`` rays per pixel (depth: the center ray).
    If ``root/meta.json`` records the same configuration the call returns at
    once; a different one is replaced only with ``overwrite=True``. ``workers``
    > 1 renders scenes in parallel processes (same bytes as ``workers=1``)."""
    root = Path(root)
    if views_per_scene < num_target_views + 2:
        raise ValueError(
            f"views_per_scene: expected >= num_target_views + 2 = {num_target_views + 2}, got {views_per_scene}"
        )
    if n_train < 0 or n_test < 0 or image_size < 4 or scenes_per_chunk < 1:
        raise ValueError(
            f"n_train={n_train}, n_test={n_test}, image_size={image_size}, "
            f"scenes_per_chunk={scenes_per_chunk}: expected n >= 0, image_size >= 4, "
            "scenes_per_chunk >= 1"
        )
    config = {
        "generator_version": GENERATOR_VERSION,
        "n_train": n_train,
        "n_test": n_test,
        "views_per_scene": views_per_scene,
        "image_size": image_size,
        "seed": seed,
        "scenes_per_chunk": scenes_per_chunk,
        "supersample": supersample,
        "store_depth": store_depth,
        "num_target_views": num_target_views,
    }
    meta_path = root / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old.get("config") == config:
            return root
        if not overwrite:
            raise FileExistsError(
                f"{meta_path}: holds a dataset generated with {old.get('config')}; pass "
                "overwrite=True (--overwrite) to replace it"
            )
    for split in ("train", "test"):
        folder = root / split
        if folder.is_dir() and any(folder.glob("*.torch")):
            if not meta_path.is_file():
                raise FileExistsError(
                    f"{folder}: holds chunk files that the generator did not write (no "
                    f"{meta_path}); refusing to overwrite"
                )
            for f in folder.glob("*.torch"):
                f.unlink()
    if meta_path.is_file():
        meta_path.unlink()
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    evaluation, overlaps = {}, {}
    for split, count in (("train", n_train), ("test", n_test)):
        folder = root / split
        folder.mkdir(exist_ok=True)
        jobs = [
            (seed, split, i, views_per_scene, image_size, supersample, store_depth, num_target_views)
            for i in range(count)
        ]
        if workers > 1 and count > 1:
            # spawn: forked children of a process that ran OpenMP can deadlock in torch
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                results = list(pool.map(_generate_one, jobs, chunksize=4))
            results = [pickle.loads(r) for r in results]
        else:
            results = [pickle.loads(_generate_one(job)) for job in jobs]
        index = {}
        for c in range(0, count, scenes_per_chunk):
            name = f"{c // scenes_per_chunk:06d}.torch"
            part = results[c : c + scenes_per_chunk]
            write_chunk(folder / name, [r[0] for r in part])
            for entry, ev, overlap in part:
                index[entry["key"]] = name
                if ev is not None:
                    evaluation[entry["key"]] = ev
                    overlaps[entry["key"]] = round(overlap, 4)
        write_index(folder / "index.json", index)
    write_evaluation_index(root / "evaluation_index.json", evaluation)
    meta = {
        "config": config,
        "near": NEAR,
        "far": FAR,
        "depth": "z-depth (camera z), float16, key 'depths'" if store_depth else None,
        "photos": {"train": list(TRAIN_PHOTOS), "test": list(TEST_PHOTOS)},
        "evaluation_overlap": dict(sorted(overlaps.items())),
        "seconds": round(time.perf_counter() - start, 2),
    }
    # meta.json last: its presence marks a complete dataset.
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return root


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--views", type=int, default=16, help="views per scene")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenes-per-chunk", type=int, default=32)
    parser.add_argument("--supersample", type=int, default=2)
    parser.add_argument("--no-depth", action="store_true", help="do not store depth maps")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    root = generate_dataset(
        args.root,
        args.n_train,
        args.n_test,
        args.views,
        args.image_size,
        args.seed,
        scenes_per_chunk=args.scenes_per_chunk,
        supersample=args.supersample,
        store_depth=not args.no_depth,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    print(json.dumps({"root": str(root), "seconds": round(time.perf_counter() - start, 2)}))


if __name__ == "__main__":
    main()
