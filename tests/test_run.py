"""The run directory: save / load round trip, resume to the identical result, bad inputs, and the
`train` / `render` commands."""

from __future__ import annotations

import json

import pytest
import torch

import fastnefes
from fastnefes.data.synth import make_synthetic_scene
from fastnefes.errors import FastnefesError
from fastnefes.render import render_image
from conftest import run_main, small_train_config
from fastnefes.train import TrainConfig, load_run, train
from fastnefes.train.run import CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE, read_checkpoint

def tiny_config(**kw) -> TrainConfig:
    return small_train_config(3000, **kw)


@pytest.fixture(scope="module")
def small_room():
    return make_synthetic_scene(seed=3, width=48, height=36, n_train=10, n_test=2, supersample=1)


@pytest.fixture(scope="module")
def trained_run(small_room, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    model, metrics = train(small_room, tiny_config(steps=9, stage_fractions=(0.34, 0.33, 0.33), checkpoint_every=4), run)
    return run, model, metrics


def test_run_directory_files_and_round_trip(trained_run, small_room):
    run, model, metrics = trained_run
    config = json.loads((run / CONFIG_FILE).read_text())
    assert config["format_version"] == fastnefes.RUN_FORMAT_VERSION
    assert config["train"]["model"]["feature_dim"] == 8 and "normalization" in config
    saved_metrics = json.loads((run / METRICS_FILE).read_text())
    assert saved_metrics["steps"] == 9 and [s["steps"] for s in saved_metrics["stages"]] == [3, 3, 3]
    assert not list(run.glob(".*.tmp*"))  # atomic writes leave no temporaries
    loaded, cfg = load_run(run, "cpu")
    assert cfg.model.feature_dim == 8 and not loaded.training
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    i = small_room.split("val")[0]
    K = torch.tensor(small_room.K[i:i + 1], dtype=torch.float32)
    c2w = torch.tensor(small_room.c2w[i:i + 1], dtype=torch.float32)
    with torch.no_grad():
        a = render_image(model.eval(), K, c2w, 36, 48, stride=4)
        b = render_image(loaded, K, c2w, 36, 48, stride=4)
    assert torch.equal(a["fused"], b["fused"]) and torch.equal(a["depth"], b["depth"])
    assert loaded.feature_stride == 4 and loaded.encode_images(torch.zeros(1, 36, 48, 3, dtype=torch.uint8)).shape == (1, 8, 9, 12)


def test_resume_reproduces_the_uninterrupted_run(small_room, tmp_path):
    cfg = lambda: tiny_config(steps=10, stage_fractions=(0.4, 0.3, 0.3), checkpoint_every=5)  # noqa: E731
    full, _ = train(small_room, cfg(), tmp_path / "full")
    train(small_room, cfg(), tmp_path / "resumed", stop_at_step=5)  # interrupted after its step-5 checkpoint
    _, meta = read_checkpoint(tmp_path / "resumed")
    assert meta["progress"]["step"] == 5 and not meta["complete"]
    resumed, metrics = train(small_room, TrainConfig(), tmp_path / "resumed", resume=True)  # config comes from the run
    assert metrics["steps"] == 10
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    hist_a = json.loads((tmp_path / "full" / METRICS_FILE).read_text())["history"]
    hist_b = json.loads((tmp_path / "resumed" / METRICS_FILE).read_text())["history"]
    assert [h["loss"] for h in hist_a] == [h["loss"] for h in hist_b]


def test_load_run_bad_inputs_are_one_line_errors(trained_run, tmp_path):
    import shutil

    run, _, _ = trained_run
    with pytest.raises(FastnefesError, match="run directory not found"):
        load_run(tmp_path / "nowhere")
    old = tmp_path / "old"
    shutil.copytree(run, old)
    cfg = json.loads((old / CONFIG_FILE).read_text())
    cfg["format_version"] = 999
    (old / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(FastnefesError, match="run format version 999"):
        load_run(old)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(run, corrupt)
    data = (corrupt / WEIGHTS_FILE).read_bytes()
    (corrupt / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(FastnefesError, match="corrupt or unreadable safetensors") as err:
        load_run(corrupt)
    assert "\n" not in str(err.value)
    missing = tmp_path / "missing"
    shutil.copytree(run, missing)
    (missing / WEIGHTS_FILE).unlink()
    with pytest.raises(FastnefesError, match="file not found"):
        load_run(missing)
    with pytest.raises(FastnefesError, match="already holds a trained run"):
        train(make_synthetic_scene(seed=3, width=16, height=12, n_train=2, n_test=1), tiny_config(steps=1), run)


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """run_main with any argument types, stdout and stderr together."""
    code, out, err = run_main(monkeypatch, capsys, *map(str, args))
    return code, out + err


@pytest.fixture(scope="module")
def dataset_on_disk(tmp_path_factory):
    from fastnefes.data import write_scene

    root = tmp_path_factory.mktemp("data") / "room"
    write_scene(make_synthetic_scene(seed=4, width=48, height=36, n_train=8, n_test=2, supersample=1), root, "7scenes")
    return root


def test_cli_bad_inputs_exit_2_with_one_line(monkeypatch, capsys, tmp_path, dataset_on_disk, trained_run):
    if not torch.cuda.is_available():
        code, text = run_cli(monkeypatch, capsys, "train", dataset_on_disk, "--out", tmp_path / "r", "--device", "cuda")
        assert code == 2 and "CUDA is not available" in text
    ext = tmp_path / "ext.pt"
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 5, 8, stride=8)), str(ext))
    code, text = run_cli(monkeypatch, capsys, "train", dataset_on_disk, "--out", tmp_path / "r", "--extractor", ext, "--feature-dim", 16)
    assert code == 2 and "5-d features but --feature-dim is 16" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    code, text = run_cli(monkeypatch, capsys, "train", empty, "--out", tmp_path / "r")
    assert code == 2 and text.strip().count("\n") == 0
    from dataclasses import replace

    from fastnefes.data import write_scene

    no_depth = tmp_path / "no_depth"
    write_scene(replace(make_synthetic_scene(seed=4, width=24, height=16, n_train=2, n_test=1, supersample=1),
                        depth_fn=None), no_depth, "transforms")
    code, text = run_cli(monkeypatch, capsys, "train", no_depth, "--out", tmp_path / "r", "--depth-weight", 0.5)
    assert code == 2 and "depth_weight > 0 needs depth maps" in text and text.strip().count("\n") == 0
    run, _, _ = trained_run
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(run, bad)
    (bad / WEIGHTS_FILE).write_bytes(b"\x00" * 64)
    code, text = run_cli(monkeypatch, capsys, "render", bad, "--data", dataset_on_disk, "--out", tmp_path / "o")
    assert code == 2 and "corrupt" in text


