"""A Theseus ``Objective`` seen as a difftto problem.

Its cost functions' weighted errors become the residuals, its optimization variables
the parameters (a dict keyed by variable name, each ``[B, dof]``), and its auxiliary
variables the data (a dict keyed by variable name). Theseus users can then run
difftto's inner optimizers and matrix-free implicit backward on their problems:

    layer = ImplicitLayer(TheseusObjective(objective), inner=GaussNewton(steps=10))
    theta_star, info = layer({"x": x0}, lam, {"t": t, "y": y})

Only Euclidean variables (``th.Vector``, ``th.Point2``, ``th.Point3``) are supported:
the proximal term and the flat update ``θ ← θ + δ`` are those of a vector space.
theseus is imported when the class is instantiated, not when difftto is.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from .base import Data, Problem
from .registry import register

__all__ = ["TheseusObjective"]


@register("theseus")
class TheseusObjective(Problem):
    """Wraps ``objective`` (a ``theseus.Objective``).

    Args:
        objective: the Theseus objective. Its variables are updated in place by every
            evaluation (Theseus's own model); the layer evaluates it functionally
            otherwise.

    Raises:
        ImportError: theseus-ai is not installed.
        TypeError: an optimization variable is not Euclidean.
    """

    def __init__(self, objective):
        try:
            import theseus as th
        except ImportError as err:  # pragma: no cover - theseus is a dependency
            raise ImportError(
                "TheseusObjective needs theseus-ai (pip install --no-build-isolation theseus-ai==0.2.3)"
            ) from err
        if not isinstance(objective, th.Objective):
            raise TypeError(f"objective must be a theseus.Objective, got {type(objective).__name__}")
        euclidean = (th.Vector,)
        for name, var in objective.optim_vars.items():
            if not isinstance(var, euclidean):
                raise TypeError(
                    f"optimization variable {name!r} is a {type(var).__name__}; TheseusObjective "
                    "supports Euclidean variables (th.Vector, th.Point2, th.Point3) only"
                )
        self.theseus_objective = objective
        self.variable_names = tuple(objective.optim_vars.keys())

    def residuals(self, theta, data: Data) -> Tensor:
        if not isinstance(theta, Mapping):
            raise TypeError(
                f"TheseusObjective: theta must be a dict keyed by the optimization variables "
                f"{list(self.variable_names)}, got a {type(theta).__name__}"
            )
        if set(theta) != set(self.variable_names):
            raise ValueError(
                f"TheseusObjective: theta has keys {sorted(theta)}, expected {sorted(self.variable_names)}"
            )
        values = dict(theta)
        if data:
            unknown = set(data) - set(self.theseus_objective.aux_vars)
            if unknown:
                raise ValueError(
                    f"TheseusObjective: data keys {sorted(unknown)} are not auxiliary variables of the "
                    f"objective ({sorted(self.theseus_objective.aux_vars)})"
                )
            values.update(data)
        self.theseus_objective.update(values)
        return self.theseus_objective.error()

    def __repr__(self) -> str:
        return f"TheseusObjective(variables={list(self.variable_names)})"
