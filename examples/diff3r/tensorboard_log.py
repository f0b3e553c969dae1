"""TensorBoard scalars and images for ``train.py``: every logged record's numbers under
``train/<name>``, and every ``image_every`` steps the first scene's target views with
their renders beneath (``train/targets_over_renders``). Rank 0 writes; the event files
go to ``out_dir/tensorboard`` (``tensorboard --logdir outputs/diff3r``)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor


class TensorBoardLog:
    """A ``SummaryWriter`` when ``enabled`` and the ``tensorboard`` package imports; a
    no-op otherwise (saying why once)."""

    def __init__(self, log_dir: str | Path, enabled: bool, image_every: int):
        if int(image_every) < 1:
            raise ValueError(f"tensorboard_image_every must be an int >= 1, got {image_every!r}")
        self.image_every = int(image_every)
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # the package is an optional extra of the example
            print(f"[train] TensorBoard logging off: {err} (pip install tensorboard)", flush=True)
            return
        self.writer = SummaryWriter(str(log_dir))

    def record(self, rec: dict, render: Tensor, target: Tensor) -> None:
        """Writes the numbers of ``rec`` at ``rec['step']``; on an image step, also the
        first scene's targets ``[V, 3, H, W]`` over its renders (clipped to [0, 1])."""
        if self.writer is None:
            return
        step = int(rec["step"])
        for name, value in rec.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                self.writer.add_scalar(f"train/{name}", value, step)
        if step % self.image_every == 0:
            pair = torch.cat([target[0].detach().float(), render[0].detach().float().clamp(0, 1)], dim=-2)
            self.writer.add_images("train/targets_over_renders", pair.cpu(), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
