"""Durations as people type them: `30s`, `10m`, `1h`, `7d`; and moments: a duration ago, or
an ISO time (`2024-05-01`, `2024-05-01T12:00`, local unless it names its zone)."""

from __future__ import annotations

import re
from datetime import datetime

import typer

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}


def seconds(duration: str) -> float:
    """`duration` (or a bare number of seconds) in seconds; a usage error if it is none."""
    match = _DURATION.fullmatch(duration.strip())
    if match is None or float(match[1]) <= 0:
        raise typer.BadParameter(f"{duration!r} is not a duration such as 30s, 10m, 1h or 7d")
    return float(match[1]) * _UNIT[match[2]]


def moment(text: str, now: float) -> float:
    """The Unix time `text` names: a duration before `now` (`1h`: an hour ago) or an ISO time;
    a usage error if it is neither."""
    if _DURATION.fullmatch(text.strip()):
        return now - seconds(text)
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except (ValueError, OverflowError, OSError):
        raise typer.BadParameter(
            f"{text!r} is neither a duration such as 1h or 7d nor an ISO time such as 2024-05-01T12:00"
        ) from None
