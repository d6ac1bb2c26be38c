"""The 2D encoder G: alignment conventions, TorchScript distillation, and self-supervised quality
(no collapse, cross-view matching far above chance) on a tiny synthetic scene."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastnefes.data.synth import make_synthetic_scene
from fastnefes.errors import FastnefesError
from fastnefes.field.encoder import DistillEncoder, SSLEncoder, as_float_images, load_torchscript, sample_feature_map
from fastnefes.train import TrainConfig, train
from fastnefes.train.run import build_model, configure_distill


@pytest.mark.parametrize("stride,hw,out_hw", [(4, (36, 48), (9, 12)), (8, (36, 48), (4, 6)), (8, (121, 161), (15, 20))])
def test_ssl_encoder_shapes_and_unit_norm(stride, hw, out_hw):
    torch.manual_seed(0)
    enc = SSLEncoder(feature_dim=8, stride=stride, width=8)
    images = torch.randint(0, 256, (2, *hw, 3), dtype=torch.uint8)
    out = enc(images)
    assert out.shape == (2, 8, *out_hw)
    assert torch.allclose(out.norm(dim=1), torch.ones(2, *out_hw), atol=1e-5)
    assert torch.allclose(enc(as_float_images(images)), out)  # uint8 HWC and float CHW agree


def test_ssl_encoder_ignores_exposure_gain_and_offset():
    torch.manual_seed(0)
    enc = SSLEncoder(feature_dim=8, stride=4, width=8)
    x = torch.rand(1, 3, 32, 32) * 0.5 + 0.2
    assert torch.allclose(enc(x), enc(1.3 * x + 0.05), atol=1e-4)


def test_sample_feature_map_reads_cell_centres_exactly():
    fmap = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    stride = 8
    i, j = torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij")
    centres = torch.stack([(j + 0.5) * stride, (i + 0.5) * stride], -1).reshape(1, -1, 2).expand(2, -1, -1)
    got = sample_feature_map(fmap, centres, stride)  # [2,20,3]
    assert torch.equal(got, fmap.flatten(2).transpose(1, 2))
    # Halfway between two cells: the mean of both.
    mid = torch.tensor([[[2 * stride, 0.5 * stride]]]).expand(2, 1, 2)
    assert torch.allclose(sample_feature_map(fmap, mid, stride)[:, 0], (fmap[:, :, 0, 1] + fmap[:, :, 0, 2]) / 2)


class TinyExtractor(torch.nn.Module):
    def __init__(self, channels: int = 6):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, channels, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x))


def save_extractor(path, channels: int = 6):
    torch.manual_seed(0)
    module = TinyExtractor(channels)
    torch.jit.save(torch.jit.script(module), str(path))
    return module


def test_distill_extractor_probe_and_frozen_forward(tmp_path):
    path = tmp_path / "extractor.pt"
    reference = save_extractor(path, channels=6)
    cfg = TrainConfig()
    module = configure_distill(cfg, path)
    assert (cfg.model.encoder, cfg.model.feature_dim, cfg.model.encoder_stride) == ("distill", 6, 4)
    enc = DistillEncoder(module, 6, 4)
    images = torch.rand(2, 3, 32, 40)
    out = enc(images)
    assert out.shape == (2, 6, 8, 10)
    assert torch.allclose(out, reference(images), atol=1e-6)
    assert all(not p.requires_grad for p in module.parameters())
    assert len(list(enc.parameters())) == 0  # not trained, not saved in model.safetensors


def test_distill_bad_inputs_are_one_line_errors(tmp_path):
    path = tmp_path / "extractor.pt"
    save_extractor(path, channels=6)
    with pytest.raises(FastnefesError, match="6-d features but --feature-dim is 16"):
        configure_distill(TrainConfig(), path, feature_dim=16)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torchscript archive" * 10)
    with pytest.raises(FastnefesError, match="not a loadable TorchScript file") as err:
        load_torchscript(garbage)
    assert "\n" not in str(err.value)
    with pytest.raises(FastnefesError, match="not found"):
        load_torchscript(tmp_path / "missing.pt")


def effective_rank(features: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of centred features [N,D] (1 = collapsed, D = isotropic)."""
    s = torch.linalg.svdvals(features - features.mean(0))
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))


