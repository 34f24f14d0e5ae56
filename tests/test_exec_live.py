"""`shoal exec` through real agents on loopback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from shoal.client import ApiError
from shoal.model import JobSpec, Resources, Role
from shoal.shell.protocol import Ended, ExecRequest, Output, Selection, Targets
from shoal.testing.live import LiveCluster, live_cluster, wait_for


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    # A frozen agent must outlast a command's connect timeout before it counts as down, or
    # its command ends as lost with its node, not timed out.
    with live_cluster(tmp_path_factory.mktemp("exec"), agents=3, heartbeat_timeout=6) as c:
        yield c


def marked(marker: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]


def test_lines_come_prefixed_by_node_with_stderr_apart(cluster: LiveCluster) -> None:
    result = cluster.cli("exec", "-w", "node[1-3]", "--", "echo out-$SHOAL_NODE; echo err >&2")
    assert result.returncode == 0
    assert sorted(result.stdout.splitlines()) == ["node1: out-node1", "node2: out-node2", "node3: out-node3"]
    assert sorted(result.stderr.splitlines()) == ["node1: err", "node2: err", "node3: err"]


def test_gathered_output_folds_identical_answers(cluster: LiveCluster) -> None:
    result = cluster.cli("exec", "-b", "-w", "node[1-3]", "--", "echo same; echo $((1+1))")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "---------------\nnode[1-3] (3)\n---------------\nsame\n2\n"


def test_differing_answers_fold_apart_largest_set_first(cluster: LiveCluster) -> None:
    command = 'case "$SHOAL_NODE" in node2) echo odd;; *) echo even;; esac'
    result = cluster.cli("exec", "-b", "-a", "--", command)
    assert result.stdout == (
        "---------------\nnode[1,3] (2)\n---------------\neven\n"
        "---------------\nnode2\n---------------\nodd\n"
    )
    by_line = cluster.cli("exec", "-bL", "-a", "--", command)
    assert by_line.stdout == "node[1,3]: even\nnode2: odd\n"
    unlabelled = cluster.cli("exec", "-N", "-L", "-w", "node[1-2]", "--", "echo $SHOAL_NODE")
    assert unlabelled.stdout == "node1\nnode2\n"


def test_exit_codes_the_largest_with_S_and_summaries_on_stderr(cluster: LiveCluster) -> None:
    plain = cluster.cli("exec", "-w", "node[1-3]", "--", "exit 2")
    assert plain.returncode == 0
    assert "shoal: node[1-3]: exited with exit code 2" in plain.stderr
    largest = cluster.cli("exec", "-S", "-a", "--", "exit 4")
    assert largest.returncode == 4


def test_json_gives_one_record_per_node(cluster: LiveCluster) -> None:
    result = cluster.cli(
        "exec", "--json", "-w", "node[1-2]", "-w", "node9", "--", "echo hi; echo no >&2; exit 1"
    )
    records = {r["node"]: r for r in json.loads(result.stdout)}
    assert set(records) == {"node1", "node2", "node9"}
    assert records["node1"]["stdout"] == "hi\n" and records["node1"]["stderr"] == "no\n"
    assert records["node1"]["code"] == 1 and records["node1"]["duration"] > 0
    assert records["node9"]["failure"] == "down" and records["node9"]["code"] is None


def test_down_nodes_are_listed_at_once_without_a_timeout(cluster: LiveCluster) -> None:
    began = time.monotonic()
    with cluster.client() as client:
        events = list(client.exec(ExecRequest(select=Selection(nodes=["node[1-5]"]), command="true")))
    assert time.monotonic() - began < 5  # the connect timeout is 10 s
    targets = events[0]
    assert isinstance(targets, Targets) and targets.down == ["node4", "node5"]
    ended = {e.node: e for e in events if isinstance(e, Ended)}
    assert {n for n, e in ended.items() if e.failure == "down"} == {"node4", "node5"}
    assert {n for n, e in ended.items() if e.code == 0} == {"node1", "node2", "node3"}


def test_groups_from_labels_and_live_state(cluster: LiveCluster) -> None:
    result = cluster.cli("exec", "-b", "-g", "agent:node2", "-w", "@up", "-X", "agent:node3", "--", "echo x")
    assert "node[1-2] (2)" in result.stdout
    unknown = cluster.cli("exec", "-g", "nosuch", "--", "true")
    assert unknown.returncode == 2 and "no group @nosuch" in unknown.stderr


def test_a_node_that_never_answers_times_out_alone(cluster: LiveCluster) -> None:
    frozen = cluster.agents["node3"]
    frozen.send_signal(signal.SIGSTOP)
    try:
        result = cluster.cli("exec", "-S", "-t", "1", "-w", "node[1-3]", "--", "echo alive")
    finally:
        frozen.send_signal(signal.SIGCONT)
        cluster.wait_nodes_up()  # the tests after this one use node3 too
    assert sorted(result.stdout.splitlines()) == ["node1: alive", "node2: alive"]
    assert "node3: connect timeout" in result.stderr
    assert result.returncode == 255


def test_command_timeout_kills_the_command(cluster: LiveCluster) -> None:
    result = cluster.cli("exec", "-u", "0.5", "-w", "node[1-2]", "--", "sleep 30 # cmd-timeout-marker")
    assert "node[1-2]: command timeout" in result.stderr
    wait_for(lambda: not marked("cmd-timeout-marker"), 5, "timed-out commands gone")


def test_interrupt_stops_the_command_everywhere(cluster: LiveCluster) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal", "exec", "-a", "--", "echo started; sleep 60 # interrupt-marker"],
        env=cluster.cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: len(marked("sleep 60 # interrupt-marker")) >= 3, 15, "commands running")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 130
    assert "Keyboard interrupt (3 nodes left" in err
    wait_for(lambda: not marked("sleep 60 # interrupt-marker"), 5, "interrupted commands gone")


def test_only_admins_exec_and_every_exec_is_audited(cluster: LiveCluster, tmp_path: Path) -> None:
    never = tmp_path / "never"
    with cluster.client() as admin:
        user = admin.create_token("carol", Role.USER).token
        with cluster.client(user) as carol:
            with pytest.raises(ApiError) as refused:
                list(carol.exec(ExecRequest(select=Selection(all=True), command=f"touch {never}")))
            assert refused.value.status == 403
            with pytest.raises(ApiError) as not_hers:
                carol.audit()
            assert not_hers.value.status == 403
        events = list(
            admin.exec(ExecRequest(select=Selection(nodes=["node[1-2]"]), command="echo audited; exit 5"))
        )
        assert sum(isinstance(e, Output) for e in events) == 2
        record = admin.audit(limit=1)[0]
    assert not never.exists()
    assert (record.who, record.command, record.nodes) == ("admin", "echo audited; exit 5", "node[1-2]")
    assert record.results == {"5": "node[1-2]"} and record.ended_at is not None
    listing = cluster.cli("audit", "--json")
    assert json.loads(listing.stdout)[0]["command"] == "echo audited; exit 5"


def test_bad_requests_name_the_field(cluster: LiveCluster) -> None:
    with cluster.client() as admin:
        for request, field in (
            ({"select": {}, "command": "true"}, "select"),
            ({"select": {"all": True}, "command": "  "}, "body"),
            ({"select": {"nodes": ["n[1-"]}, "command": "true"}, "select.nodes"),
            ({"select": {"all": True}, "command": "true", "connect_timeout": -1}, "connect_timeout"),
        ):
            response = admin._calls.send("POST", "/v1/exec", json=request)
            assert response.status_code == 422, request
            assert field in {f["field"] for f in response.json()["fields"]}, response.json()


def test_no_output_is_lost_in_a_large_answer(cluster: LiveCluster) -> None:
    result = cluster.cli("exec", "-b", "-w", "node[1-3]", "--", "seq 1 200000")
    body = result.stdout.split("---------------\n")[-1]
    assert body.splitlines() == [str(i) for i in range(1, 200001)]


def test_spread_runs_each_command_once_at_most_one_per_node(cluster: LiveCluster, tmp_path: Path) -> None:
    done = tmp_path / "done"
    done.mkdir()
    commands = tmp_path / "commands"
    stamp = "$(date +%s.%N)"
    lines = [f'b={stamp}; sleep 0.3; echo "$SHOAL_NODE $b {stamp}" > {done}/{i}' for i in range(6)]
    commands.write_text("# six jobs\n" + "\n".join(lines) + "\n\nexit 7\n")
    result = cluster.cli("exec", "--json", "-a", "--spread", str(commands))
    records = json.loads(result.stdout)
    assert result.returncode == 1  # one command failed
    assert [r["index"] for r in records] == list(range(7))
    assert [r["code"] for r in records] == [0] * 6 + [7]
    spans: dict[str, list[tuple[float, float]]] = {}
    for path in done.iterdir():
        node, began, ended = path.read_text().split()
        spans.setdefault(node, []).append((float(began), float(ended)))
    assert sum(len(runs) for runs in spans.values()) == 6  # each command ran once
    assert set(spans) == {"node1", "node2", "node3"}  # spread over every node
    for runs in spans.values():  # never two at once on a node
        runs.sort()
        assert all(earlier[1] <= later[0] for earlier, later in zip(runs, runs[1:], strict=False))
    table = cluster.cli("exec", "-w", "node[1-2]", "--per-node", "2", "--spread", str(commands))
    assert "7 commands in" in table.stdout and "node1" in table.stdout


def test_nodes_groups_lists_derived_groups(cluster: LiveCluster) -> None:
    listing = json.loads(cluster.cli("nodes", "--groups", "--json").stdout)
    assert listing["@all"] == "node[1-3]" and listing["@up"] == "node[1-3]"
    assert listing["@agent:node2"] == "node2"


def test_job_specs_and_picks_take_derived_groups(cluster: LiveCluster) -> None:
    with cluster.client() as client:
        job = client.submit(
            JobSpec(command="true", count=2, resources=Resources(cpus=0.1), nodes="@agent:node2")
        )
        view = client.wait(job, timeout=30)
        assert {t.node for t in view.tasks} == {"node2"}
        picked = [
            e
            for e in client.exec(
                ExecRequest(select=Selection(all=True, pick=2, least_loaded=True), command="true")
            )
            if isinstance(e, Ended)
        ]
    assert len(picked) == 2 and all(e.code == 0 for e in picked)


def test_output_past_the_flow_window_arrives_whole(cluster: LiveCluster) -> None:
    # 12 MB per node, three times the window an agent may send ahead of the reader
    command = "head -c 12000000 /dev/zero | tr '\\0' x | fold -w 99"
    with cluster.client() as client:
        sizes: dict[str, int] = {}
        for event in client.exec(ExecRequest(select=Selection(nodes=["node[1-2]"]), command=command)):
            if isinstance(event, Output):
                sizes[event.node] = sizes.get(event.node, 0) + len(event.data)
                time.sleep(0.0005)  # a slow reader
            elif isinstance(event, Ended):
                assert event.code == 0
    whole = 12_000_000 + 12_000_000 // 99  # every x, and a newline after each full line
    assert sizes == {"node1": whole, "node2": whole}
