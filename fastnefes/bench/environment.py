"""What a benchmark ran on: device, versions, backends, commit; peak-memory probes; a clock."""

from __future__ import annotations

import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import fastnefes


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """A file-name-safe device label: 'cpu-2t', 'cuda-nvidia-h100-80gb-hbm3'."""
    if device.type == "cuda":
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return f"cpu-{torch.get_num_threads()}t"


def git_commit() -> Optional[str]:
    """The fastnefes checkout's commit (None outside a git checkout)."""
    root = Path(fastnefes.__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device) -> dict[str, Any]:
    """Device, versions, the backend of every op on this device, the commit."""
    from fastnefes.ops.backends import report

    env = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(), "fastnefes": fastnefes.__version__,
           "commit": git_commit(), "threads": torch.get_num_threads(),
           "backends": {row["op"]: row["backend"] for row in report(device.type)}}
    try:
        import nerfacc  # noqa: F401

        env["nerfacc"] = getattr(nerfacc, "__version__", "present")
    except Exception:  # an absent or broken install is simply not in use
        env["nerfacc"] = None
    return env


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator counter, or the process's peak RSS (Linux clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> Optional[float]:
    """Peak since reset_peak_memory: CUDA tensors allocated, or resident set size on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(fn(), seconds), synchronising CUDA before reading the clock on either side."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start
