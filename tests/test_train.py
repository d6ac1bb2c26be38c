"""Training: losses and metrics against independent references, the sampler's geometry, the
progressive trainer (PSNR rises, determinism, NaN handling)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from fastnefes.data.synth import make_synthetic_scene
from conftest import small_train_config
from fastnefes.train import TrainConfig, TrainingDiverged, train
from fastnefes.train import losses
from fastnefes.errors import FastnefesError
from fastnefes.train.losses import (contrastive_loss, depth_loss, distortion_loss, photometric_loss, psnr, ssim,
                                    variance_covariance_loss)
from fastnefes.train.sampler import ImageSet, RaySampler, backproject, reproject
from fastnefes.train.trainer import Trainer

def tiny_config(**kw) -> TrainConfig:
    return small_train_config(4000, **kw)


@pytest.fixture(scope="module")
def small_room():
    return make_synthetic_scene(seed=2, width=48, height=36, n_train=12, n_test=2, supersample=1)


# ---- losses and metrics -------------------------------------------------------------------
def test_photometric_loss_matches_nerf_w_formula():
    rgb, target = torch.rand(7, 3), torch.rand(7, 3)
    beta = torch.rand(7) + 0.1
    expected = (((rgb - target) ** 2).sum(-1) / (2 * beta**2) + torch.log(beta)).mean() + 0.01 * 0.5
    assert torch.allclose(photometric_loss(rgb, target, beta, torch.tensor(0.5), 0.01), expected)
    assert torch.allclose(photometric_loss(rgb, target), F.mse_loss(rgb, target))


def test_contrastive_loss_is_symmetric_cross_entropy_for_hard_targets():
    a, b = torch.randn(20, 8), torch.randn(20, 8)
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t() / 0.1
    labels = torch.arange(20)
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    assert torch.allclose(contrastive_loss(a, b, None, temperature=0.1), expected, atol=1e-5)
    # Far-apart surface points give the same hard targets; coincident ones share positives.
    far = torch.arange(20, dtype=torch.float32)[:, None].expand(20, 3) * 10
    assert torch.allclose(contrastive_loss(a, b, far, radius=0.01, temperature=0.1), expected, atol=1e-5)
    same = losses.soft_positive_targets(torch.zeros(4, 3), 0.01)
    assert torch.allclose(same, torch.full((4, 4), 0.25))


def test_variance_covariance_loss_separates_spread_from_collapse():
    spread = torch.cat([torch.eye(8), -torch.eye(8)])  # isotropic unit vectors
    var, cov = variance_covariance_loss(spread)
    assert float(var) < 0.1 and float(cov) < 1e-6
    collapsed = torch.ones(16, 8) + 1e-3 * torch.randn(16, 8)
    var_c, _ = variance_covariance_loss(collapsed)
    assert float(var_c) > 0.9


def test_depth_loss_is_relative_l1_over_valid_targets():
    depth = torch.tensor([1.1, 2.0, 5.0, 3.0], requires_grad=True)
    target = torch.tensor([1.0, 4.0, 0.0, 3.0])  # the third has no depth
    loss = depth_loss(depth, target)
    assert float(loss) == pytest.approx((0.1 / 1.0 + 2.0 / 4.0 + 0.0) / 3, rel=1e-6)
    loss.backward()
    assert float(depth.grad[2]) == 0.0 and float(depth.grad[0]) == pytest.approx(1 / 3, rel=1e-6)
    assert float(depth_loss(depth, torch.zeros(4))) == 0.0  # no valid target: no loss, no NaN


def test_distortion_loss_equals_the_double_sum_in_value_and_gradient():
    from fastnefes.ops.composite import sample_weights

    gen = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 1, 4]
    ray_indices = torch.repeat_interleave(torch.arange(5), torch.tensor(counts))
    t_starts = torch.cat([torch.sort(torch.rand(c, generator=gen, dtype=torch.float64)).values for c in counts])
    t_ends = t_starts + 0.02 * torch.rand(len(t_starts), generator=gen, dtype=torch.float64)
    sigma = (20 * torch.rand(len(t_starts), generator=gen, dtype=torch.float64)).requires_grad_()

    def double_sum(w):
        mid = (t_starts + t_ends) / 2
        total = 0.0
        for r in range(5):
            on = ray_indices == r
            wr, mr = w[on], mid[on]
            total = total + (wr[:, None] * wr[None] * (mr[:, None] - mr[None]).abs()).sum()
            total = total + (wr.pow(2) * (t_ends[on] - t_starts[on])).sum() / 3
        return total / 5

    w = sample_weights(sigma, t_starts, t_ends, ray_indices, 5)
    fast, slow = distortion_loss(w, t_starts, t_ends, ray_indices, 5), double_sum(w)
    assert float(fast) == pytest.approx(float(slow), rel=1e-12) and float(fast) > 0
    g_fast, = torch.autograd.grad(fast, sigma, retain_graph=True)
    g_slow, = torch.autograd.grad(slow, sigma)
    assert torch.allclose(g_fast, g_slow, rtol=1e-10, atol=1e-14)
    # One sample holding all of a ray's weight costs only its own interval's third.
    one = distortion_loss(torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.2, 0.3, 0.4]),
                          torch.zeros(3, dtype=torch.long), 1)
    assert float(one) == pytest.approx(0.1 / 3)


def test_distortion_weight_gathers_each_rays_weight(small_room):
    from fastnefes.ops.composite import sample_weights
    from fastnefes.render import _sample

    def spread(weight: float) -> float:
        model, _ = train(small_room, tiny_config(steps=60, stage_fractions=(1.0, 0.0, 0.0), distortion_weight=weight))
        model.eval()
        batch = RaySampler(ImageSet(small_room, small_room.split("train"), "cpu"), seed=0).rays(512)
        with torch.no_grad():
            origins = model.to_unit(batch.origins)
            ray_idx, t0, t1, _ = _sample(model, origins, batch.dirs, False, 0.0)
            sigma = model.density(origins[ray_idx] + batch.dirs[ray_idx] * ((t0 + t1) / 2)[:, None])
            w = sample_weights(sigma, t0, t1, ray_idx, 512)
            return float(distortion_loss(w, t0, t1, ray_idx, 512))

    plain, gathered = spread(0.0), spread(10.0)  # a large weight: 60 steps from scratch
    assert gathered < 0.7 * plain, (plain, gathered)


def ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. SSIM with scipy gaussian filtering (sigma 1.5, radius 5 = 11x11), borders cropped."""
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for ch in range(x.shape[2]):
        a, b = x[..., ch].astype(np.float64), y[..., ch].astype(np.float64)
        f = lambda im: gaussian_filter(im, 1.5, truncate=3.5)  # noqa: E731  (radius int(3.5*1.5+0.5) = 5)
        mu_a, mu_b = f(a), f(b)
        saa, sbb, sab = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
        m = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
        vals.append(m[5:-5, 5:-5])
    return float(np.mean(vals))


