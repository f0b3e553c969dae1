"""Linear solvers. They only solve: ``solve(operator, b) -> LinearSolveResult``."""

from .dense import DenseCholesky as DenseCholesky
from .pcg import PCG as PCG
from .pcg import default_max_iter as default_max_iter
from .preconditioners import IdentityPreconditioner as IdentityPreconditioner
from .preconditioners import JacobiPreconditioner as JacobiPreconditioner
from .preconditioners import Preconditioner as Preconditioner
from .result import FAILURE_POLICIES as FAILURE_POLICIES
from .result import LinearSolveError as LinearSolveError
from .result import LinearSolveResult as LinearSolveResult
from .result import LinearSolveWarning as LinearSolveWarning
from .result import Status as Status
