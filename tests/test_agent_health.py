"""Health checks of runs: a verdict when it changes (from the last one, for a re-adopted run),
HTTP checks with a client made at need."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter

from shoal.agent.health import Damper, HealthChecks
from shoal.agent.runner import start_time
from shoal.agent.server import Agent
from shoal.agent.state import RunEntry
from shoal.agent.users import Users
from shoal.checks import CheckResult, CheckStatus, HealthCheck
from shoal.config import AgentSettings, load_settings
from shoal.model import Resources, TaskState
from shoal.wire import RunSpec

AGENTS_OWN = Users(None, allow_root=True)  # checks run as the agent's own user, root or not

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

        checks = HealthChecks(lambda run: tmp_path, verdict, AGENTS_OWN)
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
            lambda run: tmp_path, lambda run, check, status, out: seen.append((status, out)), AGENTS_OWN
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
    start=st.sampled_from([PASSING, WARNING, CRITICAL]),
    results=st.lists(st.sampled_from([PASSING, WARNING, CRITICAL]), max_size=40),
)
def test_a_verdict_changes_only_after_enough_results_in_a_row(
    passes: int, failures: int, start: CheckStatus, results: list[CheckStatus]
) -> None:
    """To passing takes `passes` passes in a row; away from passing, `failures` results in a
    row that are not passes (the verdict is then the last); between warning and critical,
    `failures` of the new one in a row. From any verdict it starts at (a re-adopted run's)."""
    check = HealthCheck(command="true", successes_before_passing=passes, failures_before_critical=failures)
    damper = Damper(check, start)
    verdict = start
    for i, result in enumerate(results):
        changed = damper.add(result)
        seen = list(reversed(results[: i + 1]))
        same = next((j for j, r in enumerate(seen) if r is not result), i + 1)
        alike = next((j for j, r in enumerate(seen) if (r is PASSING) != (result is PASSING)), i + 1)
        if result is verdict:
            expected = verdict  # nothing to change
        elif result is PASSING:
            expected = PASSING if same >= passes else verdict
        elif verdict is PASSING:  # leaving it: warnings and failures count alike
            expected = result if alike >= failures else verdict
        else:  # warning <-> critical
            expected = result if same >= failures else verdict
        assert changed == (expected is not verdict)
        verdict = expected
        assert damper.status is verdict


def test_a_new_damper_starts_critical() -> None:
    assert Damper(HealthCheck(command="true")).status is CRITICAL


def test_one_warning_does_not_take_a_passing_check_out_of_the_answers() -> None:
    damper = Damper(
        HealthCheck(command="true", failures_before_critical=3, successes_before_passing=1), PASSING
    )
    assert [damper.add(r) for r in (WARNING, PASSING, WARNING, WARNING)] == [False] * 4
    assert damper.status is PASSING
    assert damper.add(WARNING) and damper.status is WARNING  # the third in a row
    assert not damper.add(CRITICAL) and not damper.add(CRITICAL)  # warning -> critical: three too
    assert damper.add(CRITICAL) and damper.status is CRITICAL
    assert damper.add(PASSING) and damper.status is PASSING  # back in at the first pass


def test_known_verdicts_are_kept_and_only_changes_said(tmp_path: Path) -> None:
    """A re-adopted run's checks start from what they last said: a passing one says nothing
    while it passes (its endpoint stays in the answers), one that now fails says so, and a
    check with no verdict yet starts critical and says its first."""

    async def scenario() -> dict[str, list[CheckStatus]]:
        said: dict[str, list[CheckStatus]] = {}
        checks = HealthChecks(
            lambda run: tmp_path,
            lambda run, check, status, out: said.setdefault(run, []).append(status),
            AGENTS_OWN,
        )
        ok, failing = await _serve(200), await _serve(503)
        was_passing = {"web": CheckResult(PASSING, "HTTP GET: 200 OK", 1.0)}
        checks.watch(_spec("kept", _port(ok)), was_passing)
        checks.watch(_spec("fell", _port(failing)), was_passing)
        checks.watch(_spec("new", _port(ok)))
        checks.watch(_spec("other", _port(ok)), {"db": CheckResult(PASSING)})  # not this check's
        for _ in range(100):
            if {"fell", "new", "other"} <= said.keys():
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # several more checks of each
        await checks.close()
        for server in (ok, failing):
            server.close()
        return said

    said = asyncio.run(scenario())
    assert said == {"fell": [CRITICAL], "new": [PASSING], "other": [PASSING]}


def test_a_restarted_agent_keeps_its_runs_verdicts(tmp_path: Path) -> None:
    """The agent re-adopts a running run with the check results in its saved table."""
    sleeps = [subprocess.Popen(["sleep", "30"], start_new_session=True) for _ in range(2)]

    async def scenario() -> dict[str, CheckResult]:
        ok = await _serve(200)
        entries = [
            RunEntry(
                spec=_spec(run, _port(ok)),
                state=TaskState.RUNNING,
                pid=proc.pid,
                pid_start=start_time(proc.pid),
                started_at=1.0,
                acked=True,
                checks=checks,
            )
            for run, proc, checks in (
                ("kept", sleeps[0], {"web": CheckResult(PASSING, "HTTP GET: 200 OK", 1.0)}),
                ("new", sleeps[1], {}),
            )
        ]
        (tmp_path / "runs.json").write_bytes(TypeAdapter(list[RunEntry]).dump_json(entries))
        settings = load_settings(
            AgentSettings,
            None,
            master="http://127.0.0.1:8470",
            cluster_token="t",
            state_dir=tmp_path,
            limits=False,
            allow_root=True,
        )
        agent = Agent(settings)
        agent._adopt()
        for _ in range(100):
            if "web" in agent.state.runs["new"].checks:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # several more checks of each
        await agent.health.close()
        agent.runner.close()
        ok.close()
        return {run: entry.checks["web"] for run, entry in agent.state.runs.items()}

    try:
        got = asyncio.run(scenario())
    finally:
        for proc in sleeps:
            proc.kill()
            proc.wait()
    assert got["kept"] == CheckResult(PASSING, "HTTP GET: 200 OK", 1.0)  # not said again
    assert got["new"].status is PASSING and got["new"].since > 1.0


def test_no_http_client_is_made_until_an_http_check_runs(tmp_path: Path) -> None:
    async def scenario() -> bool:
        checks = HealthChecks(lambda run: tmp_path, lambda run, check, status, output: None, AGENTS_OWN)
        await checks.close()
        return "_http" in checks.__dict__

    assert asyncio.run(scenario()) is False


def test_alternating_warnings_and_failures_take_a_passing_check_out() -> None:
    damper = Damper(HealthCheck(command="true", failures_before_critical=3), PASSING)
    assert [damper.add(r) for r in (WARNING, CRITICAL, WARNING)] == [False, False, True]
    assert damper.status is WARNING
