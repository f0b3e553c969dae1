"""Compiled CPU kernels of the tile rasterizer (``rasterize(..., backend="cpu_kernels")``).

The kernels live in ``csrc/rasterize_cpu.cpp`` and are compiled on first use with
:func:`torch.utils.cpp_extension.load` (g++ and ninja; about a minute on 2 cores, once).
The build is cached in ``$TORCH_EXTENSIONS_DIR/difftto_<tag>`` if that variable is set,
else in ``$XDG_CACHE_HOME/difftto/torch_extensions/<tag>`` (``~/.cache/...``); ``<tag>``
names the Python, torch and CPU, because the code is compiled with ``-march=native``.
Set ``DIFFTTO_CPU_KERNELS=0`` to never compile (``backend="auto"`` then uses torch).

What is compiled and what stays in torch:

- the EWA projection (activations, camera transform, 2-D covariance, conic, footprint
  radii) and its backward are compiled (``csrc/project_cpu.cpp``, parallel over
  Gaussians); they produce per-(image, Gaussian) features ``(mean2d, conic,
  log-opacity, colours, depth)``. The backward also gives the camera (``viewmats``)
  gradient. SH colours are evaluated in torch (autograd carries their gradient to the
  SH coefficients, means and cameras). Forward mode (``torch.func.jvp``) and second order
  of the projection run through its pure-torch twin (:func:`projection_twin`); when the
  intrinsics ``Ks`` require grad the whole projection runs in torch (:func:`splat_features`);
- the tile binning (the same pairs and depth order as :func:`.rasterize._bin_tiles`),
  the compositing and its exact backward are compiled. The forward pass keeps a cache of
  ``α`` and ``T`` per (pair, pixel), which the backward, ``J·v`` (the autograd
  Function's ``jvp``, so ``torch.func.jvp`` works) and the Gauss-Newton kernels of
  :mod:`.kernel_linearization` reuse;
- double backward (``create_graph=True``) re-runs the compositing through the pure-torch
  twin on the same pairs, so higher-order derivatives stay available (slowly).

The pure-PyTorch rasterizer is the reference these kernels are tested against.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .cameras import camera_centers
from .gaussians import Gaussians, eval_sh
from .projection import Projection, project_gaussians

__all__ = [
    "cpu_kernels_available",
    "load_extension",
    "build_directory",
    "KernelStructure",
    "splat_features",
    "projection_twin",
    "structure_from_state",
    "render_cpu_kernels",
]

EXTENSION_NAME = "difftto_rasterize_cpu"
_SOURCES = tuple(Path(__file__).parent / "csrc" / name for name in ("rasterize_cpu.cpp", "project_cpu.cpp"))
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_STATUS: dict[str, object] = {}


# ----------------------------------------------------------------------------- building


def _cpu_tag() -> str:
    """A short hash of the CPU's model and flags (the build uses ``-march=native``)."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "model name", "Features")):
                    text += line
                if line.startswith("flags"):
                    break
    except OSError:
        text += platform.processor()
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def build_directory() -> Path:
    """Where the compiled extension is cached (see the module doc)."""
    tag = (f"py{sys.version_info.major}{sys.version_info.minor}"
           f"_torch{torch.__version__.replace('+', '_')}_cpu{_cpu_tag()}")
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root) / f"difftto_{tag}"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "difftto" / "torch_extensions" / tag


def load_extension():
    """The compiled module, building it on first use (once per machine and version).

    Raises:
        RuntimeError: the kernels are disabled (``DIFFTTO_CPU_KERNELS=0``) or cannot be
            built or loaded here (the message says why: no compiler, no ninja, ...).
    """
    if "module" in _STATUS:
        return _STATUS["module"]
    if "error" in _STATUS:
        raise RuntimeError(str(_STATUS["error"]))
    try:
        if os.environ.get("DIFFTTO_CPU_KERNELS", "1") == "0":
            raise RuntimeError("disabled by DIFFTTO_CPU_KERNELS=0")
        _STATUS["module"] = _build()
    except Exception as err:  # noqa: BLE001 - every failure means "not available"
        _STATUS["error"] = f"difftto's CPU kernels are unavailable: {type(err).__name__}: {err}"
        raise RuntimeError(str(_STATUS["error"])) from err
    return _STATUS["module"]


