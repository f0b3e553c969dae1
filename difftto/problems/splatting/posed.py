"""The 3DGS problem with the context cameras among the parameters (pose-free TTO)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..base import Data
from ..registry import register
from .problem import GaussianSplattingProblem
from .rasterize import DEFAULT_TILE_SIZE, RenderOutput
from .se3 import matrix_to_quat, quat_multiply, se3_exp, so3_exp_quat

__all__ = ["PosedSplattingProblem", "POSE_KEY", "VIEW_KEY", "ATTACH_MODES", "posed_viewmats"]

#: The parameter group of camera twists ``[B, C, 6]`` (translation, rotation).
POSE_KEY = "pose"
#: The data key of the per-Gaussian camera index (``attach="camera"``): ``[N]`` or ``[B, N]`` integers.
VIEW_KEY = "gaussian_view"
#: Where the Gaussians' means and rotations live: the world frame, or their camera's frame.
ATTACH_MODES = ("world", "camera")


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

    ``attach="camera"`` parametrizes each Gaussian in the frame of the context camera
    ``data['gaussian_view'][n]`` (``[N]`` or ``[B, N]`` integers in ``[0, C)``; pose-free
    bundle adjustment): its world mean and rotation are ``W_c⁻¹ · means_n`` and
    ``q(R_cᵀ) ⊗ quats_n``, with ``W_c = [R_c | t_c]`` that camera's current (masked)
    world-to-camera matrix, so a pose update moves the camera's Gaussians rigidly with it.
    Rendering view ``c`` from its own Gaussians is then independent of ``pose_c``; the
    pose is driven only by how its Gaussians explain the other views (and theirs view
    ``c``). The transform is part of :meth:`residuals`, so autograd products have the
    pose columns of J through it. Colors must be view-independent (``colors``, or ``sh``
    of degree 0). :meth:`world_gaussians` gives the Gaussians in the world frame (e.g.
    to render target views from ``θ*``).

    Backends: ``"auto"`` (default: the compiled CPU kernels for float32/float64 CPU
    tensors, the torch rasterizer otherwise), ``"cpu_kernels"`` or ``"torch"``. Both
    differentiate through the view matrices in reverse and forward mode (the kernels'
    projection backward reaches ``viewmats``; its forward mode runs through the torch
    twin). gsplat has no forward mode and is refused. The kernels' compiled Gauss-Newton
    products cover the Gaussians only, so :meth:`linearize` returns ``None``: products
    come from autograd (``torch.func`` ``jvp``/``vjp``) through the chosen rasterizer.
    """

    def __init__(self, *, backend: str = "auto", sh_degree: int | None = None, near_plane: float = 0.01,
                 far_plane: float = 1e10, eps2d: float = 0.3, tile_size: int = DEFAULT_TILE_SIZE,
                 attach: str = "world") -> None:
        if attach not in ATTACH_MODES:
            raise ValueError(f"attach: expected one of {ATTACH_MODES}, got {attach!r}")
        self.attach = attach
        if backend not in ("auto", "cpu_kernels", "torch"):
            raise ValueError(f"backend: gaussian_splatting_posed differentiates the cameras in reverse and "
                             f"forward mode; expected 'auto', 'cpu_kernels' or 'torch', got {backend!r}")
        super().__init__(backend=backend, sh_degree=sh_degree, near_plane=near_plane, far_plane=far_plane,
                         eps2d=eps2d, tile_size=tile_size)

    def __repr__(self) -> str:
        return (f"PosedSplattingProblem(backend={self.backend!r}, tile_size={self.tile_size}, "
                f"attach={self.attach!r})")

    def _masked_pose(self, theta: Mapping[str, Tensor], data: Data) -> Tensor:
        """``pose_mask · theta['pose']`` ``[B, C, 6]`` (reads only ``viewmats`` and ``pose_mask`` of ``data``)."""
        if not isinstance(theta, Mapping) or POSE_KEY not in theta:
            got = sorted(theta) if isinstance(theta, Mapping) else type(theta).__name__
            raise KeyError(f"gaussian_splatting_posed needs theta[{POSE_KEY!r}] [B, C, 6] beside the "
                           f"Gaussian groups; got {got}")
        if not isinstance(data, Mapping) or "viewmats" not in data:
            raise KeyError("gaussian_splatting_posed needs data['viewmats'] [B, C, 4, 4] (the base cameras)")
        pose = theta[POSE_KEY]
        mask = data.get("pose_mask")
        if mask is not None:
            mask = torch.as_tensor(mask, dtype=pose.dtype, device=pose.device)
            try:
                pose = pose * torch.broadcast_to(mask, pose.shape[:-1]).unsqueeze(-1)
            except RuntimeError:
                raise ValueError(f"data['pose_mask'] has shape {tuple(mask.shape)}, expected a shape that "
                                 f"broadcasts to [B, C] = {list(pose.shape[:-1])}") from None
        return pose

    def cameras(self, theta: Mapping[str, Tensor], data: Data) -> Tensor:
        """The context cameras' world-to-camera matrices ``exp(pose_mask · pose) · viewmats``
        ``[B, C, 4, 4]`` at ``theta`` (of ``data``, only ``viewmats`` and ``pose_mask`` are read)."""
        return posed_viewmats(self._masked_pose(theta, data), data["viewmats"])

    def world_gaussians(self, theta: Mapping[str, Tensor], data: Data,
                        cameras: Tensor | None = None) -> dict[str, Tensor]:
        """The Gaussian groups of ``theta`` in the world frame (``theta``'s own with
        ``attach="world"``; with ``attach="camera"``, means and quats carried out of their
        camera's frame by its current pose, see the class docstring). Of ``data`` only
        ``viewmats``, ``pose_mask`` and ``gaussian_view`` are read. ``cameras``: the
        output of :meth:`cameras` when already computed."""
        gaussians = {k: v for k, v in theta.items() if k != POSE_KEY}
        if self.attach == "world":
            return gaussians
        if VIEW_KEY not in data:
            raise KeyError(f"attach='camera' needs data[{VIEW_KEY!r}] ([N] or [B, N] integers: the context "
                           f"camera of each Gaussian)")
        if cameras is None:
            cameras = self.cameras(theta, data)
        means = gaussians["means"]
        B, N = means.shape[:2]
        C = cameras.shape[1]
        view = torch.as_tensor(data[VIEW_KEY], device=means.device)
        if view.dtype.is_floating_point or view.dtype == torch.bool or view.shape not in ((N,), (B, N)):
            raise ValueError(f"data[{VIEW_KEY!r}] has shape {tuple(view.shape)} and dtype {view.dtype}, "
                             f"expected integers of shape [N] = [{N}] or [B, N] = [{B}, {N}]")
        view = view.long().expand(B, N)
        if bool(((view < 0) | (view >= C)).any()):
            raise ValueError(f"data[{VIEW_KEY!r}] holds camera indices outside [0, {C})")
        sh = gaussians.get("sh")
        if sh is not None and sh.shape[-2] > 1:
            raise ValueError(f"attach='camera' carries the Gaussians rigidly but not their view-dependent "
                             f"colors: expected colors or sh of degree 0, got sh {tuple(sh.shape)}")
        batch = torch.arange(B, device=means.device)[:, None].expand(B, N)
        rot = cameras[..., :3, :3]  # [B, C, 3, 3] world → camera
        trans = cameras[..., :3, 3]
        r_n, t_n = rot[batch, view], trans[batch, view]  # [B, N, 3, 3], [B, N, 3]
        # world point: Rᵀ (p − t)
        gaussians["means"] = ((means - t_n).unsqueeze(-2) @ r_n).squeeze(-2)
        pose = self._masked_pose(theta, data)
        cam_quat = matrix_to_quat(torch.as_tensor(data["viewmats"])[..., :3, :3].to(means.dtype))
        # q(R_c) = q(exp(ω_c)) ⊗ q(viewmats_c); the Gaussian's world rotation is R_cᵀ · R(quats)
        q_c = quat_multiply(so3_exp_quat(pose[..., 3:]), cam_quat)
        conj = q_c * q_c.new_tensor([1.0, -1.0, -1.0, -1.0])
        gaussians["quats"] = quat_multiply(conj[batch, view], gaussians["quats"])
        return gaussians

    def render(self, theta: Mapping[str, Tensor], data: Data, *, return_state: bool = False) -> RenderOutput:
        """Renders the Gaussians of ``theta`` (:meth:`world_gaussians`) into the cameras
        ``exp(theta['pose']) · viewmats``."""
        self._check_data(theta, data)
        cameras = self.cameras(theta, data)
        posed = {k: v for k, v in data.items() if k not in ("pose_mask", VIEW_KEY)}
        posed["viewmats"] = cameras
        gaussians = self.world_gaussians(theta, data, cameras)
        return super().render(gaussians, posed, return_state=return_state)

    def linearize(self, theta: Mapping[str, Tensor], data: Data) -> None:
        """``None``: Jacobian products come from autograd through the rasterizer (the
        compiled products do not reach the cameras)."""
        return None
