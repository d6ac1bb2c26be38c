"""Learned corrections of the training cameras' poses (fastnefes.train.cameras)."""

from __future__ import annotations

import torch

from fastnefes.geometry import generate_rays, perturb_poses, pixel_grid
from fastnefes.train.cameras import correction_magnitudes, corrected_poses, corrected_rays


def _cameras(n: int = 3):
    c2w = torch.as_tensor(perturb_poses(torch.eye(4).double()[None].repeat(n, 1, 1).numpy(), 20.0, 1.0, seed=2))
    K = torch.tensor([[50.0, 0, 32], [0, 50.0, 24], [0, 0, 1]], dtype=torch.float64).expand(n, 3, 3)
    pixels = pixel_grid(48, 64, 8, device="cpu").double().reshape(1, -1, 2).expand(n, -1, 2)
    return c2w, K, pixels


def test_corrected_rays_are_the_rays_of_the_corrected_cameras():
    c2w, K, pixels = _cameras()
    delta = torch.tensor([[0.01, -0.02, 0.03, 0.004, 0.0, -0.002], [0.0] * 6, [-0.05, 0.0, 0.01, 0.0, 0.01, 0.003]],
                         dtype=torch.float64)
    scale = 0.25  # dataset -> unit cube: a unit-cube step of v is v / scale in dataset units
    origins, dirs, _ = generate_rays(K, c2w, pixels)
    n = pixels.shape[1]
    got_o, got_d = corrected_rays(origins.reshape(-1, 3), dirs.reshape(-1, 3), c2w.repeat_interleave(n, 0),
                                  delta.repeat_interleave(n, 0), scale)
    want_o, want_d, _ = generate_rays(K, corrected_poses(c2w, delta, scale), pixels)
    torch.testing.assert_close(got_o, want_o.reshape(-1, 3), rtol=0, atol=1e-12)
    torch.testing.assert_close(got_d, want_d.reshape(-1, 3), rtol=0, atol=1e-12)
    # no correction moves nothing; the reported sizes are the increments'
    torch.testing.assert_close(got_o[n:2 * n], origins[1], rtol=0, atol=1e-12)
    rot, trans = correction_magnitudes(delta, scale)
    assert abs(float(rot[1])) < 1e-6 and float(trans[1]) == 0
    assert abs(float(rot[0]) - float(torch.rad2deg(delta[0, :3].norm()))) < 1e-9


def test_corrected_rays_are_differentiable_in_the_correction():
    c2w, K, pixels = _cameras(1)
    origins, dirs, _ = generate_rays(K, c2w, pixels)
    o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    n = o.shape[0]

    def rays(delta):
        return corrected_rays(o, d, c2w.expand(n, 4, 4), delta.expand(n, 6), 0.5)

    assert torch.autograd.gradcheck(rays, (torch.tensor([[0.02, -0.01, 0.03, 0.01, 0.02, -0.01]],
                                                        dtype=torch.float64, requires_grad=True),))
