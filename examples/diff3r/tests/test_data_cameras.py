"""Camera conventions of the Diff3R data: laws of the conversions (hypothesis) and
agreement of the loaded cameras with the generator's own projection."""


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.diff3r.data import (
    build_scene,
    cameras_to_matrices,
    generate_dataset,
    invert_rigid,
    load_scene,
    matrices_to_cameras,
    normalized_to_pixel_intrinsics,
    pixel_rays,
    pixel_to_normalized_intrinsics,
    project_points,
    read_index,
    rescale_and_crop,
    unproject_depth,
    zdepth_to_distance,
)
from examples.diff3r.data.scene import render_view, rotation_from_euler

SEED, VIEWS, SIZE = 3, 6, 24


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("cams")
    generate_dataset(root, 2, 1, VIEWS, SIZE, SEED, supersample=1)
    return root


def _rotation(q):
    q = np.asarray(q, dtype=np.float64)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


finite = st.floats(-10, 10, allow_nan=False)
quats = st.tuples(*[st.floats(-1, 1) for _ in range(4)]).filter(lambda q: sum(c * c for c in q) > 0.1)
focal = st.floats(0.2, 3.0)
center = st.floats(0.2, 0.8)
sizes = st.integers(8, 96)


def _k(fx, fy, cx, cy):
    return torch.tensor([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]], dtype=torch.float64)


def _pose(q, t):
    out = torch.eye(4, dtype=torch.float64)
    out[:3, :3] = torch.from_numpy(_rotation(q))
    out[:3, 3] = torch.tensor(t, dtype=torch.float64)
    return out


