"""Fused CUDA kernels for PCG's per-iteration vector work, through CuPy.

The kernels live in ``pcg_kernels.cu`` (compiled at first use by
``cupy.RawModule``; the tests also compile it standalone with ``nvcc --ptx``). They
act on torch tensors in place: each tensor is shared with CuPy through DLPack, with
no copy, and every launch goes on torch's current CUDA stream, so the work stays
ordered with torch's own kernels and nothing synchronises with the host.

cupy is an optional extra (``pip install 'difftto[cuda]'``). Nothing outside this
module imports it, and this module imports it only when a kernel is asked for.

:func:`vector_ops` returns an object with the static-method interface of PCG's
torch path (``dot``, ``update_solution``, ``precondition``, ``update_direction``);
:func:`vector_ops_or_none` returns ``None`` instead of raising where it cannot run.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CupyBackendUnavailable",
    "KERNEL_SOURCE",
    "unavailable_reason",
    "vector_ops",
    "vector_ops_or_none",
]

KERNEL_SOURCE = Path(__file__).with_name("pcg_kernels.cu")
# Threads per block; must match DIFFTTO_BLOCK in pcg_kernels.cu (its __launch_bounds__).
BLOCK = 256
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
# Elements each thread of a reduction block handles before chunks are split further.
_ELEMENTS_PER_THREAD = 4
# Reduction blocks aimed for per streaming multiprocessor, over the whole batch.
_BLOCKS_PER_SM = 8


class CupyBackendUnavailable(RuntimeError):
    """``backend="cupy"`` was asked for where the CuPy kernels cannot run."""


def _import_cupy():
    """``(cupy, None)``, or ``(None, why)`` when it cannot be imported."""
    try:
        import cupy
    except Exception as error:  # ImportError, or a CUDA runtime cupy cannot load
        return None, (
            f"cupy cannot be imported ({type(error).__name__}: {error}); install the CUDA "
            "extra with `pip install 'difftto[cuda]'` (cupy-cuda12x)"
        )
    return cupy, None


def unavailable_reason(b: Tensor) -> str | None:
    """Why the CuPy kernels cannot run on tensors like ``b``, or ``None`` if they can."""
    if not torch.cuda.is_available():
        return "CUDA is not available to torch (a CPU-only build, or no GPU)"
    if not b.is_cuda:
        return f"the tensors are on device {b.device}, and the CuPy kernels need a CUDA device"
    if b.dtype not in _SUFFIX:
        return f"the tensors have dtype {b.dtype}; the CuPy kernels support float32 and float64"
    _, why = _import_cupy()
    return why


def vector_ops(b: Tensor) -> type[CupyVectorOps]:
    """The CuPy vector operations for tensors like ``b``.

    Raises:
        CupyBackendUnavailable: naming what is missing (CUDA, a CUDA tensor, a supported
            dtype, or cupy itself).
    """
    why = unavailable_reason(b)
    if why is not None:
        raise CupyBackendUnavailable(
            f"backend='cupy' cannot run: {why}. Use backend='torch', or backend='auto' "
            "(which uses the CuPy kernels only where they can run)."
        )
    return CupyVectorOps


def vector_ops_or_none(b: Tensor) -> type[CupyVectorOps] | None:
    """Like :func:`vector_ops`, but ``None`` where the kernels cannot run."""
    return None if unavailable_reason(b) is not None else CupyVectorOps


@functools.cache
def _module(device_index: int):
    """``pcg_kernels.cu`` as a ``cupy.RawModule`` for device ``device_index`` (cached;
    NVRTC compiles it at the first ``get_function``, and CuPy caches the binary)."""
    cupy, _ = _import_cupy()
    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=KERNEL_SOURCE.read_text(), options=("--std=c++14",))


@functools.cache
def _kernel(name: str, device_index: int):
    """The kernel ``name`` of :func:`_module` on device ``device_index`` (cached)."""
    cupy, _ = _import_cupy()
    with cupy.cuda.Device(device_index):
        return _module(device_index).get_function(name)


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def reduction_chunks(batch: int, n: int, multiprocessors: int) -> int:
    """How many blocks each batch element's reduction is split into: enough to fill the
    GPU (``_BLOCKS_PER_SM`` per multiprocessor over the batch), no more than keeps each
    thread busy with ``_ELEMENTS_PER_THREAD`` elements, and at least one."""
    by_size = math.ceil(n / (BLOCK * _ELEMENTS_PER_THREAD))
    by_occupancy = math.ceil(_BLOCKS_PER_SM * multiprocessors / max(batch, 1))
    return max(1, min(by_size, by_occupancy))


def elementwise_blocks(total: int) -> int:
    """Blocks for a grid-stride elementwise kernel over ``total`` entries."""
    return max(1, min(math.ceil(total / BLOCK), 65_535))


def _check_inplace(name: str, t: Tensor, like: Tensor) -> None:
    if not t.is_contiguous() or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(
            f"{name} must be a contiguous {like.dtype} tensor on {like.device} to be updated "
            f"in place by the CuPy kernels, got dtype {t.dtype} on {t.device} with strides "
            f"{t.stride()}"
        )


def _read(t: Tensor, like: Tensor) -> Tensor:
    """``t`` as a contiguous tensor of ``like``'s dtype (no copy when it already is)."""
    return t.to(dtype=like.dtype).contiguous()


