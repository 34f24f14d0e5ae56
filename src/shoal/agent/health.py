"""Health checks of the runs that have them: a command, a TCP connect, or an HTTP GET.

One asyncio task per check of a running run, from its start to its end. A verdict changes
only after enough checks in a row agree (`Damper`), and goes to the agent's state machine,
which reports it to the master with the run's state: make-before-break moves and the service
registry follow it. A new run's checks start critical and say their first verdict (the
master learns "not yet passing" with the output): an endpoint serves only once its first
check passes. A run a restarted agent re-adopts starts from the verdicts it last had, and
says only real changes: a passing endpoint stays in the answers through the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.agent.runner import run_env
from shoal.agent.users import ROOT_ENV, Users
from shoal.checks import OUTPUT_LIMIT, CheckResult, CheckStatus, HealthCheck
from shoal.wire import RunSpec

if TYPE_CHECKING:  # httpx itself is imported at the first HTTP check: an agent starts without it
    import httpx

Verdict = Callable[[str, str, CheckStatus, str], None]  # run id, check name, status, output


class Damper:
    """Turns the results of single checks into a verdict that changes only after enough
    results in a row say so:

    - to passing: `successes_before_passing` passes in a row;
    - away from passing: `failures_before_critical` results in a row that are not passes
      (warnings and failures alike, as Consul counts them); the verdict is then the last;
    - between warning and critical: `failures_before_critical` of the new one in a row.

    So a warning (HTTP 429) takes an endpoint out of the answers no sooner than a failure
    would. Starts at `status`: critical for a new run, the last verdict for a re-adopted one."""

    def __init__(self, check: HealthCheck, status: CheckStatus = CheckStatus.CRITICAL) -> None:
        self.status = status
        self._passes = check.successes_before_passing
        self._failures = check.failures_before_critical
        self._last: CheckStatus | None = None
        self._alike = 0  # results in a row on the same side: passes, or not passes
        self._same = 0  # results in a row equal to the last

    def add(self, result: CheckStatus) -> bool:
        """Count one check's result; True when the verdict changed."""
        passing = CheckStatus.PASSING
        last = self._last
        self._alike = self._alike + 1 if last is not None and (last is passing) == (result is passing) else 1
        self._same = self._same + 1 if result is last else 1
        self._last = result
        if result is self.status:
            return False
        if result is passing:
            enough = self._alike >= self._passes
        elif self.status is passing:
            enough = self._alike >= self._failures
        else:
            enough = self._same >= self._failures
        if enough:
            self.status = result
        return enough


class HealthChecks:
    def __init__(self, sandbox: Callable[[str], Path], verdict: Verdict, users: Users) -> None:
        self._sandbox = sandbox
        self._verdict = verdict
        self._users = users
        self._tasks: dict[str, list[asyncio.Task[None]]] = {}

    @functools.cached_property
    def _http(self) -> httpx.AsyncClient:
        # Made at the first HTTP check, not with the agent: httpx costs a start-up a good part
        # of its CPU, and most nodes run no HTTP check. Checks are plain http to a port on
        # 127.0.0.1, never TLS: no CA bundle to load.
        import httpx

        return httpx.AsyncClient(verify=False)

    def watch(self, spec: RunSpec, known: Mapping[str, CheckResult] | None = None) -> None:
        """Check a run until `stop`. `known`: what its checks last said, by name (a run a
        restarted agent re-adopts); each check without one starts critical."""
        if spec.checks and spec.run_id not in self._tasks:
            known = known or {}
            self._tasks[spec.run_id] = [
                asyncio.ensure_future(self._loop(spec, name, check, known.get(name)))
                for name, check in spec.checks.items()
            ]

    def stop(self, run_id: str) -> None:
        for task in self._tasks.pop(run_id, ()):
            task.cancel()

    async def close(self) -> None:
        for run_id in list(self._tasks):
            self.stop(run_id)
        if "_http" in self.__dict__:
            await self._http.aclose()

    async def _loop(self, spec: RunSpec, name: str, check: HealthCheck, known: CheckResult | None) -> None:
        damper = Damper(check, known.status if known is not None else CheckStatus.CRITICAL)
        first = known is None  # a new check says its first verdict even when it is the critical it starts at
        while True:
            try:
                status, output = await asyncio.wait_for(self._check(spec, check), check.timeout)
            except TimeoutError:
                status, output = CheckStatus.CRITICAL, f"timed out after {check.timeout:g}s"
            except OSError as e:
                status, output = CheckStatus.CRITICAL, str(e) or type(e).__name__
            if damper.add(status) or first:
                first = False
                self._verdict(spec.run_id, name, damper.status, output[-OUTPUT_LIMIT:])
            await asyncio.sleep(check.interval)

    async def _check(self, spec: RunSpec, check: HealthCheck) -> tuple[CheckStatus, str]:
        if check.command is not None:
            return await self._command(spec, check.command)
        port = int(spec.env[f"SHOAL_PORT_{(check.port or '').upper()}"])
        if check.tcp is not None:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return CheckStatus.PASSING, f"TCP connect 127.0.0.1:{port}: ok"
        path = (check.http or "").split("/", 1)[1] if "/" in (check.http or "") else ""
        return await self._get(f"http://127.0.0.1:{port}/{path}")

    async def _command(self, spec: RunSpec, command: str) -> tuple[CheckStatus, str]:
        # As the run itself: its user (by setpriv, as its command: uvloop's subprocesses
        # take no user), its environment, which only the user's process is given.
        who = self._users.of_run(spec.user)
        box = self._sandbox(spec.run_id)
        proc = await asyncio.create_subprocess_exec(
            *self._users.shell(who, run_env(spec, who, box), command),
            env=ROOT_ENV,
            cwd=box,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await proc.communicate()
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        text = out[-OUTPUT_LIMIT:].decode(errors="replace").strip()
        return (CheckStatus.PASSING if proc.returncode == 0 else CheckStatus.CRITICAL), text

    async def _get(self, url: str) -> tuple[CheckStatus, str]:
        import httpx

        try:
            response = await self._http.get(url)
        except httpx.HTTPError as e:
            return CheckStatus.CRITICAL, f"GET {url}: {e or type(e).__name__}"
        code = response.status_code
        # As Consul: 2xx and 3xx pass, 429 Too Many Requests warns, anything else fails.
        status = (
            CheckStatus.PASSING
            if code < 400
            else CheckStatus.WARNING
            if code == 429
            else CheckStatus.CRITICAL
        )
        return status, f"HTTP GET {url}: {code} {response.reason_phrase}"
