"""Shared fixtures: a tiny synthetic scene and a feature field trained on it (once per session)."""

from __future__ import annotations

import sys

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_scene():
    from fastnefes.data.synth import make_synthetic_scene

    return make_synthetic_scene(seed=3, width=64, height=48, n_train=24, n_test=4)


def tiny_train_config(steps: int = 400):
    """A field small enough to train in about a minute on 2 cores, good enough to refine with."""
    from fastnefes.field.model import ModelConfig
    from fastnefes.train.config import TrainConfig

    model = ModelConfig(
        grid=dict(n_levels=6, n_features_per_level=2, log2_hashmap_size=14, base_resolution=8, per_level_scale=1.6),
        encoder_stride=4, march_steps=128, occ_resolution=32,
    )
    return TrainConfig(model=model, steps=steps, batch_rays=1024, val_every=10**9, checkpoint_every=10**9)


def small_train_config(batch_samples: int = 4000, **kw):
    """A CPU-second config for the trainer and run tests: a small grid and narrow feature nets."""
    from fastnefes.train.config import TrainConfig

    cfg = TrainConfig(batch_samples=batch_samples, val_every=0, log_every=1, **kw)
    cfg.model.grid = {"n_levels": 6, "n_features_per_level": 2, "log2_hashmap_size": 14, "base_resolution": 16,
                      "per_level_scale": 1.5}
    cfg.model.occ_resolution = 32
    cfg.model.encoder_stride, cfg.model.encoder_width, cfg.model.feature_dim = 4, 8, 8
    cfg.model.fusion_width = 8
    cfg.patch_size = 4
    return cfg


@pytest.fixture(scope="session")
def tiny_run(tiny_scene, tmp_path_factory):
    """(run_dir, model) of a field trained on tiny_scene."""
    from fastnefes.train.run import train

    torch.manual_seed(0)
    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    # One thread: the hash grid's gradients are summed in another order on two, which trains
    # another field; the tests must see the same field whichever test first asks for it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, _ = train(tiny_scene, tiny_train_config(), run_dir)
    finally:
        torch.set_num_threads(threads)
    return run_dir, model


def query_views(scene, n=None):
    """(images [n,H,W,3] uint8, K [n,3,3], c2w [n,4,4]) of the first n test views of a scene."""
    import numpy as np

    test = scene.split("test")[:n]
    return np.stack([scene.image(i) for i in test]), scene.K[test], scene.c2w[test]


def field_views(model, K, c2w, hw):
    """[B, H, W, 3] uint8: the field's own renders at c2w [B, 4, 4] (K [B, 3, 3], hw (H, W)). The
    tiny field is too coarse to have its minima at the truth on the real test images
    (tests/test_refine.py's xfail); on its own renders it has, so refinement must reach the truth."""
    from fastnefes.render import render_image

    H, W = (int(v) for v in hw)
    with torch.no_grad():
        rgb = render_image(model, torch.tensor(K, dtype=torch.float32), torch.tensor(c2w, dtype=torch.float32),
                           H, W, fused=False)["rgb"]
    return (rgb.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`fastnefes ARGS` in this process (as the console script runs it): exit code, stdout, stderr."""
    from fastnefes.cli import main

    monkeypatch.setattr(sys, "argv", ["fastnefes", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
