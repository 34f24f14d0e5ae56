"""Health checks of runs: a verdict when it changes, HTTP checks with a client made at need."""

from __future__ import annotations

import asyncio
from pathlib import Path

from shoal.agent.health import HealthChecks
from shoal.model import HealthCheck, Resources
from shoal.wire import RunSpec


async def _serve(status: int) -> asyncio.Server:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


def _port(server: asyncio.Server) -> int:
    return server.sockets[0].getsockname()[1]


def _spec(run_id: str, port: int) -> RunSpec:
    return RunSpec(
        run_id=run_id,
        task_id=run_id,
        attempt=0,
        argv=["true"],
        resources=Resources(),
        env={"SHOAL_PORT_WEB": str(port)},
        health=HealthCheck(http="web/healthz", interval=0.05, timeout=1),
    )


def test_http_checks_judge_by_status_and_refused_connections(tmp_path: Path) -> None:
    async def scenario() -> dict[str, bool]:
        verdicts: dict[str, bool] = {}
        checks = HealthChecks(lambda run: tmp_path, verdicts.__setitem__)
        ok, failing, closed = await _serve(200), await _serve(503), await _serve(200)
        ports = {"ok": _port(ok), "bad": _port(failing), "gone": _port(closed)}
        closed.close()  # nothing listens there any more
        await closed.wait_closed()
        for run_id, port in ports.items():
            checks.watch(_spec(run_id, port))
        for _ in range(100):
            if len(verdicts) == 3:
                break
            await asyncio.sleep(0.02)
        await checks.close()
        ok.close()
        failing.close()
        return verdicts

    assert asyncio.run(scenario()) == {"ok": True, "bad": False, "gone": False}


def test_no_http_client_is_made_until_an_http_check_runs(tmp_path: Path) -> None:
    async def scenario() -> bool:
        checks = HealthChecks(lambda run: tmp_path, lambda run, healthy: None)
        await checks.close()
        return "_http" in checks.__dict__

    assert asyncio.run(scenario()) is False
