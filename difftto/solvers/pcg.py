"""Batched, matrix-free preconditioned conjugate gradient.

One SPD system per batch element: ``A_b x_b = b_b``. Each element has its own step
sizes, convergence flag and iteration count; converged elements stop changing.
Off the CPU the loop never synchronises with the host per iteration: convergence is
tracked on the device and looked at every ``check_every`` iterations (on the CPU, where
a look waits on nothing, every iteration by default).

Two departures from the textbook, both for float32 robustness:

- every ``recompute_every`` iterations the recursive residual ``r`` is replaced by
  the true ``b − A x`` (it drifts from it in finite precision);
- when the recursive residual says an element converged, the true residual is
  checked before that is believed; an element whose true residual is still too
  large is restarted from its current iterate while iterations remain.

Non-finite values never pass silently: a NaN/Inf right-hand side, start vector, or
operator output (in ``p·Ap``, a replaced residual, or the final true residual) makes
that element ``NON_FINITE_INPUT``, and an element that stopped keeps its iterate
whatever its (possibly non-finite) search direction holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..finite import all_finite
from ..operators import LinearOperator
from .preconditioners import (
    IdentityPreconditioner,
    JacobiPreconditioner,
    Preconditioner,
    make_preconditioner,
)
from .result import (
    FAILURE_POLICIES,
    LinearSolveResult,
    Status,
    apply_failure_policy,
)

__all__ = ["PCG", "default_max_iter"]

BACKENDS = ("auto", "torch", "cupy", "compiled")


def default_max_iter(n: int) -> int:
    """The iteration cap when none is given: ``2 n`` (CG's exact-arithmetic bound is
    ``n``; float needs slack) clamped to ``[20, 10_000]``. It counts unknowns per
    batch element, not tensor dimensions."""
    return int(min(max(2 * n, 20), 10_000))


class _TorchVectorOps:
    """The per-iteration vector updates of PCG in plain torch (any device).

    Written for few passes over memory: at large ``n`` each full-vector operation costs
    about as much as a cheap operator product, so the masked updates zero the inactive
    rows of the step once and add it with ``addcmul_`` (2 passes instead of the 4 of
    ``where(active, x + α p, x)`` and a copy), and dots are one ``vecdot``."""

    name = "torch"

    @staticmethod
    def dot(a: Tensor, b: Tensor) -> Tensor:
        return torch.linalg.vecdot(a, b, dim=1)

    @staticmethod
    def update_solution(x, r, p, q, alpha, active):
        """``x += α p``; ``r −= α q`` in place, for active elements only: inactive ones
        keep ``x`` and ``r`` whatever ``p`` and ``q`` hold (they may be non-finite;
        ``where`` selects, so no ``0 · inf`` reaches them)."""
        step = alpha[:, None]
        mask = active[:, None]
        x.addcmul_(step, torch.where(mask, p, 0.0))
        r.addcmul_(step, torch.where(mask, q, 0.0), value=-1)

    @staticmethod
    def precondition(r, inverse_diagonal):
        """``z = M⁻¹ r`` (``inverse_diagonal=None``: identity), ``⟨r, z⟩`` and ``⟨r, r⟩``."""
        rr = torch.linalg.vecdot(r, r, dim=1)
        if inverse_diagonal is None:
            return r, rr, rr
        z = inverse_diagonal * r
        return z, torch.linalg.vecdot(r, z, dim=1), rr

    @staticmethod
    def update_direction(p, z, beta):
        """``p = z + β p``."""
        p.mul_(beta[:, None]).add_(z)


def _vector_ops(backend: str, b: Tensor):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return _TorchVectorOps
    if backend == "compiled":
        from . import compiled

        return compiled.vector_ops(b)
    if backend == "cupy" or (backend == "auto" and b.is_cuda):
        from . import cupy_kernels

        if backend == "cupy":
            return cupy_kernels.vector_ops(b)  # raises a clear error without CUDA/cupy
        ops = cupy_kernels.vector_ops_or_none(b)
        if ops is not None:
            return ops
    return _TorchVectorOps


@dataclass
class PCG:
    """Batched matrix-free preconditioned conjugate gradient.

    Args:
        rtol, atol: an element has converged when ``‖b − A x‖ ≤ max(rtol ‖b‖, atol)``.
        max_iter: iteration cap per element (``None``: :func:`default_max_iter` of ``n``).
        preconditioner: ``"auto"`` (the default: block-Jacobi where the operator knows
            its diagonal blocks, ``operator.block_diagonal()``, e.g. 3DGS's per-Gaussian
            blocks; else Jacobi where it knows its diagonal; else the identity),
            ``"block_jacobi"`` (the same), ``"jacobi"`` (from ``operator.diagonal()``;
            identity where the operator knows no diagonal), ``"identity"``, or a
            :class:`Preconditioner`. See :func:`~difftto.solvers.preconditioners.make_preconditioner`.
        check_every: iterations between host-side checks for early exit (``None``, the
            default: every iteration for CPU tensors, where the look costs a few µs and
            waits on nothing, 10 elsewhere; on the CPU with ``backend="compiled"``, an
            operator that gives its product as a graph and at most
            ``steps_per_call_max_numel`` (32768) elements, ``steps_per_call`` (8), run as
            one compiled call). Elements that converged stop changing, so a longer
            interval only runs up to ``check_every − 1`` idle iterations after the last
            element converged (same results, their passes wasted). On the CPU, for such
            an operator and size, the compiled backend runs the iterations between two
            looks as one call wherever no residual replacement, best-iterate tracking
            (``on_failure="best"``) or the cap falls among them.
        recompute_every: iterations between true-residual replacements.
        on_failure: ``"raise"``, ``"warn"``, ``"zero"`` or ``"best"`` (see
            :func:`~difftto.solvers.result.apply_failure_policy`).
        backend: ``"auto"`` (fused CuPy kernels on CUDA tensors when cupy imports,
            else torch), ``"torch"``, ``"cupy"``, or ``"compiled"`` (opt-in: the torch
            updates and the per-iteration bookkeeping compiled by inductor into a few
            fused loops, and the operator's product with them where the operator gives it
            as a graph, ``operator.graph()``, see :mod:`difftto.solvers.compiled`; about a second of
            compilation per function and new shape; eager torch where compiling fails,
            after a warning).

    Example::

        result = PCG(rtol=1e-8).solve(operator, b)
        result.solution, result.status, result.iterations, result.relative_residual
    """

    rtol: float = 1e-6
    atol: float = 0.0
    max_iter: int | None = None
    preconditioner: str | Preconditioner | None = "auto"
    check_every: int | None = None
    recompute_every: int = 50
    on_failure: str = "warn"
    backend: str = "auto"

    def __post_init__(self):
        if not (self.rtol >= 0 and self.atol >= 0):
            raise ValueError(f"rtol and atol must be >= 0, got rtol={self.rtol}, atol={self.atol}")
        if self.max_iter is not None and self.max_iter < 0:
            raise ValueError(f"max_iter must be >= 0 or None, got {self.max_iter}")
        if (self.check_every is not None and self.check_every < 1) or self.recompute_every < 1:
            raise ValueError(
                f"check_every and recompute_every must be >= 1, got {self.check_every}, "
                f"{self.recompute_every}"
            )
        if self.on_failure not in FAILURE_POLICIES:
            raise ValueError(f"on_failure must be one of {FAILURE_POLICIES}, got {self.on_failure!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    @torch.no_grad()
    def solve(
        self,
        operator: LinearOperator,
        b: Tensor,
        x0: Tensor | None = None,
        *,
        preconditioner: str | Preconditioner | None = None,
        on_failure: str | None = None,
    ) -> LinearSolveResult:
        """Solves ``operator · x = b`` for every batch element.

        Args:
            operator: a symmetric positive definite :class:`LinearOperator` ``(B, n)``.
            b: right-hand sides ``[B, n]``.
            x0: start vectors ``[B, n]`` (default zeros).
            preconditioner, on_failure: override the constructor's choice for this call.

        Returns:
            :class:`LinearSolveResult` with the solution ``[B, n]`` and, per element,
            status, iterations and the true relative residual.

        Raises:
            ValueError: on mismatched shapes, an operator declared non-symmetric, or an
                operator whose ``mv`` returns another shape.
            LinearSolveError: with ``on_failure="raise"`` when an element fails.
            CupyBackendUnavailable: with ``backend="cupy"`` where CUDA, a CUDA tensor, a
                float32/float64 dtype or cupy is missing (``"auto"`` falls back to torch).
        """
        operator.check_vector(b, "b")
        if not operator.symmetric:
            raise ValueError(
                f"PCG needs a symmetric operator; {operator!r} is not declared symmetric"
            )
        if x0 is not None:
            operator.check_vector(x0, "x0")
        policy = self.on_failure if on_failure is None else on_failure
        spec = self.preconditioner if preconditioner is None else preconditioner
        if spec == "jacobi" and operator.diagonal() is None:
            spec = "identity"
        precond = make_preconditioner(spec, operator)
        ops = _vector_ops(self.backend, b)
        batch, n = operator.shape
        max_iter = default_max_iter(n) if self.max_iter is None else self.max_iter
        result, best, best_rel = _pcg_loop(
            operator, b, x0, precond, ops, max_iter, self.rtol, self.atol,
            self.check_every, self.recompute_every, track_best=(policy == "best"),
        )
        return apply_failure_policy(result, policy, best=best, best_relative_residual=best_rel,
                                    what="PCG")


def _pcg_loop(operator, b, x0, precond, ops, max_iter, rtol, atol, check_every,
              recompute_every, track_best):
    # Contiguous [B, n] rows: the CuPy kernels index them directly, and x, r, p inherit it.
    b = b.detach().contiguous()
    batch, n = b.shape
    dev = b.device
    inverse_diagonal = precond.inverse_diagonal if isinstance(precond, JacobiPreconditioner) else None
    if inverse_diagonal is None and not isinstance(precond, IdentityPreconditioner):
        # A general preconditioner: precondition with it, dots with the backend.
        def precondition(r):
            z = precond.apply(r)
            return z, ops.dot(r, z), ops.dot(r, r)
    else:
        def precondition(r):
            return ops.precondition(r, inverse_diagonal)

    def apply(v):
        out = operator.mv(v)
        if tuple(out.shape) != (batch, n):
            raise ValueError(
                f"operator.mv returned shape {tuple(out.shape)} for an input of shape "
                f"{(batch, n)}; {operator!r} must map [B, n] to [B, n]"
            )
        return out

    finite_b = all_finite(b, dim=1)
    all_b_finite = bool(finite_b.all())  # (the copies below only where one is not)
    if not all_b_finite:
        b = torch.where(finite_b[:, None], b, torch.zeros_like(b))
    x = (torch.zeros_like(b) if x0 is None
         else x0.detach().to(b.dtype).clone(memory_format=torch.contiguous_format))
    # A backend with a fused ``step`` (``_step``: advance, precondition and redirect in one
    # call) runs it on every iteration that replaces no residual, under Jacobi or identity;
    # and, where it has them, its own ``start`` and ``finish`` (the work before and after
    # the loop, ``_start`` and ``_finish``, e.g. compiled: a few fused loops in place of
    # about 25 operations).
    general = inverse_diagonal is None and not isinstance(precond, IdentityPreconditioner)
    start = None if general else getattr(ops, "start", None)
    if start is None:
        def start(*args):
            return _start(*args, precondition=precondition)
    finish = (None if general else getattr(ops, "finish", None)) or _finish
    tolerances = torch.tensor([rtol, atol], dtype=b.dtype, device=dev)
    r, p, rz, rr, b_norm, tol, tol2, status, active, iterations = start(
        b, finite_b, None if x0 is None else b - apply(x), inverse_diagonal, tolerances)
    best_x = x.clone() if track_best else None
    best_rr = torch.where(torch.isfinite(rr), rr, torch.inf) if track_best else None

    # One host look before the loop: nothing to do (b = 0, an exact x0) costs no products.
    k = 0 if bool(active.any()) else max_iter
    advance = getattr(ops, "advance", None) or (lambda *a: _advance(ops, *a))
    redirect = getattr(ops, "redirect", None) or (lambda *a: _redirect(ops, *a))
    step = None if general else getattr(ops, "step", None)
    # A backend that can compile the operator's product into that step
    # (``ops.product_step``, where the operator gives its product as a graph) makes one
    # call per such iteration for ``q = A p`` and the vector work.
    product_step = getattr(ops, "product_step", None) if step is not None else None
    step_with_product = None if product_step is None else product_step(operator)
    # Where the product is compiled into the step and the vectors are small (CPU only:
    # measured there), the iterations between two host looks run as one compiled call.
    several_per_call = (step_with_product is not None and dev.type == "cpu"
                        and b.numel() <= getattr(ops, "steps_per_call_max_numel", 0))
    if check_every is None:
        # On the CPU a host look waits on nothing: every iteration, or every
        # ``ops.steps_per_call`` where they run as one call. Elsewhere every 10.
        check_every = (10 if dev.type != "cpu" else
                       getattr(ops, "steps_per_call", 1) if several_per_call else 1)
    # Not where a residual replacement, best-iterate tracking or the cap falls among them
    # (the loop below).
    steps_between_looks = (product_step(operator, check_every)
                           if several_per_call and check_every > 1 and not track_best else None)
    final_r = None  # b − A x where the loop ended on it (x unchanged since): not recomputed
    while k < max_iter:
        if (steps_between_looks is not None and k % check_every == 0
                and k + check_every <= max_iter
                and (k + check_every) // recompute_every == k // recompute_every):
            status, active, iterations, rz, rr = steps_between_looks(
                x, r, p, rz, rr, status, active, iterations, inverse_diagonal, tol2)
            k += check_every
        else:
            k += 1
            if step is not None and k % recompute_every != 0:
                if step_with_product is not None:
                    status, active, iterations, rz, rr = step_with_product(
                        x, r, p, rz, rr, status, active, iterations, inverse_diagonal, tol2)
                else:
                    status, active, iterations, rz, rr = step(
                        x, r, p, apply(p), rz, rr, status, active, iterations,
                        inverse_diagonal, tol2)
            else:
                q = apply(p)
                status, active, iterations = advance(x, r, p, q, rz, status, active, iterations)
                if k % recompute_every == 0:
                    # Residual replacement: the recursive r drifts from b − A x in finite
                    # precision.
                    r = torch.where(active[:, None], b - apply(x), r)
                z, rz_new, rr_new = precondition(r)
                status, active, rz, rr = redirect(p, z, rz, rz_new, rr, rr_new, status, active,
                                                  tol2)
            if track_best:
                improved = rr < best_rr
                best_x = torch.where(improved[:, None], x, best_x)
                best_rr = torch.where(improved, rr, best_rr)
        if k % check_every == 0 or k == max_iter:
            if not bool(active.any()):
                # Believe "converged" only from the true residual; restart the others.
                true_r = b - apply(x)
                true_rr = ops.dot(true_r, true_r)
                restart = (status == int(Status.CONVERGED)) & finite_b & (true_rr > tol2)
                if k == max_iter or not bool(restart.any()):
                    final_r = true_r
                    break
                r = torch.where(restart[:, None], true_r, r)
                z, rz_r, rr_r = precondition(r)
                p = torch.where(restart[:, None], z, p)
                rz = torch.where(restart, rz_r, rz)
                rr = torch.where(restart, rr_r, rr)
                active = restart

    status, rel = finish(b - apply(x) if final_r is None else final_r, b_norm, tol, status)
    if not all_b_finite:
        # Elements with non-finite right-hand sides report NaN, never a silent zero.
        x = torch.where(finite_b[:, None], x, torch.full_like(x, float("nan")))
        rel = torch.where(finite_b, rel, torch.full_like(rel, float("nan")))
    best_rel = None
    if track_best:
        best_x = torch.where(finite_b[:, None], best_x, x)
        failed = status != int(Status.CONVERGED)
        if bool(failed.any()):
            best_norm = torch.linalg.vector_norm(b - apply(best_x), dim=1)
            best_rel = torch.where(finite_b, _relative(best_norm, b_norm), rel)
    return LinearSolveResult(x, status, iterations, rel), best_x, best_rel


# The work before and after the loop, in functions of tensors only, so that a backend may
# run them compiled (``ops.start`` / ``ops.finish``); otherwise they run eagerly.
def _start(b, finite_b, r, inverse_diagonal, tolerances, *, precondition):
    """The loop's state before its first iteration, from ``b`` (non-finite rows zeroed),
    which rows of it are finite, ``r = b − A x0`` (``None`` for ``x0 = 0``: ``r = b``),
    the Jacobi inverse diagonal (or ``None``), ``tolerances = [rtol, atol]`` and
    ``precondition(r) -> (z, ⟨r, z⟩, ⟨r, r⟩)``. Returns ``(r, p, rz, rr, ‖b‖, tol, tol²,
    status, active, iterations)``."""
    b_norm = torch.linalg.vector_norm(b, dim=1)
    tol = torch.clamp(tolerances[0] * b_norm, min=tolerances[1])
    r = b.clone() if r is None else r
    status = torch.where(finite_b, int(Status.CONVERGED), int(Status.NON_FINITE_INPUT))
    z, rz, rr = precondition(r)
    # A non-finite start (x0, or the operator's output at x0) is a non-finite input too.
    bad_start = finite_b & ~torch.isfinite(rr)
    status = torch.where(bad_start, int(Status.NON_FINITE_INPUT), status)
    tol2 = tol * tol
    active = finite_b & ~bad_start & (rr > tol2)
    iterations = torch.zeros_like(status)
    return r, z.clone(), rz, rr, b_norm, tol, tol2, status, active, iterations


def _finish(true_r, b_norm, tol, status):
    """Given the true residual ``b − A x`` at the end: the final ``(status, relative
    residual)`` (``CONVERGED`` only where ``‖b − A x‖ ≤ tol`` and finite)."""
    true_norm = torch.linalg.vector_norm(true_r, dim=1)
    rel = _relative(true_norm, b_norm)
    ok = status == int(Status.CONVERGED)
    # A residual that is not finite at the end means the operator's output was not.
    status = torch.where(ok & ~torch.isfinite(true_norm), int(Status.NON_FINITE_INPUT), status)
    ok = status == int(Status.CONVERGED)
    not_reached = ok & ~(true_norm <= tol)
    status = torch.where(not_reached, int(Status.MAX_ITER_REACHED), status)
    return status, rel


# The per-iteration work of the loop besides the product and the preconditioner, in two
# functions of tensors only, so that a backend may run them compiled (``ops.advance`` /
# ``ops.redirect``, see ``compiled.py``); otherwise they run eagerly with ``ops``'s updates.
def _advance(ops, x, r, p, q, rz, status, active, iterations):
    """Given ``q = A p``: ``α = ⟨r, z⟩ / ⟨p, q⟩``, ``x += α p``, ``r −= α q`` in place for
    active elements; returns the updated ``(status, active, iterations)``."""
    pq = ops.dot(p, q)
    # An element stops on a non-finite p·Ap (NON_FINITE_INPUT) or p·Ap <= 0 (BREAKDOWN).
    # Few small ops on purpose: at n ~ 1e4 these [B] updates cost as much as the vectors'.
    finite = torch.isfinite(pq)
    stop = active & ~(finite & (pq > 0))
    status = torch.where(stop, torch.where(finite, int(Status.BREAKDOWN),
                                           int(Status.NON_FINITE_INPUT)), status)
    active = active & ~stop
    # rz / pq is only selected where pq > 0 and finite.
    alpha = torch.where(active, rz / pq, 0.0)
    ops.update_solution(x, r, p, q, alpha, active)
    return status, active, iterations + active


def _redirect(ops, p, z, rz, rz_new, rr, rr_new, status, active, tol2):
    """Given ``z = M⁻¹ r``, ``⟨r, z⟩`` and ``⟨r, r⟩`` of the updated residual:
    ``p = z + β p`` in place; returns the updated ``(status, active, rz, rr)`` (an element
    whose ``⟨r, r⟩`` fell to ``tol²`` is no longer active)."""
    # The operator can turn non-finite in a replaced residual only; q was checked.
    finite = torch.isfinite(rr_new) & torch.isfinite(rz_new)
    status = torch.where(active & ~finite, int(Status.NON_FINITE_INPUT), status)
    active = active & finite
    rr = torch.where(active, rr_new, rr)
    # beta = 0 for inactive elements leaves p = z there: a clean restart direction
    # (rz_new / rz is only selected where rz != 0).
    beta = torch.where(active & (rz != 0), rz_new / rz, 0.0)
    ops.update_direction(p, z, beta)
    rz = torch.where(active, rz_new, rz)
    return status, active & (rr > tol2), rz, rr


def _step(ops, x, r, p, q, rz, rr, status, active, iterations, inverse_diagonal, tol2):
    """A whole iteration after ``q = A p`` where no residual is replaced and ``M`` is
    Jacobi (``inverse_diagonal``) or the identity (``None``): :func:`_advance`,
    ``ops.precondition`` and :func:`_redirect` in one function, which a compiled backend
    fuses; returns ``(status, active, iterations, rz, rr)``."""
    status, active, iterations = _advance(ops, x, r, p, q, rz, status, active, iterations)
    z, rz_new, rr_new = ops.precondition(r, inverse_diagonal)
    status, active, rz, rr = _redirect(ops, p, z, rz, rz_new, rr, rr_new, status, active, tol2)
    return status, active, iterations, rz, rr


def _relative(norm: Tensor, b_norm: Tensor) -> Tensor:
    """``norm / ‖b‖``, and ``norm`` itself where ``b = 0``."""
    return torch.where(b_norm > 0, norm / torch.where(b_norm > 0, b_norm, 1.0), norm)
