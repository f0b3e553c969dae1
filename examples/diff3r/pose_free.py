"""The pose-free Diff3R variant: unposed context views → depth, relative poses,
pixel-aligned Gaussians in the first view's frame, and Λ for Gaussians *and* poses.

It shares with the pose-given encoder (``model.py``) only the TTO layer and the
output heads' initialization: no cost volume (there are no poses to sweep with), its
own CNNs, and the cameras are part of what the layer refines.

Model (every step differentiable):

1. **Features.** A per-view CNN (two scales) maps each image to ``[F, H, W]``.
2. **Pose head.** For each view ``v ≥ 1``, a strided CNN over ``[image_0, f_0,
   image_v, f_v]``, global average pooling and a linear layer give the twist
   ``ξ_v [6]`` (translation, rotation) of the world-to-camera pose of ``v`` in the
   first view's frame (``T_v = exp(ξ_v)``, :mod:`difftto.problems.splatting.se3`)
   and a Λ for that camera. View 0 is the frame: ``ξ_0 = 0``, masked out of the TTO
   data term (``pose_mask``), so it never moves.
3. **Depth and Gaussian heads.** A CNN over ``[image_v, f_v, f_0, mean_u f_u]``
   (and, with ``correlation_radius = r > 0``, the local correlation volume of ``f_v``
   with the other views' features, :func:`local_correlation`) predicts per pixel an
   inverse depth in ``[1/far, 1/near]`` (sigmoid), a sub-pixel offset, scale,
   rotation, opacity, color and one Λ per Gaussian group. With
   ``depth_source="sweep"`` the depth is two-stage instead: the pose head's poses
   first, then a plane-sweep cost volume of each view against the other views *with
   those predicted poses* (``model.py``'s :func:`~examples.diff3r.model.sweep_correlation`),
   refined by a small CNN into a distribution over inverse-depth candidates whose mean
   the head refines, as the pose-given model does (:meth:`PoseFreeModel.sweep`). The pixel's point
   ``depth · K⁻¹(pixel + offset)`` in camera ``v`` is carried into the first
   view's frame by ``exp(−ξ_v)`` (the inverse pose), so the means depend on the pose
   head too. With ``attach="camera"`` the layer instead refines view ``v``'s Gaussians
   in camera ``v``'s frame (``gaussian_splatting_posed(attach="camera")``): the pose
   carries them, so a pose update moves them with the camera.

Parameters ``θ`` of the layer: the five Gaussian groups of ``model.py`` plus
``pose [B, V, 6]``; problem ``gaussian_splatting_posed`` with identity base cameras
(its default backend: the compiled CPU kernels on CPU, the torch rasterizer elsewhere).
The pose head's ``ξ`` is the poses' Θ0, so the outer loss reaches the pose head
through the layer's ``∂L/∂θ0 = Λ ⊙ u`` (and through the means).

The pipeline works in the first context view's frame: :func:`first_view_frame`
re-expresses a batch's cameras there (targets are rendered from their ground-truth
pose relative to context view 0 during training; at evaluation
:mod:`examples.diff3r.pose_alignment` optimizes them against the frozen Gaussians).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import difftto
from difftto.problems import get as get_problem
from difftto.problems.splatting import PosedSplattingProblem, rasterize
from difftto.problems.splatting.se3 import se3_exp, se3_log
from examples.diff3r.model import (
    channel_slices,
    check_context_inputs,
    check_scale_opacity,
    init_gaussian_head,
    inverse_depth_candidates,
    lam_init_values,
    pixel_rays,
    sweep_correlation,
)
from examples.diff3r.pose_alignment import relative_pose_errors
from examples.diff3r.procrustes import weighted_procrustes

__all__ = [
    "DEPTH_AGREEMENT_FORMS",
    "DEPTH_SOURCES",
    "GROUPS",
    "PoseFreeModel",
    "PoseFreeOutput",
    "build_layer",
    "constant_lam",
    "context_data",
    "cross_view_inverse_depth",
    "depth_agreement_loss",
    "depth_loss",
    "first_view_frame",
    "gaussians_only",
    "world_theta",
    "is_pose_free",
    "local_correlation",
    "pose_errors_deg",
    "pose_loss",
    "predict",
    "refined_pose_loss",
    "run_pipeline",
]

#: Λ groups: the Gaussian groups (one Λ per Gaussian) and the poses (one Λ per camera).
GAUSSIAN_GROUPS = ("means", "log_scales", "quats", "opacities", "colors")
GROUPS = (*GAUSSIAN_GROUPS, "pose")
_HEAD = {"depth": 1, "offset": 2, "scale": 3, "quat": 4, "opacity": 1, "color": 3, "lam": len(GAUSSIAN_GROUPS)}
_SOFTPLUS_ONE = math.log(math.e - 1.0)


def _non_negative(name: str, value: Any, positive: bool = False) -> float:
    """``value`` as a finite float ``>= 0`` (``> 0`` with ``positive``); a ``ValueError``
    naming ``name`` and ``value`` otherwise."""
    bound = "> 0" if positive else ">= 0"
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a finite number {bound}, got {value!r}") from None
    if not math.isfinite(out) or out < 0 or (positive and out == 0):
        raise ValueError(f"{name}: expected a finite number {bound}, got {value!r}")
    return out


#: Where the pose-free model's depth comes from (``model.depth_source``).
DEPTH_SOURCES = ("monocular", "sweep")

#: Residual forms of the cross-view depth agreement (:func:`cross_view_inverse_depth`).
DEPTH_AGREEMENT_FORMS = ("inverse", "log", "relative")


def _check_depth_agreement_form(name: str, form: Any) -> str:
    """``form`` if it is one of :data:`DEPTH_AGREEMENT_FORMS`; a ``ValueError`` naming
    ``name`` and ``form`` otherwise."""
    if not isinstance(form, str) or form not in DEPTH_AGREEMENT_FORMS:
        expected = ", ".join(repr(f) for f in DEPTH_AGREEMENT_FORMS)
        raise ValueError(f"{name}: expected one of {expected}, got {form!r}")
    return form


def _check_fraction(name: str, value: Any, one: bool = False) -> float:
    """``value`` as a float in ``[0, 1)`` (``[0, 1]`` with ``one``); a ``ValueError``
    naming ``name`` and ``value`` otherwise."""
    interval = "[0, 1]" if one else "[0, 1)"
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number in {interval}, got {value!r}") from None
    if not (0 <= out <= 1 if one else 0 <= out < 1):  # also rejects nan
        raise ValueError(f"{name}: expected a number in {interval}, got {value!r}")
    return out


def _check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool; a ``ValueError`` naming ``name`` and ``value`` otherwise."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    return value


def _check_int(name: str, value: Any, minimum: int = 0) -> int:
    """``value`` if it is an int ``>= minimum`` (not a bool); a ``ValueError`` naming
    ``name`` and ``value`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def local_correlation(feats: Tensor, radius: int, pairwise: bool = False) -> Tensor:
    """Local correlation volume between each view's features and the other views' (as
    PWC-Net's / RAFT's, without poses): for view ``v``, pixel ``p`` and displacement
    ``d = (dx, dy) ∈ [−r, r]²``, the cosine ``⟨f̂_v(p), f̂_u(p + d)⟩`` of the
    channel-normalized features, 0 where ``p + d`` is outside the image.

    Args:
        feats: ``[B, V, F, H, W]``.
        radius: ``r >= 0``.
        pairwise: return every ordered pair ``(v, u)`` (``u = v`` included) instead of
            the mean over ``u ≠ v``.

    Returns:
        ``[B, V, (2r+1)², H, W]`` (the mean over the other views; ``V = 1``: zeros), or
        ``[B, V, V, (2r+1)², H, W]`` with ``pairwise``. Channel ``(dy + r)(2r + 1) + (dx + r)``
        holds displacement ``(dx, dy)`` (``dx`` along the width).

    Raises:
        ValueError: for a ``radius`` that is not an integer ``>= 0``.
    """
    r = _check_int("radius", radius)
    B, V, C, H, W = feats.shape
    k = 2 * r + 1
    fn = F.normalize(feats, dim=2)
    patches = F.unfold(fn.flatten(0, 1), kernel_size=k, padding=r).reshape(B, V, C, k * k, H, W)
    corr = torch.einsum("bvchw,buckhw->bvukhw", fn, patches)  # [B, V, V, k², H, W]
    return corr if pairwise else _mean_over_others(corr)


def _mean_over_others(pair: Tensor) -> Tensor:
    """``[B, V, V, ...]`` → ``[B, V, ...]``: the mean over ``u ≠ v`` of ``pair[:, v, u]`` (zeros for ``V = 1``)."""
    V = pair.shape[1]
    if V == 1:
        return torch.zeros_like(pair[:, :, 0])
    own = torch.diagonal(pair, dim1=1, dim2=2)  # [B, ..., V]: u = v
    own = own.permute(0, own.dim() - 1, *range(1, own.dim() - 1))
    return (pair.sum(dim=2) - own) / (V - 1)


def is_pose_free(model_cfg: Any) -> bool:
    """Whether a ``model`` config selects this variant (``name: pose_free``)."""
    get = model_cfg.get if isinstance(model_cfg, Mapping) or hasattr(model_cfg, "get") else None
    return get is not None and get("name", None) == "pose_free"


@dataclass
class PoseFreeOutput:
    """Prediction for ``B`` scenes of ``V`` unposed context views.

    Attributes:
        theta: the Gaussian groups (``N = V·H·W``, in the first view's frame) and
            ``pose [B, V, 6]`` (twists of the world-to-camera poses; ``pose[:, 0] = 0``).
        layer_theta: θ0 as the layer takes it: ``theta`` with ``attach="world"``; with
            ``attach="camera"`` the Gaussians of view ``v`` in camera ``v``'s frame
            (``theta``'s are those carried out by the pose, :func:`world_theta`).
        lam: Λ by group: ``[B, N]`` per Gaussian group, ``pose [B, V]``.
        depth: z-depth ``[B, V, H, W]`` in each view's camera.
        pose_rotation_weight: the model's weight of the rotation entries in
            :func:`pose_loss` (``pose_supervision_rotation``).
        refined_rotation_weight: the same in :func:`refined_pose_loss`
            (``pose_supervision_refined_rotation``).
    """

    theta: dict[str, Tensor]
    lam: dict[str, Tensor]
    depth: Tensor
    pose_rotation_weight: float = 1.0
    layer_theta: dict[str, Tensor] | None = None
    attach: str = "world"
    refined_rotation_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.layer_theta is None:
            self.layer_theta = self.theta

    @property
    def gaussian_view(self) -> Tensor:
        """The context view of each Gaussian ``[N]`` (``V·H·W``, view-major)."""
        B, V = self.theta["pose"].shape[:2]
        return torch.arange(V, device=self.depth.device).repeat_interleave(self.theta["means"].shape[1] // V)

    @property
    def viewmats(self) -> Tensor:
        """Predicted world-to-camera matrices ``[B, V, 4, 4]`` (first view's frame)."""
        return se3_exp(self.theta["pose"])


class _Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.a = nn.Conv2d(channels, channels, 3, padding=1)
        self.b = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.b(F.silu(self.a(F.silu(x))))


class _Encoder(nn.Module):
    """``[M, 3, H, W]`` → ``[M, F, H, W]``: a full-resolution path and a quarter-resolution context path."""

    def __init__(self, channels: int):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 5, padding=2)
        self.block = _Block(channels)
        self.low = nn.Sequential(nn.Conv2d(channels, channels, 4, stride=4), _Block(channels))
        self.fuse = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block(self.stem(x))
        low = F.interpolate(self.low(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([x, low], dim=1))


class _DepthUNet(nn.Module):
    """``[M, 3, H, W]`` image → ``[M, H, W]`` depth logit: a three-level U-Net (widths
    ``w``, ``2w``, ``4w``; H and W divisible by 4) over the image and two pixel-coordinate
    channels, a monocular depth network of its own (``depth_net="unet"``), with more
    reach and capacity than the per-pixel head."""

    def __init__(self, width: int):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.SiLU())

        w = width
        self.enc1, self.enc2, self.enc3 = block(5, w), block(w, 2 * w), block(2 * w, 4 * w)
        self.dec2, self.dec1 = block(6 * w, 2 * w), block(3 * w, w)
        self.out = nn.Conv2d(w, 1, 1)

    def forward(self, images: Tensor) -> Tensor:
        M, _, H, W = images.shape
        if H % 4 or W % 4:
            raise ValueError(f"depth_net='unet': image height and width must be divisible by 4, got {H}x{W}")
        ys = torch.linspace(-1.0, 1.0, H, dtype=images.dtype, device=images.device)
        xs = torch.linspace(-1.0, 1.0, W, dtype=images.dtype, device=images.device)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # [2, H, W]: x, y
        x1 = self.enc1(torch.cat([images, grid.expand(M, 2, H, W)], dim=1))
        x2 = self.enc2(F.avg_pool2d(x1, 2))
        x3 = self.enc3(F.avg_pool2d(x2, 2))
        x2 = self.dec2(torch.cat([x2, F.interpolate(x3, scale_factor=2.0)], dim=1))
        x1 = self.dec1(torch.cat([x1, F.interpolate(x2, scale_factor=2.0)], dim=1))
        return self.out(x1)[:, 0]


DEPTH_NETS = ("head", "unet")


class PoseFreeModel(nn.Module):
    """Unposed context views (intrinsics known) → Gaussians, poses and Λ.

    Args:
        feature_channels, hidden_channels: CNN widths.
        scale_min, scale_max, scale_init: Gaussian scale range / start, in pixel footprints.
        opacity_init: initial opacity.
        lam_init: initial Λ by group (a dict with the keys of :data:`GROUPS`, or a number).
        lam_min: floor added to Λ.
        pose_translation, pose_rotation: the pose head's output scales (translation in
            scene units, rotation in radians per unit of the raw output).
        tto_pose_lr: the inner Adam/GD learning rate of the pose group (read by
            :func:`build_layer`; kept here because it belongs to this model's θ).
        tto_pose_translation_unit: the unit of the translation entries of the poses in
            the layer's θ (:func:`run_pipeline`): θ holds translation / unit, so Adam's
            per-entry step moves the translation ``unit`` times more and Λ anchors it
            ``unit²`` times less (1: the twist itself). Θ0 and Θ* are returned in
            scene units whatever the unit.
        pose_supervision: weight of an optional training term on the predicted context
            poses (:func:`pose_loss`, read by ``train.py``; 0: photometric losses only).
        pose_supervision_rotation: that term's weight on the rotation entries of the
            twist error, relative to the translation entries.
        pose_supervision_refined: weight of an optional training term on the *refined*
            context poses, the layer's Θ* (:func:`refined_pose_loss`, read by
            ``train.py`` in the modes through the layer; 0, the default: off). Its
            gradient reaches Λ and Θ0 (depths, poses) through the layer, so training
            asks for a TTO whose optimum has the right poses.
        pose_supervision_refined_rotation: that term's weight on the rotation entries
            (default: ``pose_supervision_rotation``).
        depth_agreement: weight of an optional training term on the predicted depths,
            their cross-view agreement under the true relative context poses
            (:func:`depth_agreement_loss`, read by ``train.py`` in every mode; 0: off).
        depth_agreement_form: that term's residual (:data:`DEPTH_AGREEMENT_FORMS`):
            ``"inverse"`` (the default), the inverse-depth difference, which moving
            every depth to the far bound makes small; ``"log"`` or ``"relative"``,
            scale-free (see :func:`cross_view_inverse_depth`).
        depth_agreement_one_sided: count only the points in front of the other view's
            surface (``depth_agreement_loss(one_sided=True)``), not those behind it,
            which may be occluded there.
        depth_agreement_contrast: ``δ`` in ``[0, 1)``; > 0: the term is divided by its
            value with the relative translations scaled by ``1 ± δ``
            (``depth_agreement_loss(contrast=δ)``), so depths far away, which agree
            under any small translation, do not satisfy it (0: off).
        depth_supervision: weight of an optional training term on the predicted depths
            against the training views' ground-truth depths (:func:`depth_loss`; needs
            data with depth, the procedural generator's; every mode; 0: off). Training
            only: the model reads no depth at test time.
        depth_supervision_scale_invariance: ``λ`` in ``[0, 1]``: that term's per-view
            mean log-depth error is subtracted ``λ`` times (:func:`depth_loss`), so
            ``1`` scores the depth map's shape alone and leaves its scale to the other
            losses, ``0`` (default) is the plain absolute log error.
        pose_estimator: ``"head"``: the pose head's twist; ``"procrustes"``: a cross-view
            point-map head predicts, for each pixel of view ``v``, its 3D point in the
            first view's frame and a weight, and the weighted Procrustes
            (:func:`examples.diff3r.procrustes.weighted_procrustes`) between view ``v``'s
            own back-projected points and those gives the pose.
        pose_lam: ``"camera"``: one Λ per camera (on all six twist entries);
            ``"split"``: one for the translation and one for the rotation entries
            (``lam["pose"]`` is then ``[B, V, 6]``).
        lam_pose_rotation: the initial rotation Λ with ``pose_lam="split"`` (default:
            ``lam_init``'s ``pose``).
        correlation_radius: ``r >= 0``; > 0: the per-pixel heads (and the pose net, with
            view ``v``'s correlation with view 0) also see the local correlation volume
            of each view's features with the other views' at displacements in
            ``[−r, r]²`` (:func:`local_correlation`, ``(2r+1)²`` channels), a
            correspondence cue; 0 (the default): off, the model without it.
        depth_source: ``"monocular"`` (the default): the per-pixel head predicts the
            inverse depth in ``[1/far, 1/near]`` from the view's features (and the
            correlation, if any); ``"sweep"``: two-stage, the poses first (pose head only),
            then a plane-sweep cost volume of each view against every other view with
            the *predicted* poses (:meth:`sweep`), a small CNN refines it into logits over
            ``depth_candidates`` inverse depths (uniform between ``1/near`` and
            ``1/far``), and the head, which also reads the distribution and its mean,
            refines that mean by a factor ``exp(±sweep_depth_refine)`` (the pose-given
            model's scheme).
        depth_candidates: ``D >= 2`` plane-sweep candidates (``depth_source="sweep"``).
        sweep_depth_refine: the largest log-factor the head applies to the sweep's depth.
        sweep_pose_gradient: ``True``: the sweep's gradient reaches the predicted poses
            (the pose head learns from the depths' photometric loss too); ``False``: the
            sweep sees the poses detached (they still get the means' and the layer's
            gradients).
        sweep_training_poses: ``"predicted"`` (the default): the sweep uses the predicted
            poses in training as at test time; ``"ground_truth"``: in training mode
            (``model.training``) :func:`predict` gives the sweep the batch's true context
            poses (teacher forcing; at test time, in eval mode, the predicted ones).
        depth_net: ``"head"`` (the default): the depth is a channel of the per-pixel
            head; ``"unet"`` (``depth_source="monocular"`` only): a monocular U-Net of its
            own over each image and the pixel coordinates (widths ``depth_net_width``, 2×,
            4×; image sides divisible by 4) gives it, through the same inverse-depth range.
        depth_net_width: the U-Net's first width.
        attach: ``"world"``: the layer refines the Gaussians in the first view's frame;
            ``"camera"``: each view's Gaussians in that view's camera frame, placed in the
            world by its current pose (``gaussian_splatting_posed(attach="camera")``), so
            a pose update moves them with the camera and the pose is driven by the other
            views only (pose-free bundle adjustment).
        name: ``"pose_free"`` (the config's selector; ignored).
    """

    def __init__(
        self,
        feature_channels: int = 24,
        hidden_channels: int = 32,
        scale_min: float = 0.5,
        scale_max: float = 4.0,
        scale_init: float = 1.0,
        opacity_init: float = 0.9,
        lam_init: float | Mapping[str, float] = 1.0,
        lam_min: float = 1e-4,
        pose_translation: float = 1.0,
        pose_rotation: float = 0.3,
        tto_pose_lr: float = 3e-3,
        tto_pose_translation_unit: float = 1.0,
        pose_supervision: float = 0.0,
        pose_supervision_rotation: float = 1.0,
        pose_supervision_refined: float = 0.0,
        pose_supervision_refined_rotation: float | None = None,
        depth_agreement: float = 0.0,
        depth_agreement_form: str = "inverse",
        depth_agreement_one_sided: bool = False,
        depth_agreement_contrast: float = 0.0,
        depth_supervision: float = 0.0,
        depth_supervision_scale_invariance: float = 0.0,
        pose_estimator: str = "head",
        pose_lam: str = "camera",
        lam_pose_rotation: float | None = None,
        attach: str = "world",
        correlation_radius: int = 0,
        depth_source: str = "monocular",
        depth_candidates: int = 32,
        sweep_depth_refine: float = 0.3,
        sweep_pose_gradient: bool = True,
        sweep_training_poses: str = "predicted",
        depth_net: str = "head",
        depth_net_width: int = 32,
        name: str = "pose_free",
    ):
        super().__init__()
        check_scale_opacity(scale_min, scale_init, scale_max, opacity_init)
        if pose_estimator not in ("head", "procrustes"):
            raise ValueError(f"pose_estimator: expected 'head' or 'procrustes', got {pose_estimator!r}")
        if pose_lam not in ("camera", "split"):
            raise ValueError(f"pose_lam: expected 'camera' or 'split', got {pose_lam!r}")
        values = lam_init_values(lam_init, GROUPS)
        if lam_pose_rotation is not None and float(lam_pose_rotation) <= 0:
            raise ValueError(f"lam_pose_rotation: expected a value > 0, got {lam_pose_rotation}")
        if attach not in ("world", "camera"):
            raise ValueError(f"attach: expected 'world' or 'camera', got {attach!r}")
        self.pose_estimator, self.pose_lam, self.attach = pose_estimator, pose_lam, attach
        self.correlation_radius = _check_int("correlation_radius", correlation_radius)
        if not isinstance(depth_source, str) or depth_source not in DEPTH_SOURCES:
            raise ValueError(f"depth_source: expected one of {', '.join(map(repr, DEPTH_SOURCES))}, "
                             f"got {depth_source!r}")
        if depth_source == "sweep" and pose_estimator != "head":
            raise ValueError("depth_source='sweep' needs pose_estimator='head' (the procrustes estimator's pose "
                             "is computed from the depths the sweep would need it for)")
        self.depth_source = depth_source
        self.depth_candidates = _check_int("depth_candidates", depth_candidates, minimum=2)
        self.sweep_depth_refine = _non_negative("sweep_depth_refine", sweep_depth_refine)
        self.sweep_pose_gradient = _check_bool("sweep_pose_gradient", sweep_pose_gradient)
        if sweep_training_poses not in ("predicted", "ground_truth"):
            raise ValueError(f"sweep_training_poses: expected 'predicted' or 'ground_truth', "
                             f"got {sweep_training_poses!r}")
        self.sweep_training_poses = sweep_training_poses
        if not isinstance(depth_net, str) or depth_net not in DEPTH_NETS:
            raise ValueError(f"depth_net: expected one of {', '.join(map(repr, DEPTH_NETS))}, got {depth_net!r}")
        if depth_net == "unet" and depth_source != "monocular":
            raise ValueError(f"depth_net='unet' is a monocular depth network: it needs depth_source='monocular', "
                             f"got {depth_source!r}")
        _check_int("depth_net_width", depth_net_width, minimum=1)
        self.depth_net = depth_net
        rotation_init = values[-1] if lam_pose_rotation is None else float(lam_pose_rotation)
        self.register_buffer("lam_pose_init", torch.tensor([values[-1]] * 3 + [rotation_init] * 3),
                             persistent=False)
        self.scale_min, self.scale_max = float(scale_min), float(scale_max)
        self.lam_min = float(lam_min)
        self.tto_pose_lr = float(tto_pose_lr)
        self.tto_pose_translation_unit = _non_negative("tto_pose_translation_unit", tto_pose_translation_unit,
                                                       positive=True)
        self.pose_supervision = float(pose_supervision)
        self.pose_supervision_rotation = float(pose_supervision_rotation)
        self.pose_supervision_refined = _non_negative("pose_supervision_refined", pose_supervision_refined)
        if pose_supervision_refined_rotation is None:
            pose_supervision_refined_rotation = self.pose_supervision_rotation
        self.pose_supervision_refined_rotation = _non_negative("pose_supervision_refined_rotation",
                                                               pose_supervision_refined_rotation)
        self.depth_agreement = _non_negative("depth_agreement", depth_agreement)
        self.depth_agreement_form = _check_depth_agreement_form("depth_agreement_form", depth_agreement_form)
        self.depth_agreement_one_sided = _check_bool("depth_agreement_one_sided", depth_agreement_one_sided)
        self.depth_agreement_contrast = _check_fraction("depth_agreement_contrast", depth_agreement_contrast)
        self.depth_supervision = _non_negative("depth_supervision", depth_supervision)
        self.depth_supervision_scale_invariance = _check_fraction(
            "depth_supervision_scale_invariance", depth_supervision_scale_invariance, one=True)
        self.register_buffer("lam_init", torch.tensor(values), persistent=False)
        self.register_buffer("pose_scale", torch.tensor([pose_translation] * 3 + [pose_rotation] * 3),
                             persistent=False)
        f, h = feature_channels, hidden_channels
        c = (2 * self.correlation_radius + 1) ** 2 if self.correlation_radius > 0 else 0  # correlation channels
        self.encoder = _Encoder(f)
        self.pose_net = nn.Sequential(
            nn.Conv2d(2 * (3 + f) + c, h, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(h, h, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(h, h, 3, padding=1), nn.SiLU(),
        )
        # twist (6) and the camera's Λ (1, or translation and rotation Λ with pose_lam="split")
        self.pose_out = nn.Linear(h, 7 if pose_lam == "camera" else 8)
        d = self.depth_candidates + 1 if depth_source == "sweep" else 0  # the sweep's distribution and mean
        self.head = nn.Sequential(nn.Conv2d(3 + 3 * f + c + d, h, 3, padding=1), _Block(h), nn.SiLU(),
                                  nn.Conv2d(h, sum(_HEAD.values()), 3, padding=1))
        if pose_estimator == "procrustes":
            # Per pixel of view v ≥ 1: its point in the first view's frame, as an offset
            # (in units of its depth) from its own-frame point, and a Procrustes weight.
            # Inputs: [image_v, f_v, f_0, mean_u f_u], the correlation (if any) and the pose net's pooled features.
            self.xview = nn.Sequential(nn.Conv2d(3 + 3 * f + c + h, h, 3, padding=1), _Block(h), nn.SiLU(),
                                       nn.Conv2d(h, 4, 3, padding=1))
        if depth_net == "unet":
            self.depth_unet = _DepthUNet(depth_net_width)
        if depth_source == "sweep":  # cost volume + the view's features → logits over the candidates
            D = self.depth_candidates
            self.cost_refine = nn.Sequential(nn.Conv2d(D + f, h, 3, padding=1), _Block(h), nn.SiLU(),
                                             nn.Conv2d(h, D, 3, padding=1))
        self._init_outputs(scale_init, opacity_init)

    def _init_outputs(self, scale_init: float, opacity_init: float) -> None:
        init_gaussian_head(self.head[-1], self._slices(), self.scale_min, self.scale_max, scale_init, opacity_init)
        nn.init.normal_(self.pose_out.weight, std=1e-3)
        with torch.no_grad():
            self.pose_out.bias.zero_()
            self.pose_out.bias[6:] = _SOFTPLUS_ONE
        if self.pose_estimator == "procrustes":  # start at the identity pose, uniform weights
            nn.init.normal_(self.xview[-1].weight, std=1e-3)
            with torch.no_grad():
                self.xview[-1].bias.zero_()
                self.xview[-1].bias[3] = _SOFTPLUS_ONE
        if self.depth_source == "sweep":  # the logits start at the raw correlation
            nn.init.zeros_(self.cost_refine[-1].weight)
            nn.init.zeros_(self.cost_refine[-1].bias)

    @staticmethod
    def _slices() -> dict[str, slice]:
        return channel_slices(_HEAD)

    def sweep(self, feats: Tensor, K: Tensor, pose: Tensor, near: Tensor, far: Tensor) -> tuple[Tensor, Tensor]:
        """Plane-sweep correlation volume of each view against every other view with the
        poses ``pose``: for view ``v``, pixel ``p`` and candidate ``k``, the mean over
        ``u ≠ v`` of :func:`~examples.diff3r.model.sweep_correlation`, view ``v``'s ray
        through ``p`` cut at z-depth ``1/inv_k``, projected into view ``u`` and ``u``'s
        features sampled there.

        Args:
            feats: features ``[B, V, F, H, W]``.
            K: pixel intrinsics ``[B, V, 3, 3]``.
            pose: twists ``[B, V, 6]`` of the world-to-camera poses (first view's frame).
            near, far: depth bounds ``[B, V]``.

        Returns:
            ``(cost [B, V, D, H, W], inv_cand [B, V, D])``: the volume and its inverse
            depths, ``1/near`` (``k = 0``) to ``1/far``.
        """
        B, V, _, H, W = feats.shape
        inv_cand = inverse_depth_candidates(near, far, self.depth_candidates, feats.dtype)
        w2c = se3_exp(pose)
        c2w = se3_exp(-pose)
        dirs = pixel_rays(K, c2w, H, W)
        origins = c2w[..., :3, 3]
        cost = None
        for k in range(1, V):  # partner u = v + k (mod V): every ordered pair once
            other = [(v + k) % V for v in range(V)]
            c = sweep_correlation(feats, feats[:, other], dirs, origins, 1.0 / inv_cand, K[:, other], w2c[:, other])
            cost = c if cost is None else cost + c
        return cost / (V - 1), inv_cand

    def forward(self, images: Tensor, intrinsics: Tensor, near: Tensor, far: Tensor,
                sweep_pose: Tensor | None = None) -> PoseFreeOutput:
        """Predict Gaussians, poses and Λ.

        Args:
            images: context images ``[B, V, 3, H, W]`` in ``[0, 1]``, ``V ≥ 2``.
            intrinsics: normalized intrinsics ``[B, V, 3, 3]``.
            near, far: depth bounds ``[B, V]``.
            sweep_pose: with ``depth_source="sweep"``, twists ``[B, V, 6]`` the plane sweep
                uses instead of the predicted poses (a diagnostic: e.g. the true poses;
                the returned poses are still the predicted ones); ``None``: the predicted.

        Raises:
            ValueError: for a ``sweep_pose`` with ``depth_source="monocular"`` or of the wrong shape.
        """
        check_context_inputs(images, "expected", intrinsics=(intrinsics, (3, 3)), near=(near, ()), far=(far, ()))
        B, V, _, H, W = images.shape
        if sweep_pose is not None:
            if self.depth_source != "sweep":
                raise ValueError("sweep_pose: given to a model without the sweep (depth_source='monocular')")
            if tuple(sweep_pose.shape) != (B, V, 6):
                raise ValueError(f"sweep_pose: expected shape {[B, V, 6]}, got {list(sweep_pose.shape)}")
        K = intrinsics * intrinsics.new_tensor([float(W), float(H), 1.0]).unsqueeze(-1)
        feats = self.encoder(images.flatten(0, 1)).unflatten(0, (B, V))  # [B, V, F, H, W]
        r = self.correlation_radius
        pair = local_correlation(feats, r, pairwise=True) if r > 0 else None  # [B, V, V, (2r+1)², H, W]

        # Poses of views 1..V-1 relative to view 0.
        first = torch.cat([images[:, :1], feats[:, :1]], dim=2).expand(B, V - 1, -1, H, W)
        others = torch.cat([images[:, 1:], feats[:, 1:]], dim=2)
        pose_in = [first, others] if pair is None else [first, others, pair[:, 1:, 0]]  # view v against view 0
        pooled = self.pose_net(torch.cat(pose_in, dim=2).flatten(0, 1)).mean(dim=(-1, -2))
        raw = self.pose_out(pooled).unflatten(0, (B, V - 1))  # [B, V-1, 7 or 8]
        if self.pose_lam == "camera":
            lam_pose = F.softplus(raw[..., 6]) * self.lam_init[-1] + self.lam_min
            lam_pose = torch.cat([torch.full_like(lam_pose[:, :1], float(self.lam_init[-1])), lam_pose], dim=1)
        else:  # [B, V, 6]: translation Λ on entries 0–2, rotation Λ on 3–5
            lam_pose = F.softplus(raw[..., 6:8]).repeat_interleave(3, dim=-1) * self.lam_pose_init + self.lam_min
            lam_pose = torch.cat([self.lam_pose_init.expand(B, 1, 6).to(lam_pose.dtype), lam_pose], dim=1)

        # Per-pixel heads.
        ctx = torch.cat([feats[:, :1].expand(B, V, -1, H, W), feats.mean(dim=1, keepdim=True).expand(B, V, -1, H, W)],
                        dim=2)
        if pair is not None:  # the mean correlation with the other views
            ctx = torch.cat([ctx, _mean_over_others(pair)], dim=2)
        head_in = [images, feats, ctx]
        inv_near, inv_far = (1.0 / near)[..., None, None], (1.0 / far)[..., None, None]
        if self.depth_source == "sweep":  # two-stage: the predicted poses first, then the plane sweep with them
            if sweep_pose is None:
                sweep_pose = torch.cat([raw.new_zeros(B, 1, 6), raw[..., :6] * self.pose_scale], dim=1)
                if not self.sweep_pose_gradient:
                    sweep_pose = sweep_pose.detach()
            cost, inv_cand = self.sweep(feats, K, sweep_pose, near, far)
            logits = cost + self.cost_refine(torch.cat([cost, feats], dim=2).flatten(0, 1)).reshape(cost.shape)
            probs = torch.softmax(logits, dim=2)  # [B, V, D, H, W]
            inv_coarse = (probs * inv_cand[..., None, None]).sum(dim=2)  # [B, V, H, W]
            head_in += [probs, ((inv_coarse - inv_far) / (inv_near - inv_far))[:, :, None]]
        out = self.head(torch.cat(head_in, dim=2).flatten(0, 1))
        out = out.unflatten(0, (B, V)).permute(0, 1, 3, 4, 2)  # [B, V, H, W, C]
        sl = self._slices()
        if self.depth_source == "sweep":
            inv_depth = inv_coarse * torch.exp(self.sweep_depth_refine * torch.tanh(out[..., sl["depth"]][..., 0]))
        else:
            logit = (self.depth_unet(images.flatten(0, 1)).unflatten(0, (B, V)) if self.depth_net == "unet"
                     else out[..., sl["depth"]][..., 0])
            inv_depth = inv_far + (inv_near - inv_far) * torch.sigmoid(logit)
        depth = 1.0 / inv_depth  # [B, V, H, W]

        v_idx, u_idx = torch.meshgrid(torch.arange(H, dtype=images.dtype, device=images.device) + 0.5,
                                      torch.arange(W, dtype=images.dtype, device=images.device) + 0.5, indexing="ij")
        pix = torch.stack([u_idx, v_idx], dim=-1) + torch.sigmoid(out[..., sl["offset"]]) - 0.5  # [B, V, H, W, 2]
        pix = torch.cat([pix, torch.ones_like(pix[..., :1])], dim=-1)
        cam = pix @ torch.linalg.inv(K)[:, :, None].transpose(-1, -2) * depth[..., None]  # camera v, z = depth
        if self.pose_estimator == "head":
            pose = torch.cat([raw.new_zeros(B, 1, 6), raw[..., :6] * self.pose_scale], dim=1)  # [B, V, 6]
        else:
            glob = pooled.unflatten(0, (B, V - 1))[..., None, None].expand(B, V - 1, -1, H, W)
            xo = self.xview(torch.cat([images[:, 1:], feats[:, 1:], ctx[:, 1:], glob], dim=2).flatten(0, 1))
            xo = xo.unflatten(0, (B, V - 1)).permute(0, 1, 3, 4, 2).flatten(2, 3)  # [B, V-1, H·W, 4]
            own = cam[:, 1:].flatten(2, 3)  # [B, V-1, H·W, 3]
            in_first = own + depth[:, 1:].flatten(2, 3)[..., None] * xo[..., :3]
            c2w_v = weighted_procrustes(own, in_first, F.softplus(xo[..., 3]) + 1e-4)  # camera v → view 0
            pose = torch.cat([raw.new_zeros(B, 1, 6), se3_log(_invert(c2w_v))], dim=1)
        c2w = se3_exp(-pose)  # [B, V, 4, 4]: camera v → first view's frame
        means = cam @ c2w[:, :, None, :3, :3].transpose(-1, -2) + c2w[:, :, None, None, :3, 3]

        focal = K[..., 0, 0][..., None, None]
        multiple = self.scale_min + (self.scale_max - self.scale_min) * torch.sigmoid(out[..., sl["scale"]])
        log_scales = torch.log(multiple * (depth / focal)[..., None])
        quats = out[..., sl["quat"]] + out.new_tensor([1.0, 0.0, 0.0, 0.0])
        colors = images.permute(0, 1, 3, 4, 2) + out[..., sl["color"]]
        lam_raw = F.softplus(out[..., sl["lam"]]) * self.lam_init[:-1] + self.lam_min

        def flat(x: Tensor) -> Tensor:
            return x.reshape(B, V * H * W, *x.shape[4:])

        theta = {"means": flat(means), "log_scales": flat(log_scales), "quats": flat(quats),
                 "opacities": flat(out[..., sl["opacity"]][..., 0]), "colors": flat(colors), "pose": pose}
        lam = {g: flat(lam_raw[..., i]) for i, g in enumerate(GAUSSIAN_GROUPS)}
        lam["pose"] = lam_pose
        weights = {"pose_rotation_weight": self.pose_supervision_rotation,
                   "refined_rotation_weight": self.pose_supervision_refined_rotation}
        if self.attach == "world":
            return PoseFreeOutput(theta, lam, depth, **weights)
        # attach="camera": the layer's Θ0 has view v's Gaussians in camera v's frame (the
        # back-projected points themselves); the world ones are placed by the pose.
        local = {**theta, "means": flat(cam)}
        view = torch.arange(V, device=images.device).repeat_interleave(H * W)
        world = world_theta(local, view)
        return PoseFreeOutput(world, lam, depth, layer_theta=local, attach="camera", **weights)



# ----------------------------------------------------------------------- pipeline


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _by_group(value: Any, name: str, pose_value: float) -> float | dict[str, float]:
    if isinstance(value, (int, float)):
        return {**{g: float(value) for g in GAUSSIAN_GROUPS}, "pose": float(pose_value)}
    try:
        out = {g: float(value[g]) for g in GAUSSIAN_GROUPS}
    except (KeyError, TypeError):
        raise ValueError(f"{name}: expected a number or a dict with keys {list(GAUSSIAN_GROUPS)}, "
                         f"got {value!r}") from None
    out["pose"] = float(value["pose"]) if "pose" in value else float(pose_value)
    return out


def build_layer(tto: Any, backward: str = "implicit", pose_lr: float = 3e-3,
                attach: str = "world") -> difftto.ImplicitLayer:
    """The TTO layer on ``gaussian_splatting_posed(attach=attach)``: the same ``tto``
    config as the pose-given model's (``conf/tto/*.yaml``), the pose group's learning
    rate ``pose_lr`` (or ``tto.lr.pose`` when given). :func:`run_pipeline` switches the
    problem's ``attach`` to the model's."""
    name = _get(tto, "inner", "adam")
    steps = int(_get(tto, "steps", 20))
    if name == "adam":
        betas = tuple(float(b) for b in _get(tto, "betas", (0.9, 0.999)))
        inner = difftto.Adam(lr=_by_group(_get(tto, "lr"), "tto.lr", pose_lr), steps=steps, betas=betas)
    elif name == "gd":
        inner = difftto.GradientDescent(lr=_by_group(_get(tto, "lr"), "tto.lr", pose_lr), steps=steps)
    elif name == "gauss_newton":
        inner = difftto.GaussNewton(steps=steps, damping=float(_get(tto, "damping", 1e-3)))
    else:
        raise ValueError(f"tto.inner: expected one of ('adam', 'gd', 'gauss_newton'), got {name!r}")
    solver = difftto.solvers.PCG(rtol=float(_get(tto, "pcg_rtol", 1e-3)), max_iter=int(_get(tto, "pcg_max_iter", 10)))
    return difftto.ImplicitLayer(get_problem("gaussian_splatting_posed", attach=attach), inner=inner,
                                 backward=backward,
                                 hessian=_get(tto, "hessian", "gauss_newton"), solver=solver,
                                 on_failure=_get(tto, "on_failure", "best"), truncate=int(_get(tto, "truncate", 5)))


def _frame_data(pose: Tensor, gaussian_view: Tensor) -> dict[str, Tensor]:
    B, V = pose.shape[:2]
    mask = torch.ones(B, V, dtype=pose.dtype, device=pose.device)
    mask[:, 0] = 0
    eye = torch.eye(4, dtype=pose.dtype, device=pose.device).expand(B, V, 4, 4).contiguous()
    return {"viewmats": eye, "pose_mask": mask, "gaussian_view": gaussian_view}


def world_theta(theta: Mapping[str, Tensor], gaussian_view: Tensor) -> dict[str, Tensor]:
    """``θ`` with camera-attached Gaussians (view ``gaussian_view[n]``'s frame) → the
    Gaussians in the first view's frame and the same ``pose``, as
    ``gaussian_splatting_posed(attach="camera")`` places them (differentiable)."""
    problem = PosedSplattingProblem(attach="camera")
    return {**problem.world_gaussians(theta, _frame_data(theta["pose"], gaussian_view)), "pose": theta["pose"]}


class TranslationScaledProblem(PosedSplattingProblem):
    """``gaussian_splatting_posed`` whose ``pose`` translation entries are in units of
    ``translation_unit`` (θ holds translation / unit; the rotation entries as they are):
    every product (residuals, Jacobians, the raster state) goes through :meth:`render`."""

    def __init__(self, translation_unit: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.translation_unit = float(translation_unit)

    def __repr__(self) -> str:
        return f"TranslationScaledProblem(translation_unit={self.translation_unit:g}, {super().__repr__()})"

    def render(self, theta, data, *, return_state=False):
        pose = scale_translation(theta["pose"], self.translation_unit)
        return super().render({**theta, "pose": pose}, data, return_state=return_state)


def scale_translation(pose: Tensor, factor: float) -> Tensor:
    """Twists ``[..., 6]`` with the translation entries multiplied by ``factor``."""
    return torch.cat([pose[..., :3] * factor, pose[..., 3:]], dim=-1)


def _layer_for(layer: difftto.ImplicitLayer, attach: str, translation_unit: float = 1.0) -> difftto.ImplicitLayer:
    """``layer`` when its problem's ``attach`` is ``attach`` and its pose translation
    unit is ``translation_unit``; otherwise a shallow copy of it on
    ``gaussian_splatting_posed(attach=attach)`` (:class:`TranslationScaledProblem` when
    the unit is not 1; same backend)."""
    problem = layer.problem
    if (getattr(problem, "attach", "world") == attach
            and getattr(problem, "translation_unit", 1.0) == float(translation_unit)):
        return layer
    out = copy.copy(layer)
    backend = getattr(problem, "backend", "auto")
    if float(translation_unit) == 1.0:
        out.problem = get_problem("gaussian_splatting_posed", backend=backend, attach=attach)
    else:
        out.problem = TranslationScaledProblem(translation_unit, backend=backend, attach=attach)
    return out


def _invert(T: Tensor) -> Tensor:
    R, t = T[..., :3, :3], T[..., :3, 3:]
    out = torch.zeros_like(T)
    out[..., :3, :3] = R.transpose(-1, -2)
    out[..., :3, 3:] = -R.transpose(-1, -2) @ t
    out[..., 3, 3] = 1
    return out


def first_view_frame(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch with every ``*_extrinsics`` (camera-to-world) re-expressed in the
    first context camera's frame: ``c2w ← c2w_ctx0⁻¹ · c2w`` (context 0 becomes the
    identity). Other entries are kept."""
    out = dict(batch)
    w2c0 = _invert(batch["context_extrinsics"][:, :1])  # [B, 1, 4, 4]
    for key in [k for k in batch if k.endswith("_extrinsics")]:
        out[key] = w2c0 @ batch[key]
    return out


def pose_loss(pred: PoseFreeOutput, batch: Mapping[str, Tensor], rotation_weight: float | None = None,
              pose: Tensor | None = None) -> Tensor:
    """Mean squared twist error of the predicted context poses ``1..V-1`` against the
    batch's (first-view-frame) ones: ``‖log(T_pred · T_true⁻¹)‖²``, a scalar, its
    rotation entries weighted by ``rotation_weight`` (default: the prediction's
    ``pose_rotation_weight``, the model's ``pose_supervision_rotation``). ``pose``
    (``[B, V, 6]``, default the prediction's Θ0 poses): the twists scored."""
    if rotation_weight is None:
        rotation_weight = pred.pose_rotation_weight
    if pose is None:
        pose = pred.theta["pose"]
    true_w2c = _invert(batch["context_extrinsics"][:, 1:])
    rel = se3_exp(pose[:, 1:]) @ _invert(true_w2c)
    err = se3_log(rel).pow(2)
    return (err[..., :3].sum(-1) + rotation_weight * err[..., 3:].sum(-1)).mean()


def refined_pose_loss(out: PoseFreePipelineOutput, batch: Mapping[str, Tensor],
                      rotation_weight: float | None = None) -> Tensor:
    """:func:`pose_loss` of the *refined* context poses, the layer's Θ* (``out.theta``'s
    ``pose``), rotation entries weighted by ``rotation_weight`` (default: the model's
    ``pose_supervision_refined_rotation``). Its gradient reaches the model through the
    layer: Θ0 of the poses and of the Gaussians and Λ.

    Raises:
        ValueError: when ``out`` did not go through the layer (no Θ*).
    """
    if out.info is None:
        raise ValueError("refined_pose_loss: the pipeline ran without the TTO layer (no refined poses Θ*); "
                         "use pose_loss for the predicted ones")
    if rotation_weight is None:
        rotation_weight = out.prediction.refined_rotation_weight
    return pose_loss(out.prediction, batch, rotation_weight, pose=out.theta["pose"])


def pose_errors_deg(out: PoseFreePipelineOutput, batch: Mapping[str, Tensor]) -> dict[str, float]:
    """Mean rotation and translation-direction errors (degrees) of the context poses of
    Θ0 (``*_theta0``) and, through the layer, of Θ* (``*_theta_star``), for the
    training log."""
    true = _invert(batch["context_extrinsics"])
    poses = {"theta0": out.prediction.theta["pose"]}
    if out.info is not None:
        poses["theta_star"] = out.theta["pose"]
    rec = {}
    with torch.no_grad():
        for name, pose in poses.items():
            rot, trans = relative_pose_errors(se3_exp(pose.detach()), true)
            rec[f"rot_err_deg_{name}"] = float(rot.mean())
            rec[f"trans_err_deg_{name}"] = float(trans.mean())
    return rec


def cross_view_inverse_depth(depth_src: Tensor, K_src: Tensor, K_dst: Tensor, dst_from_src: Tensor,
                             depth_dst: Tensor, form: str = "inverse") -> tuple[Tensor, Tensor]:
    """How a source view's depth map agrees with a destination view's under a relative
    pose: each source pixel center ``p`` is back-projected with its depth,
    ``X = depth_src(p) · K_src⁻¹ p̃``, moved into the destination camera,
    ``Y = R X + t`` (``dst_from_src = [R t; 0 1]``), and projected there, ``p' =
    π(K_dst Y)``; the destination's inverse depth, bilinear at ``p'``, is compared with
    ``1/Y_z``. (Inverse depth: for a plane it is affine in the pixel, so its bilinear
    interpolation between pixel centers is exact.)

    Args:
        depth_src, depth_dst: z-depths ``[B, H, W]`` (> 0), pixel ``(i, j)``'s center at
            ``(j + ½, i + ½)``.
        K_src, K_dst: pixel intrinsics ``[B, 3, 3]``.
        dst_from_src: ``[B, 4, 4]``, source camera → destination camera.
        form: how the two inverse depths ``a = 1/Y_z`` and ``b = depth_dst⁻¹(p')`` are
            compared (:data:`DEPTH_AGREEMENT_FORMS`): ``"inverse"``, ``a − b`` (in
            inverse scene units); ``"log"``, ``log a − log b``; ``"relative"``,
            ``(a − b) / ((a + b)/2)``. The last two depend only on ``a/b`` (scale-free):
            scaling both depth maps and the relative translation by ``c`` leaves them
            unchanged, where ``a − b`` is divided by ``c``. So scaling the depth maps
            alone by ``c`` acts on them only as the translation divided by ``c`` does:
            consistent depth maps moved far disagree more, not less; depth maps that
            disagree through the translation's parallax still agree better far away.

    Returns:
        ``(residual, valid)``, both ``[B, H, W]``: the residual of ``form`` and a mask
        (float) of the source pixels in front of the destination camera whose ``p'``
        lies between the destination's outer pixel centers; the residual is 0 where
        invalid.

    Raises:
        ValueError: for a ``form`` not in :data:`DEPTH_AGREEMENT_FORMS`.
    """
    _check_depth_agreement_form("form", form)
    B, H, W = depth_src.shape
    v, u = torch.meshgrid(torch.arange(H, dtype=depth_src.dtype, device=depth_src.device) + 0.5,
                          torch.arange(W, dtype=depth_src.dtype, device=depth_src.device) + 0.5, indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1).reshape(1, H * W, 3)
    rays = pix @ torch.linalg.inv(K_src).transpose(-1, -2)  # [B, HW, 3], z = 1
    X = rays * depth_src.reshape(B, H * W, 1)
    Y = X @ dst_from_src[:, :3, :3].transpose(-1, -2) + dst_from_src[:, None, :3, 3]
    z = Y[..., 2]
    in_front = z > 1e-6
    proj = Y @ K_dst.transpose(-1, -2)
    uv = proj[..., :2] / torch.where(in_front, z, torch.ones_like(z))[..., None]
    inside = (in_front & (uv[..., 0] >= 0.5) & (uv[..., 0] <= W - 0.5)
              & (uv[..., 1] >= 0.5) & (uv[..., 1] <= H - 0.5))
    # grid_sample, align_corners=False: normalized x = 2u/W − 1 puts pixel centers at u = j + ½.
    grid = torch.stack([2 * uv[..., 0] / W - 1, 2 * uv[..., 1] / H - 1], dim=-1).reshape(B, 1, H * W, 2)
    grid = torch.where(inside.reshape(B, 1, H * W, 1), grid, torch.zeros_like(grid))
    sampled = F.grid_sample((1.0 / depth_dst)[:, None], grid, mode="bilinear", padding_mode="border",
                            align_corners=False).reshape(B, H * W)
    inv_z = 1.0 / torch.where(in_front, z, torch.ones_like(z))  # > 0, as ``sampled`` is: the log is defined
    valid = inside.to(depth_src.dtype)
    if form == "inverse":
        residual = inv_z - sampled
    elif form == "log":
        residual = torch.log(inv_z) - torch.log(sampled)
    else:  # relative
        residual = (inv_z - sampled) / (0.5 * (inv_z + sampled))
    return (residual * valid).reshape(B, H, W), valid.reshape(B, H, W)


def depth_agreement_loss(pred: PoseFreeOutput, batch: Mapping[str, Tensor], form: str = "inverse",
                         one_sided: bool = False, contrast: float = 0.0) -> Tensor:
    """Cross-view agreement of the predicted depths under the *true* relative context
    poses (training only): for every ordered pair of context views ``(s, d)``,
    :func:`cross_view_inverse_depth` of view ``s``'s predicted depth moved into view
    ``d``; the mean squared residual of ``form`` over the valid pixels. ``"inverse"``:
    the inverse-depth residual scaled by ``near²`` (dimensionless), which shrinks as all
    depths grow (trained with it, the depths collapse to the far bound); ``"log"``,
    ``"relative"``: scale-free residuals (see :func:`cross_view_inverse_depth`), used as
    they are. Scaling the depths alone still shrinks the parallax they are compared
    by, and trained with ``"relative"`` the depths collapse to the far bound too
    (README, pose-free: "Scale-free depth agreement").

    With ``one_sided`` only the positive residuals count: source points *in front of*
    the destination's surface, which the destination would have seen (a free-space
    violation). A point behind it may be occluded there, and true depth maps disagree
    that way at every occlusion; two-sided, those few pixels dominate the squared
    residual, so that smooth wrong depths score better than the true ones.

    With ``contrast = δ > 0`` the loss is that mean square divided by the mean of the
    same with every relative translation scaled by ``1 + δ`` and ``1 − δ`` (the camera
    centers scaled about the first one's): how much better the depths agree under the
    true translation than under a wrong one. Far depths agree under any small
    translation, so they score ≈ 1 there, where the plain loss scores them ≈ 0; the
    true depths score ≈ 0. (Trained with it, the depths went too near instead: README.)

    Returns:
        A scalar; 0 when no pixel of any pair is valid.

    Raises:
        ValueError: for a ``form`` not in :data:`DEPTH_AGREEMENT_FORMS`, a ``one_sided``
            that is not a bool, or a ``contrast`` outside ``[0, 1)``.
    """
    _check_depth_agreement_form("form", form)
    _check_bool("one_sided", one_sided)
    contrast = _check_fraction("contrast", contrast)
    depth = pred.depth
    B, V, H, W = depth.shape
    imgs = batch["context_images"]
    K = batch["context_intrinsics"] * imgs.new_tensor([float(W), float(H), 1.0]).unsqueeze(-1)  # [B, V, 3, 3]
    near = batch["context_near"]

    def mean_square(c2w: Tensor) -> Tensor:
        w2c = _invert(c2w)
        total, count = depth.new_zeros(()), depth.new_zeros(())
        for s in range(V):
            for d in range(V):
                if s == d:
                    continue
                res, valid = cross_view_inverse_depth(depth[:, s], K[:, s], K[:, d], w2c[:, d] @ c2w[:, s],
                                                      depth[:, d], form=form)
                if form == "inverse":
                    res = res * near[:, d, None, None]
                if one_sided:  # every form is positive where 1/Y_z > the destination's: the point is in front
                    res = res.clamp_min(0.0)
                total = total + (res ** 2).sum()
                count = count + valid.sum()
        return total / count.clamp_min(1.0)

    c2w = batch["context_extrinsics"]  # first view's frame
    loss = mean_square(c2w)
    if contrast == 0:
        return loss

    def translation_scaled(factor: float) -> Tensor:
        out = c2w.clone()
        out[..., :3, 3] = factor * c2w[..., :3, 3]
        return out

    wrong = 0.5 * (mean_square(translation_scaled(1 + contrast)) + mean_square(translation_scaled(1 - contrast)))
    return loss / (wrong + 1e-12)


def depth_loss(pred: PoseFreeOutput, batch: Mapping[str, Tensor], scale_invariance: float = 0.0) -> Tensor:
    """Mean absolute log-depth error of the predicted context depths against the
    batch's ``context_depths`` (``[B, V, H, W]``, z-depth; pixels with a non-positive
    or non-finite depth are left out). A scalar.

    With ``scale_invariance`` ``λ`` each view's error is ``|r − λ·mean(r)|``, ``r`` the
    log ratio and the mean over that view's valid pixels: ``λ = 1`` ignores a per-view
    scale of the depths (as ``pose_free_depth_errors.py``'s per-view shape error does,
    which subtracts the median instead), ``λ = 0`` is the absolute error.

    Raises:
        KeyError: when the batch holds no ``context_depths`` (train with data that stores depth).
    """
    if "context_depths" not in batch:
        raise KeyError("depth_loss needs batch['context_depths'] (model.depth_supervision > 0: the dataset must "
                       "store depth, as the procedural generator does)")
    gt = batch["context_depths"].to(pred.depth.dtype)
    valid = torch.isfinite(gt) & (gt > 0)
    r = (torch.log(pred.depth) - torch.log(torch.where(valid, gt, torch.ones_like(gt)))) * valid
    if scale_invariance:
        mean = r.sum((-2, -1), keepdim=True) / valid.sum((-2, -1), keepdim=True).clamp_min(1)
        r = (r - scale_invariance * mean) * valid
    return r.abs().sum() / valid.sum().clamp_min(1)


def gaussians_only(theta: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``theta`` without its ``pose`` group."""
    return {k: v for k, v in theta.items() if k != "pose"}


def context_data(pred: PoseFreeOutput, batch: Mapping[str, Tensor], images: Tensor | None = None) -> dict:
    """``gaussian_splatting_posed`` data: identity base cameras (the whole pose is in θ),
    pixel intrinsics, the context images ``[B, V, H, W, 3]``, ``pose_mask`` (view 0 fixed)
    and, with ``attach="camera"``, ``gaussian_view``."""
    imgs = batch["context_images"] if images is None else images
    B, V, _, H, W = imgs.shape
    Ks = batch["context_intrinsics"] * imgs.new_tensor([float(W), float(H), 1.0]).unsqueeze(-1)
    mask = torch.ones(B, V, dtype=imgs.dtype, device=imgs.device)
    mask[:, 0] = 0
    eye = torch.eye(4, dtype=imgs.dtype, device=imgs.device).expand(B, V, 4, 4).contiguous()
    data = {"viewmats": eye, "Ks": Ks, "images": imgs.permute(0, 1, 3, 4, 2).contiguous(), "pose_mask": mask}
    if pred.attach == "camera":
        data["gaussian_view"] = pred.gaussian_view
    return data


def constant_lam(pred: PoseFreeOutput, value: float | Mapping[str, float]) -> dict[str, Tensor]:
    """Λ constant per group (a number or a dict by group), shaped like the prediction's Λ."""
    values = _by_group(value, "lam", value if isinstance(value, (int, float)) else 1.0)
    return {g: torch.full_like(pred.lam[g].detach(), values[g]) for g in GROUPS}


def render_targets(theta: Mapping[str, Tensor], batch: Mapping[str, Tensor], prefix: str = "target",
                   viewmats: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Render the Gaussians of ``theta`` into the ``prefix`` views (cameras of ``batch``,
    already in the first view's frame, or ``viewmats``): ``[B, V, 3, H, W]``. ``backend``:
    the rasterizer's (``"auto"``: the compiled CPU kernels on CPU)."""
    images = batch[f"{prefix}_images"]
    H, W = images.shape[-2:]
    Ks = batch[f"{prefix}_intrinsics"] * images.new_tensor([float(W), float(H), 1.0]).unsqueeze(-1)
    if viewmats is None:
        viewmats = _invert(batch[f"{prefix}_extrinsics"])
    return rasterize(gaussians_only(theta), viewmats, Ks, int(W), int(H), backend=backend).colors.permute(0, 1, 4, 2, 3)


@dataclass
class PoseFreePipelineOutput:
    """As ``pipeline.PipelineOutput``: prediction, the θ used (Θ0 or Θ*, poses included;
    the Gaussians in the first view's frame whatever the model's ``attach``), Λ, the
    target renders and the layer's info."""

    prediction: PoseFreeOutput
    theta: dict[str, Tensor]
    lam: dict[str, Tensor] | None
    render: Tensor
    info: difftto.LayerInfo | None


def predict(model: PoseFreeModel, batch: Mapping[str, Tensor], context_images: Tensor | None = None
            ) -> PoseFreeOutput:
    """The model's prediction from ``batch``'s context views: their images (or
    ``context_images`` in their place), intrinsics and depth bounds, never their poses
    (except in training mode with ``sweep_training_poses="ground_truth"``: the first-view-frame
    context poses for the plane sweep, teacher forcing)."""
    images = batch["context_images"] if context_images is None else context_images
    if (model.training and getattr(model, "depth_source", "monocular") == "sweep"
            and getattr(model, "sweep_training_poses", "predicted") == "ground_truth"):
        return model(images, batch["context_intrinsics"], batch["context_near"], batch["context_far"],
                     sweep_pose=se3_log(_invert(batch["context_extrinsics"])))
    return model(images, batch["context_intrinsics"], batch["context_near"], batch["context_far"])


def run_pipeline(model: PoseFreeModel, batch: Mapping[str, Tensor], layer: difftto.ImplicitLayer | None = None,
                 *, lam: str | float | Mapping[str, float] = "predicted",
                 context_images: Tensor | None = None) -> PoseFreePipelineOutput:
    """Predict Θ0 (Gaussians and poses) and Λ from the unposed context views, refine
    both on the context views with ``layer`` (TTO), render the targets. The layer runs
    on the model's ``attach`` and ``tto_pose_translation_unit`` (θ's translation entries
    divided by it; Θ* returned in scene units).

    ``batch``'s cameras must be in the first context view's frame
    (:func:`first_view_frame`); the model reads only images, intrinsics and depth
    bounds, never the context poses."""
    pred = predict(model, batch, context_images)
    if layer is None:
        return PoseFreePipelineOutput(pred, pred.theta, pred.lam, render_targets(pred.theta, batch), None)
    weights = pred.lam if isinstance(lam, str) and lam == "predicted" else constant_lam(pred, lam)
    unit = float(getattr(model, "tto_pose_translation_unit", 1.0))
    layer = _layer_for(layer, pred.attach, unit)
    theta0 = pred.layer_theta
    if unit != 1.0:
        theta0 = {**theta0, "pose": scale_translation(theta0["pose"], 1.0 / unit)}
    theta_star, info = layer(theta0, weights, context_data(pred, batch, context_images))
    if unit != 1.0:
        theta_star = {**theta_star, "pose": scale_translation(theta_star["pose"], unit)}
    if pred.attach == "camera":
        theta_star = world_theta(theta_star, pred.gaussian_view)
    return PoseFreePipelineOutput(pred, theta_star, weights, render_targets(theta_star, batch), info)
