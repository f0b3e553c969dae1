"""A small MVSplat-like pose-given encoder with an uncertainty (Λ) head.

From two posed context views it predicts one Gaussian per context pixel (pixel
aligned, ``N = V·H·W``) and, per Gaussian and per parameter group, the proximal
weights Λ of the test-time-optimization layer.

Pipeline (every step differentiable):

1. **Features.** A shared CNN (full resolution plus one half-resolution branch)
   maps each image ``[3, H, W]`` to features ``[F, H, W]``.
2. **Plane-sweep cost volume.** For view ``i`` and each of ``D`` depth candidates
   (uniform in inverse depth between ``near`` and ``far``), the pixel rays of ``i``
   are cut at that z-depth, projected into the other view ``j`` and ``j``'s
   features sampled there (bilinear, zeros outside). The correlation
   ``⟨f_i, f_j(warp)⟩ / √F`` gives ``[D, H, W]`` per view; a small CNN refines it
   (with the view's own features) into logits, a softmax over candidates gives a
   distribution and its expected inverse depth gives a first depth.
3. **Heads.** A CNN over ``[image, features, depth distribution, inverse depth]``
   predicts per pixel: a depth refinement, the Gaussian parameters and Λ.

Gaussian parameters (raw groups of ``difftto.problems.splatting``), following the
feed-forward 3DGS conventions:

- ``means``: camera origin + ray × depth, through the pixel center shifted by a
  sub-pixel offset ``(sigmoid(h) − 0.5)`` pixel. Depth is the z-depth (the data's
  convention, see ``data/cameras.py``), the ray's camera-space z is 1, so this is
  the same point as "unit ray × distance".
- ``log_scales``: ``log((s_min + (s_max − s_min)·sigmoid(h)) · depth / f_px)``:
  pixelSplat/MVSplat's rule, a multiple of the pixel footprint at that depth.
- ``quats``: ``(1, 0, 0, 0) + h`` (wxyz; the renderer normalizes).
- ``opacities``: logits ``h`` (the renderer applies the sigmoid).
- ``colors``: the input pixel color + ``h`` (the DC term starts at the pixel).
- **Λ** per group ``g``: ``lam_init[g] · softplus(h_g) + lam_min``; the head's bias
  starts at ``b`` with ``softplus(b) = 1`` (and its weights near zero), so Λ starts
  near ``lam_init``. With ``lam_log_range = r > 0`` instead
  ``lam_init[g] · exp(r · tanh(h_g)) + lam_min``: Λ stays within a factor ``e^r`` of
  ``lam_init`` (bias 0), so the network cannot drive Λ to where the inner
  optimizer no longer converges in its step budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GROUPS", "Diff3RModel", "ModelOutput", "context_cameras", "inverse_depth_candidates", "pixel_rays",
           "sweep_correlation"]

#: Parameter groups of the Gaussians, each with one Λ per Gaussian.
GROUPS = ("means", "log_scales", "quats", "opacities", "colors")

# Head output channels, in order.
_HEAD_CHANNELS = {"depth": 1, "offset": 2, "scale": 3, "quat": 4, "opacity": 1, "color": 3, "lam": len(GROUPS)}
_SOFTPLUS_ONE = math.log(math.e - 1.0)  # softplus(_SOFTPLUS_ONE) == 1


def check_scale_opacity(scale_min: float, scale_init: float, scale_max: float, opacity_init: float) -> None:
    """Raise ``ValueError`` unless ``0 < scale_min < scale_init < scale_max`` and ``0 < opacity_init < 1``."""
    if not 0 < scale_min < scale_init < scale_max:
        raise ValueError(
            f"scale_min, scale_init, scale_max: expected 0 < scale_min < scale_init < scale_max, "
            f"got {scale_min}, {scale_init}, {scale_max}"
        )
    if not 0 < opacity_init < 1:
        raise ValueError(f"opacity_init: expected a value in (0, 1), got {opacity_init}")


def check_context_inputs(images: Tensor, few_views: str, **per_view: tuple[Tensor, tuple[int, ...]]) -> None:
    """Raise ``ValueError`` unless ``images`` is ``[B, V, 3, H, W]`` with ``V >= 2`` (else the
    message ``"images: {few_views} V >= 2 context views, got V = ..."``) and each named
    tensor of ``per_view`` (``name=(tensor, trailing_shape)``) is ``[B, V, *trailing_shape]``."""
    if images.dim() != 5 or images.shape[2] != 3:
        raise ValueError(f"images: expected [B, V, 3, H, W], got {list(images.shape)}")
    B, V = images.shape[:2]
    if V < 2:
        raise ValueError(f"images: {few_views} V >= 2 context views, got V = {V}")
    for name, (t, trailing) in per_view.items():
        if tuple(t.shape) != (B, V, *trailing):
            raise ValueError(f"{name}: expected shape {[B, V, *trailing]}, got {list(t.shape)}")


def lam_init_values(lam_init: float | Mapping[str, float], groups: tuple[str, ...]) -> list[float]:
    """``lam_init`` (a number for all groups, or a dict by group) as one float per group
    of ``groups``, in order. Raises ``ValueError`` on a missing group or a value ``<= 0``."""
    if isinstance(lam_init, Mapping):
        missing = set(groups) - set(lam_init)
        if missing:
            raise ValueError(f"lam_init: missing groups {sorted(missing)}; expected keys {list(groups)}")
        values = [float(lam_init[g]) for g in groups]
    else:
        values = [float(lam_init)] * len(groups)
    if min(values) <= 0:
        raise ValueError(f"lam_init: expected values > 0, got {values}")
    return values


def channel_slices(channels: Mapping[str, int]) -> dict[str, slice]:
    """The slice of each named output of a head whose channels are ``channels`` (name → count), in order."""
    out, start = {}, 0
    for name, n in channels.items():
        out[name] = slice(start, start + n)
        start += n
    return out


def init_gaussian_head(last: nn.Conv2d, slices: Mapping[str, slice], scale_min: float, scale_max: float,
                       scale_init: float, opacity_init: float, lam_bias: float = _SOFTPLUS_ONE) -> None:
    """Start a Gaussian head's last convolution near a constant output: small weights, the
    scale bias at ``scale_init`` (a sigmoid between ``scale_min`` and ``scale_max``), the
    opacity bias at ``opacity_init`` (sigmoid), the Λ bias at ``lam_bias``, others 0."""
    nn.init.normal_(last.weight, std=1e-3)
    bias = torch.zeros(last.out_channels)
    frac = (scale_init - scale_min) / (scale_max - scale_min)
    bias[slices["scale"]] = math.log(frac / (1 - frac))
    bias[slices["opacity"]] = math.log(opacity_init / (1 - opacity_init))
    bias[slices["lam"]] = lam_bias
    with torch.no_grad():
        last.bias.copy_(bias)


@dataclass
class ModelOutput:
    """What :class:`Diff3RModel` predicts for a batch of ``B`` scenes with ``V`` context views.

    Attributes:
        theta: raw Gaussian groups, ``N = V·H·W``: ``means [B,N,3]``, ``log_scales
            [B,N,3]``, ``quats [B,N,4]``, ``opacities [B,N]``, ``colors [B,N,3]``.
        lam: Λ by group, each ``[B, N]`` and ``> 0``.
        depth: predicted z-depth ``[B, V, H, W]``.
        coarse_depth: the cost volume's depth before refinement ``[B, V, H, W]``.
        probabilities: the cost volume's distribution over candidates ``[B, V, D, H, W]``.
    """

    theta: dict[str, Tensor]
    lam: dict[str, Tensor]
    depth: Tensor
    coarse_depth: Tensor
    probabilities: Tensor


def context_cameras(intrinsics: Tensor, c2w: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Pixel intrinsics ``[..., 3, 3]`` from normalized ones and world-to-camera
    ``[..., 4, 4]`` from camera-to-world ``c2w [..., 4, 4]``."""
    scale = intrinsics.new_tensor([float(width), float(height), 1.0]).unsqueeze(-1)
    rot = c2w[..., :3, :3]
    w2c = torch.zeros_like(c2w)
    w2c[..., :3, :3] = rot.transpose(-1, -2)
    w2c[..., :3, 3:] = -rot.transpose(-1, -2) @ c2w[..., :3, 3:]
    w2c[..., 3, 3] = 1
    return intrinsics * scale, w2c


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


