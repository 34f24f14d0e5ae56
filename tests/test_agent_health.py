"""Health checks of runs: a verdict when it changes, HTTP checks with a client made at need."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from shoal.agent.health import Damper, HealthChecks
from shoal.checks import CheckStatus, HealthCheck
from shoal.model import Resources
from shoal.wire import RunSpec

PASSING, WARNING, CRITICAL = CheckStatus.PASSING, CheckStatus.WARNING, CheckStatus.CRITICAL


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
        checks={"web": HealthCheck(http="web/healthz", interval=0.05, timeout=1)},
    )


def test_http_checks_judge_by_status_and_refused_connections(tmp_path: Path) -> None:
    async def scenario() -> dict[str, tuple[CheckStatus, str]]:
        verdicts: dict[str, tuple[CheckStatus, str]] = {}

        def verdict(run: str, check: str, status: CheckStatus, output: str) -> None:
            assert check == "web"
            verdicts[run] = (status, output)

        checks = HealthChecks(lambda run: tmp_path, verdict)
        ok, failing, busy, closed = await _serve(200), await _serve(503), await _serve(429), await _serve(200)
        ports = {"ok": _port(ok), "bad": _port(failing), "busy": _port(busy), "gone": _port(closed)}
        closed.close()  # nothing listens there any more
        await closed.wait_closed()
        for run_id, port in ports.items():
            checks.watch(_spec(run_id, port))
        for _ in range(100):
            if len(verdicts) == 4 and verdicts["ok"][0] is PASSING and verdicts["busy"][0] is WARNING:
                break
            await asyncio.sleep(0.02)
        await checks.close()
        for server in (ok, failing, busy):
            server.close()
        return verdicts

    verdicts = asyncio.run(scenario())
    assert {run: status for run, (status, _) in verdicts.items()} == {
        "ok": PASSING,
        "bad": CRITICAL,
        "busy": WARNING,
        "gone": CRITICAL,
    }
    assert verdicts["bad"][1].endswith("/healthz: 503 X")  # the server's own reason phrase
    assert "/healthz: 200" in verdicts["ok"][1]


def test_a_command_check_says_its_output(tmp_path: Path) -> None:
    async def scenario() -> list[tuple[CheckStatus, str]]:
        seen: list[tuple[CheckStatus, str]] = []
        checks = HealthChecks(
            lambda run: tmp_path, lambda run, check, status, out: seen.append((status, out))
        )
        spec = RunSpec(
            run_id="r",
            task_id="r",
            attempt=0,
            argv=["true"],
            resources=Resources(),
            checks={"db": HealthCheck(command="echo lagging 3s; exit 1", interval=0.05)},
        )
        checks.watch(spec)
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.02)
        await checks.close()
        return seen

    assert asyncio.run(scenario())[0] == (CRITICAL, "lagging 3s")


@given(
    passes=st.integers(1, 4),
    failures=st.integers(1, 4),
    results=st.lists(st.sampled_from([PASSING, WARNING, CRITICAL]), max_size=40),
)
def test_a_verdict_changes_only_after_enough_results_in_a_row(
    passes: int, failures: int, results: list[CheckStatus]
) -> None:
    damper = Damper(
        HealthCheck(command="true", successes_before_passing=passes, failures_before_critical=failures)
    )
    verdict = CRITICAL  # where every check starts: not serving until it passes
    for i, result in enumerate(results):
        changed = damper.add(result)
        streak = next((j for j, r in enumerate(reversed(results[: i + 1])) if r is not result), i + 1)
        needed = failures if result is CRITICAL else passes
        expected = result if streak >= needed else verdict
        assert changed == (expected is not verdict)
        verdict = expected
        assert damper.status is verdict


def test_no_http_client_is_made_until_an_http_check_runs(tmp_path: Path) -> None:
    async def scenario() -> bool:
        checks = HealthChecks(lambda run: tmp_path, lambda run, check, status, output: None)
        await checks.close()
        return "_http" in checks.__dict__

    assert asyncio.run(scenario()) is False
