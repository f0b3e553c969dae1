"""difftto: differentiable test-time-optimization layers for PyTorch."""

from . import operators as operators
from . import problems as problems
from . import solvers as solvers
from .problems import Linearization as Linearization
from .problems import Problem as Problem
from .tree import Layout as Layout

__version__ = "0.1.0"