def test_ssim_and_psnr_against_independent_references():
    rng = np.random.default_rng(0)
    x = rng.random((40, 50, 3))
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1)
    got = float(ssim(torch.from_numpy(x).permute(2, 0, 1)[None], torch.from_numpy(y).permute(2, 0, 1)[None])[0])
    assert got == pytest.approx(ssim_reference(x, y), abs=1e-6)
    assert float(ssim(torch.from_numpy(x).permute(2, 0, 1)[None], torch.from_numpy(x).permute(2, 0, 1)[None])[0]) == pytest.approx(1.0)
    mse = np.mean((x - y) ** 2)
    assert float(psnr(torch.from_numpy(x), torch.from_numpy(y))) == pytest.approx(-10 * math.log10(mse), rel=1e-5)


# ---- sampler ------------------------------------------------------------------------------
def test_rays_pass_through_their_pixels_and_carry_their_colours(small_room):
    images = ImageSet(small_room, small_room.split("train"), "cpu")
    sampler = RaySampler(images, seed=0)
    batch = sampler.rays(64)
    for r in range(0, 64, 7):
        k = int(batch.image_ids[r])
        idx = images.indices[k]
        x, y = batch.pixels[r].tolist()
        expected = small_room.image(idx)[int(y), int(x)] / 255.0
        assert np.allclose(batch.rgb[r].numpy(), expected)
        c2w, K = small_room.c2w[idx], small_room.K[idx]
        assert np.allclose(batch.origins[r].numpy(), c2w[:3, 3], atol=1e-5)
        d_cam = np.array([(x - K[0, 2]) / K[0, 0], (y - K[1, 2]) / K[1, 1], 1.0])
        d = c2w[:3, :3] @ d_cam
        assert np.allclose(batch.dirs[r].numpy(), d / np.linalg.norm(d), atol=1e-5)
    # From chosen images: evenly split, image by image.
    ids = sampler.choose_images(3)
    batch = sampler.rays(30, ids)
    assert torch.equal(batch.image_ids, ids.repeat_interleave(10))


