"""The refinement service's wire format, shared by the server and the client (no web imports).

A query is an image (PNG or JPEG bytes) plus JSON: the pinhole camera the image was taken with
(`width`, `height`, `fx`, `fy`, `cx`, `cy` in pixels of that image) and the initial pose in the
pose-file convention, `[qw, qx, qy, qz, tx, ty, tz]` (world-to-camera, Hamilton quaternion w
first, OpenCV camera axes, the dataset's frame and units). Refined poses come back the same way.
"""

from __future__ import annotations

import struct

import numpy as np

from fastnefes.errors import FastnefesError


class WireError(FastnefesError):
    """A malformed part of a query: `field` names it ("image", "pose", "camera.fx", ...)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# ---- poses ------------------------------------------------------------------------------------
def pose_from_wire(values, field: str = "pose") -> np.ndarray:
    """[qw, qx, qy, qz, tx, ty, tz] (world-to-camera) -> camera-to-world [4, 4]; validated as a
    pose-file line is (seven finite numbers, a unit quaternion)."""
    from fastnefes.geometry.posefile import parse_pose_line

    if not isinstance(values, (list, tuple)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                        for v in values):
        raise WireError(field, "expected a list of 7 numbers [qw, qx, qy, qz, tx, ty, tz]")
    try:
        _, c2w = parse_pose_line(["query", *(repr(float(v)) for v in values)], field)
    except FastnefesError as exc:
        raise WireError(field, str(exc).removeprefix(f"{field}: ")) from None
    return c2w


def pose_to_wire(c2w: np.ndarray) -> list[float]:
    """Camera-to-world [4, 4] -> [qw, qx, qy, qz, tx, ty, tz] (world-to-camera), as pose files
    write it: t from the quaternion itself, so the camera centre survives exactly."""
    from fastnefes.geometry import invert_pose, quat_to_rotmat, rotmat_to_quat

    c2w = np.asarray(c2w, dtype=np.float64)
    q = rotmat_to_quat(invert_pose(c2w)[:3, :3])
    t = -quat_to_rotmat(q) @ c2w[:3, 3]
    return [float(v) for v in (*q, *t)]


# ---- cameras ----------------------------------------------------------------------------------
def camera_to_wire(K: np.ndarray, width: int, height: int) -> dict:
    """Intrinsics [3, 3] of a width x height image -> the wire's camera dict."""
    K = np.asarray(K, dtype=np.float64)
    return {"width": int(width), "height": int(height), "fx": float(K[0, 0]), "fy": float(K[1, 1]),
            "cx": float(K[0, 2]), "cy": float(K[1, 2])}


def camera_matrix(camera: dict) -> np.ndarray:
    """The wire's camera dict -> intrinsics [3, 3]."""
    K = np.eye(3)
    K[0, 0], K[1, 1], K[0, 2], K[1, 2] = camera["fx"], camera["fy"], camera["cx"], camera["cy"]
    return K


# ---- images -----------------------------------------------------------------------------------
def encode_png(image: np.ndarray) -> bytes:
    """uint8 RGB [H, W, 3] -> PNG bytes (lossless: the server sees exactly these pixels)."""
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(np.asarray(image, dtype=np.uint8)[..., ::-1]))
    if not ok:
        raise FastnefesError("could not encode the image as PNG")
    return buf.tobytes()


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG or JPEG header, without decoding the pixels (so a small file
    that would decode to a huge image is refused before it takes the memory)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 4 <= len(data):
            if data[i] != 0xFF:
                break
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
                i += 2
                continue
            (length,) = struct.unpack(">H", data[i + 2 : i + 4])
            # Start-of-frame markers (C0-CF but C4 DHT, C8 JPG, CC DAC) carry the size.
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and i + 9 <= len(data):
                height, width = struct.unpack(">HH", data[i + 5 : i + 9])
                return width, height
            i += 2 + length
    raise WireError("image", "not a PNG or JPEG file")


def decode_image(data: bytes, width: int, height: int) -> np.ndarray:
    """PNG or JPEG bytes -> uint8 RGB [height, width, 3], as fastnefes.io.read_image decodes a
    file; the image must have the camera's size."""
    import cv2

    w, h = image_size(data)
    if (w, h) != (width, height):
        raise WireError("image", f"image is {w}x{h} but the camera is {width}x{height} (intrinsics are per image size)")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise WireError("image", "unreadable or truncated PNG/JPEG data")
    if image.shape[:2] != (height, width):
        raise WireError("image", f"decoded to {image.shape[1]}x{image.shape[0]}, not the {width}x{height} its header says")
    return np.ascontiguousarray(image[..., ::-1])
