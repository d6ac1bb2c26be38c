"""Sequence order of a split's images, for tracking.

A name's frame number is its last run of digits; the text before and after it is the name's
sequence ('seq-03/frame-000012.color.png' -> sequence ('seq-03/frame-', '.color.png'), frame 12).
Sequences are taken in natural order of their text (digit runs compared as numbers), frames in
order of their number. A sequence's step is the smallest difference between its consecutive
frame numbers (1 for full 7-Scenes sequences, 10 for every tenth frame); a larger difference is
a gap, across which the motion since the last frame is unknown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fastnefes.errors import FastnefesError

_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")
_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple:
    """Sort key comparing digit runs as numbers: 'seq-2' < 'seq-10'."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in _DIGITS.split(text) if part)


@dataclass
class Segment:
    """A run of frames tracked from one start pose: frames in order, each `step` after the last."""

    sequence: str  # the sequence's name with its frame number replaced by '*'
    names: list[str]
    frames: list[int]


def split_frame_number(name: str, where: str) -> tuple[str, int, str]:
    """(text before the frame number, frame number, text after it)."""
    match = _LAST_NUMBER.search(name)
    if match is None:
        raise FastnefesError(f"{where}: image {name!r} has no frame number (tracking orders a split by the last number in each name)")
    return name[: match.start()], int(match.group(1)), name[match.end() :]


def tracking_segments(names: list[str], starts: set[str], where: str, init_path: str | Path) -> list[Segment]:
    """Cut a split's images (any order) into segments to track, each from a start pose.

    Every sequence starts a segment at its first frame, which must be in `starts` (the names the
    init file gives a pose for); every other name in `starts` starts a new segment there
    (a re-initialisation). A gap (frame numbers jumping by more than the sequence's step) is
    allowed only where the frame after it is in `starts`. Raises FastnefesError (one line,
    naming the frames and the init file) otherwise, or when two names share a frame number.
    """
    sequences: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for name in names:
        before, number, after = split_frame_number(name, where)
        sequences.setdefault((before, after), []).append((number, name))
    segments = []
    for (before, after) in sorted(sequences, key=lambda k: (natural_key(k[0]), natural_key(k[1]))):
        frames = sorted(sequences[(before, after)])
        label = f"{before}*{after}"
        for (a, name_a), (b, name_b) in zip(frames, frames[1:]):
            if a == b:
                raise FastnefesError(f"{where}: {name_a!r} and {name_b!r} have the same frame number {a}: the sequence order is ambiguous")
        first = frames[0][1]
        if first not in starts:
            raise FastnefesError(f"{init_path}: no pose for {first!r}, the first frame of sequence {label!r} in {where} (tracking starts from it)")
        step = min((b - a for (a, _), (b, _) in zip(frames, frames[1:])), default=1)
        current = Segment(label, [], [])
        segments.append(current)
        for k, (number, name) in enumerate(frames):
            if k > 0 and name in starts:
                current = Segment(label, [], [])
                segments.append(current)
            elif k > 0 and number - frames[k - 1][0] > step:
                raise FastnefesError(
                    f"{where}: sequence {label!r} jumps from frame {frames[k - 1][0]} to {number} (step {step}): a gap; "
                    f"give a pose for {name!r} in {init_path} to restart tracking there")
            current.names.append(name)
            current.frames.append(number)
    return segments
