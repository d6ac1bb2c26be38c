"""Packaging hook: ship the kernel sources (csrc/) inside the package as fastnefes/_csrc.

The native kernels are compiled on first use (fastnefes/ops/_backend.py), so a wheel carries the
sources, not binaries. Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE_SUFFIXES = (".h", ".cpp", ".cu")


class BuildPyWithCsrc(build_py):
    """build_py that also copies csrc/*.{h,cpp,cu} to <build>/fastnefes/_csrc."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install finds <repo>/csrc directly
        target = Path(self.build_lib) / "fastnefes" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for src in sorted(CSRC.iterdir()):
            if src.suffix in SOURCE_SUFFIXES:
                shutil.copy2(src, target / src.name)


setup(cmdclass={"build_py": BuildPyWithCsrc})
