"""The photometric polish (Levenberg-Marquardt on RGB): its per-ray Jacobian, the textured-pixel
subset it may fit, and the guards that keep it from raising the photometric loss."""

from __future__ import annotations

import pytest
import torch

from fastnefes.geometry import generate_rays, perturb_poses, pixel_grid, pose_errors, se3_exp
from fastnefes.refine import RefineConfig, Refiner
from fastnefes.refine.gauss_newton import LUMA, photometric_jacobian, textured_pixels
from fastnefes.refine.refiner import frozen
from fastnefes.render import render_rays

from conftest import query_views


def nefes_config(**overrides) -> RefineConfig:
    """The Levenberg-Marquardt polish these tests are about: the nefes preset's."""
    return RefineConfig.preset("nefes", **overrides)


def test_textured_pixels_take_each_blocks_edge_pixel():
    h, w, s = 6, 8, 2
    target = torch.zeros(2, 3, h, w)
    target[0, :, :, 5:] = 1.0  # an edge between columns 4 and 5
    target[1, :, :, 2:] = torch.tensor([0.2, 0.5, 0.9])[:, None, None]  # one between columns 1 and 2
    target[1] += torch.linspace(0.0, 0.05, h)[:, None]  # a faint vertical ramp: texture, but far less
    pixels, colours = textured_pixels(target, s, h * w // 4)  # 2 x 2 blocks: 3 x 4 of them
    assert pixels.shape == (2, 12, 2) and colours.shape == (2, 12, 3)
    col = (pixels[..., 0] / s - 0.5).round().long()
    row = (pixels[..., 1] / s - 0.5).round().long()
    assert torch.allclose(pixels, (torch.stack([col, row], -1) + 0.5) * s)  # pixel_grid's centres
    for b in range(2):  # one pixel in every block
        assert sorted(zip((row[b] // 2).tolist(), (col[b] // 2).tolist())) == [(i, j) for i in range(3) for j in range(4)]
    # Central differences score both sides of an edge: the blocks it crosses or touches take a
    # pixel beside it, whatever the ramp says.
    assert set(col[0][col[0] // 2 == 2].tolist()) <= {4, 5}
    assert set(col[1][col[1] // 2 == 0].tolist()) == {1} and set(col[1][col[1] // 2 == 1].tolist()) == {2}
    flat = row * w + col
    assert torch.all(flat[:, 1:] > flat[:, :-1])  # raster order
    for b in range(2):
        assert torch.equal(colours[b], target[b][:, row[b], col[b]].t())
    for count in (h * w, 10**6):  # the grid or more: every pixel
        every, _ = textured_pixels(target, s, count)
        assert torch.equal(every[0], pixel_grid(h * s, w * s, s).reshape(-1, 2))
    few, _ = textured_pixels(target, s, 5)  # 3 x 3 blocks would be 2 x 3 = 6 > 5: 4 x 4, 2 x 2 of them
    assert few.shape == (2, 4, 2)


def test_per_ray_jacobian_matches_the_pose_gradient(tiny_run, tiny_scene):
    _, model = tiny_run
    images, K, gt = query_views(tiny_scene, 2)
    K = torch.tensor(K, dtype=torch.float32)
    init = torch.tensor(perturb_poses(gt, 1.0, 0.02, seed=4), dtype=torch.float32)
    delta = torch.tensor([[0.01, -0.02, 0.005, 0.01, 0.0, -0.01], [0.0, 0.01, 0.0, 0.0, 0.02, 0.0]])
    pixels = pixel_grid(48, 64, 4).reshape(-1, 2)
    weights = torch.rand(2, pixels.shape[0], 3, generator=torch.Generator().manual_seed(0))
    flags = [p.requires_grad for p in model.parameters()]
    with frozen(model.eval()):
        rgb, J = photometric_jacobian(model, K, init, delta, pixels)
        d = delta.clone().requires_grad_(True)
        c2w = init @ se3_exp(d)
        o, dirs, _ = generate_rays(K, c2w, pixels.expand(2, *pixels.shape))
        ref = render_rays(model, o.reshape(-1, 3), dirs.reshape(-1, 3), with_features=False)["rgb"].reshape(2, -1, 3)
        grad, = torch.autograd.grad((ref * weights).sum(), d)
    assert torch.allclose(rgb, ref.detach(), atol=1e-5)
    # J^T w, summed over rays and channels, is the gradient of sum(w * rgb) with one shared pose.
    assert torch.allclose(torch.einsum("bnci,bnc->bi", J, weights), grad, rtol=1e-3, atol=1e-4)
    assert [p.requires_grad for p in model.parameters()] == flags  # frozen() restores the flags
    # The luma path (one backward pass) is the same Jacobian mixed down to one channel.
    with frozen(model):
        luma, J_luma = photometric_jacobian(model, K, init, delta, pixels, mix=torch.tensor([LUMA]))
    mix = torch.tensor(LUMA)
    assert torch.allclose(luma[..., 0], rgb @ mix, atol=1e-6)
    assert torch.allclose(J_luma[..., 0, :], torch.einsum("bnci,c->bni", J, mix), rtol=1e-4, atol=1e-6)


def test_per_query_pixels_give_each_query_its_own_rays(tiny_run, tiny_scene):
    _, model = tiny_run
    _, K, gt = query_views(tiny_scene, 2)
    K, init = torch.tensor(K, dtype=torch.float32), torch.tensor(gt, dtype=torch.float32)
    grid = pixel_grid(48, 64, 4).reshape(-1, 2)
    pixels = torch.stack([grid[:40], grid[-40:]])  # different rays for the two queries
    delta = torch.tensor([[0.01, 0.0, 0.0, 0.0, 0.01, 0.0], [0.0, -0.01, 0.0, 0.02, 0.0, 0.0]])
    with frozen(model.eval()):
        rgb, J = photometric_jacobian(model, K, init, delta, pixels)
        for b in range(2):
            alone, J_alone = photometric_jacobian(model, K[b : b + 1], init[b : b + 1], delta[b : b + 1], pixels[b])
            assert torch.allclose(rgb[b], alone[0], atol=1e-5)
            assert torch.allclose(J[b], J_alone[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rays", [0, 100])
def test_polish_never_raises_the_photometric_loss(tiny_run, tiny_scene, rays):
    """Every pixel of the finest grid judges the polish: fitting all of them (LM keeps only steps
    that lower its loss) or the 100 most textured of 768 (undone where the rest disagree)."""
    _, model = tiny_run
    images, K, gt = query_views(tiny_scene, 3)
    init = perturb_poses(gt, 1.0, 0.02, seed=5)
    cfg = nefes_config(iters=0, polish_iters=4, polish_stride=2, verify=False, polish_rays=rays)
    refiner = Refiner(model, cfg)
    res = refiner.refine(images, K, init)
    target = refiner.encode_queries(images, "rgb", 2)
    Kt = torch.tensor(K, dtype=torch.float32)
    with torch.no_grad():
        before = refiner._loss_at(Kt, torch.tensor(init, dtype=torch.float32), target, 48, 64, 2, signal="rgb")
        after = refiner._loss_at(Kt, torch.tensor(res.poses, dtype=torch.float32), target, 48, 64, 2, signal="rgb")
    assert torch.all(after <= before + 1e-7), (before, after)
    assert torch.any(after < 0.9 * before)  # and it does move
    assert all(d.iterations >= 1 for d in res.diagnostics)


def test_a_subset_polish_is_undone_where_every_pixel_says_it_hurt(tiny_run, tiny_scene, monkeypatch):
    """Fitting only the most textured pixels, a polish could lower its own loss and raise the
    rest's; every pixel of the finest grid then judges it (constructed: a polish that moves
    every pose half a metre, which test_refine's verification test shows is kept when the
    polish fits every pixel)."""
    import fastnefes.refine.refiner as refiner_module

    _, model = tiny_run
    images, K, gt = query_views(tiny_scene, 2)
    init = perturb_poses(gt, 3.0, 0.05, seed=4)
    base = dict(iters=4, coarse_iters=0, search_pad=0.0)
    plain = Refiner(model, nefes_config(**base, polish_iters=0)).refine(images, K, init)
    seen = []

    def far_polish(model, K, init, target, height, width, stride, iters, delta, failed, counts, *rest, **kw):
        seen.append(rest[-1])  # max_rays, as the refiner passes it
        delta += torch.tensor([0.0, 0.0, 0.0, 0.5, 0.0, 0.0]).to(delta)
        return torch.ones(delta.shape[0], dtype=torch.bool)

    monkeypatch.setattr(refiner_module, "levenberg_marquardt_phase", far_polish)
    res = Refiner(model, nefes_config(**base, polish_iters=1, polish_levels=1, polish_rays=50)).refine(images, K, init)
    assert seen == [50]
    moved, turned = pose_errors(res.poses, plain.poses)
    assert moved.max() < 1e-6 and turned.max() < 1e-4  # the feature phase's result, not the polish's


@pytest.mark.parametrize("every", [0, 2])
def test_polish_keeps_its_jacobian_between_refreshes(tiny_run, tiny_scene, monkeypatch, every):
    """polish_jacobian_every: a Jacobian at the first evaluation and every `every`-th (0: only
    the first), colour-only renders in between; the polish still never raises the loss and
    still moves."""
    import fastnefes.refine.gauss_newton as gn

    _, model = tiny_run
    images, K, gt = query_views(tiny_scene, 1)
    init = perturb_poses(gt, 1.0, 0.02, seed=5)
    calls = []

    def counting(*args, with_jacobian=True, **kw):
        calls.append(with_jacobian)
        return photometric_jacobian(*args, with_jacobian=with_jacobian, **kw)

    monkeypatch.setattr(gn, "photometric_jacobian", counting)
    cfg = nefes_config(iters=0, polish_iters=5, polish_levels=1, polish_stride=2, verify=False,
                       polish_jacobian_every=every)
    refiner = Refiner(model, cfg)
    res = refiner.refine(images, K, init)
    assert len(calls) >= 3
    assert calls == [k == 0 or (every > 0 and k % every == 0) for k in range(len(calls))]
    target = refiner.encode_queries(images, "rgb", 2)
    Kt = torch.tensor(K, dtype=torch.float32)
    with torch.no_grad():
        before = refiner._loss_at(Kt, torch.tensor(init, dtype=torch.float32), target, 48, 64, 2, signal="rgb")
        after = refiner._loss_at(Kt, torch.tensor(res.poses, dtype=torch.float32), target, 48, 64, 2, signal="rgb")
    assert torch.all(after <= before + 1e-7) and torch.any(after < 0.95 * before), (before, after)


def test_views_rendered_again_in_one_refinement_are_reused(tiny_run, tiny_scene, monkeypatch):
    """With every stride equal (tracking's setting) the initial loss, the polish's judge and the
    pixel check render the same views: the refinement renders each once, with the same results
    as rendering every time."""
    import fastnefes.render as render_module
    from fastnefes.refine.render_memo import RenderMemo

    _, model = tiny_run
    images, K, gt = query_views(tiny_scene, 2)
    init = perturb_poses(gt, 1.0, 0.02, seed=6)
    cfg = nefes_config(signal="rgb", iters=0, search_pad=0.0, stride=4, polish_levels=1, polish_stride=4,
                       polish_rays=100, polish_iters=3, verify_rays=192)
    renders = []
    plain_render = render_module.render_image

    def counting(*args, **kw):
        renders.append(1)
        return plain_render(*args, **kw)

    monkeypatch.setattr(render_module, "render_image", counting)
    reused = Refiner(model, cfg).refine(images, K, init)
    n_reused, renders[:] = len(renders), []
    monkeypatch.setattr(RenderMemo, "render", lambda self, K, c2w, h, w, stride, fused, with_features=True: counting(
        self.model, K, c2w, h, w, stride=stride, fused=fused, with_features=with_features))
    fresh = Refiner(model, cfg).refine(images, K, init)
    assert n_reused + 4 <= len(renders)  # initial pose: 3 renders -> 1, refined: 3 -> 1
    assert (reused.poses == fresh.poses).all()
    for a, b in zip(reused.diagnostics, fresh.diagnostics):
        assert (a.status, a.initial_loss, a.final_loss, a.ssim_initial, a.ssim_refined) == \
               (b.status, b.initial_loss, b.final_loss, b.ssim_initial, b.ssim_refined)