def cross_view_hits(scene, model, i: int, j: int) -> tuple[float, float, int]:
    """Nearest-neighbour matching of view i's encoder cells in view j (cosine), scored with the
    ground-truth depth and poses: (hit rate within one cell, chance rate, number of cells scored)."""
    s = model.feature_stride
    with torch.no_grad():
        fi, fj = model.encode_images(torch.from_numpy(np.stack([scene.image(i), scene.image(j)])))
    D, h, w = fi.shape
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    px, py = (cols + 0.5) * s, (rows + 0.5) * s
    depth_i, depth_j = scene.depth(i), scene.depth(j)
    z = depth_i[np.minimum(py.astype(int), depth_i.shape[0] - 1), np.minimum(px.astype(int), depth_i.shape[1] - 1)]
    Ki, Kj = scene.K[i], scene.K[j]
    cam = np.stack([(px - Ki[0, 2]) / Ki[0, 0] * z, (py - Ki[1, 2]) / Ki[1, 1] * z, z], -1)
    world = cam @ scene.c2w[i][:3, :3].T + scene.c2w[i][:3, 3]
    cam_j = (world - scene.c2w[j][:3, 3]) @ scene.c2w[j][:3, :3]
    u = cam_j[..., 0] / cam_j[..., 2] * Kj[0, 0] + Kj[0, 2]
    v = cam_j[..., 1] / cam_j[..., 2] * Kj[1, 1] + Kj[1, 2]
    H, W = depth_j.shape
    inside = (cam_j[..., 2] > 0) & (u >= 0) & (u < w * s) & (v >= 0) & (v < h * s)
    vis = np.zeros_like(inside)
    ui, vi = np.clip(u.astype(int), 0, W - 1), np.clip(v.astype(int), 0, H - 1)
    vis[inside] = np.abs(depth_j[vi[inside], ui[inside]] - cam_j[..., 2][inside]) < 0.03 * cam_j[..., 2][inside]
    sim = torch.einsum("dn,dm->nm", fi.reshape(D, -1), fj.reshape(D, -1))
    best = sim.argmax(1).numpy()
    best_r, best_c = best // w, best % w
    true_r, true_c = (v / s).astype(int), (u / s).astype(int)
    ok = vis.reshape(-1)
    hit = (np.abs(best_r - true_r.reshape(-1)) <= 1) & (np.abs(best_c - true_c.reshape(-1)) <= 1)
    return float(hit[ok].mean()), 9.0 / (h * w), int(ok.sum())


@pytest.fixture(scope="module")
def ssl_run():
    scene = make_synthetic_scene(seed=1, width=64, height=48, n_train=16, n_test=2, supersample=1)
    cfg = TrainConfig(steps=160, stage_fractions=(0.45, 0.55, 0.0), batch_samples=6000, val_every=0, log_every=1)
    cfg.model.grid = {"n_levels": 6, "n_features_per_level": 2, "log2_hashmap_size": 14, "base_resolution": 16, "per_level_scale": 1.5}
    cfg.model.encoder_stride, cfg.model.feature_dim, cfg.model.encoder_width = 4, 16, 16
    cfg.model.occ_resolution = 32
    model, metrics = train(scene, cfg)
    return scene, model, metrics


def test_ssl_training_lowers_the_contrastive_loss_without_collapse(ssl_run):
    scene, model, metrics = ssl_run
    losses = [h["match"] for h in metrics["history"] if "match" in h]  # the InfoNCE term
    assert len(losses) >= 10
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3
    assert np.mean(losses[-3:]) < np.log(TrainConfig().contrastive_pixels) - 0.8  # chance level: log(pixels)
    with torch.no_grad():
        feats = model.encode_images(torch.from_numpy(np.stack([scene.image(k) for k in scene.split("train")[:4]])))
    flat = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    assert effective_rank(flat) > feats.shape[1] / 3  # many directions in use, not a collapsed embedding
    assert float(flat.std(0).mean()) > 0.5 / np.sqrt(feats.shape[1])


def overlapping_pairs(scene, indices, count: int) -> list[tuple[int, int]]:
    """The `count` image pairs whose camera centres and viewing directions are closest."""
    scored = []
    for a in indices:
        for b in indices:
            if a < b:
                angle = np.degrees(np.arccos(np.clip(scene.c2w[a][:3, 2] @ scene.c2w[b][:3, 2], -1, 1)))
                scored.append((angle + 20 * np.linalg.norm(scene.c2w[a][:3, 3] - scene.c2w[b][:3, 3]), a, b))
    return [(a, b) for _, a, b in sorted(scored)[:count]]


def test_ssl_features_match_across_views_far_above_chance(ssl_run):
    scene, model, _ = ssl_run
    rates = []
    for a, b in overlapping_pairs(scene, scene.split("train"), 3):
        rate, chance, n = cross_view_hits(scene, model, a, b)
        assert n > 40
        rates.append(rate)
    assert np.mean(rates) > 6 * chance, (rates, chance)


def test_build_model_in_distill_mode_needs_the_extractor():
    cfg = TrainConfig()
    cfg.model.encoder = "distill"
    from fastnefes.data.normalize import SceneNormalization

    norm = SceneNormalization(center=np.zeros(3), scale=1.0, near=0.1, far=2.0)
    with pytest.raises(FastnefesError, match="extractor"):
        build_model(cfg, norm)
