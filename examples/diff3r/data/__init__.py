"""Data for the Diff3R example: a procedural multi-view scene generator with exact
cameras and depth, the RealEstate10K chunk format (writer, loader, validation),
view samplers and a context/target dataset.

Conventions (OpenCV cameras, normalized intrinsics, z-depth) are documented in
:mod:`.cameras`; the chunk format in :mod:`.chunks`.
"""

from .cameras import (
    cameras_to_matrices,
    covisibility,
    invert_rigid,
    matrices_to_cameras,
    normalized_to_pixel_intrinsics,
    pixel_rays,
    pixel_to_normalized_intrinsics,
    project_points,
    unproject_depth,
    zdepth_to_distance,
)
from .chunks import (
    ChunkFormatError,
    SceneViews,
    decode_image,
    decode_scene,
    encode_image,
    load_chunk,
    load_scene,
    read_index,
    validate_scene,
    write_chunk,
    write_index,
)
from .dataset import RE10KDataset, rescale_and_crop
from .generate import build_scene, generate_dataset, generate_scene, scene_key
from .sampler import (
    BoundedViewSampler,
    choose_evaluation_views,
    pair_overlap,
    read_evaluation_index,
    validate_evaluation_entry,
    write_evaluation_index,
)
from .scene import PinholeCamera, Scene, render_view, sample_scene

__all__ = [
    "BoundedViewSampler",
    "ChunkFormatError",
    "PinholeCamera",
    "RE10KDataset",
    "Scene",
    "SceneViews",
    "build_scene",
    "cameras_to_matrices",
    "choose_evaluation_views",
    "covisibility",
    "decode_image",
    "decode_scene",
    "encode_image",
    "generate_dataset",
    "generate_scene",
    "invert_rigid",
    "load_chunk",
    "load_scene",
    "matrices_to_cameras",
    "normalized_to_pixel_intrinsics",
    "pair_overlap",
    "pixel_rays",
    "pixel_to_normalized_intrinsics",
    "project_points",
    "read_evaluation_index",
    "read_index",
    "render_view",
    "rescale_and_crop",
    "sample_scene",
    "scene_key",
    "unproject_depth",
    "validate_evaluation_entry",
    "validate_scene",
    "write_chunk",
    "write_evaluation_index",
    "write_index",
    "zdepth_to_distance",
]
