"""Parameter structures: a tensor ``[B, ...]`` or a dict of named tensors, each with
a leading batch dimension ``B``. :class:`Layout` flattens them once to ``[B, n]`` for
the solvers and restores the structure on the way out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Layout", "Params"]

Params = Tensor | Mapping[str, Tensor]


@dataclass(frozen=True)
class Layout:
    """The shapes of a parameter structure.

    Attributes:
        keys: group names in order (``None`` for a bare tensor).
        shapes: per-group shapes without the batch dimension.
        batch: the batch size ``B``.
    """

    keys: tuple[str, ...] | None
    shapes: tuple[tuple[int, ...], ...]
    batch: int
    dtype: torch.dtype
    device: torch.device

    @staticmethod
    def of(theta: Params, name: str = "theta0") -> Layout:
        """The layout of ``theta``; raises ``ValueError``/``TypeError`` on a malformed one."""
        if isinstance(theta, Tensor):
            if theta.dim() < 1:
                raise ValueError(f"{name} must have a leading batch dimension, got a 0-d tensor")
            if not theta.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {theta.dtype}")
            return Layout(None, (tuple(theta.shape[1:]),), theta.shape[0], theta.dtype, theta.device)
        if isinstance(theta, Mapping):
            if not theta:
                raise ValueError(f"{name} is an empty dict; expected named tensors [B, ...]")
            keys = tuple(theta.keys())
            batch, dtype, device = None, None, None
            shapes = []
            for k in keys:
                t = theta[k]
                if not isinstance(t, Tensor):
                    raise TypeError(f"{name}[{k!r}] must be a tensor, got {type(t).__name__}")
                if t.dim() < 1:
                    raise ValueError(f"{name}[{k!r}] must have a leading batch dimension, got 0-d")
                if not t.is_floating_point():
                    raise TypeError(f"{name}[{k!r}] must be floating point, got {t.dtype}")
                if batch is None:
                    batch, dtype, device = t.shape[0], t.dtype, t.device
                if t.shape[0] != batch:
                    raise ValueError(
                        f"{name}[{k!r}] has batch size {t.shape[0]}, but {name}[{keys[0]!r}] has {batch}"
                    )
                if t.dtype != dtype or t.device != device:
                    raise ValueError(
                        f"{name}[{k!r}] is {t.dtype} on {t.device}; every group must share "
                        f"{dtype} on {device}"
                    )
                shapes.append(tuple(t.shape[1:]))
            return Layout(keys, tuple(shapes), batch, dtype, device)
        raise TypeError(f"{name} must be a tensor or a dict of tensors, got {type(theta).__name__}")

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def numel(self) -> int:
        """Unknowns per batch element, ``n``."""
        return sum(self.sizes)

    @property
    def names(self) -> tuple[str, ...]:
        return self.keys if self.keys is not None else ("theta",)

    def slices(self) -> dict[str, slice]:
        """Group name → slice of the flat vector."""
        out, start = {}, 0
        for name, size in zip(self.names, self.sizes):
            out[name] = slice(start, start + size)
            start += size
        return out

    def groups(self, theta: Params) -> list[Tensor]:
        return [theta] if self.keys is None else [theta[k] for k in self.keys]

    def check(self, theta: Params, name: str) -> None:
        """Raises ``ValueError`` unless ``theta`` has this layout's structure and shapes."""
        other = Layout.of(theta, name)
        if other.keys != self.keys:
            raise ValueError(f"{name} has keys {other.keys}, expected {self.keys}")
        if other.shapes != self.shapes or other.batch != self.batch:
            got = [(other.batch, *s) for s in other.shapes]
            want = [(self.batch, *s) for s in self.shapes]
            raise ValueError(f"{name} has shapes {got}, expected {want}")

    def flatten(self, theta: Params) -> Tensor:
        """``[B, n]`` (one ``cat``; differentiable)."""
        parts = [t.reshape(self.batch, -1) for t in self.groups(theta)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def unflatten(self, flat: Tensor) -> Params:
        """The structure back from ``[B, n]`` (views; differentiable)."""
        batch = flat.shape[0]
        # One group: no split (whose backward would copy the gradient into a new tensor).
        parts = (flat,) if len(self.sizes) == 1 else torch.split(flat, self.sizes, dim=1)
        tensors = [p.reshape(batch, *s) for p, s in zip(parts, self.shapes)]
        if self.keys is None:
            return tensors[0]
        return dict(zip(self.keys, tensors))

    def expand(self, weights, name: str = "lam") -> Tensor:
        """Broadcasts per-group weights to ``[B, n]`` (differentiable, so autograd sums
        gradients back to each weight's own shape).

        Each group's weight may be a Python number, a 0-d tensor, a ``[B]`` tensor, or a
        tensor whose shape is a leading prefix of the group's ``[B, ...]`` shape
        (e.g. ``[B, N]`` for means ``[B, N, 3]``: one weight per Gaussian), or any
        shape that broadcasts against the full one. For a dict structure, ``weights``
        is a dict with the same keys, or a single number/tensor used for every group.
        """
        if self.keys is not None and isinstance(weights, Mapping):
            if set(weights.keys()) != set(self.keys):
                raise ValueError(
                    f"{name} has keys {sorted(weights.keys())}, expected the keys of theta0 "
                    f"{sorted(self.keys)}"
                )
            per_group = [weights[k] for k in self.keys]
        elif isinstance(weights, Mapping):
            raise ValueError(f"{name} is a dict but theta0 is a single tensor")
        else:
            per_group = [weights] * len(self.names)
        parts = []
        for gname, shape, w in zip(self.names, self.shapes, per_group):
            full = (self.batch, *shape)
            w = torch.as_tensor(w, dtype=self.dtype, device=self.device)
            label = name if self.keys is None else f"{name}[{gname!r}]"
            if w.dim() < len(full) and tuple(w.shape) == full[: w.dim()]:
                w = w.reshape(*w.shape, *([1] * (len(full) - w.dim())))
            try:
                w = w.expand(full)
            except RuntimeError:
                raise ValueError(
                    f"{label} has shape {tuple(w.shape)}, which neither is a leading prefix of "
                    f"nor broadcasts to the parameter shape {full}"
                ) from None
            parts.append(w.reshape(self.batch, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
