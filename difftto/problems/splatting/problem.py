"""The registered 3DGS problem: photometric residuals of rendered context views."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..base import Data, Linearization, Problem
from ..registry import register
from .gaussians import Gaussians
from .rasterize import DEFAULT_TILE_SIZE, RasterState, RenderOutput, rasterize

__all__ = ["GaussianSplattingProblem", "STATE_KEY", "apply_pose_deltas"]

#: The key under which :meth:`GaussianSplattingProblem.freeze` stores the raster state.
STATE_KEY = "raster_state"


def _hat(w: Tensor) -> Tensor:
    """Skew matrices ``[..., 3, 3]`` of vectors ``[..., 3]``."""
    x, y, z = w.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).unflatten(-1, (3, 3))


def apply_pose_deltas(viewmats: Tensor, deltas: Tensor) -> Tensor:
    """``exp(ξ^) · viewmats`` for twists ``deltas [B, C, 6]`` = (translation, rotation).

    The correction acts in camera coordinates (left multiplication of world-to-camera);
    ``deltas = 0`` leaves the cameras unchanged. Differentiable in both arguments
    (reverse and forward mode).
    """
    if deltas.shape != viewmats.shape[:-2] + (6,):
        raise ValueError(
            f"theta['pose_deltas'] has shape {tuple(deltas.shape)}, expected [B, C, 6] = "
            f"{list(viewmats.shape[:-2]) + [6]}"
        )
    twist = torch.zeros(*deltas.shape[:-1], 4, 4, dtype=deltas.dtype, device=deltas.device)
    twist = twist + torch.nn.functional.pad(_hat(deltas[..., 3:]), (0, 1, 0, 1))
    twist = twist + torch.nn.functional.pad(deltas[..., :3].unsqueeze(-1), (3, 0, 0, 1))
    return torch.linalg.matrix_exp(twist) @ viewmats


@register("gaussian_splatting")
class GaussianSplattingProblem(Problem):
    """Least squares on rendered context views: ``r = √w · (render(θ) − images)``.

    ``theta``: a dict of raw Gaussian groups with a leading batch dimension ``B``:
    ``means [B,N,3]``, ``log_scales [B,N,3]``, ``quats [B,N,4]`` (wxyz), ``opacities
    [B,N]`` (logits) and ``colors [B,N,3]`` or ``sh [B,N,K,3]``; optionally
    ``pose_deltas [B,C,6]`` (see :func:`apply_pose_deltas`) to refine the cameras too.

    ``data``: ``viewmats [B,C,4,4]`` (world-to-camera; may require grad),
    ``Ks [B,C,3,3]``, ``images [B,C,H,W,3]`` targets, optional ``background``
    (broadcastable to ``[B,C,3]``) and ``weights`` (per-pixel, broadcastable to
    ``[B,C,H,W,3]``, ≥ 0). Width and height come from ``images``.

    Residuals are ``[B, C·H·W·3]``. :meth:`freeze` adds the rasterizer's
    :class:`RasterState` (tile bins, depth order, active pairs) under ``"raster_state"``,
    so that every product of one linear solve sees the same smooth function.

    Args:
        backend: rasterizer backend for :meth:`residuals`. ``"auto"`` (default): the
            compiled CPU kernels for CPU tensors (falling back to torch with a warning when
            they cannot be built), the pure-PyTorch rasterizer on other devices (gsplat's
            CUDA kernels have no forward mode or double backward, which Gauss-Newton
            products need). ``"torch"``: the pure-PyTorch reference; ``"cpu_kernels"``;
            ``"gsplat"`` (first-order use only). With the kernels, :meth:`linearize`
            returns the compiled Gauss-Newton products.
        sh_degree, near_plane, far_plane, eps2d, tile_size: passed to :func:`rasterize`.
    """

    def __init__(
        self,
        *,
        backend: str = "auto",
        sh_degree: int | None = None,
        near_plane: float = 0.01,
        far_plane: float = 1e10,
        eps2d: float = 0.3,
        tile_size: int = DEFAULT_TILE_SIZE,
    ) -> None:
        self.backend = backend
        self.sh_degree = sh_degree
        self.near_plane = near_plane
        self.far_plane = far_plane
        self.eps2d = eps2d
        self.tile_size = tile_size

    def __repr__(self) -> str:
        return f"GaussianSplattingProblem(backend={self.backend!r}, tile_size={self.tile_size})"

    @staticmethod
    def _check_data(theta: Any, data: Data) -> tuple[Tensor, Tensor, Tensor]:
        if not isinstance(theta, Mapping):
            raise TypeError(
                "gaussian_splatting expects theta as a dict of Gaussian groups (means, "
                f"log_scales, quats, opacities, colors|sh), got {type(theta).__name__}"
            )
        if not isinstance(data, Mapping):
            raise TypeError(
                "gaussian_splatting needs data = {'viewmats', 'Ks', 'images', ...}, got "
                f"{type(data).__name__}"
            )
        missing = [k for k in ("viewmats", "Ks", "images") if k not in data]
        if missing:
            raise KeyError(f"data is missing {missing}; expected viewmats [B,C,4,4], "
                           f"Ks [B,C,3,3] and images [B,C,H,W,3]")
        viewmats, Ks, images = data["viewmats"], data["Ks"], data["images"]
        if not isinstance(images, Tensor) or images.dim() != 5:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"data['images'] has shape {shape}, expected [B, C, H, W, 3]")
        if isinstance(viewmats, Tensor) and tuple(images.shape[:2]) != tuple(viewmats.shape[:2]):
            raise ValueError(
                f"data['images'] has shape {tuple(images.shape)} but data['viewmats'] has "
                f"{tuple(viewmats.shape)}; expected images [B, C, H, W, 3] with the cameras' B, C"
            )
        return viewmats, Ks, images

    def render(self, theta: Mapping[str, Tensor], data: Data, *,
               return_state: bool = False) -> RenderOutput:
        """Renders ``theta`` into the cameras of ``data`` (using a frozen state if present)."""
        viewmats, Ks, images = self._check_data(theta, data)
        gaussians = Gaussians.from_params(theta)
        if "pose_deltas" in theta:
            viewmats = apply_pose_deltas(viewmats, theta["pose_deltas"])
        state = data.get(STATE_KEY)
        if state is not None and not isinstance(state, RasterState):
            raise TypeError(f"data[{STATE_KEY!r}] must be a RasterState, got "
                            f"{type(state).__name__}")
        H, W = images.shape[2], images.shape[3]
        if images.shape[-1] != gaussians.channels:
            raise ValueError(
                f"data['images'] has {images.shape[-1]} channels (shape {tuple(images.shape)}), "
                f"but the Gaussians render {gaussians.channels}"
            )
        return rasterize(
            gaussians, viewmats, Ks, W, H,
            background=data.get("background"), backend=self._backend_for(gaussians.means),
            sh_degree=self.sh_degree, near_plane=self.near_plane, far_plane=self.far_plane,
            eps2d=self.eps2d, tile_size=self.tile_size, state=state,
            return_state=return_state,
        )

    def _backend_for(self, means: Tensor) -> str:
        if self.backend == "auto" and means.device.type != "cpu":
            return "torch"
        return self.backend

    def residuals(self, theta: Mapping[str, Tensor], data: Data) -> Tensor:
        """``√w · (render − images)`` flattened to ``[B, C·H·W·3]``."""
        render = self.render(theta, data).colors
        diff = render - data["images"]
        weights = data.get("weights")
        if weights is not None:
            w = torch.as_tensor(weights, dtype=diff.dtype, device=diff.device)
            try:
                w = torch.broadcast_to(w, diff.shape)
            except RuntimeError:
                raise ValueError(
                    f"data['weights'] has shape {tuple(w.shape)}, expected a shape that "
                    f"broadcasts to the images' {tuple(diff.shape)}"
                ) from None
            diff = diff * torch.sqrt(w.clamp_min(0.0))
        return diff.reshape(diff.shape[0], -1)

    def freeze(self, theta: Mapping[str, Tensor], data: Data) -> dict[str, Any]:
        """``data`` plus the raster state (bins, depth order, active pairs) at ``theta``."""
        detached = {k: v.detach() for k, v in theta.items()}
        frozen = {k: v for k, v in data.items() if k != STATE_KEY}
        with torch.no_grad():
            frozen_inputs = {k: (v.detach() if isinstance(v, Tensor) else v)
                             for k, v in frozen.items()}
            state = self.render(detached, frozen_inputs, return_state=True).state
        if state is None:
            raise RuntimeError(
                f"GaussianSplattingProblem(backend={self.backend!r}) cannot freeze: only the "
                "torch and cpu_kernels backends have a raster state"
            )
        frozen[STATE_KEY] = state
        return frozen

    def linearize(self, theta: Mapping[str, Tensor], data: Data) -> Linearization | None:
        """The compiled Gauss-Newton products (:class:`.kernel_linearization.KernelLinearization`:
        ``J·v``, ``Jᵀ·w`` and the exact ``diag(JᵀJ)`` from one per-pixel cache) when the
        backend is ``"cpu_kernels"``, or ``"auto"`` with float32/float64 CPU tensors and the
        kernels available; ``None`` (autograd products) otherwise."""
        if self.backend not in ("cpu_kernels", "auto"):
            return None
        means = theta["means"] if isinstance(theta, Mapping) and "means" in theta else None
        if means is None or means.device.type != "cpu" or means.dtype not in (torch.float32, torch.float64):
            return None
        from .cpu_kernels import cpu_kernels_available

        if not cpu_kernels_available()[0]:
            return None  # residuals() falls back to torch with a warning
        from .kernel_linearization import KernelLinearization

        if data is None or STATE_KEY not in data:
            data = self.freeze(theta, data)
        return KernelLinearization(self, theta, data)
