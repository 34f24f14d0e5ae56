"""Health checks of the runs that have one: a command, a TCP connect, or an HTTP GET.

One asyncio task per running run with a check, from its start to its end. A change of the
verdict goes to the agent's state machine, which reports it to the master with the run's
state (make-before-break migrations wait on it; the service registry will too).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.model import HealthCheck
from shoal.wire import RunSpec

if TYPE_CHECKING:  # httpx itself is imported at the first HTTP check: an agent starts without it
    import httpx

Verdict = Callable[[str, bool], None]  # run id, healthy


class HealthChecks:
    def __init__(self, sandbox: Callable[[str], Path], verdict: Verdict) -> None:
        self._sandbox = sandbox
        self._verdict = verdict
        self._tasks: dict[str, asyncio.Task[None]] = {}

    @functools.cached_property
    def _http(self) -> httpx.AsyncClient:
        # Made at the first HTTP check, not with the agent: httpx costs a start-up a good part
        # of its CPU, and most nodes run no HTTP check. Checks are plain http to a port on
        # 127.0.0.1, never TLS: no CA bundle to load.
        import httpx

        return httpx.AsyncClient(verify=False)

    def watch(self, spec: RunSpec) -> None:
        if spec.health is not None and spec.run_id not in self._tasks:
            self._tasks[spec.run_id] = asyncio.ensure_future(self._loop(spec, spec.health))

    def stop(self, run_id: str) -> None:
        if (task := self._tasks.pop(run_id, None)) is not None:
            task.cancel()

    async def close(self) -> None:
        for run_id in list(self._tasks):
            self.stop(run_id)
        if "_http" in self.__dict__:
            await self._http.aclose()

    async def _loop(self, spec: RunSpec, check: HealthCheck) -> None:
        last: bool | None = None
        while True:
            try:
                healthy = await asyncio.wait_for(self._check(spec, check), check.timeout)
            except (TimeoutError, OSError):
                healthy = False
            if healthy != last:
                last = healthy
                self._verdict(spec.run_id, healthy)
            await asyncio.sleep(check.interval)

    async def _check(self, spec: RunSpec, check: HealthCheck) -> bool:
        if check.command is not None:
            env = {**os.environ, **spec.env}
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh",
                "-c",
                check.command,
                env=env,
                cwd=self._sandbox(spec.run_id),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                return await proc.wait() == 0
            finally:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        port = int(spec.env[f"SHOAL_PORT_{(check.port or '').upper()}"])
        if check.tcp is not None:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return True
        path = (check.http or "").split("/", 1)[1] if "/" in (check.http or "") else ""
        return await self._get_ok(f"http://127.0.0.1:{port}/{path}")

    async def _get_ok(self, url: str) -> bool:
        import httpx

        try:
            response = await self._http.get(url)
        except httpx.HTTPError:
            return False
        return response.status_code < 400
