"""How a scene was loaded, as plain data: recorded in a run, reused by later commands.

A run trained with `--format 7scenes --sfm-poses a.txt --sfm-poses b.txt --max-side 320` must be
refined, rendered and evaluated on the same poses, intrinsics and resolution, or its poses and
errors are meaningless. So `fastnefes train` records its DataOptions in the run's config.json,
and every command that takes a run fills the options its user left unset from that record
(`DataOptions.merged_over`). Paths inside the data folder are stored relative to it, so a
dataset moved together with its pose lists still loads.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from fastnefes.errors import FastnefesError


@dataclass(frozen=True)
class DataOptions:
    """Loader options; None means "not given" (the loader's default, or the run's record)."""

    format: Optional[str] = None  # "auto" or a format name
    downscale: Optional[int] = None
    max_side: Optional[int] = None
    focal: Optional[float] = None  # pixels at the stored resolution
    sfm_poses: Optional[tuple[str, ...]] = None  # 7-Scenes pseudo ground-truth lists

    def __post_init__(self) -> None:
        if self.sfm_poses is not None:
            object.__setattr__(self, "sfm_poses", tuple(str(p) for p in self.sfm_poses))

    def merged_over(self, recorded: Optional["DataOptions"]) -> "DataOptions":
        """These options, with each one left unset taken from `recorded` (a run's record)."""
        if recorded is None:
            return self
        return replace(self, **{f.name: getattr(recorded, f.name) for f in fields(self) if getattr(self, f.name) is None})

    def loader_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of fastnefes.data.load_scene (loader defaults for unset options)."""
        kwargs: dict[str, Any] = {"format": self.format or "auto", "downscale": self.downscale or 1,
                                  "max_side": self.max_side, "focal": self.focal}
        if self.sfm_poses:
            kwargs["sfm_poses"] = [Path(p) for p in self.sfm_poses]
        return kwargs

    def load(self, data: str | Path):
        """The Scene at `data` loaded with these options."""
        from fastnefes.data.load import load_scene

        scene = load_scene(data, **self.loader_kwargs())
        scene.load_options = self.to_record(scene.root, scene.format)
        return scene

    # ---- the record in a run ----------------------------------------------------------------
    def to_record(self, data_root: str | Path, scene_format: str = "") -> dict[str, Any]:
        """JSON-ready dict; pose-list paths inside data_root become relative to it. The detected
        format replaces "auto", so later loads cannot detect differently."""
        from fastnefes.data.load import FORMATS

        root = Path(data_root).resolve()
        record = asdict(self)
        if scene_format in FORMATS and self.format in (None, "auto"):  # not for in-memory scenes
            record["format"] = scene_format
        if self.sfm_poses:
            record["sfm_poses"] = [_relative_if_inside(p, root) for p in self.sfm_poses]
        record["data"] = str(root)
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any], data_root: str | Path, where: str = "run config") -> "DataOptions":
        """Options from `to_record`'s dict; relative pose-list paths resolve against data_root
        (the data folder given now), so the record follows a moved dataset."""
        names = {f.name for f in fields(cls)}
        try:
            opts = cls(**{k: v for k, v in record.items() if k in names})
        except TypeError as exc:
            raise FastnefesError(f"{where}: malformed data options ({exc})") from None
        if opts.sfm_poses:
            root = Path(data_root)
            opts = replace(opts, sfm_poses=tuple(p if os.path.isabs(p) else str(root / p) for p in opts.sfm_poses))
        return opts

    def describe(self) -> str:
        """One line for the console: the options that are set."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "sfm_poses":
                value = ",".join(Path(p).name for p in value)
            parts.append(f"{f.name.replace('_', '-')}={value}")
        return " ".join(parts) or "defaults"


def _relative_if_inside(path: str, root: Path) -> str:
    p = Path(path).resolve()
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return str(p)


def as_options(format: Optional[str] = None, downscale: Optional[int] = None, max_side: Optional[int] = None,
               focal: Optional[float] = None, sfm_poses: Optional[Sequence[str | Path]] = None) -> DataOptions:
    """DataOptions from separate values (an empty sfm_poses list counts as not given)."""
    return DataOptions(format, downscale, max_side, focal, tuple(str(p) for p in sfm_poses) if sfm_poses else None)
