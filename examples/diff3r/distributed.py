"""Multi-process data-parallel training with ``torch.distributed`` (``torchrun``).

``torchrun --nproc_per_node N examples/diff3r/train.py ...`` sets ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK``; :func:`setup` then joins the process group (gloo on CPU,
NCCL on CUDA). Every rank takes its own slice of each global batch; gradients are
averaged by ``DistributedDataParallel``; rank 0 alone writes logs and checkpoints.
A single process (no ``WORLD_SIZE``) runs exactly as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Context", "setup", "cleanup"]


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``model`` in ``DistributedDataParallel`` when several processes run.
        ``find_unused_parameters``: the Λ head is unused in ``zero_shot`` mode."""
        if not self.enabled:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's contiguous slice of a global batch of ``world × b`` indices."""
        per_rank = len(indices) // self.world
        return indices[self.rank * per_rank:(self.rank + 1) * per_rank]


def setup(device: torch.device) -> Context:
    """Joins the process group when launched by ``torchrun``; returns the context.

    Raises ``RuntimeError`` when ``WORLD_SIZE`` and ``RANK`` disagree with each other.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    rank = int(os.environ.get("RANK", "-1"))
    if not 0 <= rank < world:
        raise RuntimeError(f"RANK={os.environ.get('RANK')!r} is not in [0, WORLD_SIZE={world})")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Context(rank, world)


def cleanup(ctx: Context) -> None:
    """Leaves the process group (after a final barrier)."""
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
