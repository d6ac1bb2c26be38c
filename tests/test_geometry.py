"""Geometry maps against independent closed forms."""

import math

import numpy as np
import pytest
import torch

from fastnefes.geometry import (
    generate_rays, invert_pose, make_intrinsics, opengl_to_opencv, orthonormalize, perturb_poses, pixel_grid,
    pose_errors, quat_to_rotmat, rotmat_to_quat, scale_intrinsics, se3_exp, se3_log, so3_exp, so3_log,
)


def rot_x(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def rot_z(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def random_rotations(n, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n, 4))
    return quat_to_rotmat(q / np.linalg.norm(q, axis=1, keepdims=True))


def test_so3_exp_matches_known_rotations():
    assert np.allclose(so3_exp(np.array([0.3, 0, 0])), rot_x(0.3), atol=1e-12)
    assert np.allclose(so3_exp(np.array([0, 0, -1.2])), rot_z(-1.2), atol=1e-12)
    assert np.allclose(so3_exp(np.zeros(3)), np.eye(3))


@pytest.mark.parametrize("angle", [0.0, 1e-9, 1e-5, 0.5, 2.0, math.pi - 1e-6, math.pi])
def test_exp_log_roundtrip_including_near_pi(angle):
    rng = np.random.default_rng(1)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    R = so3_exp(axis * angle)
    w = so3_log(R)
    assert np.allclose(so3_exp(w), R, atol=1e-9)
    assert abs(np.linalg.norm(w) - angle) < 1e-6


def test_exp_log_random_batch():
    R = random_rotations(200)
    assert np.allclose(so3_exp(so3_log(R)), R, atol=1e-9)
    assert np.allclose(np.linalg.det(R), 1.0)


def test_se3_exp_log_roundtrip_and_pure_translation():
    rng = np.random.default_rng(2)
    xi = np.concatenate([rng.uniform(-1.5, 1.5, size=(50, 3)), rng.normal(size=(50, 3))], axis=1)  # angles < pi
    T = se3_exp(xi)
    assert np.allclose(se3_log(T), xi, atol=1e-9)
    # Pure translation: exp gives the identity rotation and translation v exactly.
    T0 = se3_exp(np.array([0, 0, 0, 1.0, -2.0, 3.0]))
    assert np.allclose(T0[:3, :3], np.eye(3)) and np.allclose(T0[:3, 3], [1, -2, 3])


def test_se3_exp_is_differentiable():
    xi = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    p = torch.tensor([1.0, 2.0, 3.0, 1.0], dtype=torch.float64)
    (se3_exp(xi) @ p)[:3].sum().backward()
    # At 0, R p + t = p + w x p + v, and sum(w x p) = w . (p x 1) = w . (p_y - p_z, p_z - p_x, p_x - p_y).
    assert torch.allclose(xi.grad[3:], torch.ones(3, dtype=torch.float64))
    assert torch.allclose(xi.grad[:3], torch.tensor([2.0 - 3.0, 3.0 - 1.0, 1.0 - 2.0], dtype=torch.float64))
    x = torch.tensor([0.5, -0.3, 0.2, 1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(se3_exp, (x,))


def test_quaternion_known_values_and_roundtrip():
    # 90 degrees about z: q = (cos 45, 0, 0, sin 45)
    q = np.array([math.cos(math.pi / 4), 0, 0, math.sin(math.pi / 4)])
    assert np.allclose(quat_to_rotmat(q), rot_z(math.pi / 2), atol=1e-12)
    assert np.allclose(rotmat_to_quat(rot_z(math.pi / 2)), q, atol=1e-12)
    # 180 degrees about x: w = 0, robust branch
    assert np.allclose(np.abs(rotmat_to_quat(rot_x(math.pi))), [0, 1, 0, 0], atol=1e-12)
    R = random_rotations(100, seed=3)
    q = rotmat_to_quat(R)
    assert np.all(q[:, 0] >= 0) and np.allclose(np.linalg.norm(q, axis=1), 1)
    assert np.allclose(quat_to_rotmat(q), R, atol=1e-12)


def test_near_180_rotations_roundtrip_through_quaternions():
    rng = np.random.default_rng(4)
    for _ in range(20):
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        R = so3_exp(axis * (math.pi - rng.uniform(0, 1e-7)))
        assert np.allclose(quat_to_rotmat(rotmat_to_quat(R)), R, atol=1e-9)


def test_opengl_opencv_flip():
    c2w = np.eye(4)
    c2w[:3, :3] = rot_z(0.3)
    c2w[:3, 3] = [1, 2, 3]
    cv = opengl_to_opencv(c2w)
    # OpenGL camera looks down -z; OpenCV down +z: the forward vectors agree in the world.
    assert np.allclose(cv[:3, 2], -c2w[:3, 2]) and np.allclose(cv[:3, 1], -c2w[:3, 1])
    assert np.allclose(cv[:3, 0], c2w[:3, 0]) and np.allclose(cv[:3, 3], c2w[:3, 3])
    assert np.allclose(opengl_to_opencv(cv), c2w)


def test_invert_pose():
    T = se3_exp(np.array([0.1, -0.4, 0.2, 1.0, 0.5, -2.0]))
    assert np.allclose(invert_pose(T) @ T, np.eye(4), atol=1e-12)


def test_rays_hit_projected_points():
    K = make_intrinsics(100.0, 110.0, 80.0, 60.0)
    c2w = se3_exp(np.array([0.1, 0.2, -0.1, 0.5, 0.2, 1.0]))
    pix = pixel_grid(120, 160, stride=8).double()
    o, d, z = generate_rays(torch.tensor(K), torch.tensor(c2w), pix)
    assert torch.allclose(torch.linalg.norm(d, dim=-1), torch.ones(()).double())
    # A point at z-depth 2 along each ray must project back onto its pixel.
    pts = o + d * (2.0 / z)[..., None]
    w2c = torch.tensor(invert_pose(c2w))
    cam = (w2c[:3, :3] @ pts[..., None])[..., 0] + w2c[:3, 3]
    assert torch.allclose(cam[..., 2], torch.full_like(cam[..., 2], 2.0))
    proj = (torch.tensor(K) @ (cam / cam[..., 2:])[..., None])[..., 0]
    assert torch.allclose(proj[..., :2], pix, atol=1e-9)
    assert pix.shape == (15, 20, 2) and torch.allclose(pix[0, 0], torch.tensor([4.0, 4.0]).double())


def test_downscaled_intrinsics_see_the_same_rays():
    K = make_intrinsics(200.0, 200.0, 160.0, 120.0)
    pix_full = pixel_grid(240, 320, stride=4).double()
    pix_small = pixel_grid(60, 80, stride=1).double()
    _, d_full, _ = generate_rays(torch.tensor(K), torch.eye(4).double(), pix_full)
    _, d_small, _ = generate_rays(torch.tensor(scale_intrinsics(K, 0.25)), torch.eye(4).double(), pix_small)
    assert torch.allclose(d_full, d_small, atol=1e-12)


def test_batched_rays():
    K = torch.tensor(make_intrinsics(50.0, 50.0, 16.0, 12.0)).float()
    c2w = torch.tensor(se3_exp(np.random.default_rng(0).normal(size=(3, 6)))).float()
    pix = pixel_grid(24, 32).expand(3, 24, 32, 2)
    o, d, z = generate_rays(K.expand(3, 3, 3), c2w, pix)
    assert o.shape == d.shape == (3, 24, 32, 3) and z.shape == (3, 24, 32)
    o1, d1, _ = generate_rays(K, c2w[1], pix[1])
    assert torch.allclose(d[1], d1) and torch.allclose(o[1], o1)


def test_pose_errors_closed_form():
    gt = np.eye(4)[None].repeat(3, 0)
    est = gt.copy()
    est[0, :3, 3] = [0.3, 0.4, 0.0]  # 0.5 translation
    est[1, :3, :3] = rot_x(math.radians(30))
    est[2, :3, :3] = rot_z(math.radians(179.0))
    t, r = pose_errors(est, gt)
    assert np.allclose(t, [0.5, 0, 0]) and np.allclose(r, [0, 30, 179], atol=1e-6)


def test_pose_errors_ignore_slight_non_orthonormality():
    gt = np.eye(4)
    est = np.eye(4)
    est[:3, :3] = rot_x(math.radians(10)) * 1.002  # scaled: not a rotation
    _, r = pose_errors(est, gt)
    assert abs(r - 10.0) < 1e-6
    assert np.allclose(orthonormalize(est[:3, :3]), rot_x(math.radians(10)), atol=1e-9)


def test_perturb_exact_and_ranged_magnitudes():
    c2w = se3_exp(np.random.default_rng(5).normal(size=(40, 6)))
    p = perturb_poses(c2w, 7.5, 0.25, seed=3)
    t, r = pose_errors(p, c2w)
    assert np.allclose(t, 0.25) and np.allclose(r, 7.5, atol=1e-6)
    p2 = perturb_poses(c2w, (5, 10), (0.1, 0.3), seed=3)
    t, r = pose_errors(p2, c2w)
    assert np.all((t >= 0.1 - 1e-9) & (t <= 0.3 + 1e-9)) and np.all((r >= 5 - 1e-6) & (r <= 10 + 1e-6))
    assert t.std() > 0.01
    assert np.allclose(perturb_poses(c2w, 7.5, 0.25, seed=3), p)
    assert not np.allclose(perturb_poses(c2w, 7.5, 0.25, seed=4), p)
