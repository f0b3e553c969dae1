"""Glue between the data, the model and the difftto layer: cameras, the TTO layer,
rendering target views, and one forward pass of a Diff3R pipeline.

Shapes: a batch from :class:`~examples.diff3r.data.RE10KDataset` collated to ``B``
scenes has ``context_images [B, Vc, 3, H, W]``, ``*_extrinsics [B, V, 4, 4]``
(camera-to-world), ``*_intrinsics [B, V, 3, 3]`` (normalized), ``*_near/far [B, V]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import difftto
from difftto.problems.splatting import rasterize

from .model import GROUPS, Diff3RModel, ModelOutput, context_cameras

__all__ = [
    "INNER_OPTIMIZERS",
    "PipelineOutput",
    "build_layer",
    "constant_lam",
    "context_data",
    "render_views",
    "run_pipeline",
]

INNER_OPTIMIZERS = ("adam", "gd", "gauss_newton")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _groups(value: Any, name: str) -> float | dict[str, float]:
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return {g: float(value[g]) for g in GROUPS}
    except (KeyError, TypeError):
        raise ValueError(f"{name}: expected a number or a dict with keys {list(GROUPS)}, got {value!r}") from None


def build_layer(tto: Any, backward: str = "implicit") -> difftto.ImplicitLayer:
    """The test-time-optimization layer for the ``gaussian_splatting`` problem.

    ``tto`` (a dict or config) holds ``inner`` (``adam`` | ``gd`` | ``gauss_newton``),
    ``steps``, ``lr`` (a number or a dict by group; Adam/GD), ``betas`` (Adam),
    ``damping`` (Gauss-Newton), ``hessian``, ``pcg_rtol``, ``pcg_max_iter``,
    ``on_failure`` and ``truncate``."""
    name = _get(tto, "inner", "adam")
    steps = int(_get(tto, "steps", 20))
    if name == "adam":
        betas = tuple(float(b) for b in _get(tto, "betas", (0.9, 0.999)))
        inner = difftto.Adam(lr=_groups(_get(tto, "lr"), "tto.lr"), steps=steps, betas=betas)
    elif name == "gd":
        inner = difftto.GradientDescent(lr=_groups(_get(tto, "lr"), "tto.lr"), steps=steps)
    elif name == "gauss_newton":
        inner = difftto.GaussNewton(steps=steps, damping=float(_get(tto, "damping", 1e-3)))
    else:
        raise ValueError(f"tto.inner: expected one of {INNER_OPTIMIZERS}, got {name!r}")
    solver = difftto.solvers.PCG(rtol=float(_get(tto, "pcg_rtol", 1e-3)),
                                 max_iter=int(_get(tto, "pcg_max_iter", 10)))
    return difftto.ImplicitLayer(
        "gaussian_splatting",
        inner=inner,
        backward=backward,
        hessian=_get(tto, "hessian", "gauss_newton"),
        solver=solver,
        on_failure=_get(tto, "on_failure", "best"),
        truncate=int(_get(tto, "truncate", 5)),
    )


def _cameras(batch: Mapping[str, Tensor], prefix: str) -> tuple[Tensor, Tensor, int, int]:
    images = batch[f"{prefix}_images"]
    H, W = images.shape[-2:]
    Ks, viewmats = context_cameras(batch[f"{prefix}_intrinsics"], batch[f"{prefix}_extrinsics"], H, W)
    return viewmats, Ks, H, W


def context_data(batch: Mapping[str, Tensor], images: Tensor | None = None) -> dict[str, Tensor]:
    """The ``gaussian_splatting`` problem's data for the context views: ``viewmats
    [B, Vc, 4, 4]``, ``Ks [B, Vc, 3, 3]`` (pixels), ``images [B, Vc, H, W, 3]``.
    ``images [B, Vc, 3, H, W]`` replaces the batch's context images (e.g. corrupted ones)."""
    viewmats, Ks, _, _ = _cameras(batch, "context")
    imgs = batch["context_images"] if images is None else images
    return {"viewmats": viewmats, "Ks": Ks, "images": imgs.permute(0, 1, 3, 4, 2).contiguous()}


def render_views(theta: Mapping[str, Tensor], batch: Mapping[str, Tensor], prefix: str = "target") -> Tensor:
    """Render Gaussians ``theta`` into the ``prefix`` views of ``batch``: ``[B, V, 3, H, W]``
    (black background, not clipped; the rasterizer's ``auto`` backend: the compiled
    kernels on CPU)."""
    viewmats, Ks, H, W = _cameras(batch, prefix)
    colors = rasterize(dict(theta), viewmats, Ks, int(W), int(H)).colors
    return colors.permute(0, 1, 4, 2, 3)


def constant_lam(like: Mapping[str, Tensor], value: float | Mapping[str, float]) -> dict[str, Tensor]:
    """Λ that is a constant per group (a number or a dict by group), shaped like ``like``'s ``[B, N]``."""
    values = _groups(value, "lam")
    out = {}
    for g in GROUPS:
        v = values if isinstance(values, float) else values[g]
        out[g] = torch.full_like(like[g].detach(), v)
    return out


@dataclass
class PipelineOutput:
    """One pass: model prediction, the Gaussians used for rendering (Θ0 or Θ*),
    the target renders ``[B, Vt, 3, H, W]`` and the layer's info (``None`` without TTO)."""

    prediction: ModelOutput
    theta: dict[str, Tensor]
    lam: dict[str, Tensor] | None
    render: Tensor
    info: difftto.LayerInfo | None


def run_pipeline(
    model: Diff3RModel,
    batch: Mapping[str, Tensor],
    layer: difftto.ImplicitLayer | None = None,
    *,
    lam: str | float | Mapping[str, float] = "predicted",
    context_images: Tensor | None = None,
) -> PipelineOutput:
    """Predict Θ0 (and Λ) from the context views, optionally refine on them with
    ``layer`` (TTO), and render the target views.

    Args:
        model: the encoder.
        batch: a collated batch (see the module docstring).
        layer: the TTO layer; ``None`` renders Θ0 (zero-shot).
        lam: ``"predicted"`` (the model's Λ) or a constant (number or dict by group).
        context_images: ``[B, Vc, 3, H, W]`` replacing the context images for both the
            model and the TTO data (e.g. exposure-corrupted views).
    """
    images = batch["context_images"] if context_images is None else context_images
    pred = model(images, batch["context_intrinsics"], batch["context_extrinsics"],
                 batch["context_near"], batch["context_far"])
    if layer is None:
        return PipelineOutput(pred, pred.theta, pred.lam, render_views(pred.theta, batch), None)
    weights = pred.lam if isinstance(lam, str) and lam == "predicted" else constant_lam(pred.theta, lam)
    theta_star, info = layer(pred.theta, weights, context_data(batch, images))
    return PipelineOutput(pred, theta_star, weights, render_views(theta_star, batch), info)
