"""`fastnefes doctor`: what this machine has and which backend each fast op uses."""

from __future__ import annotations

import platform
import shutil
import subprocess
from typing import Annotated

import typer
from rich.table import Table

from fastnefes.cli.app import app, console


def _version_of(cmd: list[str]) -> str:
    exe = shutil.which(cmd[0])
    if exe is None:
        return "not found"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
        return f"{exe} ({out[-1] if cmd[0] == 'nvcc' else out[0]})" if out else exe
    except (OSError, subprocess.SubprocessError):
        return exe


def _module_status(name: str) -> str:
    try:
        mod = __import__(name)
    except Exception as exc:  # tinycudann raises RuntimeError/ImportError etc. without CUDA
        return f"not usable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return f"{getattr(mod, '__version__', 'installed')}"


def environment_report() -> dict[str, str]:
    import torch

    from fastnefes import __version__

    cuda = torch.cuda.is_available()
    return {
        "fastnefes": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CUDA build": str(torch.version.cuda),
        "CUDA device": torch.cuda.get_device_name(0) if cuda else "none",
        "CPU threads": str(torch.get_num_threads()),
        "C++ compiler": _version_of(["c++", "--version"]),
        "nvcc": _version_of(["nvcc", "--version"]),
        "ninja": _version_of(["ninja", "--version"]),
        "nerfacc": _module_status("nerfacc"),
        "tinycudann": _module_status("tinycudann"),
    }


@app.command("doctor")
def doctor_command(
    build: Annotated[bool, typer.Option("--build", help="Build the native kernels now and report.")] = False,
) -> None:
    """Python, torch, CUDA device, compilers, and the backend each fast op will use."""
    import torch

    from fastnefes.ops import backends

    table = Table(title="environment", show_header=False)
    for key, value in environment_report().items():
        table.add_row(key, value)
    console.print(table)

    if build:
        try:
            from fastnefes.ops._backend import build_native
        except ImportError as exc:
            console.print(f"[yellow]native kernels not available in this version ({exc})[/]")
        else:
            result = build_native(verbose=False)
            rt = Table(title="native build", show_header=False)
            for key, value in result.items():
                rt.add_row(str(key), str(value))
            console.print(rt)

    ops = Table(title="fast ops")
    for col in ("op", "device", "backend in use", "requested", "why not the others"):
        ops.add_column(col)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for row in backends.report(device):
            why = "; ".join(f"{b}: {r}" for b, r in row["unavailable"].items()) or "-"
            ops.add_row(row["op"], row["device"], _backend_in_use(row["backend"], device), row["requested"], why)
    console.print(ops)


def _backend_in_use(backend: str, device: str) -> str:
    """The backend's name; a native one not yet compiled says so (a failed build falls back to torch)."""
    if backend != "native":
        return backend
    from fastnefes.ops._backend import is_loaded

    return backend if is_loaded(device) else f"{backend} (not compiled yet)"
