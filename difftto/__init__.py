"""difftto: differentiable test-time-optimization layers for PyTorch."""

from . import operators as operators
from . import problems as problems
from . import solvers as solvers
from .problems import Linearization as Linearization
from .problems import Problem as Problem
from .tree import Layout as Layout

__version__ = "0.1.0"
from .inner import Adam as Adam
from .inner import GaussNewton as GaussNewton
from .inner import GradientDescent as GradientDescent
from .inner import InnerInfo as InnerInfo
from .inner import InnerOptimizer as InnerOptimizer
from .layer import BackwardInfo as BackwardInfo
from .layer import ImplicitLayer as ImplicitLayer
from .layer import InnerDivergenceError as InnerDivergenceError
from .layer import InnerDivergenceWarning as InnerDivergenceWarning
from .layer import LayerInfo as LayerInfo
from .regularizers import Proximal as Proximal
