"""Problems: data terms ``D(θ; data)``, and their registry."""

from . import least_squares as least_squares  # noqa: F401  (registers its problems)
from . import splatting as splatting  # noqa: F401  (registers "gaussian_splatting")
from . import theseus as theseus  # noqa: F401  (registers 'theseus'; imports theseus lazily)
from .base import Data as Data
from .base import Linearization as Linearization
from .base import Problem as Problem
from .registry import available as available
from .registry import get as get
from .registry import register as register
