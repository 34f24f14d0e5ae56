"""The CPU load controller: holds a node's total CPU utilization inside a band.

    shoal loadgen --min 40 --max 60

Busy worker processes (processes, not threads: each can use a core of its own) run a duty
cycle: busy for `duty` of every 20 ms, asleep for the rest. Each interval the controller
measures the node's total utilization (psutil, every process counted, ours included) and,
when it is outside the band, moves the total work (`workers x duty`, in cores) toward the
band's middle: half the distance at a time (other load reacts to ours; half steps do not
overshoot), at most `step` workers added or removed at once. Inside the band it holds still,
so the band is a dead zone, not a target the controller hunts around.

`Controller` is the decision alone (pure); `run` is the shell: processes, clock, display.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized

import psutil

_PERIOD = 0.02  # seconds of one duty cycle
_GAIN = 0.5  # the part of the distance to the band's middle closed each interval


@dataclass(frozen=True, slots=True)
class Setting:
    workers: int
    duty: float  # 0..1, the busy part of each worker's cycle

    @property
    def cores(self) -> float:
        return self.workers * self.duty


@dataclass(frozen=True, slots=True)
class Controller:
    low: float  # percent of the whole node
    high: float
    cpus: int
    max_workers: int
    step: int = 1

    def decide(self, measured: float, now: Setting) -> Setting:
        """The next setting, from the node's utilization (percent) under the current one."""
        if self.low <= measured <= self.high:
            return now
        middle = (self.low + self.high) / 2
        want = now.cores + _GAIN * (middle - measured) / 100 * self.cpus
        want = min(max(want, 0.0), float(self.max_workers))
        workers = min(max(math.ceil(want - 1e-9), 0), self.max_workers)
        workers = min(max(workers, now.workers - self.step), now.workers + self.step)
        if workers == 0:
            return Setting(0, 0.0)
        return Setting(workers, min(want / workers, 1.0))


def _work(duty: Synchronized, stop: Synchronized) -> None:  # type: ignore[type-arg]
    """A worker: busy for `duty` of every period until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers end
    while not stop.value:
        began = time.perf_counter()
        busy_until = began + duty.value * _PERIOD
        while time.perf_counter() < busy_until:
            pass
        rest = _PERIOD - (time.perf_counter() - began)
        if rest > 0:
            time.sleep(rest)


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # seconds since the start
    utilization: float  # percent, the whole node
    workers: int
    duty: float


class LoadGenerator:
    """The shell: worker processes, the measuring clock."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self._context = multiprocessing.get_context("fork")
        self._duty = self._context.Value("d", 0.0, lock=False)
        self._workers: list[tuple[multiprocessing.process.BaseProcess, Synchronized]] = []  # type: ignore[type-arg]
        self.setting = Setting(0, 0.0)

    def apply(self, setting: Setting) -> None:
        while len(self._workers) < setting.workers:
            stop = self._context.Value("b", False, lock=False)
            worker = self._context.Process(target=_work, args=(self._duty, stop), daemon=True)
            worker.start()
            self._workers.append((worker, stop))
        while len(self._workers) > setting.workers:
            worker, stop = self._workers.pop()
            stop.value = True
            worker.join(1.0)
        self._duty.value = setting.duty
        self.setting = setting

    def run(self, interval: float, duration: float | None, report: Callable[[Sample], None]) -> list[Sample]:
        samples: list[Sample] = []
        began = time.monotonic()
        psutil.cpu_percent(None)  # the first reading starts the measurement
        try:
            while duration is None or time.monotonic() - began < duration:
                time.sleep(interval)
                measured = psutil.cpu_percent(None)
                sample = Sample(time.monotonic() - began, measured, self.setting.workers, self.setting.duty)
                samples.append(sample)
                report(sample)
                self.apply(self.controller.decide(measured, self.setting))
        finally:
            self.apply(Setting(0, 0.0))
        return samples


@dataclass(frozen=True, slots=True)
class Summary:
    seconds: float
    low: float
    high: float
    in_band: float  # the part of the samples inside the band, after the first fifth
    median_utilization: float
    workers: int  # at the end

    @classmethod
    def of(cls, samples: list[Sample], low: float, high: float) -> Summary:
        settled = samples[len(samples) // 5 :] or samples
        inside = sum(low <= s.utilization <= high for s in settled)
        return cls(
            seconds=round(samples[-1].at if samples else 0.0, 2),
            low=low,
            high=high,
            in_band=round(inside / len(settled), 3) if settled else 0.0,
            median_utilization=round(statistics.median(s.utilization for s in settled), 1)
            if settled
            else 0.0,
            workers=samples[-1].workers if samples else 0,
        )


def default_workers() -> int:
    return os.cpu_count() or 1
