"""The work a chaos run keeps going (see `shoal.testing.chaos`): jobs submitted through the
client at random intervals, long tasks (one of them a service) that should run across every
fault, and a framework launching short tasks from offers.

Every task, whoever launched it, is the same bash script: it appends a line to
`history.log` in its agent's directory as it starts and as it ends (task id, attempt,
wall-clock time, exit status; a SIGTERM, the way an agent stops a run, ends it too), which
is what `chaos_checks` reads.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from shoal.client import ApiError, Client, Unreachable
from shoal.framework import protocol as fp
from shoal.framework.driver import Driver, Scheduler
from shoal.model import JobSpec, Resources, RestartPolicy, TaskState
from shoal.services import ServiceSpec
from shoal.testing.chaos_checks import Submission

ARRAY, RESTARTING, LONG, SERVICE, PROBE = "array", "restarting", "long", "service", "probe"
SERVICE_NAME = "chaos"
TASK_RESOURCES = Resources(cpus=0.1, mem=32)

# $1: seconds to sleep ("infinity" for a long task), $2: the attempts that fail (exit 1)
# before one succeeds. The trap comes first, so a run stopped at any point notes its end.
_TASK = r"""
h="${SHOAL_SANDBOX%/*/*}/history.log"
note() { echo "$1 $SHOAL_TASK_ID $SHOAL_ATTEMPT ${EPOCHREALTIME/,/.} $2" >> "$h"; }
trap 'note end 143; exit 143' TERM INT HUP
note start 0
sleep "$1" & wait $!
rc=0; [ "$SHOAL_ATTEMPT" -lt "$2" ] && rc=1
note end $rc
exit $rc
"""


def task_argv(seconds: str, failing: int = 0) -> list[str]:
    return ["bash", "-c", _TASK, "chaos-task", seconds, str(failing)]


def job_spec(kind: str, rng: random.Random) -> JobSpec:
    """A job of the workload: arrays of short sleeps, single tasks failing a few attempts
    before one succeeds, long tasks (a service among them), probes that only start and end."""
    count, seconds, fail, restart = 1, "0", 0, RestartPolicy(attempts=0)
    extra: dict[str, object] = {}
    if kind == ARRAY:
        count, seconds = rng.randint(5, 20), f"{rng.uniform(0.2, 2.0):.2f}"
        restart = RestartPolicy(attempts=1, delay=0.2)
    elif kind == RESTARTING:
        attempts = rng.randint(1, 3)
        seconds, fail = f"{rng.uniform(0.2, 1.5):.2f}", rng.randint(0, attempts)
        restart = RestartPolicy(attempts=attempts, delay=round(rng.uniform(0.1, 0.5), 2))
    elif kind in (LONG, SERVICE):
        # As many attempts as a policy may give: each stop is counted, not given up on.
        seconds, restart = "infinity", RestartPolicy(attempts=1000, delay=0.2)
    if kind == SERVICE:
        extra = {"ports": ["http"], "services": [ServiceSpec(name=SERVICE_NAME, port="http")]}
    return JobSpec(
        name=f"chaos-{kind}",
        command=task_argv(seconds, fail),
        count=count,
        resources=TASK_RESOURCES,
        restart=restart,
        kill_grace=2.0,
        **extra,  # type: ignore[arg-type]
    )


class Workload:
    """Submissions at random intervals (`every` seconds on average) on a thread of their own,
    each recorded; first `long_jobs` long jobs, one of them a service."""

    def __init__(self, client: Client, rng: random.Random, every: float, long_jobs: int) -> None:
        self.client, self.rng, self.every, self.long_jobs = client, rng, every, long_jobs
        self.submissions: list[Submission] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="chaos workload", daemon=True)

    def submit(self, client: Client, kind: str, spec: JobSpec) -> Submission:
        """One submission; one whose call failed is unacknowledged (it may or may not exist)."""
        done = Submission(kind, time.time())
        try:
            done.job_id = client.submit(spec)
            done.acked = time.time()
        except (Unreachable, ApiError) as e:
            done.error = str(e)
        with self._lock:
            self.submissions.append(done)
        return done

    def start(self) -> None:
        for i in range(self.long_jobs):
            kind = SERVICE if i == 0 else LONG
            self.submit(self.client, kind, job_spec(kind, self.rng))
        self._thread.start()

    def stop(self) -> None:
        """No more submissions (any number of times, started or not)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        self.client.close()

    def _loop(self) -> None:
        while not self._stopping.wait(self.rng.uniform(0.5, 1.5) * self.every):
            kind = self.rng.choice((ARRAY, RESTARTING))
            self.submit(self.client, kind, job_spec(kind, self.rng))


