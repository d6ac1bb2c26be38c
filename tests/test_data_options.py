"""7-Scenes as users hold it (.color.jpg frames, SfM pseudo ground truth) and runs that
remember how their data was loaded."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import run_main
from fastnefes.data import load_scene, write_scene
from fastnefes.data.options import DataOptions
from fastnefes.data.synth import make_synthetic_scene
from fastnefes.geometry import format_poses, perturb_poses, read_poses


@pytest.fixture(scope="module")
def jpg_7scenes(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A 7-Scenes folder whose colour frames are JPEG (.color.jpg), with SfM lists beside it
    that hold other poses and another focal; returns (root, SfM camera-to-world [N,4,4])."""
    root = tmp_path_factory.mktemp("data") / "kitchen"
    scene = make_synthetic_scene(seed=5, width=48, height=36, n_train=6, n_test=2, supersample=1)
    write_scene(scene, root, "7scenes")
    for png in sorted(root.glob("seq-*/*.color.png")):
        image = cv2.imread(str(png))
        cv2.imwrite(str(png.with_name(png.name.replace(".color.png", ".color.jpg"))), image)
        png.unlink()
    loaded = load_scene(root, focal=scene.K[0, 0, 0])
    sfm = perturb_poses(loaded.c2w, 2.0, 0.05, seed=3)
    for split, rows in (("train", loaded.split("train")), ("test", loaded.split("test"))):
        text = format_poses({loaded.names[i]: sfm[i] for i in rows})
        lines = [line + f" {0.9 * loaded.K[0, 0, 0]:.6f}" for line in text.splitlines() if not line.startswith("#")]
        (root / f"pgt_{split}.txt").write_text("\n".join(lines) + "\n")
    return root, sfm


def test_jpg_frames_load(jpg_7scenes):
    root, _ = jpg_7scenes
    scene = load_scene(root)
    assert scene.names and all(n.endswith(".color.jpg") for n in scene.names)
    assert scene.image(0).shape == (36, 48, 3)
    assert scene.depth(0) is not None  # the depth PNGs beside the JPEG frames still load


def test_sfm_poses_on_the_command_line(monkeypatch, capsys, tmp_path, jpg_7scenes):
    root, sfm = jpg_7scenes
    out = tmp_path / "gt.txt"
    code, _, err = run_main(monkeypatch, capsys, "poses", str(root), "--out", str(out), "--split", "test",
                            "--sfm-poses", str(root / "pgt_train.txt"), "--sfm-poses", str(root / "pgt_test.txt"))
    assert code == 0, err
    scene = load_scene(root)
    poses = read_poses(out)
    assert set(poses) == {scene.names[i] for i in scene.split("test")}
    for i in scene.split("test"):
        np.testing.assert_allclose(poses[scene.names[i]], sfm[i], atol=1e-8)
    # a missing list is one line naming it
    code, _, err = run_main(monkeypatch, capsys, "poses", str(root), "--out", str(out),
                            "--sfm-poses", str(root / "nope.txt"))
    assert code == 2 and "nope.txt" in err and err.strip().count("\n") == 0


def test_run_remembers_its_data_options(monkeypatch, capsys, tmp_path, jpg_7scenes):
    """Trained with --sfm-poses and --max-side, a run's later commands load the data the same
    way without being told; an explicit option still wins."""
    root, _ = jpg_7scenes
    run = tmp_path / "run"
    code, out, err = run_main(monkeypatch, capsys, "train", str(root), "--out", str(run), "--steps", "3",
                              "--device", "cpu", "--feature-dim", "4", "--max-side", "24",
                              "--sfm-poses", str(root / "pgt_train.txt"), "--sfm-poses", str(root / "pgt_test.txt"),
                              "--space", "contracted")
    assert code == 0, out + err
    assert "contracted space" in " ".join(out.split())  # the space the model uses, whatever the data suggested
    record = json.loads((run / "config.json").read_text())["data"]
    assert record["sfm_poses"] == ["pgt_train.txt", "pgt_test.txt"]  # relative to the data folder
    assert record["max_side"] == 24 and record["format"] == "7scenes"

    from fastnefes.cli.options import load_scene_from_options

    remembered = load_scene_from_options(root, run=run)
    told = DataOptions(sfm_poses=(str(root / "pgt_train.txt"), str(root / "pgt_test.txt")), max_side=24).load(root)
    np.testing.assert_allclose(remembered.c2w, told.c2w)
    np.testing.assert_allclose(remembered.K, told.K)
    assert tuple(remembered.hw[0]) == (18, 24)
    overridden = load_scene_from_options(root, max_side=48, run=run)
    assert tuple(overridden.hw[0]) == (36, 48)
    np.testing.assert_allclose(overridden.c2w, told.c2w)  # the SfM poses still come from the record

    code, out, err = run_main(monkeypatch, capsys, "render", str(run), "--data", str(root), "--out",
                              str(tmp_path / "render"), "--limit", "1", "--device", "cpu")
    assert code == 0, out + err
    rendered = json.loads((tmp_path / "render" / "render.json").read_text())
    assert rendered["data_options"]["max_side"] == 24 and len(rendered["data_options"]["sfm_poses"]) == 2
    assert cv2.imread(str(next((tmp_path / "render").glob("*_rgb.png")))).shape[:2] == (18, 24)