class _ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.a, self.b = _conv(channels, channels), _conv(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.b(F.gelu(self.a(F.gelu(x))))


class _FeatureNet(nn.Module):
    """``[M, 3, H, W]`` → ``[M, F, H, W]``: full-resolution trunk + a half-resolution branch."""

    def __init__(self, channels: int):
        super().__init__()
        self.stem = _conv(3, channels)
        self.full = _ResBlock(channels)
        self.down = _conv(channels, channels, stride=2)
        self.coarse = _ResBlock(channels)
        self.out = _ResBlock(channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.full(self.stem(x))
        h = self.coarse(self.down(F.gelu(x)))
        x = x + F.interpolate(h, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(x)


class Diff3RModel(nn.Module):
    """Two posed context views → pixel-aligned Gaussians Θ0 and Λ.

    Args:
        feature_channels: channels ``F`` of the image features.
        hidden_channels: channels of the refinement and head CNNs.
        depth_candidates: ``D`` plane-sweep candidates, uniform in inverse depth.
        scale_min, scale_max: Gaussian scale range in pixel footprints (pixelSplat: 0.5, 15).
        scale_init: initial scale in pixel footprints (sets the scale heads' bias).
        opacity_init: initial opacity (sets the opacity head's bias).
        lam_init: initial Λ by group (a number for all groups, or a dict by group);
            Λ is ``lam_init · softplus(head) + lam_min``, the head starting at ``softplus = 1``.
        lam_min: a floor added to Λ (keeps the backward system positive definite).
        lam_log_range: ``0`` (default): ``Λ = lam_init · softplus(h) + lam_min``, unbounded
            above; ``r > 0``: ``Λ = lam_init · exp(r · tanh(h)) + lam_min``, within a factor
            ``e^r`` of ``lam_init``.
        depth_refine: the largest factor ``exp(±depth_refine)`` the head may apply to
            the cost-volume inverse depth.
    """

    def __init__(
        self,
        feature_channels: int = 32,
        hidden_channels: int = 48,
        depth_candidates: int = 32,
        scale_min: float = 0.5,
        scale_max: float = 15.0,
        scale_init: float = 1.0,
        opacity_init: float = 0.9,
        lam_init: float | Mapping[str, float] = 1.0,
        lam_min: float = 1e-4,
        depth_refine: float = 0.3,
        lam_log_range: float = 0.0,
    ):
        super().__init__()
        check_scale_opacity(scale_min, scale_init, scale_max, opacity_init)
        if depth_candidates < 2:
            raise ValueError(f"depth_candidates: expected >= 2, got {depth_candidates}")
        lam_values = lam_init_values(lam_init, GROUPS)
        self.scale_min, self.scale_max = float(scale_min), float(scale_max)
        self.depth_candidates = int(depth_candidates)
        self.lam_min = float(lam_min)
        if lam_log_range < 0:
            raise ValueError(f"lam_log_range: expected >= 0 (0: softplus), got {lam_log_range}")
        self.lam_log_range = float(lam_log_range)
        self.depth_refine = float(depth_refine)
        self.register_buffer("lam_init", torch.tensor(lam_values), persistent=False)

        f, h, d = feature_channels, hidden_channels, depth_candidates
        self.features = _FeatureNet(f)
        self.cost_refine = nn.Sequential(_conv(d + f, h), _ResBlock(h), nn.GELU(), _conv(h, d))
        self.head = nn.Sequential(_conv(3 + f + d + 1, h), _ResBlock(h), _ResBlock(h), nn.GELU(),
                                  _conv(h, sum(_HEAD_CHANNELS.values())))
        self._init_heads(scale_init, opacity_init)

    def _init_heads(self, scale_init: float, opacity_init: float) -> None:
        init_gaussian_head(self.head[-1], self._slices(), self.scale_min, self.scale_max, scale_init, opacity_init,
                           lam_bias=0.0 if self.lam_log_range > 0 else _SOFTPLUS_ONE)
        cost_last = self.cost_refine[-1]
        nn.init.zeros_(cost_last.weight)
        nn.init.zeros_(cost_last.bias)

    @staticmethod
    def _slices() -> dict[str, slice]:
        return channel_slices(_HEAD_CHANNELS)

    def forward(self, images: Tensor, intrinsics: Tensor, c2w: Tensor, near: Tensor, far: Tensor) -> ModelOutput:
        """Predict Gaussians and Λ.

        Args:
            images: context images ``[B, V, 3, H, W]`` in ``[0, 1]`` (``V = 2``; with
                more views each view is matched against the next one, cyclically).
            intrinsics: normalized intrinsics ``[B, V, 3, 3]``.
            c2w: camera-to-world ``[B, V, 4, 4]`` (OpenCV axes).
            near, far: depth bounds ``[B, V]`` of the plane sweep.

        Returns:
            :class:`ModelOutput` with ``N = V·H·W`` Gaussians per scene.
        """
        check_context_inputs(images, "the cost volume needs", intrinsics=(intrinsics, (3, 3)), c2w=(c2w, (4, 4)),
                             near=(near, ()), far=(far, ()))
        B, V, _, H, W = images.shape
        K, w2c = context_cameras(intrinsics, c2w, H, W)
        feats = self.features(images.reshape(B * V, 3, H, W)).reshape(B, V, -1, H, W)

        # Plane sweep: candidate z-depths, uniform in inverse depth, near → far.
        inv_near, inv_far = 1.0 / near, 1.0 / far  # [B, V]
        inv_cand = inverse_depth_candidates(near, far, self.depth_candidates, images.dtype)  # [B, V, D]
        dirs = pixel_rays(K, c2w, H, W)  # [B, V, H, W, 3], camera z = 1
        origins = c2w[..., :3, 3]  # [B, V, 3]
        other = [(v + 1) % V for v in range(V)]
        cost = sweep_correlation(feats, feats[:, other], dirs, origins, 1.0 / inv_cand, K[:, other], w2c[:, other])
        logits = cost + self.cost_refine(torch.cat([cost, feats], dim=2).flatten(0, 1)).reshape(cost.shape)
        probs = torch.softmax(logits, dim=2)  # [B, V, D, H, W]
        inv_coarse = (probs * inv_cand[..., None, None]).sum(dim=2)  # [B, V, H, W]

        inv_norm = (inv_coarse - inv_far[..., None, None]) / (inv_near - inv_far)[..., None, None]
        head_in = torch.cat([images, feats, probs, inv_norm[:, :, None]], dim=2).flatten(0, 1)
        out = self.head(head_in).reshape(B, V, -1, H, W).permute(0, 1, 3, 4, 2)  # [B, V, H, W, C]
        sl = self._slices()
        inv_depth = inv_coarse * torch.exp(self.depth_refine * torch.tanh(out[..., sl["depth"]][..., 0]))
        depth = 1.0 / inv_depth

        # Sub-pixel offsets move the ray within its pixel.
        offset = torch.sigmoid(out[..., sl["offset"]]) - 0.5  # [B, V, H, W, 2] pixels
        k_inv = torch.linalg.inv(K)
        cam_shift = torch.cat([offset, torch.zeros_like(offset[..., :1])], dim=-1)
        cam_shift = cam_shift @ k_inv[:, :, None, :, :].transpose(-1, -2)
        ray = dirs + cam_shift @ c2w[:, :, None, :3, :3].transpose(-1, -2)
        means = origins[:, :, None, None, :] + depth[..., None] * ray

        focal = K[..., 0, 0][..., None, None]  # [B, V, 1, 1] pixels
        multiple = self.scale_min + (self.scale_max - self.scale_min) * torch.sigmoid(out[..., sl["scale"]])
        log_scales = torch.log(multiple * (depth / focal)[..., None])
        quats = out[..., sl["quat"]] + out.new_tensor([1.0, 0.0, 0.0, 0.0])
        colors = images.permute(0, 1, 3, 4, 2) + out[..., sl["color"]]
        if self.lam_log_range > 0:
            lam_raw = torch.exp(self.lam_log_range * torch.tanh(out[..., sl["lam"]])) * self.lam_init + self.lam_min
        else:
            lam_raw = F.softplus(out[..., sl["lam"]]) * self.lam_init + self.lam_min

        def flat(x: Tensor) -> Tensor:
            return x.reshape(B, V * H * W, *x.shape[4:])

        theta = {
            "means": flat(means),
            "log_scales": flat(log_scales),
            "quats": flat(quats),
            "opacities": flat(out[..., sl["opacity"]][..., 0]),
            "colors": flat(colors),
        }
        lam = {g: flat(lam_raw[..., i]) for i, g in enumerate(GROUPS)}
        return ModelOutput(theta, lam, depth, 1.0 / inv_coarse, probs)


def inverse_depth_candidates(near: Tensor, far: Tensor, count: int, dtype: torch.dtype | None = None) -> Tensor:
    """``count`` plane-sweep candidates ``[..., count]`` in inverse depth, uniform from
    ``1/near`` to ``1/far`` (``near``, ``far``: ``[...]``; ``dtype``: the fractions',
    default ``near``'s)."""
    t = torch.linspace(0.0, 1.0, count, dtype=near.dtype if dtype is None else dtype, device=near.device)
    inv_near, inv_far = 1.0 / near, 1.0 / far
    return inv_near[..., None] + t * (inv_far - inv_near)[..., None]


def pixel_rays(K: Tensor, c2w: Tensor, H: int, W: int) -> Tensor:
    """World-space ray directions through pixel centers, camera z = 1: ``[B, V, H, W, 3]``
    (pixel intrinsics ``K [B, V, 3, 3]``, camera-to-world ``c2w [B, V, 4, 4]``)."""
    v, u = torch.meshgrid(
        torch.arange(H, dtype=K.dtype, device=K.device) + 0.5,
        torch.arange(W, dtype=K.dtype, device=K.device) + 0.5,
        indexing="ij",
    )
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1)  # [H, W, 3]
    cam = pix @ torch.linalg.inv(K)[:, :, None].transpose(-1, -2)  # [B, V, H, W, 3]
    return cam @ c2w[:, :, None, :3, :3].transpose(-1, -2)


def sweep_correlation(feats: Tensor, feats_other: Tensor, dirs: Tensor, origins: Tensor, depths: Tensor,
                      K_other: Tensor, w2c_other: Tensor) -> Tensor:
    """Plane-sweep correlation volume ``[B, V, D, H, W]`` of each view with a partner view:
    view ``v``'s rays (``dirs [B, V, H, W, 3]`` from ``origins [B, V, 3]``) cut at the
    z-depths ``depths [B, V, D]``, projected into the partner (``K_other``,
    ``w2c_other``: ``[B, V, 3, 3]``, ``[B, V, 4, 4]``), its features ``feats_other
    [B, V, F, H, W]`` sampled there (bilinear, zeros outside or behind it), and
    ``⟨f_v, f_other(warp)⟩ / √F``."""
    B, V, C, H, W = feats.shape
    D = depths.shape[-1]
    points = origins[:, :, None, None, None, :] + depths[:, :, :, None, None, None] * dirs[:, :, None]
    cam = points @ w2c_other[:, :, None, None, :3, :3].transpose(-1, -2) + w2c_other[:, :, None, None, None, :3, 3]
    z = cam[..., 2:3]
    hom = cam @ K_other[:, :, None, None].transpose(-1, -2)
    uv = hom[..., :2] / z.clamp_min(1e-6)
    # grid_sample (align_corners=False): -1 and 1 are the outer pixel edges.
    grid = torch.stack([2 * uv[..., 0] / W - 1, 2 * uv[..., 1] / H - 1], dim=-1)
    grid = torch.where(z > 1e-6, grid, torch.full_like(grid, -2.0))  # behind the camera: outside
    grid = grid.clamp(-2.0, 2.0)
    sampled = F.grid_sample(
        feats_other[:, :, None].expand(B, V, D, C, H, W).reshape(B * V * D, C, H, W),
        grid.reshape(B * V * D, H, W, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    ).reshape(B, V, D, C, H, W)
    return (sampled * feats[:, :, None]).sum(dim=3) / math.sqrt(C)
