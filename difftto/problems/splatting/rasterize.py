"""``rasterize``: render batched 3D Gaussians into several cameras.

Three backends behind one call:

- ``"torch"``: a pure-PyTorch tile rasterizer (any device). Differentiable in
  reverse mode, forward mode (``torch.func.jvp``) and to higher order, so it gives
  ``J·v`` for Gauss-Newton products.
- ``"gsplat"``: gsplat's CUDA ``rasterization()`` (reverse mode only), for CUDA
  tensors when gsplat's kernels load.

- ``"cpu_kernels"``: compiled C++ kernels (:mod:`.cpu_kernels`, built on first use) for
  the projection and its backward (gradients reach every group and ``viewmats``), the
  binning, the compositing and its backward and forward mode, with this module's torch
  path as their tested twin. Forward mode and second order of the projection run through
  its torch twin; when ``Ks`` requires grad the projection runs in torch autograd.

``backend="auto"`` picks gsplat for CUDA tensors when it can run, the CPU kernels for
float32/float64 CPU tensors (compiling them on first use), torch otherwise; a backend
that cannot be built falls back to torch with a warning.

How the torch path works (a design measured on 2-core CPUs, see REFERENCES.md):

1. EWA projection (:mod:`.projection`), opacity-aware 3.33σ footprints.
2. Tile binning without gradient: every (image, tile, Gaussian) intersection is listed,
   sorted by depth inside each tile, and packed into a padded ``[T, K]`` index matrix
   (``T`` tiles that hold at least one Gaussian, ``K`` the largest count). Small
   4×4 tiles keep ``K`` small, which is what makes the dense per-tile math cheap.
3. Per tile, the Gaussian exponent at the ``P = tile²`` pixels is one matrix product:
   ``σ = G·Fᵀ`` with per-pair coefficients ``G [T·K, 6]`` (quadratic form in tile-local
   coordinates) and fixed pixel features ``F [P, 6] = (u², v², uv, u, v, 1)``.
4. ``α = min(0.999, o·exp(−σ))``, skipped below 1/255; front-to-back transmittance as
   an exclusive cumulative sum of ``log(1 − α)``; a pixel stops (exclusive) once its
   transmittance would drop to 1e-4 — gsplat's conventions throughout.
5. Colours and depth in one batched matmul ``wᵀ·[rgb | z]``; tiles are written back
   into the images.

The discrete decisions of steps 2 and 4 (bins, depth order, which pairs pass the
alpha threshold and the early stop) form a :class:`RasterState`. Passing a state back
(``state=``) reuses them, so the render is a smooth function of the parameters near
the point where the state was taken: ``J·v`` then matches finite differences and
products of one linear solve see one function.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .cameras import camera_centers, check_cameras
from .gaussians import Gaussians, eval_sh
from .projection import ALPHA_THRESHOLD, project_gaussians

__all__ = [
    "rasterize",
    "RenderOutput",
    "RasterState",
    "gsplat_available",
    "ALPHA_MAX",
    "TRANSMITTANCE_MIN",
    "DEFAULT_TILE_SIZE",
]

#: Alpha is clamped to this (gsplat's CUDA kernels use 0.999).
ALPHA_MAX = 0.999
#: A pixel stops compositing when its transmittance would fall to this (exclusive).
TRANSMITTANCE_MIN = 1e-4
#: 4×4 tiles were fastest on CPU (16×16 were 6–12× slower, REFERENCES.md).
DEFAULT_TILE_SIZE = 4


class RenderOutput(NamedTuple):
    """What :func:`rasterize` returns.

    Attributes:
        colors: ``[B, C, H, W, D]`` composited colours (plus background).
        alphas: ``[B, C, H, W, 1]`` accumulated opacity ``1 − T``.
        depths: ``[B, C, H, W, 1]`` expected z-depth ``Σ wᵢzᵢ / max(Σ wᵢ, 1e-10)``
            (gsplat's "ED").
        state: the :class:`RasterState` when asked for (torch backend), else ``None``.
    """

    colors: Tensor
    alphas: Tensor
    depths: Tensor
    state: RasterState | None = None


@dataclass(frozen=True, eq=False)
class RasterState:
    """The discrete structure of a render, frozen at one parameter value.

    Only the (tile, Gaussian) pairs that touched at least one pixel are kept, packed
    into groups of tiles with similar counts.

    Attributes:
        signature: ``(B, C, N, H, W, tile_size)`` it was made for.
        tile_ids: ``[T]`` int64 flat ids ``image · tiles_per_image + tile`` of the
            tiles that hold at least one pair (``image = b · C + c``), group by group.
        groups: per group ``(gauss_ids [Tg, Kg], active [Tg, Kg, P])``: flat Gaussian
            ids ``image · N + n`` front to back (padding ``B·C·N``), and the pixels each
            pair contributes to (alpha ≥ 1/255, before the pixel's early stop);
            ``P = tile_size²``.
    """

    signature: tuple[int, int, int, int, int, int]
    tile_ids: Tensor
    groups: tuple[tuple[Tensor, Tensor], ...]

    @property
    def num_pairs(self) -> int:
        """(tile, Gaussian) pairs kept, without padding."""
        pad = self.signature[0] * self.signature[1] * self.signature[2]
        return sum(int((ids < pad).sum()) for ids, _ in self.groups)

    @property
    def num_padded(self) -> int:
        """Entries of the padded matrices (the work per pixel is proportional to it)."""
        return sum(ids.numel() for ids, _ in self.groups)


# ----------------------------------------------------------------------------- backends

_GSPLAT_STATUS: dict[str, object] = {}


def gsplat_available() -> tuple[bool, str]:
    """``(True, "")`` when gsplat's CUDA rasterizer can run here, else ``(False, why)``.

    The check imports gsplat and loads its CUDA extension once (cached).
    """
    if "ok" not in _GSPLAT_STATUS:
        ok, why = False, ""
        if not torch.cuda.is_available():
            why = "CUDA is not available (torch.cuda.is_available() is False)"
        else:
            try:
                import gsplat  # noqa: F401
                from gsplat.cuda._backend import _C

                ok = _C is not None
                why = "" if ok else "gsplat's CUDA extension did not load"
            except Exception as err:  # noqa: BLE001 - any failure means "cannot run"
                why = f"gsplat could not be loaded: {type(err).__name__}: {err}"
        _GSPLAT_STATUS["ok"], _GSPLAT_STATUS["why"] = ok, why
    return bool(_GSPLAT_STATUS["ok"]), str(_GSPLAT_STATUS["why"])


_BACKENDS = ("auto", "torch", "gsplat", "cpu_kernels")
_FALLBACK_WARNED: set[str] = set()


def _choose_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be 'auto', 'torch', 'gsplat' or 'cpu_kernels', got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "cpu_kernels" or (backend == "auto" and device.type == "cpu"):
        return _choose_cpu_kernels(backend, device, dtype)
    if device.type != "cuda":
        if backend == "gsplat":
            raise RuntimeError(
                f"backend='gsplat' needs CUDA tensors, but the Gaussians are on {device}; "
                "use backend='torch' (or 'auto') on this device"
            )
        return "torch"
    ok, why = gsplat_available()
    if ok:
        return "gsplat"
    if backend == "gsplat":
        raise RuntimeError(f"backend='gsplat' cannot run: {why}")
    warnings.warn(f"gsplat unavailable ({why}); rasterize falls back to backend='torch'",
                  RuntimeWarning, stacklevel=3)
    return "torch"


def _choose_cpu_kernels(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The compiled CPU kernels (float32/float64 CPU tensors), else torch with a warning
    (once per reason) when they cannot be built."""
    from .cpu_kernels import cpu_kernels_available

    if device.type != "cpu":
        raise RuntimeError(f"backend='cpu_kernels' needs CPU tensors, but the Gaussians are on {device}")
    if dtype not in (torch.float32, torch.float64):
        if backend == "cpu_kernels":
            raise ValueError(f"backend='cpu_kernels' supports float32 and float64, got {dtype}")
        return "torch"
    ok, why = cpu_kernels_available()
    if ok:
        return "cpu_kernels"
    if why not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(why)
        warnings.warn(f"{why}; rasterize falls back to backend='torch'", RuntimeWarning, stacklevel=4)
    return "torch"


# ----------------------------------------------------------------------------- public API


def rasterize(
    gaussians: Gaussians | Mapping[str, Tensor],
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    background: Tensor | None = None,
    backend: str = "auto",
    sh_degree: int | None = None,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    tile_size: int = DEFAULT_TILE_SIZE,
    state: RasterState | None = None,
    return_state: bool = False,
) -> RenderOutput:
    """Renders ``B`` scenes of Gaussians into ``C`` cameras each.

    Args:
        gaussians: a :class:`Gaussians` or a dict of raw groups ``means [B,N,3]``,
            ``log_scales [B,N,3]``, ``quats [B,N,4]`` (wxyz), ``opacities [B,N]``
            (logits) and ``colors [B,N,D]`` or ``sh [B,N,K,3]``.
        viewmats: ``[B, C, 4, 4]`` world-to-camera (may require grad).
        Ks: ``[B, C, 3, 3]`` pixel intrinsics.
        width, height: image size in pixels (≥ 1).
        background: colour behind the Gaussians, broadcastable to ``[B, C, D]``
            (``None``: black).
        backend: ``"auto"``, ``"torch"``, ``"cpu_kernels"`` or ``"gsplat"`` (see the
            module doc).
        sh_degree: SH degree to use (default: all that ``sh`` holds).
        near_plane, far_plane: depth range of rendered Gaussians.
        eps2d: 2-D dilation in px² (0.3, as gsplat).
        tile_size: tile edge in pixels (torch backend).
        state: a :class:`RasterState` from an earlier call with the same shapes: reuse
            its bins, depth order and active pairs (torch and cpu_kernels backends).
        return_state: also return the state of this call (torch and cpu_kernels).

    Returns:
        :class:`RenderOutput` ``(colors [B,C,H,W,D], alphas [B,C,H,W,1],
        depths [B,C,H,W,1], state)``.

    Raises:
        ValueError / KeyError / TypeError: malformed inputs (the message names the
            argument, the shape received and the one expected), non-finite inputs.
        RuntimeError: ``backend="gsplat"`` where gsplat cannot run; ``"cpu_kernels"`` on
            a non-CPU device.
    """
    g = Gaussians.from_params(gaussians)
    B, C = check_cameras(viewmats, Ks, batch=g.batch)
    if not (isinstance(width, int) and isinstance(height, int)) or width < 1 or height < 1:
        raise ValueError(f"width and height must be positive ints, got {width!r} x {height!r}")
    for name, t in (("viewmats", viewmats), ("Ks", Ks)):
        if t.dtype != g.means.dtype or t.device != g.means.device:
            raise ValueError(
                f"{name} is {t.dtype} on {t.device}, but the Gaussians are {g.means.dtype} on "
                f"{g.means.device}; pass cameras in the same dtype and device"
            )
    if not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
    D = g.channels
    bg = None
    if background is not None:
        bg = torch.as_tensor(background, dtype=g.means.dtype, device=g.means.device)
        try:
            bg = bg.expand(B, C, D) if bg.dim() <= 3 else None
        except RuntimeError:
            bg = None
        if bg is None:
            raise ValueError(
                f"background has shape {tuple(torch.as_tensor(background).shape)}, expected a "
                f"shape that broadcasts to [B, C, D] = [{B}, {C}, {D}]"
            )
    g.check_finite()
    for name, t in (("viewmats", viewmats), ("Ks", Ks)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} has non-finite entries (NaN or inf)")

    chosen = _choose_backend(backend, g.means.device, g.means.dtype)
    if chosen == "cpu_kernels":
        from .cpu_kernels import render_cpu_kernels

        return render_cpu_kernels(g, viewmats, Ks, width, height, bg, sh_degree, near_plane,
                                  far_plane, eps2d, tile_size, state, return_state)
    if chosen == "gsplat":
        if state is not None or return_state:
            raise ValueError("state / return_state need backend='torch' (gsplat has no frozen "
                             "state and no forward mode)")
        return _rasterize_gsplat(g, viewmats, Ks, width, height, bg, sh_degree,
                                 near_plane, far_plane, eps2d)
    return _rasterize_torch(g, viewmats, Ks, width, height, bg, sh_degree, near_plane,
                            far_plane, eps2d, tile_size, state, return_state)


# ----------------------------------------------------------------------------- gsplat


def _rasterize_gsplat(g, viewmats, Ks, width, height, bg, sh_degree, near, far, eps2d):
    from gsplat import rasterization

    colors = g.colors if g.colors is not None else g.sh
    degree = None if g.sh is None else (g.sh_degree if sh_degree is None else sh_degree)
    # gsplat wants the quaternions in any norm, the scales and opacities activated.
    render, alphas, _ = rasterization(
        means=g.means, quats=g.quats, scales=g.scales(), opacities=g.opacity(),
        colors=colors, viewmats=viewmats, Ks=Ks, width=width, height=height,
        near_plane=near, far_plane=far, eps2d=eps2d, sh_degree=degree,
        backgrounds=bg, render_mode="RGB+ED", packed=False,
    )
    return RenderOutput(render[..., :-1], alphas, render[..., -1:], None)


# ----------------------------------------------------------------------------- torch


def _pixel_features(tile_size: int, dtype, device) -> Tensor:
    """``[P, 6]`` = ``(u², v², uv, u, v, 1)`` at pixel centres in tile coordinates."""
    j = torch.arange(tile_size * tile_size, device=device)
    u = (j % tile_size).to(dtype) + 0.5
    v = torch.div(j, tile_size, rounding_mode="floor").to(dtype) + 0.5
    return torch.stack([u * u, v * v, u * v, u, v, torch.ones_like(u)], dim=-1)


# Tiles are packed in groups of similar Gaussian counts, each padded to its own maximum
# (one padded matrix for all tiles wasted about half its entries on skewed scenes).
_GROUP_FRACTIONS = (0.35, 0.65, 0.85, 0.95)


@torch.no_grad()
def _pack(key, gauss, total_tiles, pad, active=None):
    """Packs (tile, Gaussian) entries into padded groups of tiles.

    ``key [M]`` tile ids and ``gauss [M]`` Gaussian ids, front to back within each tile
    (entries of different tiles may interleave). ``active [M, P]`` optional per-pixel
    flags that travel with the entries.

    Returns ``(tile_ids [T], groups)`` with ``groups`` a tuple of
    ``(gauss_ids [Tg, Kg], active [Tg, Kg, P] or None)`` covering ``tile_ids`` in order;
    tiles are ordered by their number of entries.
    """
    device = key.device
    counts = torch.bincount(key, minlength=total_tiles)
    tiles = torch.nonzero(counts).squeeze(1)
    tile_counts, order = torch.sort(counts[tiles], stable=True)
    tiles = tiles[order]
    n = tiles.numel()
    row_of = torch.empty(total_tiles, dtype=torch.long, device=device)
    row_of[tiles] = torch.arange(n, device=device)
    # One stable sort by row: every tile's entries become contiguous (and stay front to
    # back), and every group of rows is a contiguous slice of the entries.
    row, perm = torch.sort(row_of[key], stable=True)
    gauss = gauss[perm]
    if active is not None:
        active = active[perm]
    row_start = torch.cumsum(tile_counts, 0) - tile_counts
    pos = torch.arange(key.numel(), device=device) - row_start[row]
    cuts = sorted({0, n, *(int(n * f) for f in _GROUP_FRACTIONS)})
    cut_t = torch.tensor(cuts, device=device)
    bounds = torch.cat([row_start, tile_counts.sum().reshape(1)])[cut_t].tolist()
    widths = tile_counts[cut_t[1:] - 1].tolist()
    groups = []
    for i, k in enumerate(widths):
        a, b = cuts[i], cuts[i + 1]
        e0, e1 = bounds[i], bounds[i + 1]
        r, p = row[e0:e1] - a, pos[e0:e1]
        ids = torch.full((b - a, k), pad, dtype=torch.long, device=device)
        ids[r, p] = gauss[e0:e1]
        act = None
        if active is not None:
            act = torch.zeros(b - a, k, active.shape[1], dtype=torch.bool, device=device)
            act[r, p] = active[e0:e1]
        groups.append((ids, act))
    return tiles, tuple(groups)


@torch.no_grad()
def _bin_tiles(proj, log_opacity, B, C, N, width, height, tile_size):
    """Every (tile, Gaussian) pair where the Gaussian can reach alpha ≥ 1/255 at one of
    the tile's pixel centres, front to back → :func:`_pack`'s output.

    Candidates come from the footprint boxes (as gsplat); a pair is then kept only if
    the minimum of the Gaussian's exponent over the rectangle spanned by the tile's
    pixel centres is below the alpha threshold (exact for a convex quadratic: the
    centre if inside, else the best point of the nearest edges). This drops the box
    corners that the ellipse misses, about a third of the pairs.
    """
    device = proj.means2d.device
    I = B * C
    tw, th = math.ceil(width / tile_size), math.ceil(height / tile_size)
    n_tiles = tw * th
    m2 = proj.means2d.detach().reshape(I, N, 2)
    radii = proj.radii.reshape(I, N, 2).to(m2.dtype)
    depths = proj.depths.detach().reshape(I, N)
    valid = proj.valid.reshape(I, N)

    # Depth order inside every image; culled Gaussians go last.
    order = torch.argsort(depths.masked_fill(~valid, math.inf), dim=1, stable=True)
    m2 = torch.gather(m2, 1, order.unsqueeze(-1).expand(I, N, 2))
    radii = torch.gather(radii, 1, order.unsqueeze(-1).expand(I, N, 2))
    valid = torch.gather(valid, 1, order)
    flat_ids = (order + (torch.arange(I, device=device) * N).unsqueeze(1)).reshape(-1)

    lo = torch.floor((m2 - radii) / tile_size)
    hi = torch.ceil((m2 + radii) / tile_size)
    x0 = lo[..., 0].clamp(0, tw).long().reshape(-1)
    x1 = hi[..., 0].clamp(0, tw).long().reshape(-1)
    y0 = lo[..., 1].clamp(0, th).long().reshape(-1)
    y1 = hi[..., 1].clamp(0, th).long().reshape(-1)
    span_x = x1 - x0
    counts = span_x * (y1 - y0) * valid.reshape(-1)
    total = int(counts.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long, device=device), ()

    src = torch.repeat_interleave(torch.arange(I * N, device=device), counts, output_size=total)
    local = torch.arange(total, device=device) - (torch.cumsum(counts, 0) - counts)[src]
    w = span_x[src]
    tx = x0[src] + local % w
    ty = y0[src] + torch.div(local, w, rounding_mode="floor")
    gauss = flat_ids[src]
    keep = _reaches_tile(m2.reshape(-1, 2)[src], proj.conics.detach().reshape(-1, 3)[gauss],
                         log_opacity.detach().unsqueeze(1).expand(B, C, N).reshape(-1)[gauss],
                         tx, ty, tile_size)
    src, tx, ty, gauss = src[keep], tx[keep], ty[keep], gauss[keep]
    if src.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=device), ()
    image = torch.div(src, N, rounding_mode="floor")
    key = image * n_tiles + ty * tw + tx
    return _pack(key, gauss, I * n_tiles, I * N)


def _reaches_tile(means2d, conics, log_opacity, tx, ty, tile_size):
    """``[M]`` bool: ``min σ(p) − log o ≤ ln 255`` over the tile's pixel-centre rectangle.

    A small margin keeps the test conservative under rounding (an extra pair costs a
    little time, a missing one would change the image).
    """
    dt = means2d.dtype
    x_lo = (tx * tile_size).to(dt) + 0.5 - means2d[:, 0]
    y_lo = (ty * tile_size).to(dt) + 0.5 - means2d[:, 1]
    x_hi = x_lo + (tile_size - 1)
    y_hi = y_lo + (tile_size - 1)
    a, b, c = conics.unbind(-1)

    def q(dx, dy):
        return 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy

    best = torch.where((x_lo <= 0) & (x_hi >= 0) & (y_lo <= 0) & (y_hi >= 0), 0.0, math.inf)
    for dx in (x_lo, x_hi):  # vertical edges: minimize over dy
        dy = torch.minimum(torch.maximum(-b * dx / c, y_lo), y_hi)
        best = torch.minimum(best, q(dx, dy))
    for dy in (y_lo, y_hi):  # horizontal edges: minimize over dx
        dx = torch.minimum(torch.maximum(-b * dy / a, x_lo), x_hi)
        best = torch.minimum(best, q(dx, dy))
    threshold = log_opacity - math.log(ALPHA_THRESHOLD)
    return best <= threshold + 1e-3 * (1.0 + threshold.abs())


#: The cotangent of every compositing weight α·T is bounded to this fraction of the dtype's
#: largest value (see :class:`_BoundCotangent`).
COTANGENT_BOUND_FRACTION = 2.0**-64


class _BoundCotangent(torch.autograd.Function):
    """Identity whose backward clamps the incoming gradient to ``±bound``.

    The gradient of a compositing weight is ``⟨g, (colour, depth, 1)⟩`` per pixel. With a
    finite but huge colour (3.4e38 in float32) it and the sums it feeds (the cumulative
    transmittance backward) overflowed to ±inf, and inf − inf gave NaN geometry gradients.
    Bounded to ``finfo.max · 2⁻⁶⁴`` (1.8e19 in float32), the rest of the chain stays finite,
    while the gradients of any sane scene, far below the bound, are bit-identical. The
    compiled backward bounds the same quantity (``bound_cotangent`` in ``rasterize_cpu.cpp``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        bound = torch.finfo(grad.dtype).max * COTANGENT_BOUND_FRACTION
        return grad.clamp(-bound, bound)

    @staticmethod
    def jvp(ctx, tangent):
        return tangent


def _composite(pair, ox, oy, pix, active):
    """Front-to-back compositing of one group of tiles.

    ``pair [Tg, Kg, F]`` gathered features (means2d, conic, log-opacity, colours, depth),
    ``ox, oy [Tg]`` tile origins, ``pix [P, 6]`` pixel features, ``active`` the frozen
    ``[Tg, Kg, P]`` flags or ``None`` (thresholds applied, flags returned).
    Returns ``(out [Tg, P, D+2] = (colour, depth, alpha) sums, active)``.
    """
    Tg, Kg, F = pair.shape
    mx = pair[..., 0] - ox.unsqueeze(1)
    my = pair[..., 1] - oy.unsqueeze(1)
    ca, cb, cc = pair[..., 2], pair[..., 3], pair[..., 4]
    amx_bmy = ca * mx + cb * my
    cmy_bmx = cc * my + cb * mx
    # σ(u, v) − log(o) = coeffs · (u², v², uv, u, v, 1); the opacity rides in the
    # constant term so that α = exp(−σ') needs no extra product over pixels.
    const = 0.5 * (amx_bmy * mx + cmy_bmx * my) - pair[..., 5]
    coeffs = torch.stack([0.5 * ca, 0.5 * cc, cb, -amx_bmy, -cmy_bmx, const], dim=-1)
    sigma = coeffs @ pix.T  # [Tg, Kg, P]
    alpha = torch.exp(-sigma).clamp(max=ALPHA_MAX)
    if active is None:
        with torch.no_grad():
            active = sigma <= -math.log(ALPHA_THRESHOLD)  # α ≥ 1/255
        alpha = torch.where(active, alpha, 0.0)
        log_t = torch.log1p(-alpha)
        log_trans = torch.cumsum(log_t, dim=1)  # log T after each pair (inclusive)
        with torch.no_grad():
            # Stop (exclusive) where T would reach 1e-4. The dropped pairs form a
            # suffix, so the prefix sums of the kept pairs stay what they are.
            active = active & (log_trans > math.log(TRANSMITTANCE_MIN))
        alpha = torch.where(active, alpha, 0.0)
    else:
        alpha = torch.where(active, alpha, 0.0)
        log_t = torch.log1p(-alpha)
        log_trans = torch.cumsum(log_t, dim=1)
    weights = _BoundCotangent.apply(alpha * torch.exp(log_trans - log_t))  # α · T before the pair
    values = pair[..., 6:]  # colours and depth
    out = torch.bmm(weights.transpose(1, 2), values)  # [Tg, P, D+1]
    return torch.cat([out, weights.sum(dim=1).unsqueeze(-1)], dim=-1), active


@torch.no_grad()
def _compact(tile_ids, groups, n_pad):
    """Frozen state with only the (tile, Gaussian) pairs that touch an active pixel.

    Pairs whose every pixel is inactive contribute exactly zero while the state is
    frozen, so dropping them changes nothing but the cost (about half the pairs on
    pixel-aligned scenes).
    """
    keys, gauss, act = [], [], []
    start = 0
    for ids, active in groups:
        tg = ids.shape[0]
        keep = active.any(dim=2)
        rows = keep.nonzero()
        keys.append(tile_ids[start : start + tg][rows[:, 0]])
        gauss.append(ids[rows[:, 0], rows[:, 1]])
        act.append(active[rows[:, 0], rows[:, 1]])
        start += tg
    if not keys or sum(k.numel() for k in keys) == 0:
        return tile_ids[:0], ()
    total_tiles = int(tile_ids.max()) + 1
    return _pack(torch.cat(keys), torch.cat(gauss), total_tiles, n_pad, torch.cat(act))


def _rasterize_torch(g, viewmats, Ks, width, height, bg, sh_degree, near, far, eps2d,
                     tile_size, state, return_state):
    B, N = g.batch, g.num
    C = viewmats.shape[1]
    I = B * C
    D = g.channels
    P = tile_size * tile_size
    dtype, device = g.means.dtype, g.means.device
    signature = (B, C, N, height, width, tile_size)
    check_state(state, signature)

    opacity = g.opacity()  # [B, N]
    proj = project_gaussians(g.means, g.covariance_factors(), viewmats, Ks, width, height,
                             opacities=opacity, eps2d=eps2d, near_plane=near, far_plane=far)
    if g.sh is not None:
        dirs = g.means.unsqueeze(1) - camera_centers(viewmats).unsqueeze(2)  # [B, C, N, 3]
        colors = eval_sh(g.sh.unsqueeze(1), dirs, sh_degree)  # [B, C, N, 3]
    else:
        colors = g.colors.unsqueeze(1).expand(B, C, N, D)

    if state is None:
        tile_ids, groups = _bin_tiles(proj, torch.nn.functional.logsigmoid(g.opacities),
                                      B, C, N, width, height, tile_size)
    else:
        tile_ids, groups = state.tile_ids, state.groups

    tw, th = math.ceil(width / tile_size), math.ceil(height / tile_size)
    n_tiles = tw * th
    n_feat = D + 2  # colour channels, depth, alpha
    canvas = torch.zeros(I * n_tiles, P, n_feat, dtype=dtype, device=device)
    new_groups = []
    if tile_ids.numel() == 0:
        # Keep the outputs connected to the inputs (zero gradient, defined tangents).
        canvas = canvas + 0.0 * proj.means2d.sum()
    else:
        # Per-image Gaussian features, one gather per group; the last row is padding
        # (log-opacity −1e4: α = 0 exactly).
        log_opacity = torch.nn.functional.logsigmoid(g.opacities)
        feats = torch.cat(
            [
                proj.means2d,  # 0:2
                proj.conics,  # 2:5
                log_opacity.unsqueeze(1).expand(B, C, N).unsqueeze(-1),  # 5
                colors,  # 6:6+D
                proj.depths.unsqueeze(-1),  # 6+D
            ],
            dim=-1,
        ).reshape(I * N, 7 + D)
        pad_row = feats.new_zeros(1, 7 + D)
        pad_row[0, 5] = -1e4
        feats = torch.cat([feats, pad_row], dim=0)
        pix = _pixel_features(tile_size, dtype, device)
        tile_local = tile_ids % n_tiles
        ox_all = ((tile_local % tw) * tile_size).to(dtype)
        oy_all = (torch.div(tile_local, tw, rounding_mode="floor") * tile_size).to(dtype)
        outs, start = [], 0
        for ids, active in groups:
            tg, kg = ids.shape
            pair = feats.index_select(0, ids.reshape(-1)).view(tg, kg, 7 + D)
            out, active = _composite(pair, ox_all[start : start + tg],
                                     oy_all[start : start + tg], pix, active)
            outs.append(out)
            new_groups.append((ids, active))
            start += tg
        tile_out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        canvas = canvas.index_copy(0, tile_ids, tile_out)

    image = (
        canvas.view(I, th, tw, tile_size, tile_size, n_feat)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(I, th * tile_size, tw * tile_size, n_feat)[:, :height, :width]
        .reshape(B, C, height, width, n_feat)
    )
    rgb, alphas, depths = split_image(image, D, bg)
    out_state = None
    if return_state:
        if state is not None:
            out_state = state
        else:
            frozen_tiles, frozen_groups = _compact(tile_ids, new_groups, I * N)
            out_state = RasterState(signature, frozen_tiles, frozen_groups)
    return RenderOutput(rgb, alphas, depths, out_state)


def split_image(image: Tensor, channels: int, background: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Both backends composite ``[B, C, H, W, channels + 2]`` = (color, depth·alpha,
    alpha); returns ``(color over the background, alpha, expected depth)``."""
    rgb, depth_sum, alphas = image[..., :channels], image[..., channels : channels + 1], image[..., channels + 1 :]
    if background is not None:
        rgb = rgb + (1.0 - alphas) * background[:, :, None, None, :]
    return rgb, alphas, depth_sum / alphas.clamp_min(1e-10)


def check_state(state: RasterState | None, signature: tuple[int, ...]) -> None:
    """Raises unless ``state`` is ``None`` or a :class:`RasterState` made for a call of
    this ``signature`` ``(B, C, N, H, W, tile)``."""
    if state is None:
        return
    if not isinstance(state, RasterState):
        raise TypeError(f"state must be a RasterState, got {type(state).__name__}")
    if state.signature != signature:
        raise ValueError(
            f"state was made for (B, C, N, H, W, tile) = {state.signature}, but this call has {signature}"
        )
