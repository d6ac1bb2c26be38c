"""Atomic file output and safe input helpers.

Every file fastnefes writes goes to a temporary file in the same folder first and is renamed
into place, so an interrupted run never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from fastnefes.errors import FastnefesError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_text(path: str | os.PathLike, what: str = "a text file") -> str:
    """The UTF-8 text of a user's file (a byte-order mark is dropped); FastnefesError naming the
    file when it is missing, a folder, or not text."""
    path = Path(path)
    if not path.is_file():
        raise FastnefesError(f"{path}: {'is a folder' if path.is_dir() else 'file not found'} (expected {what})")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise FastnefesError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}; expected {what})") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise FastnefesError(f"{path}:{line}: binary data (a NUL byte; expected {what})")
    return text


def read_json(path: str | os.PathLike) -> Any:
    text = read_text(path, "a JSON file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FastnefesError(f"{path}: not valid JSON ({exc})") from None


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an RGB (HxWx3) or grey (HxW) uint8 / uint16 image; the format follows the suffix."""
    import cv2

    path = Path(path)
    if image.ndim == 3:
        image = np.ascontiguousarray(image[..., ::-1])  # OpenCV wants BGR
    with atomic_path(path) as tmp:
        ok, buf = cv2.imencode(path.suffix or ".png", image)
        if not ok:
            raise FastnefesError(f"{path}: could not encode image")
        tmp.write_bytes(buf.tobytes())


def read_image(path: str | os.PathLike, unchanged: bool = False) -> np.ndarray:
    """Read an image as uint8 RGB (HxWx3), or as stored (`unchanged`, e.g. RGBA or 16-bit depth)."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise FastnefesError(f"{path}: image file not found")
    data = np.fromfile(str(path), dtype=np.uint8)
    flags = cv2.IMREAD_UNCHANGED if unchanged else cv2.IMREAD_COLOR
    image = cv2.imdecode(data, flags) if data.size else None
    if image is None:
        raise FastnefesError(f"{path}: unreadable or truncated image")
    if image.ndim == 3:
        if image.shape[2] == 4:
            image = image[..., [2, 1, 0, 3]]
        else:
            image = image[..., ::-1]
    return np.ascontiguousarray(image)