def _build():
    from torch.utils import cpp_extension

    build = build_directory()
    build.mkdir(parents=True, exist_ok=True)
    # cpp_extension rebuilds when the sources or flags change; say so when that happens.
    digest = hashlib.sha1(repr(_CFLAGS + _LDFLAGS).encode())
    for src in _SOURCES:
        digest.update(src.read_bytes())
    stamp = build / "difftto_build_stamp"
    so = build / f"{EXTENSION_NAME}.so"
    fresh = so.exists() and stamp.exists() and stamp.read_text() == digest.hexdigest()
    if not fresh:
        print(f"difftto: compiling the CPU rasterizer kernels (once; about a minute) into {build}",
              file=sys.stderr, flush=True)
    # cpp_extension needs `ninja` on PATH; a venv's ninja sits next to its python, which
    # is not on PATH when the venv's python is called without activating it.
    old_path = os.environ.get("PATH", "")
    venv_bin = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and (Path(venv_bin) / "ninja").exists():
        os.environ["PATH"] = venv_bin + os.pathsep + old_path
    try:
        module = cpp_extension.load(
            name=EXTENSION_NAME, sources=[str(s) for s in _SOURCES], extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS,
            build_directory=str(build), verbose=False,
        )
        if not fresh:
            stamp.write_text(digest.hexdigest())
        return module
    finally:
        os.environ["PATH"] = old_path


def cpu_kernels_available() -> tuple[bool, str]:
    """``(True, "")`` when the compiled kernels load (compiling them if needed), else
    ``(False, why)``. The answer is cached for the process."""
    try:
        load_extension()
    except RuntimeError as err:
        return False, str(err)
    return True, ""


# ----------------------------------------------------------------------------- structure


@dataclass(eq=False)
class KernelStructure:
    """The (tile, Gaussian) pairs of a render as a CSR by tile.

    Attributes:
        signature: ``(B, C, N, H, W, tile_size)``.
        tile_ptr: ``[B·C·tiles + 1]`` int64 offsets into the pairs, tiles in image order.
        pair_gauss: ``[M]`` int64 flat Gaussian ids ``image · N + n``, front to back per tile.
        active: ``[M, P]`` uint8 frozen per-pixel flags, or ``None`` (thresholds applied).
    """

    signature: tuple[int, int, int, int, int, int]
    tile_ptr: Tensor
    pair_gauss: Tensor
    active: Tensor | None = None
    _by_gaussian: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    @property
    def grid(self) -> tuple[int, int, int, int]:
        """``(I, H, W, tile_size)`` with ``I = B·C`` images."""
        B, C, _, H, W, ts = self.signature
        return B * C, H, W, ts

    def by_gaussian(self) -> tuple[Tensor, Tensor]:
        """``(gauss_ptr [I·N + 1], pairs [M])``: the pairs of each Gaussian, in pair order
        (the segmented reduction of the backward and Gram kernels)."""
        if self._by_gaussian is None:
            B, C, N = self.signature[:3]
            self._by_gaussian = tuple(load_extension().group_by_gaussian(self.pair_gauss, B * C * N))
        return self._by_gaussian

    def tile_of_pairs(self) -> Tensor:
        """``[M]`` global tile id of every pair."""
        counts = self.tile_ptr[1:] - self.tile_ptr[:-1]
        tiles = torch.arange(counts.numel(), device=counts.device)
        return torch.repeat_interleave(tiles, counts, output_size=self.pair_gauss.numel())