def test_rays_carry_ground_truth_distance_to_the_surface(small_room):
    images = ImageSet(small_room, small_room.split("train"), "cpu", with_depth=True)
    batch = RaySampler(images, seed=0).rays(64)
    assert batch.depth is not None and bool((batch.depth > 0).all())
    for r in range(0, 64, 5):  # the ray's point at that distance lies at the pixel's z-depth
        idx = images.indices[int(batch.image_ids[r])]
        x, y = (int(v) for v in batch.pixels[r].tolist())
        point = batch.origins[r].double().numpy() + batch.dirs[r].double().numpy() * float(batch.depth[r])
        c2w = small_room.c2w[idx]
        z = (point - c2w[:3, 3]) @ c2w[:3, 2]
        assert z == pytest.approx(float(small_room.depth(idx)[y, x]), rel=1e-5)
    assert RaySampler(ImageSet(small_room, [0], "cpu"), 0).rays(4).depth is None  # not asked for


def test_depth_supervision_needs_depth_maps(small_room):
    from dataclasses import replace

    with pytest.raises(FastnefesError, match="depth_weight > 0 needs depth maps, and this synthetic dataset has none"):
        ImageSet(replace(small_room, depth_fn=None), [0, 1], "cpu", with_depth=True)
    with pytest.raises(FastnefesError, match=r"depth_weight=-1\.0, expected a number >= 0"):
        TrainConfig(depth_weight=-1.0)


def test_patches_sit_on_feature_cell_centres(small_room):
    images = ImageSet(small_room, small_room.split("train"), "cpu")
    sampler = RaySampler(images, seed=0)
    pix = sampler.patches(torch.tensor([0, 1]), per_image=3, size=4, stride=4)
    assert pix.shape == (6, 4, 4, 2)
    assert torch.allclose(torch.remainder(pix / 4 - 0.5, 1.0), torch.zeros_like(pix))
    assert torch.allclose(pix[:, :, 1:, 0] - pix[:, :, :-1, 0], torch.full((6, 4, 3), 4.0))
    assert float(pix[..., 0].max()) < 48 and float(pix[..., 1].max()) < 36


def test_reproject_and_jitter_geometry(small_room):
    images = ImageSet(small_room, small_room.split("train"), "cpu")
    sampler = RaySampler(images, seed=0)
    c2w = images.c2w[:2]
    jittered = sampler.jitter(c2w, 3.0, 0.05)
    delta_t = (jittered[:, :3, 3] - c2w[:, :3, 3]).norm(dim=-1)
    cos = ((torch.einsum("bij,bij->b", jittered[:, :3, :3], c2w[:, :3, :3]) - 1) / 2).clamp(-1, 1)
    assert bool((delta_t <= 0.05 + 1e-6).all()) and bool((torch.rad2deg(torch.acos(cos)) <= 3.0 + 1e-3).all())
    K = images.K[:2]
    pixels = torch.rand(2, 3, 3, 2) * 30
    depth = torch.rand(2, 3, 3) + 1.0
    same, z = reproject(pixels, depth, K, c2w, c2w)
    assert torch.allclose(same, pixels, atol=1e-3) and torch.allclose(z, depth, atol=1e-5)
    uv, z2 = reproject(pixels, depth, K, jittered, c2w)
    world = backproject(pixels, depth, K, jittered)
    cam = (world - c2w[:, None, None, :3, 3]) @ c2w[:, None, :3, :3]
    assert torch.allclose(z2, cam[..., 2], atol=1e-5)
    assert torch.allclose(uv[..., 0], cam[..., 0] / cam[..., 2] * K[:, None, None, 0, 0] + K[:, None, None, 0, 2], atol=1e-3)


