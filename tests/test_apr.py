"""The built-in APR: rigid differentiable output, consistent augmentation, training, IO, scene checks, CLI."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fastnefes.apr import (
    APR, APRConfig, check_scene, fit_apr, load_apr, rotation_from_6d, sample_novel_poses, save_apr,
)
from fastnefes.apr.train import augment, rotate_cameras
from fastnefes.data import load_scene, write_scene
from fastnefes.data.synth import make_synthetic_scene
from fastnefes.errors import FastnefesError
from fastnefes.geometry import pose_errors, read_poses, so3_exp
from conftest import run_main

REPO = Path(__file__).resolve().parents[1]
# A net small enough to train in seconds; mild rotation augmentation so 16 images fit quickly.
TINY = APRConfig(
    input_height=32, widths=(16, 32, 64), pool_grid=(2, 2), hidden=128, batch_size=8, epochs=70, lr=3e-3, aug_rot_deg=3.0,
)


def random_poses(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c2w = np.tile(np.eye(4), (n, 1, 1))
    c2w[:, :3, :3] = so3_exp(rng.normal(size=(n, 3)))
    c2w[:, :3, 3] = rng.normal(size=(n, 3)) * 2 + 5
    return c2w


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These nets are tiny: one thread is as fast, and immune to an oversubscribed machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def room(one_thread, tmp_path_factory):
    """A tiny synthetic room written to disk and loaded back, and an APR trained on it."""
    root = tmp_path_factory.mktemp("apr") / "room"
    write_scene(make_synthetic_scene(seed=0, width=48, height=36, n_train=16, n_test=4), root, "transforms")
    scene = load_scene(root)
    apr, metrics = fit_apr(scene, TINY, progress=False)
    apr_dir = save_apr(apr, root.parent / "apr", scene=scene, metrics=metrics)
    return scene, apr, metrics, apr_dir


# ----------------------------------------------------------------------------- model


def test_rotation_from_6d_recovers_rotations_and_is_proper():
    R = torch.as_tensor(so3_exp(np.random.default_rng(0).normal(size=(64, 3))))
    six = torch.cat([R[..., 0], R[..., 1]], -1)
    torch.testing.assert_close(rotation_from_6d(six), R)
    # Scaled / skewed inputs still give proper rotations whose first column follows the first vector.
    noisy = six * 3 + 0.2 * torch.randn(64, 6, dtype=R.dtype)
    out = rotation_from_6d(noisy)
    torch.testing.assert_close(out.transpose(-1, -2) @ out, torch.eye(3, dtype=R.dtype).expand(64, 3, 3))
    torch.testing.assert_close(torch.det(out), torch.ones(64, dtype=R.dtype))
    torch.testing.assert_close(out[..., 0], noisy[:, :3] / noisy[:, :3].norm(dim=-1, keepdim=True))


def test_apr_output_is_rigid_starts_at_mean_pose_and_is_differentiable():
    torch.manual_seed(0)
    c2w = random_poses(10, seed=1)
    apr = APR(replace(TINY, dropout=0.0), (32, 43))
    apr.set_frame(c2w)
    apr.eval()
    images = torch.rand(4, 3, 36, 48, requires_grad=True)  # another size: resized inside
    out = apr(images)
    assert out.shape == (4, 4, 4)
    R = out[:, :3, :3].detach().double()
    torch.testing.assert_close(R.transpose(-1, -2) @ R, torch.eye(3, dtype=R.dtype).expand(4, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.det(R), torch.ones(4, dtype=R.dtype), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 3].detach(), torch.tensor([0.0, 0, 0, 1]).expand(4, 4))
    # An untrained head predicts the training poses' centroid and mean rotation.
    np.testing.assert_allclose(out[:, :3, 3].detach().numpy(), np.broadcast_to(c2w[:, :3, 3].mean(0), (4, 3)), atol=0.05)
    assert np.all(pose_errors(out.detach().double().numpy(), np.repeat(apr.mean_pose()[None], 4, 0))[1] < 1.0)
    # A loss on the output pose reaches every weight (the `apr` refinement target) and the images.
    loss = (out[:, :3, 3] ** 2).sum() + out[:, :3, :3].sum()
    loss.backward()
    for name, p in apr.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert apr.head_r.weight.grad.abs().sum() > 0 and apr.stem[0].weight.grad.abs().sum() > 0
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_predict_takes_uint8_any_size_matches_forward_and_rejects_floats():
    apr = APR(TINY, (32, 43))
    apr.set_frame(random_poses(5, seed=2))
    imgs = np.random.default_rng(0).integers(0, 256, (3, 36, 48, 3), dtype=np.uint8)
    pred = apr.predict(imgs)
    assert pred.shape == (3, 4, 4) and pred.dtype == np.float64 and not apr.training
    # The refinement target calls forward on full-size float images: it must give the same poses.
    with torch.no_grad():
        full = apr(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0)
    np.testing.assert_allclose(pred, full.double().numpy(), atol=1e-6)
    with pytest.raises(FastnefesError, match="uint8"):
        apr.predict(imgs.astype(np.float32))


# ----------------------------------------------------------------------------- augmentation


def test_rotation_augmentation_moves_image_content_where_the_rotated_camera_sees_it():
    """A bright dot seen by the original camera appears where the rotated camera projects its ray."""
    H, W = 60, 80
    K = torch.tensor([[70.0, 0, 40], [0, 70.0, 30], [0, 0, 1]])
    yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    p = torch.tensor([47.0, 25.0])
    image = torch.exp(-((xx - p[0]) ** 2 + (yy - p[1]) ** 2) / (2 * 1.5**2)).expand(1, 3, H, W)
    R_delta = torch.as_tensor(so3_exp(np.array([0.03, -0.06, 0.05])), dtype=torch.float32)[None]
    warped = rotate_cameras(image.contiguous(), K[None], R_delta)[0, 0]
    d_new = R_delta[0].T @ torch.linalg.inv(K) @ torch.tensor([p[0], p[1], 1.0])  # ray in the new camera
    expected = (K @ d_new)[:2] / (K @ d_new)[2]
    w = warped.clamp_min(0.2) - 0.2  # centroid of the blob
    centroid = torch.stack([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()])
    assert torch.linalg.norm(centroid - expected) < 0.3, (centroid, expected, p)
    assert torch.linalg.norm(expected - p) > 3  # the rotation really moved it


def test_augment_labels_are_rotated_consistently_and_images_stay_in_range():
    cfg = APRConfig(aug_rot_deg=5.0)
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(6, 3, 30, 40)
    K = torch.tensor([[35.0, 0, 20], [0, 35.0, 15], [0, 0, 1]]).expand(6, 3, 3)
    c2w = torch.as_tensor(random_poses(6, seed=3), dtype=torch.float32)
    out, labels = augment(imgs, K, c2w, cfg, g)
    assert out.shape == imgs.shape and out.min() >= 0 and out.max() <= 1
    t_err, r_err = pose_errors(labels.double().numpy(), c2w.double().numpy())
    assert np.all(t_err < 1e-6) and np.all(r_err <= 5.0 + 1e-3) and np.any(r_err > 0.5)


def test_novel_poses_lie_near_and_between_training_poses():
    c2w = random_poses(30, seed=4)
    rng = np.random.default_rng(0)
    poses = sample_novel_poses(c2w, 200, rng, neighbours=3, jitter_trans=0.0, jitter_rot_deg=0.0)
    R = poses[:, :3, :3]
    np.testing.assert_allclose(R @ np.swapaxes(R, 1, 2), np.broadcast_to(np.eye(3), R.shape), atol=1e-9)
    centres = c2w[:, :3, 3]
    d = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    reach = np.sort(d, axis=1)[:, 2].max()  # farthest 3rd-nearest neighbour
    nearest = np.linalg.norm(poses[:, None, :3, 3] - centres[None], axis=-1).min(1)
    assert np.all(nearest <= reach / 2 + 1e-9)
    assert len(np.unique(poses[:, 0, 3].round(9))) > 150  # not just copies of training poses


# ----------------------------------------------------------------------------- training


def test_training_fits_the_training_poses(room):
    scene, apr, metrics, _ = room
    train = scene.split("train")
    centres = scene.c2w[train, :3, 3]
    spread = np.median(np.linalg.norm(centres - centres.mean(0), axis=1))
    mean_pose = np.repeat(apr.mean_pose()[None], len(train), 0)
    rot_spread = np.median(pose_errors(mean_pose, scene.c2w[train])[1])
    assert metrics["train"]["n"] == len(train) and metrics["test"]["n"] == len(scene.split("test"))
    assert metrics["train"]["median_trans"] < 0.3 * spread, (metrics["train"], spread)
    assert metrics["train"]["median_rot_deg"] < 0.3 * rot_spread, (metrics["train"], rot_spread)


def test_training_is_deterministic_and_mixes_novel_views():
    scene = make_synthetic_scene(seed=1, width=32, height=24, n_train=8, n_test=2)
    train = scene.split("train")
    calls = []

    def novel_views(n: int, rng: np.random.Generator):
        calls.append(n)
        pick = rng.integers(0, len(train), n)
        return np.stack([scene.image(train[i]) for i in pick]), scene.c2w[[train[i] for i in pick]]

    cfg = replace(TINY, input_height=24, epochs=4, novel_fraction=0.5, novel_pool=12, novel_refresh_epochs=2)
    a, m = fit_apr(scene, cfg, novel_views=novel_views, progress=False)
    b, _ = fit_apr(scene, cfg, novel_views=novel_views, progress=False)
    assert calls == [12, 12, 12, 12] and m["novel_views"] == 24 and m["steps"] == 4 * (8 // 4)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    with pytest.raises(FastnefesError, match="novel views"):
        fit_apr(scene, cfg, novel_views=lambda n, rng: (np.zeros((n, 8, 8, 3), np.float32), np.eye(4)[None]), progress=False)


# ----------------------------------------------------------------------------- IO and scene checks


def test_save_load_round_trip_gives_identical_predictions(room):
    scene, apr, _, apr_dir = room
    loaded = load_apr(apr_dir)
    images = np.stack([scene.image(i) for i in scene.split("test")])
    np.testing.assert_array_equal(loaded.predict(images), apr.predict(images))
    assert loaded.fingerprint == apr.fingerprint and loaded.image_hw == apr.image_hw
    assert sorted(p.name for p in apr_dir.iterdir()) == ["config.json", "model.safetensors"]


def test_check_scene_accepts_the_same_scene_at_another_resolution_and_refuses_another(room, tmp_path):
    scene, apr, _, apr_dir = room
    check_scene(apr, scene)
    check_scene(load_apr(apr_dir), load_scene(scene.root, downscale=2))
    other_root = tmp_path / "other"
    write_scene(make_synthetic_scene(seed=5, width=32, height=24, n_train=16, n_test=2), other_root, "transforms")
    with pytest.raises(FastnefesError) as err:
        check_scene(load_apr(apr_dir), load_scene(other_root))
    msg = str(err.value)
    assert "\n" not in msg and str(scene.root) in msg and str(other_root) in msg and str(apr_dir) in msg


def test_load_refuses_missing_corrupt_and_mismatched_files(room, tmp_path):
    _, _, _, apr_dir = room
    with pytest.raises(FastnefesError, match="not found"):
        load_apr(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((apr_dir / "config.json").read_text())
    (bad / "model.safetensors").write_bytes((apr_dir / "model.safetensors").read_bytes()[:200])
    with pytest.raises(FastnefesError, match="model.safetensors"):
        load_apr(bad)
    (bad / "model.safetensors").write_bytes((apr_dir / "model.safetensors").read_bytes())
    (bad / "config.json").write_text((apr_dir / "config.json").read_text().replace('"hidden": 128', '"hidden": 64'))
    with pytest.raises(FastnefesError, match="head_t.weight|mlp"):
        load_apr(bad)
    (bad / "config.json").write_text('{"format": "something-else"}')
    with pytest.raises(FastnefesError, match="not an APR config"):
        load_apr(bad)


# ----------------------------------------------------------------------------- CLI


def test_cli_predict_writes_a_pose_file_of_the_split(room, tmp_path, monkeypatch, capsys):
    scene, apr, _, apr_dir = room
    out = tmp_path / "init.txt"
    code, stdout, err = run_main(monkeypatch, capsys, "apr", "predict", str(apr_dir), "--data", str(scene.root),
                                 "--split", "test", "--out", str(out), "--device", "cpu")
    assert code == 0, err
    poses = read_poses(out)
    test = scene.split("test")
    assert list(poses) == [scene.names[i] for i in test]
    expected = apr.predict(np.stack([scene.image(i) for i in test]))
    np.testing.assert_allclose(np.stack(list(poses.values())), expected, atol=1e-6)
    t_err, r_err = pose_errors(expected, scene.c2w[test])
    assert "median" in stdout and f"{np.median(t_err):.3f} / {np.median(r_err):.2f}°" in stdout


def test_cli_refuses_bad_apr_folders_with_one_line(room, tmp_path, monkeypatch, capsys):
    scene, _, _, apr_dir = room
    args = ["--data", str(scene.root), "--out", str(tmp_path / "x.txt"), "--device", "cpu"]
    code, _, err = run_main(monkeypatch, capsys, "apr", "predict", str(tmp_path / "missing"), *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "missing" in err
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((apr_dir / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    code, _, err = run_main(monkeypatch, capsys, "apr", "predict", str(corrupt), *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "model.safetensors" in err
    assert not (tmp_path / "x.txt").exists()


def test_cli_train_end_to_end(room, tmp_path, monkeypatch, capsys):
    """`fastnefes apr train` in a fresh interpreter writes a loadable APR and prints its errors."""
    scene = room[0]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = tmp_path / "apr"
    done = subprocess.run(
        [sys.executable, "-m", "fastnefes", "apr", "train", str(scene.root), "--out", str(out), "--epochs", "1",
         "--input-height", "24", "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert load_apr(out).image_hw == (24, 32) and "median" in done.stdout
    code, _, err = run_main(monkeypatch, capsys, "apr", "train", str(tmp_path / "none"), "--out", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "none" in err
    code, _, err = run_main(monkeypatch, capsys, "apr", "train", str(scene.root), "--out", str(out), "--epochs", "2", "--minutes", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--minutes" in err