def _launch(name: str, like: Tensor, blocks: int, args: tuple) -> None:
    """Launches kernel ``name`` (dtype suffix added) on torch's current stream of
    ``like``'s device. Tensors in ``args`` are passed through DLPack (no copy); ints
    must already be numpy scalars of the kernel's parameter types."""
    cupy, _ = _import_cupy()
    index = like.device.index if like.device.index is not None else torch.cuda.current_device()
    kernel = _kernel(f"{name}_{_SUFFIX[like.dtype]}", index)
    with cupy.cuda.Device(index):
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(index).cuda_stream)
        with stream:
            # Inside the stream context, DLPack hands the tensors over on the same stream
            # torch uses: no synchronisation, no copy.
            converted = tuple(cupy.from_dlpack(a) if isinstance(a, Tensor) else a for a in args)
            kernel((blocks,), (BLOCK,), converted)


def _reduce(name: str, like: Tensor, k: int, args_before: tuple, n: int) -> Tensor:
    """Two-pass reduction: ``name``'s partials per (batch, chunk), then the finalize
    kernel per batch element. Returns ``[k, B]``."""
    batch = like.shape[0]
    chunks = reduction_chunks(batch, n, _multiprocessors(like.device.index or 0))
    partials = torch.empty(batch * chunks * k, dtype=like.dtype, device=like.device)
    out = torch.empty(k, batch, dtype=like.dtype, device=like.device)
    _launch(name, like, batch * chunks, (*args_before, partials, np.int64(n), np.int32(chunks)))
    _launch("pcg_finalize", like, batch,
            (partials, out, np.int32(chunks), np.int32(k), np.int64(batch)))
    return out


class CupyVectorOps:
    """PCG's per-iteration vector operations as fused CUDA kernels (float32, float64).

    Same interface as the torch path: vectors ``[B, n]``, per-element scalars ``[B]``.
    Reductions accumulate in the vectors' dtype, as torch's do, in a fixed order.
    """

    name = "cupy"

    @staticmethod
    def dot(a: Tensor, b: Tensor) -> Tensor:
        """``⟨a_i, b_i⟩`` per batch element: ``[B]``."""
        a_c, b_c = _read(a, a), _read(b, a)
        return _reduce("pcg_dot_partials", a_c, 1, (a_c, b_c), a.shape[1])[0]

    @staticmethod
    def update_solution(x: Tensor, r: Tensor, p: Tensor, q: Tensor, alpha: Tensor,
                        active: Tensor) -> None:
        """``x += α p``; ``r −= α q`` in place, for active elements only (one launch)."""
        _check_inplace("x", x, x)
        _check_inplace("r", r, x)
        total = x.numel()
        if total == 0:
            return
        mask = active.to(torch.bool).contiguous().view(torch.uint8)
        _launch("pcg_update_solution", x, elementwise_blocks(total),
                (x, r, _read(p, x), _read(q, x), _read(alpha, x), mask,
                 np.int64(x.shape[1]), np.int64(total)))

    @staticmethod
    def precondition(r: Tensor, inverse_diagonal: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """``z = M⁻¹ r`` (``inverse_diagonal=None``: ``z`` is ``r``), ``⟨r, z⟩`` and
        ``⟨r, r⟩``: one fused launch for all three, plus the small finalize launch."""
        r_c = _read(r, r)
        if inverse_diagonal is None:
            z, diag, has_diagonal = r_c, r_c, 0
        else:
            z = torch.empty_like(r_c)
            diag, has_diagonal = _read(inverse_diagonal, r), 1
        sums = _reduce("pcg_precondition_partials", r_c, 2,
                       (r_c, diag, z, np.int32(has_diagonal)), r.shape[1])
        return z, sums[0], sums[1]

    @staticmethod
    def update_direction(p: Tensor, z: Tensor, beta: Tensor) -> None:
        """``p = z + β p`` in place (one launch)."""
        _check_inplace("p", p, p)
        total = p.numel()
        if total == 0:
            return
        _launch("pcg_update_direction", p, elementwise_blocks(total),
                (p, _read(z, p), _read(beta, p), np.int64(p.shape[1]), np.int64(total)))