_STATE_STRUCTURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def structure_from_state(state) -> KernelStructure:
    """The frozen :class:`KernelStructure` of a :class:`.rasterize.RasterState` (cached
    per state object)."""
    cached = _STATE_STRUCTURES.get(state)
    if cached is not None:
        return cached
    B, C, N, H, W, ts = state.signature
    I, P = B * C, ts * ts
    n_tiles = -(-W // ts) * -(-H // ts)
    pad = I * N
    keys, gauss, act = [], [], []
    start = 0
    for ids, active in state.groups:
        tg = ids.shape[0]
        mask = ids < pad
        keys.append(state.tile_ids[start : start + tg].unsqueeze(1).expand_as(ids)[mask])
        gauss.append(ids[mask])
        act.append(active[mask])
        start += tg
    if keys:
        key, gauss_ids, active = torch.cat(keys), torch.cat(gauss), torch.cat(act)
        # A tile lives in one row of one group, so a stable sort by tile keeps each
        # tile's pairs front to back.
        key, order = torch.sort(key, stable=True)
        gauss_ids, active = gauss_ids[order], active[order]
    else:
        key = torch.zeros(0, dtype=torch.long)
        gauss_ids = torch.zeros(0, dtype=torch.long)
        active = torch.zeros(0, P, dtype=torch.bool)
    counts = torch.bincount(key, minlength=I * n_tiles)
    tile_ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    structure = KernelStructure(state.signature, tile_ptr.contiguous(), gauss_ids.contiguous(),
                                active.to(torch.uint8).contiguous())
    _STATE_STRUCTURES[state] = structure
    return structure


def _state_from_structure(structure: KernelStructure, active: Tensor):
    """A :class:`.rasterize.RasterState` (the torch backend's format) of a render's pairs
    and active flags, compacted to the pairs that touch a pixel; its kernel structure is
    cached so that frozen calls need no conversion."""
    from .rasterize import RasterState, _pack

    B, C, N, H, W, ts = structure.signature
    I = B * C
    n_tiles = -(-W // ts) * -(-H // ts)
    keep = active.bool().any(dim=1)
    keys = structure.tile_of_pairs()[keep]
    gauss, act = structure.pair_gauss[keep], active[keep]
    if keys.numel() == 0:
        state = RasterState(structure.signature, keys, ())
    else:
        tile_ids, groups = _pack(keys, gauss, I * n_tiles, I * N, act.bool())
        state = RasterState(structure.signature, tile_ids, groups)
    counts = torch.bincount(keys, minlength=I * n_tiles)
    tile_ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    _STATE_STRUCTURES[state] = KernelStructure(structure.signature, tile_ptr, gauss.contiguous(),
                                               act.to(torch.uint8).contiguous())
    return state


# ----------------------------------------------------------------------------- features


def splat_features(g: Gaussians, viewmats: Tensor, Ks: Tensor, width: int, height: int, *,
                   sh_degree: int | None, near_plane: float, far_plane: float,
                   eps2d: float) -> tuple[Tensor, Projection]:
    """Per-(image, Gaussian) features the kernels composite, in torch autograd.

    Returns ``(feats [B, C, N, 7 + D], projection)`` with columns ``mean2d (2), conic
    (3), log-opacity, colours (D), depth`` — the columns the torch rasterizer gathers.
    """
    B, N, D = g.batch, g.num, g.channels
    C = viewmats.shape[1]
    proj = project_gaussians(g.means, g.covariance_factors(), viewmats, Ks, width, height,
                             opacities=g.opacity(), eps2d=eps2d, near_plane=near_plane,
                             far_plane=far_plane)
    if g.sh is not None:
        dirs = g.means.unsqueeze(1) - camera_centers(viewmats).unsqueeze(2)
        colors = eval_sh(g.sh.unsqueeze(1), dirs, sh_degree)
    else:
        colors = g.colors.unsqueeze(1).expand(B, C, N, D)
    log_opacity = torch.nn.functional.logsigmoid(g.opacities)
    feats = torch.cat([proj.means2d, proj.conics, log_opacity.unsqueeze(1).expand(B, C, N).unsqueeze(-1),
                       colors, proj.depths.unsqueeze(-1)], dim=-1)
    return feats, proj


def projection_twin(means: Tensor, log_scales: Tensor, quats: Tensor, opacities: Tensor, colors: Tensor,
                    viewmats: Tensor, Ks: Tensor, settings: tuple) -> Tensor:
    """The features of the compiled projection, in torch autograd (its test twin and its
    forward-mode and second-order path): ``colors`` is ``[B, N, D]`` or per camera
    ``[B, C, N, D]``, ``settings = (width, height, eps2d, near_plane, far_plane)``.
    Returns ``feats [B, C, N, 7 + D]``."""
    width, height, eps2d, near, far = settings
    g = Gaussians(means, log_scales, quats, opacities)
    B, N, C = means.shape[0], means.shape[1], viewmats.shape[1]
    proj = project_gaussians(means, g.covariance_factors(), viewmats, Ks, width, height, opacities=g.opacity(),
                             eps2d=eps2d, near_plane=near, far_plane=far)
    if colors.dim() == 3:
        colors = colors.unsqueeze(1).expand(B, C, N, colors.shape[-1])
    log_opacity = torch.nn.functional.logsigmoid(opacities).unsqueeze(1).expand(B, C, N).unsqueeze(-1)
    return torch.cat([proj.means2d, proj.conics, log_opacity, colors, proj.depths.unsqueeze(-1)], dim=-1)


_PROJECTION_INPUTS = 7  # means, log_scales, quats, opacities, colors, viewmats, Ks


class _ProjectFunction(torch.autograd.Function):
    """``(means, log_scales, quats, opacities, colors, viewmats, Ks) → (feats [B, C, N, F],
    radii [B, C, N, 2], valid [B, C, N])`` by the compiled projection. Gradients reach every
    input but ``Ks`` (the caller uses the torch projection when ``Ks`` requires grad)."""

    @staticmethod
    def forward(means, log_scales, quats, opacities, colors, viewmats, Ks, settings):
        tensors = [t.detach().contiguous() for t in (means, log_scales, quats, opacities, colors, viewmats, Ks)]
        return tuple(load_extension().project_forward(*tensors, *settings))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.set_materialize_grads(False)
        ctx.settings = inputs[-1]
        ctx.save_for_backward(*inputs[:_PROJECTION_INPUTS])
        ctx.save_for_forward(*inputs[:_PROJECTION_INPUTS])

    @staticmethod
    def backward(ctx, grad_feats, *_unused):
        if grad_feats is None:
            return (None,) * (_PROJECTION_INPUTS + 1)
        inputs = ctx.saved_tensors
        grads = _ProjectCotangentFunction.apply(grad_feats, ctx.settings, ctx.needs_input_grad[5], *inputs)
        grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad)]
        return (*grads, None, None)

    @staticmethod
    def jvp(ctx, *tangents):
        inputs = ctx.saved_tensors
        tangents = tuple(torch.zeros_like(x) if t is None else t
                         for x, t in zip(inputs, tangents[:_PROJECTION_INPUTS]))
        _, dfeats = torch.func.jvp(lambda *xs: projection_twin(*xs, ctx.settings), inputs, tangents)
        return dfeats, None, None


