"""Procedural multi-view scenes with exact color and depth by analytic ray casting.

A scene is a textured room (an axis-aligned box seen from inside) holding a few
objects: oriented boxes, spheres and rectangular panels (free-standing or hung
on a wall). Surfaces carry photo crops or procedural patterns
(:mod:`.textures`) and view-independent Lambertian shading, so a pixel's color
does not depend on the viewpoint (what SH degree 0 Gaussians can represent).

World frame: y up, metres. Cameras use OpenCV axes (x right, y down, z forward)
and the pixel conventions of :mod:`.cameras`. Everything here is numpy float64.

Camera trajectories imitate RealEstate10K clips: a smooth walk of 0.5-1.6 m,
forward, sideways or diagonal, while the heading turns by a few degrees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .textures import PROCEDURAL, photo_texture, procedural_texture, sample_texture, split_photos

__all__ = [
    "PinholeCamera",
    "Primitive",
    "Scene",
    "render_view",
    "rotation_from_euler",
    "sample_scene",
    "sample_trajectory",
]

_EPS = 1e-6


def rotation_from_euler(yaw: float, pitch: float, roll: float = 0.0) -> np.ndarray:
    """Camera-to-world rotation ``[3, 3]`` of an OpenCV camera in the y-up world.

    ``yaw`` turns the heading about world +y (yaw 0 looks along world +z),
    ``pitch`` > 0 looks up, ``roll`` turns about the optical axis; radians.
    Columns are the camera x (right), y (down) and z (forward) axes in world
    coordinates."""
    base = np.diag([-1.0, -1.0, 1.0])  # x right = -X, y down = -Y, z forward = +Z
    cy, sy = np.cos(yaw), np.sin(yaw)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cr, sr = np.cos(roll), np.sin(roll)
    r_yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_pitch = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])  # about world X, > 0 up
    r_roll = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])  # about camera z
    return r_yaw @ r_pitch @ base @ r_roll


@dataclass(frozen=True)
class PinholeCamera:
    """A pinhole camera: pixel intrinsics, image size, pose (camera-to-world).

    ``rotation [3, 3]`` has the camera axes (x right, y down, z forward) as
    columns in world coordinates; ``position [3]`` is the camera center."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    rotation: np.ndarray
    position: np.ndarray

    def intrinsics(self) -> np.ndarray:
        """Pixel intrinsics ``[3, 3]``."""
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1.0]])

    def normalized_intrinsics(self) -> tuple[float, float, float, float]:
        """``(fx / W, fy / H, cx / W, cy / H)`` as stored in RE10K camera rows."""
        return (self.fx / self.width, self.fy / self.height, self.cx / self.width, self.cy / self.height)

    def world_to_camera(self) -> np.ndarray:
        """World-to-camera matrix ``[4, 4]``."""
        out = np.eye(4)
        out[:3, :3] = self.rotation.T
        out[:3, 3] = -self.rotation.T @ self.position
        return out

    def camera_to_world(self) -> np.ndarray:
        """Camera-to-world matrix ``[4, 4]``."""
        out = np.eye(4)
        out[:3, :3] = self.rotation
        out[:3, 3] = self.position
        return out

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points ``[N, 3]`` -> continuous pixel coordinates ``[N, 2]`` and z-depth ``[N]``."""
        cam = (np.asarray(points, dtype=np.float64) - self.position) @ self.rotation
        z = cam[:, 2]
        u = self.fx * cam[:, 0] / z + self.cx
        v = self.fy * cam[:, 1] / z + self.cy
        return np.stack([u, v], axis=-1), z

    def rays(self, supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Unit ray directions ``[H*s, W*s, 3]`` through ``s x s`` sub-pixel centers
        (pixel centers for ``s = 1``) and their camera-z component ``[H*s, W*s]``."""
        s = supersample
        offsets = (np.arange(s) + 0.5) / s
        u = (np.arange(self.width)[:, None] + offsets[None, :]).reshape(-1)
        v = (np.arange(self.height)[:, None] + offsets[None, :]).reshape(-1)
        vv, uu = np.meshgrid(v, u, indexing="ij")
        cam = np.stack([(uu - self.cx) / self.fx, (vv - self.cy) / self.fy, np.ones_like(uu)], axis=-1)
        norm = np.linalg.norm(cam, axis=-1, keepdims=True)
        cam = cam / norm
        return cam @ self.rotation.T, cam[..., 2]