@settings(max_examples=30, deadline=None)
@given(focal, focal, center, center, sizes, sizes)
def test_intrinsics_normalized_pixel_round_trip(fx, fy, cx, cy, h, w):
    k = _k(fx, fy, cx, cy)
    px = normalized_to_pixel_intrinsics(k, h, w)
    assert torch.allclose(px[0], k[0] * w) and torch.allclose(px[1], k[1] * h)
    assert torch.equal(px[2], k[2])
    assert torch.allclose(pixel_to_normalized_intrinsics(px, h, w), k, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(quats, st.tuples(finite, finite, finite))
def test_invert_rigid_is_inverse(q, t):
    w2c = _pose(q, t)
    c2w = invert_rigid(w2c)
    eye = torch.eye(4, dtype=torch.float64)
    assert torch.allclose(c2w @ w2c, eye, atol=1e-9)
    assert torch.allclose(w2c @ c2w, eye, atol=1e-9)
    assert torch.allclose(invert_rigid(c2w), w2c, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(focal, focal, center, center, quats, st.tuples(finite, finite, finite))
def test_camera_rows_round_trip(fx, fy, cx, cy, q, t):
    k, w2c = _k(fx, fy, cx, cy), _pose(q, t)
    row = matrices_to_cameras(k[None], w2c[None])
    assert row.shape == (1, 18)
    assert row[0, 4] == 0 and row[0, 5] == 0
    assert torch.allclose(row[0, 6:], w2c[:3].reshape(-1))
    k2, w2c2 = cameras_to_matrices(row)
    assert torch.allclose(k2[0], k) and torch.allclose(w2c2[0], w2c)


@settings(max_examples=30, deadline=None)
@given(
    focal,
    focal,
    center,
    center,
    sizes,
    sizes,
    sizes,
    sizes,
    st.tuples(st.floats(-1, 1), st.floats(-1, 1), st.floats(1, 5)),
)
def test_rescale_and_crop_moves_projections_with_the_pixels(fx, fy, cx, cy, h, w, ho, wo, p):
    """A point at continuous pixel (u, v) lands at (u * Ws/W - left, v * Hs/H - top)."""
    k = _k(fx, fy, cx, cy)[None]
    images = torch.zeros(1, 3, h, w, dtype=torch.float64)
    out, k2, _ = rescale_and_crop(images, k, (ho, wo))
    assert out.shape == (1, 3, ho, wo)
    scale = max(ho / h, wo / w)
    hs, ws = max(ho, round(h * scale)), max(wo, round(w * scale))
    top, left = (hs - ho) // 2, (ws - wo) // 2
    point = torch.tensor([p], dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)
    uv, _ = project_points(point, eye, normalized_to_pixel_intrinsics(k[0], h, w))
    uv2, _ = project_points(point, eye, normalized_to_pixel_intrinsics(k2[0], ho, wo))
    expected = torch.stack([uv[0, 0] * ws / w - left, uv[0, 1] * hs / h - top])
    assert torch.allclose(uv2[0], expected, atol=1e-9)


def test_rotation_from_euler_axes():
    r = rotation_from_euler(0.0, 0.0)
    # camera z (forward) = world +z, camera y (down) = world -y, right-handed
    assert np.allclose(r[:, 2], [0, 0, 1]) and np.allclose(r[:, 1], [0, -1, 0])
    assert np.isclose(np.linalg.det(r), 1.0)
    up = rotation_from_euler(0.0, 0.3)
    assert up[1, 2] > 0  # positive pitch looks up
    left = rotation_from_euler(0.3, 0.0)
    assert left[0, 2] > 0  # positive yaw turns the view towards +x


def test_loaded_cameras_project_like_the_generator(dataset):
    """Project known 3-D points with the chunk's cameras and with the generator's."""
    key = sorted(read_index(dataset / "train" / "index.json"))[0]
    index = [i for i in range(2) if _key(i) == key][0]
    scene = build_scene(SEED, "train", index, VIEWS, SIZE)
    views = load_scene(dataset / "train", key)
    assert views.images.shape == (VIEWS, 3, SIZE, SIZE)
    rng = np.random.default_rng(0)
    points = np.concatenate([np.stack([p.center for p in scene.primitives[1:]]), rng.uniform(-2, 2, (20, 3))])
    for v, cam in enumerate(scene.cameras):
        uv_gen, z_gen = cam.project(points)
        uv, z = project_points(torch.from_numpy(points), views.w2c[v].double(), views.intrinsics_px[v].double())
        front = z_gen > 0.1
        assert np.allclose(z.numpy(), z_gen, atol=1e-4)
        assert np.allclose(uv.numpy()[front], uv_gen[front], atol=1e-3)
        assert torch.allclose(views.c2w[v].double(), torch.from_numpy(cam.camera_to_world()), atol=1e-5)


def test_depth_is_consistent_with_the_cameras(dataset):
    """Depth unprojected with the loaded cameras lies on the scene's surfaces: it
    projects back to the pixel centers, its own ray hits it, and other views' rays
    towards it never pass it (they hit it, or an occluder before it)."""
    key = sorted(read_index(dataset / "train" / "index.json"))[1]
    index = [i for i in range(2) if _key(i) == key][0]
    scene = build_scene(SEED, "train", index, VIEWS, SIZE)
    views = load_scene(dataset / "train", key)
    a, b = 0, VIEWS - 1
    _, depth = render_view(scene, scene.cameras[a], supersample=1)
    depth = torch.from_numpy(depth).double()
    # stored float16 depth matches the exact depth
    assert torch.allclose(views.depths[a].double(), depth, rtol=1e-3)
    k, c2w = views.intrinsics_px.double(), views.c2w.double()
    points = unproject_depth(depth, k[a], c2w[a]).reshape(-1, 3)
    uv, z = project_points(points, views.w2c[a].double(), k[a])
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    centers = torch.stack([cols, rows], -1).reshape(-1, 2).double() + 0.5
    assert torch.allclose(uv, centers, atol=1e-3)
    assert torch.allclose(z, depth.reshape(-1), rtol=1e-5)
    # distance along the ray from z-depth
    dist = zdepth_to_distance(depth, k[a]).reshape(-1)
    assert torch.allclose((points - c2w[a, :3, 3]).norm(dim=-1), dist, rtol=1e-5)
    for view in (a, b):
        origin = c2w[view, :3, 3].numpy()
        to_point = points.numpy() - origin
        dist = np.linalg.norm(to_point, axis=-1)
        t, _ = scene.cast(origin, to_point / dist[:, None])
        tol = 2e-3 * dist
        assert np.all(t <= dist + tol)
        seen = np.abs(t - dist) <= tol
        if view == a:
            assert seen.all()
        else:
            assert seen.mean() > 0.3, seen.mean()


def test_pixel_rays_have_unit_camera_z():
    k = _k(30.0, 30.0, 8.0, 8.0)
    c2w = _pose((1, 0.2, -0.1, 0.3), (1, 2, 3))
    origins, dirs = pixel_rays(k, c2w, 16, 16)
    cam = dirs @ c2w[:3, :3]  # rotate back to camera axes
    assert torch.allclose(cam[..., 2], torch.ones(16, 16, dtype=torch.float64))
    assert torch.allclose(origins, c2w[:3, 3].expand(16, 16, 3))


def _key(i):
    from examples.diff3r.data import scene_key

    return scene_key(SEED, "train", i)