class _ProjectCotangentFunction(torch.autograd.Function):
    """The compiled projection backward: ``grad_feats → (∂means, ∂log_scales, ∂quats,
    ∂opacities, ∂colors, ∂viewmats or zeros)``; differentiable once more through the twin."""

    @staticmethod
    def forward(grad_feats, settings, view_grad, means, log_scales, quats, opacities, colors, viewmats, Ks):
        tensors = [t.detach().contiguous() for t in (means, log_scales, quats, opacities, colors, viewmats, Ks)]
        out = load_extension().project_backward(*tensors, *settings, grad_feats.detach().contiguous(), view_grad)
        g_view = torch.zeros_like(viewmats)
        if view_grad:  # per (image, Gaussian) [3, 4] rows, summed per camera
            g_view[..., :3, :] = out[5].sum(dim=2)
        return (*out[:5], g_view)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.settings = inputs[1]
        ctx.save_for_backward(inputs[0], *inputs[3:])

    @staticmethod
    def backward(ctx, *grad_grads):
        grad_feats, *inputs = ctx.saved_tensors
        out = _ProjectSecondOrderFunction.apply(ctx.settings, grad_feats, *inputs, *grad_grads)
        d_grad_feats, d_inputs = out[0], out[1:]
        return (d_grad_feats, None, None, *d_inputs)