# ---- the trainer --------------------------------------------------------------------------
def test_progressive_training_raises_psnr_and_runs_all_stages(small_room):
    cfg = tiny_config(steps=72, stage_fractions=(0.75, 0.125, 0.125))
    cfg.val_images, cfg.val_stride = 2, 1
    cfg.fusion_min_opacity = 0.1  # 54 photometric steps leave the tiny room semi-transparent
    model, metrics = train(small_room, cfg)
    history = metrics["history"]
    early = np.mean([h["psnr"] for h in history[:5]])
    late = np.mean([h["psnr"] for h in history[45:54]])
    assert late > early + 1.2, (early, late)  # a closed room starts slowly: fog, then walls
    assert [s["steps"] for s in metrics["stages"]] == [54, 9, 9]
    assert all("feature" in h for h in history if h["stage"] == 1)
    assert any("fusion" in h and "feature" in h for h in history if h["stage"] == 2)
    assert metrics["val"] and metrics["val"][-1]["step"] == 72
    assert not model.training


def test_training_is_deterministic_for_a_seed(small_room):
    make = lambda: tiny_config(steps=8, stage_fractions=(0.5, 0.25, 0.25))  # noqa: E731
    m1, _ = train(small_room, make())
    m2, _ = train(small_room, make())
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    cfg = make()
    cfg.seed = 1
    m3, _ = train(small_room, cfg)
    assert not torch.equal(m3.geometry.encoding.params, m1.geometry.encoding.params)


def test_nan_loss_stops_training_naming_step_and_stage(small_room, tmp_path, monkeypatch):
    cfg = tiny_config(steps=12, stage_fractions=(0.5, 0.5, 0.0), checkpoint_every=4)
    real_step = Trainer.step

    def poisoned(self):
        logged = real_step(self)
        if self.state.step == 6:  # the 7th step, in stage 2
            logged["loss"] = logged["loss"] * float("nan")
        return logged

    monkeypatch.setattr(Trainer, "step", poisoned)
    with pytest.raises(TrainingDiverged, match=r"at step 6 \(stage 2 'features'\)"):
        train(small_room, cfg, tmp_path / "run")
    from fastnefes.train.run import read_checkpoint

    _, meta = read_checkpoint(tmp_path / "run")
    assert meta["progress"]["step"] == 4 and not meta["complete"]  # the last good checkpoint, intact


def test_minutes_budget_stops_on_time_with_stages_in_order(small_room):
    cfg = tiny_config(minutes=0.02, stage_fractions=(0.5, 0.3, 0.2))  # 1.2 s of training
    _, metrics = train(small_room, cfg)
    assert metrics["wall_time_s"] >= 1.2 and metrics["steps"] >= 1
    stages = [h["stage"] for h in metrics["history"]]
    assert stages == sorted(stages) and stages[0] == 0


def test_minutes_budget_counts_validation_and_setup(small_room, monkeypatch):
    import types

    import fastnefes.train.run as run_module
    import fastnefes.train.trainer as trainer_module

    clock = types.SimpleNamespace(t=0.0)

    def perf_counter() -> float:  # a virtual clock: every reading costs 50 ms, validation 400 ms
        clock.t += 0.05
        return clock.t

    real_validate = trainer_module.validate

    def slow_validate(*args, **kwargs):
        clock.t += 0.4
        return real_validate(*args, **kwargs)

    fake_time = types.SimpleNamespace(perf_counter=perf_counter)
    monkeypatch.setattr(trainer_module, "time", fake_time)
    monkeypatch.setattr(run_module, "time", fake_time)
    monkeypatch.setattr(trainer_module, "validate", slow_validate)

    def run(spent_before: float) -> dict:
        cfg = tiny_config(minutes=0.05, stage_fractions=(1.0, 0.0, 0.0))  # 3 s
        cfg.val_every = 2
        return train(small_room, cfg, budget_start=clock.t - spent_before)[1]

    metrics = run(0.3)
    # validations count: the loop stops early enough for its closing validation to end on time
    assert len(metrics["val"]) >= 2 and 3.0 - 0.5 <= metrics["wall_time_s"] <= 3.0 + 0.1
    assert metrics["steps"] < 3.0 / 0.1  # a step reads the clock twice: without validations there would be more
    late = run(2.99)  # setup counts: the budget is spent before the first step, which runs anyway
    assert late["steps"] == 1 and late["wall_time_s"] >= 3.0


