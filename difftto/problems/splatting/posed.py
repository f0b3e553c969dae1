"""The 3DGS problem with the context cameras among the parameters (pose-free TTO)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..base import Data
from ..registry import register
from .problem import GaussianSplattingProblem
from .rasterize import DEFAULT_TILE_SIZE, RenderOutput
from .se3 import se3_exp

__all__ = ["PosedSplattingProblem", "POSE_KEY", "posed_viewmats"]

#: The parameter group of camera twists ``[B, C, 6]`` (translation, rotation).
POSE_KEY = "pose"


def posed_viewmats(pose: Tensor, viewmats: Tensor) -> Tensor:
    """World-to-camera matrices ``exp(pose) · viewmats`` ``[B, C, 4, 4]`` for twists
    ``pose [B, C, 6]`` and base cameras ``viewmats [B, C, 4, 4]``.

    With ``viewmats`` the identity, ``pose`` is the camera's pose itself (the pose-free
    setting: world = the first context camera's frame); with measured cameras it is a
    correction in camera coordinates. Raises ``ValueError`` on mismatched shapes."""
    if not isinstance(pose, Tensor) or pose.shape != viewmats.shape[:-2] + (6,):
        shape = tuple(pose.shape) if isinstance(pose, Tensor) else type(pose).__name__
        raise ValueError(f"theta[{POSE_KEY!r}] has shape {shape}, expected [B, C, 6] = "
                         f"{list(viewmats.shape[:-2]) + [6]} (one twist per camera)")
    return se3_exp(pose) @ viewmats


@register("gaussian_splatting_posed")
class PosedSplattingProblem(GaussianSplattingProblem):
    """``gaussian_splatting`` whose cameras are parameters too: ``θ`` holds the Gaussian
    groups and ``pose [B, C, 6]``; the context view ``c`` is rendered from
    ``exp(pose_c) · viewmats_c`` (:func:`posed_viewmats`, the closed-form SE(3)
    exponential of :mod:`.se3`).

    ``data`` is that of :class:`GaussianSplattingProblem`; ``viewmats`` are the base
    cameras (the identity when ``pose`` holds the whole camera pose). An optional
    ``pose_mask`` (broadcastable to ``[B, C]``; 1 refine, 0 keep) renders camera ``c``
    from ``exp(pose_mask_c · pose_c) · viewmats_c``: a masked camera (e.g. the first
    one, which fixes the frame of a pose-free reconstruction) gets no data gradient,
    so its pose stays at Θ0 whatever Λ is. Λ on the ``pose``
    group anchors each camera to the predicted one, like the Gaussians to Θ0.

    Backends: ``"auto"`` (default: the compiled CPU kernels for float32/float64 CPU
    tensors, the torch rasterizer otherwise), ``"cpu_kernels"`` or ``"torch"``. Both
    differentiate through the view matrices in reverse and forward mode (the kernels'
    projection backward reaches ``viewmats``; its forward mode runs through the torch
    twin). gsplat has no forward mode and is refused. The kernels' compiled Gauss-Newton
    products cover the Gaussians only, so :meth:`linearize` returns ``None``: products
    come from autograd (``torch.func`` ``jvp``/``vjp``) through the chosen rasterizer.
    """

    def __init__(self, *, backend: str = "auto", sh_degree: int | None = None, near_plane: float = 0.01,
                 far_plane: float = 1e10, eps2d: float = 0.3, tile_size: int = DEFAULT_TILE_SIZE) -> None:
        if backend not in ("auto", "cpu_kernels", "torch"):
            raise ValueError(f"backend: gaussian_splatting_posed differentiates the cameras in reverse and "
                             f"forward mode; expected 'auto', 'cpu_kernels' or 'torch', got {backend!r}")
        super().__init__(backend=backend, sh_degree=sh_degree, near_plane=near_plane, far_plane=far_plane,
                         eps2d=eps2d, tile_size=tile_size)

    def __repr__(self) -> str:
        return f"PosedSplattingProblem(backend={self.backend!r}, tile_size={self.tile_size})"

    def render(self, theta: Mapping[str, Tensor], data: Data, *, return_state: bool = False) -> RenderOutput:
        """Renders the Gaussians of ``theta`` into the cameras ``exp(theta['pose']) · viewmats``."""
        if not isinstance(theta, Mapping) or POSE_KEY not in theta:
            got = sorted(theta) if isinstance(theta, Mapping) else type(theta).__name__
            raise KeyError(f"gaussian_splatting_posed needs theta[{POSE_KEY!r}] [B, C, 6] beside the "
                           f"Gaussian groups; got {got}")
        viewmats, _, _ = self._check_data(theta, data)
        pose = theta[POSE_KEY]
        mask = data.get("pose_mask")
        if mask is not None:
            mask = torch.as_tensor(mask, dtype=pose.dtype, device=pose.device)
            try:
                pose = pose * torch.broadcast_to(mask, pose.shape[:-1]).unsqueeze(-1)
            except RuntimeError:
                raise ValueError(f"data['pose_mask'] has shape {tuple(mask.shape)}, expected a shape that "
                                 f"broadcasts to [B, C] = {list(pose.shape[:-1])}") from None
        posed = {k: v for k, v in data.items() if k != "pose_mask"}
        posed["viewmats"] = posed_viewmats(pose, viewmats)
        gaussians = {k: v for k, v in theta.items() if k != POSE_KEY}
        return super().render(gaussians, posed, return_state=return_state)

    def linearize(self, theta: Mapping[str, Tensor], data: Data) -> None:
        """``None``: Jacobian products come from autograd through the rasterizer (the
        compiled products do not reach the cameras)."""
        return None
