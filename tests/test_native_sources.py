"""The kernel sources themselves: every CUDA launcher compiles (nvcc, no GPU needed), and each op's
CPU and CUDA launchers include the same kernel-body header, so the CPU tests exercise the
arithmetic the GPU runs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).parents[1] / "csrc"
OPS = ("composite", "hashgrid", "occgrid")


def _includes(path: Path) -> set[str]:
    return set(re.findall(r'^#include "([^"]+)"', path.read_text(), flags=re.M))


@pytest.mark.parametrize("op", OPS)
def test_cpu_and_cuda_launchers_share_one_kernel_body(op: str) -> None:
    body = CSRC / f"{op}_kernel.h"
    cpu, cuda = CSRC / f"{op}_cpu.cpp", CSRC / f"{op}_cuda.cu"
    assert f"{op}_kernel.h" in _includes(cpu) and f"{op}_kernel.h" in _includes(cuda)
    # The body is host/device code: its functions carry the shared qualifier, not __device__ alone.
    text = body.read_text()
    assert "FASTNEFES_HD" in text and "__device__" not in text and "__global__" not in text
    # The launchers only launch: neither redefines the body's per-element functions.
    body_functions = set(re.findall(r"^FASTNEFES_HD [^(]*?(\w+)\(", text, flags=re.M))
    assert body_functions
    for launcher in (cpu, cuda):
        defined = set(re.findall(r"^(?:inline |__device__ |static )*[\w:<>, ]+? (\w+)\([^;]*\{", launcher.read_text(), flags=re.M))
        assert not body_functions & defined, (launcher.name, body_functions & defined)


def _nvcc() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    candidate = Path(home, "bin", "nvcc") if home else None
    return str(candidate) if candidate and candidate.exists() else shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found: CUDA sources not compile-checked")
def test_cuda_sources_compile(tmp_path: Path) -> None:
    """Every .cu compiles with nvcc under the flags torch's extension builder uses (run side by
    side: each takes a few seconds of one core)."""
    from torch.utils import cpp_extension

    sources = sorted(CSRC.glob("*.cu"))
    assert {p.name for p in sources} >= {f"{op}_cuda.cu" for op in OPS}
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    procs = {}
    for src in sources:
        cmd = [_nvcc(), "-c", str(src), "-o", str(tmp_path / f"{src.stem}.o"), "-std=c++17", "-O1",
               "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-gencode", "arch=compute_80,code=sm_80",
               "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
               "-D__CUDA_NO_HALF2_OPERATORS__", "-Werror", "all-warnings", *includes]
        procs[src.name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    failures = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failures[name] = err[-3000:]
    assert not failures, failures
