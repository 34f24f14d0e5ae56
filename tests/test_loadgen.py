"""The CPU load controller: against a simulated node (pure), and for real on this machine."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.loadgen import Controller, Setting


def measure(other: float, setting: Setting, cpus: int) -> float:
    """A node's utilization: other load plus ours, capped at the whole node."""
    return min(100.0, other + 100 * setting.cores / cpus)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 64),  # cpus
    st.tuples(st.integers(0, 80), st.integers(10, 40)).filter(lambda b: b[0] + b[1] <= 100),
    st.lists(st.floats(0, 35), min_size=1, max_size=4),  # other load, changing over time
)
def test_the_band_is_reached_again_after_every_change_of_other_load(cpus, band, others) -> None:
    low, width = band
    high = low + width
    controller = Controller(float(low), float(high), cpus, max_workers=cpus, step=cpus)
    setting = Setting(0, 0.0)
    for other in others:
        if other > high:
            continue  # other load alone is past the band: nothing of ours could help
        for _ in range(30):
            setting = controller.decide(measure(other, setting, cpus), setting)
            assert 0 <= setting.workers <= cpus and 0 <= setting.duty <= 1
        assert low <= measure(other, setting, cpus) <= high


def test_workers_change_at_most_a_step_at_a_time() -> None:
    controller = Controller(40, 60, cpus=16, max_workers=16, step=2)
    setting = Setting(0, 0.0)
    seen = [setting.workers]
    for _ in range(10):
        setting = controller.decide(measure(0, setting, 16), setting)
        seen.append(setting.workers)
    assert all(abs(b - a) <= 2 for a, b in zip(seen, seen[1:], strict=False))
    assert 40 <= measure(0, setting, 16) <= 60


def test_inside_the_band_it_holds_still() -> None:
    controller = Controller(40, 60, cpus=4, max_workers=4)
    assert controller.decide(50.0, Setting(2, 0.9)) == Setting(2, 0.9)


def test_shoal_loadgen_holds_this_machine_in_a_band() -> None:
    """For real: busy processes, psutil measuring the whole machine (a shared one: the band is
    wide and half the settled measurements must be in it)."""
    result = subprocess.run(
        [sys.executable, "-m", "shoal", "loadgen", "--min", "30", "--max", "70", "--duration", "6", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    summary = lines[-1]
    assert summary["in_band"] >= 0.5, lines
    assert 0 < max(s["workers"] for s in lines[:-1])
    # Its workers end with it.
    left = [
        p for p in psutil.process_iter(["cmdline"]) if {"shoal", "loadgen"} <= set(p.info["cmdline"] or [])
    ]
    assert left == []