class Sweeper(Scheduler):
    """A framework that keeps up to `width` short tasks going, launched from offers. It
    records each task a launch call was answered for, and each end it hears of: every one
    it launched should end, through any failover."""

    def __init__(self, rng: random.Random, width: int = 3) -> None:
        self.rng, self.width = rng, width
        self.launched: dict[str, int] = {}  # task name -> job id
        self.ended: dict[str, TaskState] = {}
        self.unanswered = 0  # tasks whose launch call failed: they may run or not
        self.stopping = False
        self._lock = threading.Lock()

    def resource_offers(self, driver: Driver, offers: list[fp.OfferInfo]) -> None:
        with self._lock:
            room = 0 if self.stopping else self.width - len(set(self.launched) - set(self.ended))
            first = len(self.launched) + self.unanswered
        if room <= 0:
            _quietly(lambda: driver.decline([o.id for o in offers], refuse_seconds=0.5))
            return
        seconds = f"{self.rng.uniform(0.2, 2.0):.2f}"
        tasks = [
            fp.TaskLaunch(name=f"fw-{first + i}", command=task_argv(seconds), resources=TASK_RESOURCES)
            for i in range(room)
        ]
        try:
            jobs = driver.launch([offers[0].id], tasks)
        except (ApiError, Unreachable):  # a failover under way: offers come again from the next leader
            with self._lock:
                self.unanswered += len(tasks)
        else:
            with self._lock:
                self.launched.update(jobs)
        if offers[1:]:
            _quietly(lambda: driver.decline([o.id for o in offers[1:]], refuse_seconds=0.5))

    def status_update(self, driver: Driver, status: fp.TaskStatus) -> None:
        if status.state.terminal:
            with self._lock:
                self.ended[status.task] = status.state

    def unended(self) -> list[str]:
        with self._lock:
            return sorted(set(self.launched) - set(self.ended))


class Framework:
    """The `Sweeper` under a driver on a thread of its own, from entering the block to its end
    (or `close()`), the driver's log in `log` meanwhile (its warnings at each failover would
    cross a progress bar). `finish` stops its launches and gives what it launched `timeout`
    seconds to end, asking the leader for every task's state again now and then."""

    def __init__(self, urls: list[str], token: str, rng: random.Random, log: Path) -> None:
        self.sweeper = Sweeper(rng)
        self.driver = Driver(self.sweeper, "chaos", url=",".join(urls), token=token, failover_timeout=300)
        self._thread = threading.Thread(target=self.driver.run, name="chaos framework", daemon=True)
        self._log = logging.FileHandler(log)
        self._log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._logger = logging.getLogger("shoal.framework")

    def __enter__(self) -> Framework:
        self._logger.addHandler(self._log)
        self._logger.propagate = False
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def finish(self, timeout: float, problems: list[str]) -> None:
        self.sweeper.stopping = True
        deadline = time.monotonic() + timeout
        asked = 0.0
        while self.sweeper.unended() and time.monotonic() < deadline:
            if time.monotonic() - asked > 5:  # updates a lost stream missed come again
                _quietly(self.driver.reconcile)
                asked = time.monotonic()
            time.sleep(0.2)
        if unended := self.sweeper.unended():
            problems.append(f"framework tasks launched and never heard to end: {unended}")

    def close(self) -> None:
        """Tear the framework down (its tasks killed); once is enough."""
        if self._log in self._logger.handlers:
            _quietly(self.driver.stop)
            self._thread.join(timeout=30)
            self._logger.removeHandler(self._log)
            self._logger.propagate = True
            self._log.close()


def _quietly(call: Callable[[], object]) -> None:
    """A call that may fail while a master is away: the next round asks again."""
    try:
        call()
    except (ApiError, Unreachable):
        return
