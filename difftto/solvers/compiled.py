"""Compiled (inductor) execution of PCG's vector work and of traced products: the opt-in
counterpart of the CuPy kernels (``PCG(backend="compiled")``, ``jvp_mode="compile"``).

Eager torch runs each operation of an iteration on its own: about ten passes over the
``[B, n]`` vectors and forty ``[B]``-sized operations (status, masks, step sizes) per PCG
iteration, and one pass per operation of a traced product. Compiled, the same
operations are fused into a few loops. Nothing here changes the algorithm:

- :func:`vector_ops` compiles PCG's own per-iteration functions (``pcg._advance`` and
  ``pcg._redirect``, which the eager backends run too, and ``pcg._step``, the two with the
  Jacobi/identity preconditioning between them, which the loop calls on every iteration
  that replaces no residual) over the torch updates, the work before and after the loop
  (``pcg._start``, ``pcg._finish``), and the updates ``dot`` / ``precondition`` used
  outside the loop's body; statuses, masks,
  non-finite handling and residual replacement are those of the eager loop, which still
  drives the iterations (no host synchronisation is added).
- :meth:`CompiledVectorOps.product_step` compiles an operator's product, where the
  operator gives it as a graph (:meth:`~difftto.operators.LinearOperator.graph`, e.g. a
  traced product with ``jvp_mode="compile"``, the proximal ``diag Λ`` included), into
  that fused ``_step``: one call per iteration for ``q = A p`` and the vector work, one
  pass fewer over ``q``; or several iterations per call, those between two of the loop's
  host looks (``PCG.check_every``; by default 8 where the vectors are small, where the
  ~40 µs around a call outweighs the ~17 µs of one iteration's loops). The operator only
  gives its graph; the composition is here.
- :func:`compile_graph` compiles one FX graph of aten operations (a traced product, see
  ``objective._fold_linear_map``) for fixed input shapes; a product's constants stay
  inputs, so a new linearization point does not recompile.

Both go through ``torch._inductor.compile`` on a ``make_fx`` graph rather than
``torch.compile``: the compiled code is then called without dynamo's guards, which cost
more than the work itself at n ~ 10⁴ (measured 60 µs vs 22 µs per call of a 10⁴ product).
Shapes are static, so the code is keyed here by every input's shape, strides, dtype and
device (inductor's code also asserts them on each call).

Compilation costs about a second to tens of seconds per function and shape on first use
(inductor caches the generated code on disk for later processes). Where it fails, the
eager code runs instead, after one warning naming the reason.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from . import pcg

__all__ = ["CompiledFunction", "CompiledVectorOps", "CompileFallbackWarning", "compile_graph",
           "input_key", "vector_ops", "warn_fallback"]


class CompileFallbackWarning(RuntimeWarning):
    """Compiling a function failed; its eager version runs instead."""


_WARNED: set[tuple[str, str]] = set()


def warn_fallback(what: str, error: BaseException) -> None:
    """Warns once per ``what`` and kind of error that ``what`` runs eagerly instead."""
    text = str(error).strip()
    reason = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
    key = (what, type(error).__name__)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"compiling {what} failed; running it eagerly instead ({reason[:500]})",
                      CompileFallbackWarning, stacklevel=3)


def compile_graph(module: torch.fx.GraphModule, example_inputs: tuple[Tensor, ...], what: str
                  ) -> Callable[..., Tensor] | None:
    """``module`` (a graph of aten operations, e.g. from ``make_fx``) compiled by inductor
    for the shapes, strides, dtypes and devices of ``example_inputs``; ``None`` (after
    :func:`warn_fallback`) where compiling fails. The result must only be called with
    inputs like the examples, and returns what ``module`` returns."""
    from torch._inductor import compile as inductor_compile

    try:
        with torch.no_grad():
            # A copy: inductor rewrites the graph it is given, and ``module`` stays in use.
            return inductor_compile(copy.deepcopy(module), list(example_inputs))
    except Exception as error:  # noqa: BLE001 - any compiler failure means "run it eagerly"
        warn_fallback(what, error)
        return None


def input_key(args) -> tuple:
    """What compiled code is specialized to: each argument's shape, strides, dtype and
    device (``None`` for a ``None`` argument)."""
    return tuple(None if a is None else (a.shape, a.stride(), a.dtype, a.device) for a in args)


class CompiledFunction:
    """``fn(*tensors)`` (tensor or ``None`` arguments; it may update its inputs in place)
    compiled once per key of the arguments (shapes, strides, dtypes, devices, which ones
    are ``None``), the last ``keep`` keys kept. Where compiling fails for a key, ``fn``
    runs eagerly for it (after one :class:`CompileFallbackWarning`)."""

    def __init__(self, fn: Callable, what: str, keep: int = 16):
        self.fn, self.what, self.keep = fn, what, keep
        self.compiled: OrderedDict[tuple, Callable | None] = OrderedDict()

    def __call__(self, *args):
        key = input_key(args)
        found = self.compiled.get(key, False)
        if found is False:
            found = self._compile(args)
            self.compiled[key] = found
            while len(self.compiled) > self.keep:
                self.compiled.popitem(last=False)
        if found is None:
            return self.fn(*args)
        compiled, drops_none = found
        return compiled(*[a for a in args if a is not None]) if drops_none else compiled(*args)

    def for_one_key(self) -> Callable:
        """``self`` for a caller whose inputs keep one key from call to call (one PCG
        solve's loop: the same tensors or new ones of the same shapes, strides, dtypes and
        devices, the same ones ``None``): the key is computed on the first call only (11-20
        µs of a ~90 µs iteration at n = 10^4); later calls go straight to the compiled
        code, whose own checks (inductor asserts every input's size and stride before it
        runs) still guard each call, and where they fail the call is looked up by its key
        again."""
        resolved: list = []

        def call(*args):
            if resolved:
                compiled, drops_none = resolved[0]
                try:
                    return compiled(*[a for a in args if a is not None]) if drops_none \
                        else compiled(*args)
                except AssertionError:  # other sizes or strides: look the key up
                    resolved.clear()
            key = input_key(args)
            out = self(*args)
            found = self.compiled.get(key)
            if found is not None:
                resolved.append(found)
            return out

        return call

    def _compile(self, args):
        from torch.fx.experimental.proxy_tensor import make_fx

        drops_none = any(a is None for a in args)
        slots = [a is not None for a in args]
        fn = self.fn

        def tensors_only(*tensors):
            it = iter(tensors)
            return fn(*[next(it) if s else None for s in slots])

        # Traced on copies: tracing runs the function, which may update its inputs. A copy
        # of an overlapping input (e.g. an expanded constant) would have other strides, so
        # such inputs (which cannot be updated in place) are passed as they are.
        examples = [_example(a) for a in args if a is not None]
        try:
            with torch.no_grad():
                graph = make_fx(tensors_only)(*examples)
        except Exception as error:  # noqa: BLE001 - cannot trace: run it eagerly
            warn_fallback(self.what, error)
            return None
        compiled = compile_graph(graph, tuple(_example(a) for a in args if a is not None),
                                 self.what)
        return None if compiled is None else (compiled, drops_none)


def _example(a: Tensor) -> Tensor:
    """A copy of ``a`` with its strides, or ``a`` itself where a copy cannot keep them."""
    copied = a.clone()
    return copied if copied.stride() == a.stride() else a


# PCG's per-iteration functions over the torch updates.
def _advance(x, r, p, q, rz, status, active, iterations):
    return pcg._advance(pcg._TorchVectorOps, x, r, p, q, rz, status, active, iterations)


def _redirect(p, z, rz, rz_new, rr, rr_new, status, active, tol2):
    return pcg._redirect(pcg._TorchVectorOps, p, z, rz, rz_new, rr, rr_new, status, active, tol2)


def _start(b, finite_b, r, inverse_diagonal, tolerances):
    return pcg._start(b, finite_b, r, inverse_diagonal, tolerances,
                      precondition=lambda v: pcg._TorchVectorOps.precondition(v, inverse_diagonal))


def _step(x, r, p, q, rz, rr, status, active, iterations, inverse_diagonal, tol2):
    return pcg._step(pcg._TorchVectorOps, x, r, p, q, rz, rr, status, active, iterations,
                     inverse_diagonal, tol2)


class CompiledVectorOps:
    """PCG's vector work compiled (see the module docstring): the interface of
    ``pcg._TorchVectorOps`` plus ``advance``, ``redirect`` and ``step``, the loop's
    per-iteration functions, and ``start`` and ``finish``, the work before and after it."""

    name = "compiled"
    # CPU iterations per compiled call where the operator's product is compiled in and
    # the right-hand side has at most ``steps_per_call_max_numel`` elements (PCG's default
    # ``check_every`` there). At n = 10⁴ a call of one iteration costs ~32 µs, of 8 ~175
    # µs; the backward of peers.py's problems took 12-18% less at n = 10⁴ and 2·10⁴, but
    # 30% more at 4·10⁴ and 3x as much at 10⁵, where the unrolled iterations' fresh
    # buffers are page-faulted in on every call. More iterations per call also cost
    # compile time (about linear in the count) and up to ``steps_per_call − 1`` idle
    # iterations per solve.
    steps_per_call = 8
    steps_per_call_max_numel = 1 << 15

    def __init__(self):
        torch_ops = pcg._TorchVectorOps
        self.dot = CompiledFunction(torch_ops.dot, "PCG dot")
        self.update_solution = CompiledFunction(torch_ops.update_solution, "PCG update_solution")
        self.precondition = CompiledFunction(torch_ops.precondition, "PCG precondition")
        self.update_direction = CompiledFunction(torch_ops.update_direction,
                                                 "PCG update_direction")
        self.advance = CompiledFunction(_advance, "PCG step (advance)")
        self.redirect = CompiledFunction(_redirect, "PCG step (redirect)")
        # The whole iteration in one compiled call (1.2-1.5x faster than the three above
        # at n = 10^4, where the per-call cost counts; a pass less over r at 10^6).
        self.step = CompiledFunction(_step, "PCG step")
        # The work before and after the loop (about 25 operations, 2-3 loops compiled).
        self.start = CompiledFunction(_start, "PCG start")
        self.finish = CompiledFunction(pcg._finish, "PCG finish")
        # graph -> the iteration with the operator's product compiled in (product_step).
        self._with_product: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def product_step(self, operator, count: int = 1) -> Callable | None:
        """``count`` iterations of ``q = A p`` and :meth:`step` as one compiled call, where
        ``operator.graph()`` gives the product as a graph: ``f(x, r, p, rz, rr, status,
        active, iterations, inverse_diagonal, tol2)`` returning what ``step`` returns
        (``pcg._step`` after ``q = A p``, ``count`` times in a row); ``None`` where the
        operator has no graph. Compiled once per graph, count and input key (the graph is
        kept with its trace, so every linearization point of a problem and shape reuses
        the code: its constants are inputs).

        ``count > 1`` runs the iterations between two host looks without returning to
        Python: at n ~ 10⁴ the generated loops of one iteration take ~17 µs and the call
        around them ~40 µs. An element that stops within the call stays as it is for the
        rest of it (``pcg._step`` leaves inactive elements' ``x`` and ``r`` alone), as over
        the idle iterations of a longer ``check_every``."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        found = operator.graph()
        if found is None:
            return None
        module, constants = found
        by_count = self._with_product.get(module)
        if by_count is None:
            by_count = {}
            self._with_product[module] = by_count
        fused = by_count.get(count)
        if fused is None:
            fused = CompiledFunction(_steps_with_product(module, count),
                                     f"PCG step with the operator's product (x{count})")
            by_count[count] = fused

        call = fused.for_one_key()  # one solve: its loop's inputs keep their key

        def step(*args):
            return call(*args, *constants)

        return step


def _steps_with_product(module: torch.fx.GraphModule, count: int) -> Callable:
    """``count`` times ``pcg._step`` after ``q = module(p, *constants)``. The module is
    held weakly: the function is kept in a table keyed by it."""
    ref = weakref.ref(module)

    def steps_with_product(x, r, p, rz, rr, status, active, iterations, inverse_diagonal, tol2,
                           *constants):
        product = ref()
        for _ in range(count):
            q = product(p, *constants)
            if tuple(q.shape) != tuple(p.shape):
                raise ValueError(f"the operator's graph returned shape {tuple(q.shape)} for an "
                                 f"input of shape {tuple(p.shape)}; it must map [B, n] to [B, n]")
            status, active, iterations, rz, rr = _step(x, r, p, q, rz, rr, status, active,
                                                       iterations, inverse_diagonal, tol2)
        return status, active, iterations, rz, rr

    return steps_with_product


_OPS: CompiledVectorOps | None = None


def vector_ops(b: Tensor) -> CompiledVectorOps:
    """The process's compiled vector ops (one set, keyed by the inputs as they come)."""
    global _OPS
    if _OPS is None:
        _OPS = CompiledVectorOps()
    return _OPS
