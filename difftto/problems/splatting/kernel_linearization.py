"""Gauss-Newton products of the 3DGS problem from the compiled CPU kernels.

:class:`KernelLinearization` is what :meth:`GaussianSplattingProblem.linearize` returns
when the problem runs on the ``"cpu_kernels"`` backend. It follows 3DGS-LM's PCG
kernels, adapted to a CPU:

- once per linearization point: the frozen render's cache (``α`` and ``T`` per (pair,
  pixel)), and the Jacobian ``∂feats/∂θ`` of every Gaussian's projected features
  (mean2d, conic, log-opacity, colours, depth) w.r.t. its own parameters, one small
  ``[F, p]`` matrix per (image, Gaussian) (and ``[F, 6]`` for ``pose_deltas``), in closed
  form by the compiled projection (``project_jacobian``: its reverse pass with unit
  cotangents, parallel over Gaussians; SH colours' rows by ``torch.func`` on ``eval_sh``),
  or by ``torch.func`` forward mode on the whole pure-torch projection (its twin);
- ``J·v``: contract ``v`` to feature tangents, then one front-to-back pass by pixel that
  writes the residual tangents (``residual_jvp``);
- ``Jᵀ·w``: one back-to-front pass by pixel that reads the residual cotangents
  (``residual_backward``) and writes one gradient row per (tile, Gaussian) pair, a
  segmented reduction by Gaussian (atomics-free, deterministic), then the transposed
  contraction;
- ``diag(JᵀJ)`` exactly: per pair, the Gram matrix ``Σ_pixels Σ_ch u uᵀ`` of the
  residual's feature gradients ``u`` (the same cache), reduced by Gaussian and contracted
  with the projection Jacobian: ``Σ_c diag(J_cᵀ G_c J_c)``. For ``pose_deltas`` (shared
  by all Gaussians of a camera) the diagonal takes 6 extra ``J·v`` passes;
- the per-Gaussian blocks ``Σ_c J_cᵀ G_c J_c`` of ``JᵀJ`` exactly, from the same Gram
  matrices (``gram_blocks``), for the block-Jacobi preconditioner; once they are formed,
  ``diag(JᵀJ)`` is read off them.

The residuals are the problem's: ``r = √w · (colour + (1 − alpha)·background − image)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..base import Data, Linearization
from .cameras import camera_centers
from .cpu_kernels import load_extension, splat_features, structure_from_state
from .gaussians import Gaussians, eval_sh

__all__ = ["KernelLinearization"]

POSE_KEY = "pose_deltas"
# The groups of the compiled projection Jacobian, in project_jacobian's column order.
_KERNEL_GROUPS = ("means", "log_scales", "quats", "opacities", "colors")


class KernelLinearization(Linearization):
    """``J``, ``Jᵀ`` and ``diag(JᵀJ)`` of :class:`GaussianSplattingProblem`'s residuals at
    ``theta`` (``data`` frozen: it must hold the raster state), from the CPU kernels.

    Tangents and cotangents use ``theta``'s structure; residual vectors are ``[B, m]``
    with ``m = C·H·W·D`` in the order of :meth:`GaussianSplattingProblem.residuals`.

    ``jacobian`` says how the projection Jacobian is built: ``"kernel"`` (the default)
    computes it in closed form in the compiled projection (with ``sh``, the rows of the
    SH colours come from ``torch.func`` on the SH evaluation alone); ``"torch.func"``
    always uses forward mode on the whole pure-torch projection (the twin the kernel is
    tested against; slower). Raises ``ValueError`` for another value or for
    ``data`` without the frozen raster state.
    """

    def __init__(self, problem, theta: Mapping[str, Tensor], data: Data, *, jacobian: str = "kernel") -> None:
        from .problem import STATE_KEY

        if jacobian not in ("kernel", "torch.func"):
            raise ValueError(f"jacobian must be 'kernel' or 'torch.func', got {jacobian!r}")
        viewmats, Ks, images = problem._check_data(theta, data)
        state = data.get(STATE_KEY)
        if state is None:
            raise ValueError(f"KernelLinearization needs frozen data (data[{STATE_KEY!r}]); call "
                             "problem.freeze(theta, data) first")
        self._ext = load_extension()
        theta = {k: v.detach() for k, v in theta.items()}
        B, C, H, W, D = images.shape
        N = theta["means"].shape[1]
        self._dims = (B, C, N, H, W, D)
        self._keys = [k for k in theta if k != POSE_KEY]
        self._shapes = {k: theta[k].shape for k in theta}
        self._sizes = [theta[k].reshape(B, N, -1).shape[-1] for k in self._keys]
        self._has_pose = POSE_KEY in theta
        vm, ks = viewmats.detach(), Ks.detach()
        opts = dict(sh_degree=problem.sh_degree, near_plane=problem.near_plane,
                    far_plane=problem.far_plane, eps2d=problem.eps2d)

        with torch.no_grad():
            if jacobian == "kernel":
                feats, self._jac, self._jac_pose = self._kernel_jacobian(theta, vm, ks, W, H, **opts)
            else:
                x = torch.cat([theta[k].reshape(B, N, -1) for k in self._keys], dim=-1)
                feats, self._jac, self._jac_pose = self._twin_jacobian(x, theta.get(POSE_KEY), vm, ks, W, H,
                                                                       **opts)
        # J·v's kernel reads the Jacobian transposed ([.., p, F]: an axpy over features).
        self._jac_t = self._jac.transpose(-1, -2).contiguous()
        self._feats = feats.reshape(B * C * N, -1).contiguous()
        self._structure = structure_from_state(state)
        I, _, _, ts = self._structure.grid
        _, self._alpha, self._trans, _ = self._ext.forward(
            self._feats, self._structure.tile_ptr, self._structure.pair_gauss, self._structure.active,
            I, H, W, ts, D)
        # r = rw·colour − rb·alpha + const, per pixel and channel.
        dtype = feats.dtype
        weights = data.get("weights")
        rw = torch.ones(B, C, H, W, D, dtype=dtype)
        if weights is not None:
            rw = torch.sqrt(torch.as_tensor(weights, dtype=dtype).clamp_min(0.0)).expand(B, C, H, W, D)
        background = data.get("background")
        rb = torch.zeros(B, C, H, W, D, dtype=dtype)
        if background is not None:
            bg = torch.as_tensor(background, dtype=dtype).expand(B, C, D)
            rb = rw * bg[:, :, None, None, :]
        self._rw, self._rb = rw.contiguous(), rb.contiguous()
        self._gram_cache: Tensor | None = None
        self._block_diagonal: Tensor | None = None  # diag of the last gauss_newton_blocks

    # ------------------------------------------------------------------ helpers
    def _kernel_jacobian(self, theta, vm: Tensor, ks: Tensor, W: int, H: int, **opts):
        """``(feats [B, C, N, F], jac [B, C, N, F, p], jac_pose [B, C, N, F, 6] or None)`` from
        the compiled projection: closed-form rows, parallel over Gaussians."""
        from .problem import apply_pose_deltas

        offsets, start = {}, 0  # each group's first column in the flat per-Gaussian parameters
        for key, size in zip(self._keys, self._sizes):
            offsets[key] = start
            start += size
        pose = theta.get(POSE_KEY)
        cams, dviews = vm, vm.new_zeros(0)
        if pose is not None:
            cams = apply_pose_deltas(vm, pose)
            basis = torch.eye(6, dtype=pose.dtype).view(6, 1, 1, 6).expand(6, *pose.shape)
            dviews = _columns(lambda t: torch.func.jvp(lambda q: apply_pose_deltas(vm, q), (pose,), (t,))[1], basis)
            dviews = dviews.permute(1, 2, 0, 3, 4).contiguous()  # [B, C, 6, 4, 4]
        sh = theta.get("sh")
        if sh is None:
            colors = theta["colors"]
        else:  # per-camera SH colours: their rows come from torch.func below, on eval_sh only
            centers = camera_centers(cams)

            def sh_colors(means: Tensor, coeffs: Tensor, centers: Tensor) -> Tensor:
                dirs = means.unsqueeze(1) - centers.unsqueeze(2)
                return eval_sh(coeffs.unsqueeze(1), dirs, opts["sh_degree"])

            colors = sh_colors(theta["means"], sh, centers)  # [B, C, N, D]
        groups = [theta[k].contiguous() for k in _KERNEL_GROUPS[:4]]
        settings = (W, H, opts["eps2d"], opts["near_plane"], opts["far_plane"])
        feats = self._ext.project_forward(*groups, colors.contiguous(), cams.contiguous(), ks.contiguous(),
                                          *settings)[0]
        cols = torch.tensor([offsets.get(k, -1) for k in _KERNEL_GROUPS], dtype=torch.int64)
        shared_colors = colors if sh is None else colors[:, 0]  # the kernel reads only D here
        out = self._ext.project_jacobian(*groups, shared_colors.contiguous(), cams.contiguous(), ks.contiguous(),
                                         *settings, cols, start, dviews)
        jac, jac_pose = out[0], (out[1] if pose is not None else None)
        if sh is not None:
            D = colors.shape[-1]
            rows = slice(6, 6 + D)
            for key, arg in (("means", 0), ("sh", 1)):
                x = theta[key]
                width = x[0, 0].numel()
                basis = torch.eye(width, dtype=x.dtype).view(width, 1, 1, *x.shape[2:]).expand(width, *x.shape)

                def tangent(t: Tensor, arg: int = arg) -> Tensor:
                    primals = (theta["means"], sh, centers)
                    tangents = tuple(t if i == arg else torch.zeros_like(v) for i, v in enumerate(primals))
                    return torch.func.jvp(sh_colors, primals, tangents)[1]

                start_col = offsets[key]
                jac[..., rows, start_col : start_col + width] = _columns(tangent, basis).permute(1, 2, 3, 4, 0)
            if pose is not None:
                pbasis = torch.eye(6, dtype=pose.dtype).view(6, 1, 1, 6).expand(6, *pose.shape)
                dcols = _columns(lambda t: torch.func.jvp(
                    lambda q: sh_colors(theta["means"], sh, camera_centers(apply_pose_deltas(vm, q))),
                    (pose,), (t,))[1], pbasis)
                jac_pose[..., rows, :] = dcols.permute(1, 2, 3, 4, 0)
        return feats, jac, jac_pose

    def _twin_jacobian(self, x: Tensor, pose: Tensor | None, vm: Tensor, ks: Tensor, W: int, H: int, **opts):
        """:meth:`_kernel_jacobian`'s outputs by ``torch.func`` forward mode on the pure-torch
        projection (its twin)."""
        from .problem import apply_pose_deltas

        B, C, N = self._dims[:3]

        def features(x: Tensor, pose: Tensor | None) -> Tensor:
            cams = vm if pose is None else apply_pose_deltas(vm, pose)
            return splat_features(Gaussians.from_params(self._split(x)), cams, ks, W, H, **opts)[0]

        feats = features(x, pose)
        p = x.shape[-1]
        basis = torch.eye(p, dtype=x.dtype).view(p, 1, 1, p).expand(p, B, N, p)
        jac = _columns(lambda t: torch.func.jvp(lambda y: features(y, pose), (x,), (t,))[1], basis)
        jac = jac.permute(1, 2, 3, 4, 0).contiguous()  # [B, C, N, F, p]
        jac_pose = None
        if pose is not None:
            pbasis = torch.eye(6, dtype=x.dtype).view(6, 1, 1, 6).expand(6, B, C, 6)
            jac_pose = _columns(lambda t: torch.func.jvp(lambda q: features(x, q), (pose,), (t,))[1], pbasis)
            jac_pose = jac_pose.permute(1, 2, 3, 4, 0).contiguous()  # [B, C, N, F, 6]
        return feats, jac, jac_pose

    def _split(self, x: Tensor) -> dict[str, Tensor]:
        parts = torch.split(x, self._sizes, dim=-1)
        return {k: part.reshape(x.shape[:-2] + self._shapes[k][1:]) for k, part in zip(self._keys, parts)}

    def _pixel_tangent(self, dfeats: Tensor) -> Tensor:
        """Feature tangents ``[I·N, F]`` → residual tangents ``[B, C, H, W, D]``."""
        B, C, N, H, W, D = self._dims
        dr = self._ext.residual_jvp(self._feats, dfeats.contiguous(), self._structure.tile_ptr,
                                    self._structure.pair_gauss, self._alpha, self._trans,
                                    self._rw.view(B * C, H, W, D), self._rb.view(B * C, H, W, D),
                                    self._structure.signature[-1])
        return dr.view(B, C, H, W, D)

    # ------------------------------------------------------------------ products
    def jvp(self, tangent: Any) -> Tensor:
        """``J · tangent`` → ``[B, C·H·W·D]``."""
        B, C, N, H, W, D = self._dims
        parts = [tangent[k].reshape(B, N, -1) if k in tangent else torch.zeros(B, N, s, dtype=self._feats.dtype)
                 for k, s in zip(self._keys, self._sizes)]
        v = torch.cat(parts, dim=-1).to(self._feats.dtype).contiguous()
        dfeats = self._ext.project_tangent(self._jac_t, v)
        if self._jac_pose is not None and tangent.get(POSE_KEY) is not None:
            dfeats = dfeats + torch.einsum("bcnfj,bcj->bcnf", self._jac_pose, tangent[POSE_KEY])
        return self._pixel_tangent(dfeats.reshape(B * C * N, -1)).reshape(B, -1)

    def vjp(self, cotangent: Tensor) -> dict[str, Tensor]:
        """``Jᵀ · cotangent`` (``[B, C·H·W·D]``) → ``theta``'s structure."""
        B, C, N, H, W, D = self._dims
        w = cotangent.reshape(B * C, H, W, D).to(self._feats.dtype).contiguous()
        gauss_ptr, gauss_pairs = self._structure.by_gaussian()
        gfeats = self._ext.residual_backward(self._feats, self._structure.tile_ptr, self._structure.pair_gauss,
                                             gauss_ptr, gauss_pairs, self._alpha, self._trans, w,
                                             self._rw.view(B * C, H, W, D), self._rb.view(B * C, H, W, D),
                                             self._structure.signature[-1])
        gfeats = gfeats.view(B, C, N, -1)
        out = self._split(self._ext.project_cotangent(self._jac, gfeats))
        if self._jac_pose is not None:
            out[POSE_KEY] = torch.einsum("bcnfj,bcnf->bcj", self._jac_pose, gfeats)
        return out

    def _gram(self) -> Tensor:
        """``[B, C, N, F, F]``: per (image, Gaussian), ``Σ_pixels Σ_ch u uᵀ`` of the residual's
        gradients ``u`` w.r.t. the Gaussian's projected features (kept: the diagonal and
        the blocks both contract it)."""
        if self._gram_cache is None:
            B, C, N, H, W, D = self._dims
            gauss_ptr, gauss_pairs = self._structure.by_gaussian()
            gram = self._ext.gram(self._feats, self._structure.tile_ptr, self._structure.pair_gauss, gauss_ptr,
                                  gauss_pairs, self._alpha, self._trans, self._rw.view(B * C, H, W, D),
                                  self._rb.view(B * C, H, W, D), self._structure.signature[-1])
            self._gram_cache = gram.view(B, C, N, *gram.shape[1:])
        return self._gram_cache

    def gauss_newton_blocks(self) -> tuple[Tensor, tuple[str, ...]]:
        """The exact per-Gaussian blocks of ``JᵀJ``: ``Σ_c J_cᵀ G_c J_c`` ``[B, N, p, p]``
        over every group but ``pose_deltas`` (in ``theta``'s key order), from the same
        per-pair Gram matrices as :meth:`gauss_newton_diagonal`."""
        # J_cᵀ (G_c J_c), summed over cameras, in the kernel (gram_blocks); F and p are small
        # (≤ 12 and 14 + SH).
        blocks = self._ext.gram_blocks(self._jac, self._gram())
        # Their diagonal is diag(JᵀJ) of these groups: gauss_newton_diagonal reuses it.
        self._block_diagonal = blocks.diagonal(dim1=-2, dim2=-1).clone()
        return blocks, tuple(self._keys)

    def gauss_newton_diagonal(self) -> dict[str, Tensor]:
        """The exact ``diag(JᵀJ)`` in ``theta``'s structure."""
        B, C, N, H, W, D = self._dims
        diagonal = self._block_diagonal
        if diagonal is None:
            diagonal = self._ext.gram_diagonal(self._jac, self._gram())
        out = self._split(diagonal)
        if self._jac_pose is not None:
            cols = []
            for j in range(6):
                dr = self._pixel_tangent(self._jac_pose[..., j].reshape(B * C * N, -1))
                cols.append(dr.pow(2).sum(dim=(2, 3, 4)))
            out[POSE_KEY] = torch.stack(cols, dim=-1)
        return out


def _columns(fn, basis: Tensor) -> Tensor:
    """``stack([fn(t) for t in basis])``, vectorized with ``torch.func.vmap`` when every
    operation allows it."""
    try:
        return torch.func.vmap(fn)(basis)
    except (RuntimeError, NotImplementedError, ValueError):
        return torch.stack([fn(t) for t in basis])
