"""Scene parametrisation: where the hash grid's [0, 1]^3 sits in the world.

"bounded": the scene normalisation's cube is the whole scene (objects seen from outside,
rooms seen from inside, where depth, silhouettes or sparse points bound the content).
"contracted": the normalisation's cube is the foreground; everything outside it, out to
infinity (distant background, sky), is squeezed into a shell around it, as mip-NeRF 360 does.
With the L-infinity norm (as nerfstudio's nerfacto) the foreground keeps the central half of
the grid along each axis and the shell fills the rest of the cube:

    y = 2 u - 1  (u: normalised coordinates, foreground y in [-1, 1]^3)
    c(y) = y                          if |y|_inf <= 1
           (2 - 1 / |y|_inf) y / |y|_inf  otherwise          (c in [-2, 2]^3)
    grid = (c + 2) / 4                                        (in [0, 1]^3)

Marching happens in uncontracted normalised space: a multi-level occupancy grid (level l
covering 2^l times the foreground cube) and steps that grow with distance (cone angle), as
nerfacc's estimator does for unbounded scenes.
"""

from __future__ import annotations

import torch
from torch import Tensor

SPACES = ("bounded", "contracted")
# Occupancy levels and cone angle of the contracted space (nerfacc's choices for unbounded
# scenes): the outermost level reaches 2^(levels-1) foreground half-sizes from the centre.
CONTRACTED_OCC_LEVELS = 4
CONTRACTED_CONE_ANGLE = 1.0 / 256.0


def contract_to_grid(x: Tensor) -> Tensor:
    """Normalised points x [..., 3] (foreground in [0, 1]^3) -> hash-grid coordinates [..., 3]
    in [0, 1]^3 (foreground in [0.25, 0.75]^3); differentiable everywhere."""
    y = 2.0 * x - 1.0
    norm = y.abs().amax(-1, keepdim=True)
    outside = norm > 1.0
    safe = torch.where(outside, norm, torch.ones_like(norm))  # no 0 / 0 in the unused branch
    c = torch.where(outside, (2.0 - 1.0 / safe) * (y / safe), y)
    return (c + 2.0) * 0.25


def contract_distance(t: Tensor) -> Tensor:
    """Ray distances t [...] (normalised units) squeezed as the space squeezes points: t up to 1,
    2 - 1 / t beyond, so distances out to infinity weigh no more than two foreground cubes."""
    return torch.where(t > 1.0, 2.0 - 1.0 / t.clamp_min(1.0), t)


def uncontract_from_grid(g: Tensor) -> Tensor:
    """Inverse of contract_to_grid for grid points [..., 3] strictly inside (0, 1)^3."""
    c = 4.0 * g - 2.0
    norm = c.abs().amax(-1, keepdim=True)
    outside = norm > 1.0
    safe = torch.where(outside, norm, torch.ones_like(norm))
    r = 1.0 / (2.0 - safe).clamp_min(1e-6)  # |y|_inf
    y = torch.where(outside, c / safe * r, c)
    return (y + 1.0) * 0.5
