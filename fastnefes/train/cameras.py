"""Learned corrections of the training cameras' poses (TrainConfig.camera_lr).

Poses from COLMAP or a phone's tracking are estimates; a ray cast from a camera that is a few
millimetres or a tenth of a degree off lands on the wrong surface point, and the field blurs
or grows floaters to reconcile the views. As nerfstudio's camera optimiser and BARF do, each
training image carries an SE(3) increment (model.camera_delta [N, 6]: rotation w in radians,
translation v in unit-cube units, in the camera's own frame) that the photometric loss trains
with the field: the camera is c2w @ exp(w, v / scale).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastnefes.geometry import se3_exp


def correction_transforms(delta: Tensor, scale: float) -> Tensor:
    """[N, 4, 4] camera-frame increments of delta [N, 6] (rotation, unit-cube translation);
    scale: dataset -> unit-cube factor (the translation is applied in dataset units, v / scale)."""
    return se3_exp(torch.cat([delta[..., :3], delta[..., 3:] / scale], -1))


def corrected_poses(c2w: Tensor, delta: Tensor, scale: float) -> Tensor:
    """[N, 4, 4] camera-to-world poses c2w [N, 4, 4] corrected by delta [N, 6]."""
    return c2w @ correction_transforms(delta, scale)


def corrected_rays(origins: Tensor, dirs: Tensor, c2w: Tensor, delta: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Rays [R, 3] cast by cameras c2w [R, 4, 4] (dataset frame), recast by the corrected
    cameras c2w @ T (T = correction_transforms(delta [R, 6])): the origin moves by R t_T and the
    direction turns by R R_T R^T, R the camera's rotation. Differentiable in delta."""
    T = correction_transforms(delta, scale)
    R = c2w[:, :3, :3]
    moved = origins + (R @ T[:, :3, 3:])[..., 0]
    turned = (R @ (T[:, :3, :3] @ (R.transpose(1, 2) @ dirs[..., None])))[..., 0]
    return moved, turned


def correction_magnitudes(delta: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """([N] rotation in degrees, [N] translation in dataset units) of delta [N, 6]."""
    T = correction_transforms(delta, scale)
    cos = ((T[:, 0, 0] + T[:, 1, 1] + T[:, 2, 2] - 1) / 2).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cos)), T[:, :3, 3].norm(dim=1)
