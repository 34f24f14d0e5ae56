"""Durations as people type them: `30s`, `10m`, `1h`, `7d`."""

from __future__ import annotations

import re

import typer

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}


def seconds(duration: str) -> float:
    """`duration` (or a bare number of seconds) in seconds; a usage error if it is none."""
    match = _DURATION.fullmatch(duration.strip())
    if match is None or float(match[1]) <= 0:
        raise typer.BadParameter(f"{duration!r} is not a duration such as 30s, 10m, 1h or 7d")
    return float(match[1]) * _UNIT[match[2]]
