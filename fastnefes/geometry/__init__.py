"""Geometry: SO(3)/SE(3) maps, quaternions, cameras and rays, pose errors and pose files."""

from fastnefes.geometry.cameras import (
    backproject,
    camera_directions,
    generate_rays,
    invert_pose,
    make_intrinsics,
    opencv_to_opengl,
    opengl_to_opencv,
    pixel_grid,
    scale_intrinsics,
    world_to_camera,
)
from fastnefes.geometry.lie import (
    orthonormalize,
    quat_to_rotmat,
    rotmat_to_quat,
    se3_exp,
    se3_log,
    so3_exp,
    so3_log,
)
from fastnefes.geometry.posefile import format_poses, read_poses, write_poses
from fastnefes.geometry.poses import perturb_poses, pose_errors

__all__ = [
    "backproject",
    "camera_directions", "generate_rays", "invert_pose", "make_intrinsics", "opencv_to_opengl",
    "opengl_to_opencv", "pixel_grid", "scale_intrinsics", "world_to_camera", "orthonormalize", "quat_to_rotmat",
    "rotmat_to_quat", "se3_exp", "se3_log", "so3_exp", "so3_log", "format_poses", "read_poses",
    "write_poses", "perturb_poses", "pose_errors",
]