class _SecondOrderOnly(torch.autograd.Function):
    """Base of the Functions that compute a second derivative through a pure-torch twin:
    they stop there (third order raises)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *_grads):
        raise NotImplementedError(
            "backend='cpu_kernels' supports derivatives up to second order; use backend='torch' for more"
        )


class _ProjectSecondOrderFunction(_SecondOrderOnly):
    """``∂/∂(grad_feats, inputs) Σ_k ⟨gg_k, ∂⟨grad_feats, feats⟩/∂input_k⟩`` through the
    pure-torch twin (second order is rare and may be slow)."""

    @staticmethod
    def forward(settings, grad_feats, *tensors):
        inputs, grad_grads = tensors[:_PROJECTION_INPUTS], tensors[_PROJECTION_INPUTS:]
        with torch.enable_grad():
            xs = [t.detach().requires_grad_(True) for t in inputs]
            gf = grad_feats.detach().requires_grad_(True)
            feats = projection_twin(*xs, settings)
            first = torch.autograd.grad(feats, xs, gf, create_graph=True, allow_unused=True)
            used = [(f, gg) for f, gg in zip(first, grad_grads) if f is not None and gg is not None]
            second = torch.autograd.grad([f for f, _ in used], [gf, *xs], [gg.detach() for _, gg in used],
                                         allow_unused=True)
        return tuple(torch.zeros_like(x) if s is None else s for x, s in zip([gf, *xs], second))


# ----------------------------------------------------------------------------- autograd


class _Holder:
    """Side channel out of a Function's forward (a plain object: torch.func rebuilds
    containers such as dicts that it passes through)."""

    structure: KernelStructure | None = None
    active: Tensor | None = None


class _CompositeFunction(torch.autograd.Function):
    """``feats [I·N, F] → per-pixel sums [I, H, W, D+2]`` (colours, depth, alpha), plus the
    non-differentiable cache ``alpha, trans [M, P]`` and active flags ``[M, P]``.

    Without a frozen structure the tiles are binned here, from the features and the
    projection's ``radii``/``valid``. The structure made here (plain tensors even under
    torch.func transforms, which hand Functions unwrapped inputs) is put in ``holder``.
    """

    @staticmethod
    def forward(feats, radii, valid, state, signature, holder):
        ext = load_extension()
        # Converted here, not by the caller: inside a Function's forward torch.func
        # transforms are off, so the cached structure holds plain tensors.
        structure = None if state is None else structure_from_state(state)
        feats = feats.detach().contiguous()
        B, C, N, H, W, ts = signature
        I, D = B * C, feats.shape[1] - 7
        if structure is None:
            tile_ptr, pair_gauss = ext.bin_tiles(
                feats[:, 0:2].contiguous(), radii.contiguous(), feats[:, 2:5].contiguous(),
                feats[:, 5].contiguous(), feats[:, 6 + D].contiguous(), valid.contiguous(), I, N, W, H, ts)
            structure = KernelStructure(signature, tile_ptr, pair_gauss, None)
        out, alpha, trans, active = ext.forward(feats, structure.tile_ptr, structure.pair_gauss, structure.active,
                                                I, H, W, ts, D)
        holder.structure, holder.active = structure, active
        return out, alpha, trans, active

    @staticmethod
    def setup_context(ctx, inputs, output):
        feats, _, _, _, _, holder = inputs
        _, alpha, trans, active = output
        ctx.mark_non_differentiable(alpha, trans, active)
        # No zero gradients for the cache outputs: materializing them cost as much as the
        # backward kernel itself.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(feats, alpha, trans, active)
        ctx.save_for_forward(feats, alpha, trans, active)
        ctx.structure = holder.structure

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        feats, alpha, trans, active = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None, None, None
        grad = _CotangentFunction.apply(grad_out, feats, alpha, trans, active, ctx.structure)
        return grad, None, None, None, None, None

    @staticmethod
    def jvp(ctx, feats_tangent, *_other_tangents):
        feats, alpha, trans, active = ctx.saved_tensors
        structure = ctx.structure
        I, H, W, ts = structure.grid
        if feats_tangent is None:
            dout = feats.new_zeros(I, H, W, feats.shape[1] - 5)
        else:
            dout = _TangentFunction.apply(feats_tangent, feats, alpha, trans, active, structure)
        return dout, None, None, None


# The first-order products are Functions of their own so that (1) torch.func transforms
# hand the kernels plain tensors (wrapped tensors have no storage to read) and (2) they can
# be differentiated again: in the vector exactly (they are linear in it, and each one's
# adjoint is the other kernel), in the features through the pure-torch twin
# (_SecondOrderFunction), which keeps double backward and forward-over-reverse available.


class _CotangentFunction(torch.autograd.Function):
    """``Jᵀ·g``: gradient of the per-pixel sums w.r.t. the features, ``g [I, H, W, D+2]``."""

    @staticmethod
    def forward(grad_out, feats, alpha, trans, active, structure):
        gauss_ptr, gauss_pairs = structure.by_gaussian()
        return load_extension().backward(feats.detach().contiguous(), structure.tile_ptr, structure.pair_gauss,
                                         gauss_ptr, gauss_pairs, alpha, trans, grad_out.detach().contiguous(),
                                         structure.signature[-1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, feats, alpha, trans, active, structure = inputs
        ctx.save_for_backward(grad_out, feats, alpha, trans, active)
        ctx.structure = structure

    @staticmethod
    def backward(ctx, gg):
        grad_out, feats, alpha, trans, active = ctx.saved_tensors
        d_grad_out = d_feats = None
        if ctx.needs_input_grad[0]:
            d_grad_out = _TangentFunction.apply(gg, feats.detach(), alpha, trans, active, ctx.structure)
        if ctx.needs_input_grad[1]:  # ∂/∂f ⟨Jᵀ(f) g, gg⟩ = ∂/∂f ⟨g, J(f) gg⟩
            d_feats = _SecondOrderFunction.apply(feats, grad_out, gg, active, ctx.structure)
        return d_grad_out, d_feats, None, None, None, None


class _TangentFunction(torch.autograd.Function):
    """``J·v``: tangent of the per-pixel sums ``[I, H, W, D+2]`` for feature tangents ``v``."""

    @staticmethod
    def forward(feats_tangent, feats, alpha, trans, active, structure):
        I, H, W, ts = structure.grid
        return load_extension().jvp(feats.detach().contiguous(), feats_tangent.detach().contiguous(),
                                    structure.tile_ptr, structure.pair_gauss, alpha, trans, I, H, W, ts)

    @staticmethod
    def setup_context(ctx, inputs, output):
        feats_tangent, feats, alpha, trans, active, structure = inputs
        ctx.save_for_backward(feats_tangent, feats, alpha, trans, active)
        ctx.structure = structure

    @staticmethod
    def backward(ctx, gg):
        v, feats, alpha, trans, active = ctx.saved_tensors
        d_v = d_feats = None
        if ctx.needs_input_grad[0]:
            d_v = _CotangentFunction.apply(gg, feats.detach(), alpha, trans, active, ctx.structure)
        if ctx.needs_input_grad[1]:  # ∂/∂f ⟨gg, J(f) v⟩
            d_feats = _SecondOrderFunction.apply(feats, gg, v, active, ctx.structure)
        return d_v, d_feats, None, None, None, None


class _SecondOrderFunction(_SecondOrderOnly):
    """``∂/∂f ⟨w, J(f)·v⟩`` by the pure-torch twin (second order is rare and may be slow)."""

    @staticmethod
    def forward(feats, w, v, active, structure):
        with torch.enable_grad():
            f = feats.detach().requires_grad_(True)
            out = _twin_composite(f, structure, active)
            (first,) = torch.autograd.grad(out, f, w.detach(), create_graph=True)
            (second,) = torch.autograd.grad(first, f, v.detach(), allow_unused=True)
        return torch.zeros_like(f) if second is None else second


def _twin_composite(feats: Tensor, structure: KernelStructure, active: Tensor) -> Tensor:
    """The pure-torch compositing of :mod:`.rasterize` on the kernel's pairs and flags →
    ``[I, H, W, D+2]`` (the torch backend's own code path, differentiable to any order)."""
    from .rasterize import _composite, _pack, _pixel_features

    B, C, N, H, W, ts = structure.signature
    I, P, F = B * C, ts * ts, feats.shape[1]
    tw, th = -(-W // ts), -(-H // ts)
    n_tiles = tw * th
    canvas = feats.new_zeros(I * n_tiles, P, F - 5)
    if structure.pair_gauss.numel() == 0:
        canvas = canvas + 0.0 * feats.sum()
    else:
        tile_ids, groups = _pack(structure.tile_of_pairs(), structure.pair_gauss, I * n_tiles, I * N,
                                 active.bool())
        pad_row = feats.new_zeros(1, F)
        pad_row[0, 5] = -1e4
        padded = torch.cat([feats, pad_row], dim=0)
        pix = _pixel_features(ts, feats.dtype, feats.device)
        local = tile_ids % n_tiles
        ox = ((local % tw) * ts).to(feats.dtype)
        oy = (torch.div(local, tw, rounding_mode="floor") * ts).to(feats.dtype)
        outs, start = [], 0
        for ids, act in groups:
            tg, kg = ids.shape
            pair = padded.index_select(0, ids.reshape(-1)).view(tg, kg, F)
            out, _ = _composite(pair, ox[start : start + tg], oy[start : start + tg], pix, act)
            outs.append(out)
            start += tg
        canvas = canvas.index_copy(0, tile_ids, torch.cat(outs, dim=0))
    return (canvas.view(I, th, tw, ts, ts, F - 5).permute(0, 1, 3, 2, 4, 5)
            .reshape(I, th * ts, tw * ts, F - 5)[:, :H, :W])


# ----------------------------------------------------------------------------- backend


def render_cpu_kernels(g: Gaussians, viewmats: Tensor, Ks: Tensor, width: int, height: int,
                       bg: Tensor | None, sh_degree: int | None, near: float, far: float, eps2d: float,
                       tile_size: int, state, return_state: bool):
    """``rasterize``'s ``"cpu_kernels"`` backend (arguments already validated there)."""
    from .rasterize import RenderOutput, check_state, split_image

    B, N, D = g.batch, g.num, g.channels
    C = viewmats.shape[1]
    signature = (B, C, N, height, width, tile_size)
    check_state(state, signature)
    if Ks.requires_grad:  # the compiled backward has no intrinsics gradient
        feats, proj = splat_features(g, viewmats, Ks, width, height, sh_degree=sh_degree,
                                     near_plane=near, far_plane=far, eps2d=eps2d)
        radii, valid = proj.radii, proj.valid
    else:
        colors = g.colors
        if g.sh is not None:
            dirs = g.means.unsqueeze(1) - camera_centers(viewmats).unsqueeze(2)
            colors = eval_sh(g.sh.unsqueeze(1), dirs, sh_degree)
        feats, radii, valid = _ProjectFunction.apply(g.means, g.log_scales, g.quats, g.opacities, colors, viewmats,
                                                     Ks, (width, height, eps2d, near, far))
    I = B * C
    holder = _Holder()
    out, _, _, _ = _CompositeFunction.apply(feats.reshape(I * N, 7 + D), radii.reshape(I * N, 2),
                                            valid.reshape(I * N), state, signature, holder)
    image = out.view(B, C, height, width, D + 2)
    rgb, alphas, depths = split_image(image, D, bg)
    out_state = None
    if return_state:
        out_state = state if state is not None else _state_from_structure(holder.structure, holder.active)
    return RenderOutput(rgb, alphas, depths, out_state)