@dataclass
class Primitive:
    """A textured surface.

    ``kind``: "room" (box seen from inside, one texture per face), "box",
    "sphere" or "panel" (two-sided rectangle in the local xy plane).
    ``center [3]``, ``rotation [3, 3]`` (local axes as columns in world),
    ``half [3]`` half extents (sphere: radius in ``half[0]``),
    ``textures``: one texture (six for a room, ordered -x, +x, -y, +y, -z, +z),
    ``tile``: metres per texture repeat (None stretches the texture once over a
    panel), ``names``: texture source names."""

    kind: str
    center: np.ndarray
    rotation: np.ndarray
    half: np.ndarray
    textures: list[np.ndarray]
    names: list[str]
    tile: float | None = 1.0

    def _local(self, origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # origins may be one point [3] shared by all rays: transform it once.
        o = (np.asarray(origins, dtype=np.float64) - self.center) @ self.rotation
        d = dirs @ self.rotation
        return np.broadcast_to(o, d.shape), d

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """Ray parameter ``t [N]`` of the first hit along unit ``dirs [N, 3]``
        from ``origins [N, 3]`` (``inf`` where the ray misses)."""
        o, d = self._local(origins, dirs)
        if self.kind in ("room", "box"):
            with np.errstate(divide="ignore", invalid="ignore"):
                inv = 1.0 / d
                t1 = (-self.half - o) * inv
                t2 = (self.half - o) * inv
            t1 = np.nan_to_num(t1, nan=-np.inf)
            t2 = np.nan_to_num(t2, nan=np.inf)
            lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
            t_near = np.maximum(np.maximum(lo[:, 0], lo[:, 1]), lo[:, 2])
            t_far = np.minimum(np.minimum(hi[:, 0], hi[:, 1]), hi[:, 2])
            hit = t_near <= t_far
            t = t_far if self.kind == "room" else t_near
            return np.where(hit & (t > _EPS), t, np.inf)
        if self.kind == "sphere":
            r = self.half[0]
            b = d @ o[0] if o.strides[0] == 0 else np.einsum("ij,ij->i", o, d)
            c = (o[0] @ o[0] if o.strides[0] == 0 else np.einsum("ij,ij->i", o, o)) - r * r
            disc = b * b - c
            sq = np.sqrt(np.maximum(disc, 0.0))
            t = -b - sq
            return np.where((disc >= 0) & (t > _EPS), t, np.inf)
        if self.kind == "panel":
            with np.errstate(divide="ignore", invalid="ignore"):
                t = -o[:, 2] / d[:, 2]
            p = o + t[:, None] * d
            inside = (np.abs(p[:, 0]) <= self.half[0]) & (np.abs(p[:, 1]) <= self.half[1])
            return np.where(inside & (t > _EPS) & np.isfinite(t), t, np.inf)
        raise ValueError(f"primitive kind: unknown {self.kind!r}")

    def shade(self, points: np.ndarray, light: np.ndarray, ambient: float) -> np.ndarray:
        """Colors ``[N, 3]`` of surface points ``[N, 3]`` (world) under a directional
        ``light [3]`` (unit, pointing towards the light)."""
        p = (points - self.center) @ self.rotation
        if self.kind in ("room", "box"):
            ratio = np.abs(p) / self.half
            axis = np.argmax(ratio, axis=-1)
            sign = np.sign(p[np.arange(len(p)), axis])
            color = np.zeros((len(p), 3))
            normal_local = np.zeros((len(p), 3))
            normal_local[np.arange(len(p)), axis] = sign
            if self.kind == "room":
                normal_local = -normal_local
            # texture axes per face axis: (u axis, v axis, v flipped); v runs downwards on walls
            layout = {0: (2, 1, True), 1: (0, 2, False), 2: (0, 1, True)}
            for a, (ua, va, flip) in layout.items():
                for s_idx, s in enumerate((-1.0, 1.0)):
                    sel = (axis == a) & (sign == s)
                    if not sel.any():
                        continue
                    face = 2 * a + s_idx
                    tex = self.textures[face if self.kind == "room" else 0]
                    u = (p[sel, ua] + self.half[ua]) / self.tile
                    v = (self.half[va] - p[sel, va]) if flip else (p[sel, va] + self.half[va])
                    color[sel] = sample_texture(tex, u, v / self.tile)
        elif self.kind == "sphere":
            r = self.half[0]
            n = p / np.linalg.norm(p, axis=-1, keepdims=True)
            normal_local = n
            reps = 2 * max(1, round(np.pi * r / self.tile))
            u = (np.arctan2(n[:, 0], n[:, 2]) / (2 * np.pi) + 0.5) * reps
            v = np.arccos(np.clip(n[:, 1], -1, 1)) / np.pi * (reps / 2)
            color = sample_texture(self.textures[0], u, v)
        elif self.kind == "panel":
            normal_local = np.zeros((len(p), 3))
            normal_local[:, 2] = 1.0
            if self.tile is None:
                u = (p[:, 0] + self.half[0]) / (2 * self.half[0])
                v = (self.half[1] - p[:, 1]) / (2 * self.half[1])
            else:
                u = (p[:, 0] + self.half[0]) / self.tile
                v = (self.half[1] - p[:, 1]) / self.tile
            color = sample_texture(self.textures[0], u, v)
        else:
            raise ValueError(f"primitive kind: unknown {self.kind!r}")
        normal = normal_local @ self.rotation.T
        lambert = normal @ light
        if self.kind == "panel":  # two-sided, view independent
            lambert = np.abs(lambert)
        diffuse = ambient + (1 - ambient) * np.clip(lambert, 0.0, 1.0)
        return color * diffuse[:, None]


@dataclass
class Scene:
    """A room with objects, a light, and the cameras of one trajectory."""

    primitives: list[Primitive]
    light: np.ndarray
    ambient: float
    cameras: list[PinholeCamera] = field(default_factory=list)

    @property
    def sources(self) -> list[str]:
        """Names of all texture sources (photographs and procedural patterns)."""
        return [n for p in self.primitives for n in p.names]

    def cast(self, origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First hits of rays from ``origins`` (``[N, 3]`` or one point ``[3]``) along
        unit ``dirs [N, 3]``: ray parameter ``t [N]``
        (the distance; ``inf`` on a miss) and primitive index ``[N]`` (-1 on a miss)."""
        best = np.full(len(dirs), np.inf)
        index = np.full(len(dirs), -1, dtype=np.int64)
        for i, prim in enumerate(self.primitives):
            t = prim.intersect(origins, dirs)
            closer = t < best
            best = np.where(closer, t, best)
            index = np.where(closer, i, index)
        return best, index

    def shade(self, origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Colors ``[N, 3]`` and hit distances ``[N]`` of rays ``[N, 3]``."""
        t, index = self.cast(origins, dirs)
        if (index < 0).any():
            raise RuntimeError(f"{int((index < 0).sum())} rays left the room; camera outside?")
        points = np.asarray(origins, dtype=np.float64) + t[:, None] * dirs
        color = np.zeros((len(dirs), 3))
        for i, prim in enumerate(self.primitives):
            sel = index == i
            if sel.any():
                color[sel] = prim.shade(points[sel], self.light, self.ambient)
        return np.clip(color, 0.0, 1.0), t


def render_view(scene: Scene, camera: PinholeCamera, supersample: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Render ``camera``: color ``[H, W, 3]`` float32 in [0, 1] (mean of
    ``supersample**2`` sub-pixel rays) and exact z-depth ``[H, W]`` float32 of the
    surface seen through each pixel center."""
    h, w = camera.height, camera.width
    s = int(supersample)
    if s < 1:
        raise ValueError(f"supersample: expected an int >= 1, got {supersample!r}")
    dirs, _ = camera.rays(s)
    color, _ = scene.shade(camera.position, dirs.reshape(-1, 3))
    color = color.reshape(h, s, w, s, 3).mean(axis=(1, 3))
    center_dirs, center_z = camera.rays(1)
    t, _ = scene.cast(camera.position, center_dirs.reshape(-1, 3))
    depth = t.reshape(h, w) * center_z
    return color.astype(np.float32), depth.astype(np.float32)


def _texture(rng: np.random.Generator, photos: tuple[str, ...], p_photo: float, size: int):
    if rng.random() < p_photo:
        name = photos[int(rng.integers(len(photos)))]
        return photo_texture(name, rng, size), name
    kind = PROCEDURAL[int(rng.integers(len(PROCEDURAL)))]
    return procedural_texture(kind, rng, size), f"procedural:{kind}"


def sample_trajectory(
    rng: np.random.Generator,
    room_half: np.ndarray,
    num_views: int,
    width: int,
    height: int,
) -> list[PinholeCamera]:
    """RE10K-like camera path inside a room with half extents ``room_half [3]``
    (centered at the origin, y up): ``num_views`` cameras along a smooth walk of
    0.5-1.6 m (forward, sideways or diagonal) with a few degrees of turning."""
    hx, hy, hz = room_half
    fx_norm = rng.uniform(0.75, 1.05)
    fx, fy = fx_norm * width, fx_norm * height
    cx, cy = width / 2, height / 2
    start = np.array(
        [
            rng.uniform(-0.35, 0.35) * hx,
            -hy + rng.uniform(1.1, min(1.7, 2 * hy - 0.6)),
            -hz + rng.uniform(0.4, 0.35 * hz),
        ]
    )
    yaw0 = rng.uniform(-0.4, 0.4)
    pitch0 = rng.uniform(-0.12, 0.06)
    mode = rng.choice(["forward", "lateral", "diagonal"])
    angle = {
        "forward": rng.uniform(-0.3, 0.3),
        "lateral": rng.choice([-1, 1]) * rng.uniform(1.2, 1.75),
        "diagonal": rng.choice([-1, 1]) * rng.uniform(0.5, 1.1),
    }[str(mode)]
    length = rng.uniform(0.5, 1.6)
    heading = yaw0 + angle
    # Displacement in the y-up world: yaw 0 looks along +z and the camera's right is -x.
    direction = np.array([np.sin(heading), 0.0, np.cos(heading)])
    direction[1] = rng.uniform(-0.08, 0.08)
    direction /= np.linalg.norm(direction)
    bend = rng.uniform(-0.15, 0.15) * length  # sideways bow of the path
    side = np.array([direction[2], 0.0, -direction[0]])
    dyaw = rng.uniform(-0.15, 0.15)  # total turn, up to ~9 degrees
    dpitch = rng.uniform(-0.05, 0.05)
    roll = rng.uniform(-0.03, 0.03)
    wobble = rng.uniform(0, 2 * np.pi, size=2)
    cams = []
    for k in range(num_views):
        s = k / max(num_views - 1, 1)
        pos = start + direction * length * s + side * bend * 4 * s * (1 - s)
        pos[0] = np.clip(pos[0], -hx + 0.5, hx - 0.5)
        pos[1] = np.clip(pos[1], -hy + 0.5, hy - 0.5)
        pos[2] = np.clip(pos[2], -hz + 0.3, hz - 0.5)
        yaw = yaw0 + dyaw * s + 0.01 * np.sin(2 * np.pi * s + wobble[0])
        pitch = pitch0 + dpitch * s + 0.005 * np.sin(2 * np.pi * s + wobble[1])
        cams.append(PinholeCamera(fx, fy, cx, cy, width, height, rotation_from_euler(yaw, pitch, roll), pos))
    return cams


def _facing(yaw: float, pitch: float) -> np.ndarray:
    """Panel frame (x right, y up, z normal towards the viewer) that a camera with
    heading ``yaw`` and ``pitch`` sees upright."""
    return rotation_from_euler(yaw, pitch) @ np.diag([1.0, -1.0, -1.0])


def _distance_to_path(point: np.ndarray, positions: np.ndarray) -> float:
    return float(np.linalg.norm(positions - point, axis=-1).min())


def sample_scene(
    rng: np.random.Generator,
    split: str,
    num_views: int,
    width: int,
    height: int | None = None,
    texture_size: int = 128,
    p_photo: float = 0.65,
) -> Scene:
    """Sample a room, 3-7 objects, a light and a camera trajectory of ``num_views``
    cameras. Textures come from the photographs of ``split`` ("train"/"test")
    with probability ``p_photo``, otherwise from procedural patterns."""
    height = width if height is None else height
    photos = split_photos(split)
    room_half = np.array([rng.uniform(2.0, 3.5), rng.uniform(1.2, 1.7), rng.uniform(3.0, 5.0)])
    room_tex, room_names = [], []
    for _ in range(6):
        tex, name = _texture(rng, photos, p_photo, texture_size)
        room_tex.append(tex)
        room_names.append(name)
    prims = [Primitive("room", np.zeros(3), np.eye(3), room_half, room_tex, room_names, tile=rng.uniform(1.2, 2.5))]
    cams = sample_trajectory(rng, room_half, num_views, width, height)
    positions = np.stack([c.position for c in cams])
    mid = positions.mean(axis=0)
    heading = np.mean([c.rotation[:, 2] for c in cams], axis=0)
    heading[1] = 0
    heading /= np.linalg.norm(heading)
    lateral = np.array([heading[2], 0.0, -heading[0]])
    floor = -room_half[1]
    n_objects = int(rng.integers(3, 8))
    placed = 0
    for _ in range(60):
        if placed >= n_objects:
            break
        kind = str(rng.choice(["box", "sphere", "panel", "wall_panel"], p=[0.35, 0.3, 0.2, 0.15]))
        tex, name = _texture(rng, photos, p_photo, texture_size)
        if kind == "wall_panel":
            # A picture hung on the far or a side wall.
            wall = int(rng.integers(3))
            w_half = rng.uniform(0.4, 1.0)
            h_half = rng.uniform(0.3, 0.7)
            y = rng.uniform(floor + 0.9, room_half[1] - 0.3 - h_half)
            if wall == 0:
                center = np.array([rng.uniform(-1, 1) * (room_half[0] - w_half - 0.1), y, room_half[2] - 0.02])
                view_yaw = 0.0
            else:
                sx = -1.0 if wall == 1 else 1.0
                center = np.array(
                    [sx * (room_half[0] - 0.02), y, rng.uniform(-0.2, 0.8) * (room_half[2] - w_half - 0.1)]
                )
                view_yaw = sx * np.pi / 2
            rot = _facing(view_yaw, 0.0)
            prims.append(Primitive("panel", center, rot, np.array([w_half, h_half, 0.0]), [tex], [name], tile=None))
            placed += 1
            continue
        forward = rng.uniform(1.3, 5.0)
        side = rng.uniform(-1.6, 1.6)
        center = mid + heading * forward + lateral * side
        yaw = rng.uniform(0, 2 * np.pi)
        rot = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
        if kind == "box":
            half = rng.uniform([0.2, 0.2, 0.2], [0.7, 0.8, 0.7])
            on_floor = rng.random() < 0.7
            center[1] = floor + half[1] if on_floor else rng.uniform(floor + 0.8, 0.6)
            radius = float(np.linalg.norm(half))
            tile = rng.uniform(0.6, 1.5)
        elif kind == "sphere":
            r = rng.uniform(0.2, 0.6)
            half = np.array([r, r, r])
            on_floor = rng.random() < 0.6
            center[1] = floor + r if on_floor else rng.uniform(floor + 0.8, 0.6)
            radius = r
            tile = rng.uniform(0.5, 1.2)
        else:  # free-standing panel, slightly tilted, facing the cameras roughly
            half = np.array([rng.uniform(0.3, 0.9), rng.uniform(0.3, 0.8), 0.0])
            center[1] = rng.uniform(floor + half[1] + 0.05, 0.8)
            yaw = np.arctan2(heading[0], heading[2]) + rng.uniform(-0.7, 0.7)
            rot = _facing(yaw, rng.uniform(-0.2, 0.2))
            radius = float(np.linalg.norm(half))
            tile = None
        inside = np.all(np.abs(center) + radius < room_half + 1e-9)
        clear = _distance_to_path(center, positions) > radius + 0.6
        if not (inside and clear):
            continue
        prims.append(Primitive(kind, center, rot, half, [tex], [name], tile=tile))
        placed += 1
    light = np.array([rng.uniform(-0.6, 0.6), 1.0, rng.uniform(-0.6, 0.6)])
    light /= np.linalg.norm(light)
    return Scene(prims, light, float(rng.uniform(0.5, 0.7)), cams)