def test_cli_train_reports_its_keypoint_depths(monkeypatch, capsys, tmp_path, dataset_on_disk):
    code, text = run_cli(monkeypatch, capsys, "train", dataset_on_disk, "--out", tmp_path / "run", "--steps", 3,
                         "--device", "cpu", "--feature-dim", 8, "--keypoint-depth-weight", 0.5)
    assert code == 0, text
    found = json.loads((tmp_path / "run" / "metrics.json").read_text())["keypoint_depths"]
    assert f"keypoint depth: {found} triangulated keypoints supervised" in " ".join(text.split())


def test_cli_train_and_render(monkeypatch, capsys, tmp_path, dataset_on_disk):
    code, text = run_cli(monkeypatch, capsys, "train", dataset_on_disk, "--out", tmp_path / "run", "--steps", 6,
                         "--device", "cpu", "--feature-dim", 8, "--depth-weight", 0.5, "--distortion-weight", 0.1,
                         "--keypoint-depth-weight", 0.3)
    assert code == 0, text
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert saved["depth_weight"] == 0.5 and saved["distortion_weight"] == 0.1 and saved["keypoint_depth_weight"] == 0.3
    assert "val PSNR" in text and "fusion" in text
    code, text = run_cli(monkeypatch, capsys, "render", tmp_path / "run", "--data", dataset_on_disk, "--out", tmp_path / "vis",
                         "--split", "test", "--limit", 2)
    assert code == 0, text
    result = json.loads((tmp_path / "vis" / "render.json").read_text())
    assert result["summary"]["images"] == 2 and 0 < result["summary"]["ssim"] <= 1
    names = sorted(p.name for p in (tmp_path / "vis").glob("*.png"))
    assert "contact_sheet.png" in names and sum(n.endswith("_features.png") for n in names) == 2
    assert sum(n.endswith("_depth.png") for n in names) == 2 and sum(n.endswith("_rgb.png") for n in names) == 2


def test_distill_run_keeps_its_extractor_and_reloads(small_room, tmp_path):
    from fastnefes.train.run import EXTRACTOR_FILE, configure_distill

    ext = tmp_path / "ext.pt"
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 6, 4, stride=4)), str(ext))
    cfg = tiny_config(steps=6, stage_fractions=(0.34, 0.33, 0.33))
    module = configure_distill(cfg, ext)
    model, metrics = train(small_room, cfg, tmp_path / "run", extractor=module, extractor_path=ext)
    assert (tmp_path / "run" / EXTRACTOR_FILE).read_bytes() == ext.read_bytes()
    assert all("match" in h for h in metrics["history"] if h["stage"] == 1)  # distillation loss logged
    loaded, loaded_cfg = load_run(tmp_path / "run")
    assert (loaded_cfg.model.encoder, loaded.feature_dim, loaded.feature_stride) == ("distill", 6, 4)
    images = torch.rand(1, 3, 36, 48)
    assert torch.allclose(loaded.encode_images(images), module(images), atol=1e-6)
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 6, 4, stride=4)), str(tmp_path / "run" / EXTRACTOR_FILE))
    with pytest.raises(FastnefesError, match="sha256 mismatch"):
        load_run(tmp_path / "run")
