"""Pose-file reading and writing, including malformed files."""

import numpy as np
import pytest

from fastnefes.errors import FastnefesError
from fastnefes.geometry import read_poses, se3_exp, write_poses


def test_roundtrip(tmp_path):
    c2w = se3_exp(np.random.default_rng(0).normal(size=(5, 6)))
    poses = {f"seq-01/frame-{i:06d}.color.png": c2w[i] for i in range(5)}
    path = tmp_path / "poses.txt"
    write_poses(path, poses)
    back = read_poses(path)
    assert list(back) == list(poses)
    for k in poses:
        assert np.allclose(back[k], poses[k], atol=1e-8)


def test_file_is_world_to_camera(tmp_path):
    # Camera at centre (1, 2, 3) with identity rotation: world-to-camera t = -C.
    path = tmp_path / "p.txt"
    c2w = np.eye(4)
    c2w[:3, 3] = [1, 2, 3]
    write_poses(path, {"a.png": c2w})
    fields = [l for l in path.read_text().splitlines() if not l.startswith("#")][0].split()
    assert np.allclose([float(v) for v in fields[1:]], [1, 0, 0, 0, -1, -2, -3])


def test_comments_and_blank_lines_ignored(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# header\n\n a.png 1 0 0 0 0 0 0\n# x\nb.png 0 1 0 0 1 1 1\n")
    assert list(read_poses(path)) == ["a.png", "b.png"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("a.png 1 0 0 0 0 0", "expected 8 fields"),
        ("a.png 1 0 0 0 0 0 0 9 9", "expected 8 fields"),
        ("a.png 1 0 0 0 0 0 0 9", "confidence 9 is not in [0, 1]"),
        ("a.png 1 0 0 0 0 0 0 high", "expected a number (confidence)"),
        ("a.png 1 0 0 0 nan 0 0", "non-finite"),
        ("a.png 1 0 0 0 inf 0 0", "non-finite"),
        ("a.png 1 0 0 0 x 0 0", "expected numbers"),
        ("a.png 1.01 0 0 0 0 0 0", "quaternion norm 1.010000"),
        ("b.png 1 0 0 0 0 0 0", "duplicate image name 'b.png'"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.txt"
    path.write_text(f"b.png 1 0 0 0 0 0 0\n{line}\n")
    with pytest.raises(FastnefesError) as err:
        read_poses(path)
    assert f"{path}:2: {message}" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(FastnefesError, match="pose file not found"):
        read_poses(tmp_path / "nope.txt")


def test_write_is_atomic_and_refuses_nan(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("keep\n")
    bad = np.eye(4)
    bad[0, 3] = np.nan
    with pytest.raises(ValueError):
        write_poses(path, {"a.png": np.eye(4), "b.png": bad})
    assert path.read_text() == "keep\n"
    assert [p.name for p in tmp_path.iterdir()] == ["p.txt"]