def depth_error_after_training(scene, **config) -> tuple[float, dict]:
    """(mean over 4 training views of the median relative depth error, metrics) of a 60-step
    photometric-only field trained with the given TrainConfig fields."""
    from fastnefes.train.trainer import evaluate_views

    model, metrics = train(scene, tiny_config(steps=60, stage_fractions=(1.0, 0.0, 0.0), **config))
    errors = [np.median(np.abs(v["depth"].numpy() - scene.depth(v["index"])) / scene.depth(v["index"]))
              for v in evaluate_views(model, scene, scene.split("train")[:4])]
    return float(np.mean(errors)), metrics


def test_depth_supervision_brings_rendered_depth_closer_to_the_truth(small_room):
    (plain, _), (supervised, _) = (depth_error_after_training(small_room, depth_weight=w) for w in (0.0, 1.0))
    assert supervised < 0.5 * plain, (plain, supervised)


def true_keypoints(scene, per_view: int, seed: int = 0) -> dict:
    """keypoint_depths' output made of random pixels and the scene's true z-depths."""
    rng = np.random.default_rng(seed)
    found = {}
    for i in scene.split("train"):
        depth = scene.depth(i).reshape(-1)
        flat = np.unique(rng.integers(0, depth.shape[0], per_view))
        found[i] = (flat.astype(np.int64), depth[flat].astype(np.float32))
    return found


def test_keypoint_rays_carry_their_depth(small_room):
    images = ImageSet(small_room, small_room.split("train"), "cpu")
    found = true_keypoints(small_room, 20)
    assert images.set_keypoints(found) == sum(len(f) for f, _ in found.values())
    batch = RaySampler(images, seed=0).rays(64, keypoint_fraction=0.25)
    assert batch.depth is not None and bool((batch.depth[:48] == 0).all()) and bool((batch.depth[48:] > 0).all())
    for r in range(48, 64):  # the keypoint ray's point at its target lies at the keypoint's z-depth
        idx = images.indices[int(batch.image_ids[r])]
        x, y = (int(v) for v in batch.pixels[r].tolist())
        flat, z = found[idx]
        assert y * small_room.hw[idx][1] + x in flat
        point = batch.origins[r].double().numpy() + batch.dirs[r].double().numpy() * float(batch.depth[r])
        c2w = small_room.c2w[idx]
        assert (point - c2w[:3, 3]) @ c2w[:3, 2] == pytest.approx(float(small_room.depth(idx)[y, x]), rel=1e-5)
    # whole-image batches (feature stages) and a zero fraction draw no keypoints
    assert RaySampler(images, 0).rays(8, torch.tensor([0, 1])).depth is None
    assert RaySampler(images, 0).rays(8).depth is None


def test_keypoint_depth_supervision_brings_rendered_depth_closer_to_the_truth(small_room, monkeypatch):
    """The trainer's keypoint path (triangulation replaced by true depths at 3% of the pixels)."""
    import fastnefes.data.triangulate as triangulate

    monkeypatch.setattr(triangulate, "keypoint_depths", lambda scene, indices, center: true_keypoints(scene, 50))
    (plain, m0), (supervised, m1) = (depth_error_after_training(small_room, keypoint_depth_weight=w) for w in (0.0, 1.0))
    none, used = m0["keypoint_depths"], m1["keypoint_depths"]
    assert none == 0 and used > 12 * 45
    assert supervised < 0.7 * plain, (plain, supervised)


def test_grid_from_pixels_is_resolved_at_the_start_and_saved(small_room, tmp_path):
    from fastnefes.data.normalize import compute_normalization
    from fastnefes.field.resolution import per_level_scale_for, pixel_footprint_cells
    from fastnefes.train.run import read_config

    cfg = tiny_config(steps=2)
    cfg.model.grid = {**cfg.model.grid, "per_level_scale": 1.05}  # coarse enough that the cameras raise it
    cfg.model.grid_from_pixels = True
    train(small_room, cfg, tmp_path / "run")
    saved, norm, _ = read_config(tmp_path / "run")
    finest = pixel_footprint_cells(small_room.K, small_room.c2w, compute_normalization(small_room).center, norm.scale,
                                   small_room.split("train"))
    expected = per_level_scale_for(finest, 16, 6, floor=1.05)
    assert expected > 1.05 and saved.model.grid["per_level_scale"] == pytest.approx(expected)
    assert not saved.model.grid_from_pixels
