"""3D Gaussian Splatting: Gaussians, cameras, EWA projection, rasterizers and the
registered ``"gaussian_splatting"`` problem."""

from .cameras import camera_centers as camera_centers
from .cameras import check_cameras as check_cameras
from .cameras import intrinsics as intrinsics
from .cameras import look_at as look_at
from .gaussians import Gaussians as Gaussians
from .gaussians import eval_sh as eval_sh
from .gaussians import quat_to_rotmat as quat_to_rotmat
from .posed import PosedSplattingProblem as PosedSplattingProblem
from .problem import GaussianSplattingProblem as GaussianSplattingProblem
from .problem import apply_pose_deltas as apply_pose_deltas
from .projection import Projection as Projection
from .projection import project_gaussians as project_gaussians
from .rasterize import RasterState as RasterState
from .rasterize import RenderOutput as RenderOutput
from .rasterize import gsplat_available as gsplat_available
from .rasterize import rasterize as rasterize
