"""`shoal bootstrap`: install shoal on machines over SSH and start an agent on each.

One ClusterShell task does it all with the usual fanout: the wheel goes to every node by
scp, then a small sh script per node installs it into a venv (made unless one is there,
so a second run upgrades in place) and starts the agent, under systemd where the node
runs it, otherwise as a detached process. The token travels on the script's stdin and lands
in a file only root can read, never on a command line: for a master serving TLS, a bootstrap
token the agent joins with, followed on stdin by the cluster CA's certificate, which the
agent verifies the master with; for a plain-HTTP master (--insecure), the cluster token.
"""

from __future__ import annotations

import json
import queue
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from ClusterShell.Event import EventHandler
from ClusterShell.NodeSet import NodeSet
from ClusterShell.Worker.Worker import StreamWorker

from shoal.errors import ShoalError
from shoal.shell.ssh import DEFAULT_FANOUT, SshOptions, ssh_task

_UNIT = """[Unit]
Description=shoal agent
After=network-online.target

[Service]
EnvironmentFile=$P/agent.env
ExecStart=$P/bin/shoal agent --master $MASTER --name $NODE --state-dir $P/state $LABELS
Restart=always

[Install]
WantedBy=multi-user.target
"""

_SCRIPT = """set -e
P={prefix}; W={wheel}; MASTER={master}; NODE={node}; LABELS={labels}; TLS={tls}
IFS= read -r TOKEN
[ -z "$TLS" ] || CA_PEM=$(cat)  # the rest of stdin, read before anything else may take it
D=$(mktemp -d)
trap 'rm -rf "$D"' EXIT
mv "$W" "$D/"{wheel_name}  # pip wants the wheel under its own name
[ -x "$P/bin/python" ] || {python} -m venv "$P"
"$P/bin/pip" install --quiet --disable-pip-version-check {pip_args} "$D/"{wheel_name}
umask 077
if [ -n "$TLS" ]; then
  printf '%s\\n' "$CA_PEM" > "$P/ca.pem"
  printf 'SHOAL_CA=%s\\nSHOAL_BOOTSTRAP_TOKEN=%s\\n' "$P/ca.pem" "$TOKEN" > "$P/agent.env"
else
  printf 'SHOAL_CLUSTER_TOKEN=%s\\n' "$TOKEN" > "$P/agent.env"
fi
if [ -d /run/systemd/system ]; then
  cat > /etc/systemd/system/shoal-agent.service <<UNIT
{unit}UNIT
  systemctl daemon-reload
  systemctl enable --quiet shoal-agent
  systemctl restart shoal-agent
  echo "agent started under systemd"
else
  pkill -f "^$P/bin/python $P/bin/shoal agent" || true
  set -a; . "$P/agent.env"; set +a
  setsid nohup "$P/bin/shoal" agent --master "$MASTER" --name "$NODE" --state-dir "$P/state" $LABELS \\
    >> "$P/agent.log" 2>&1 < /dev/null &
  echo "agent started as process $!"
fi
"""


@dataclass(frozen=True, slots=True)
class Plan:
    master: str
    token: str  # a bootstrap token with `ca_pem`; without, the cluster token
    wheel: Path
    prefix: str = "/opt/shoal"  # `{node}` is replaced by each node's name
    python: str = "python3"
    pip_args: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    ca_pem: str = ""  # the cluster CA's certificate: the master serves TLS

    def stdin(self) -> bytes:
        """What the script reads on its stdin: the secret, then the CA's certificate."""
        return f"{self.token}\n{self.ca_pem}".encode()

    def remote_wheel(self, node: str) -> str:
        """Where the wheel lands on `node`: a name of its own, in case /tmp is shared."""
        return f"/tmp/shoal-bootstrap-{node}-{self.wheel.name}"

    def script(self, node: str) -> str:
        labels = " ".join(f"--label {k}={v}" for k, v in sorted(self.labels.items()))
        return _SCRIPT.format(
            prefix=shlex.quote(self.prefix.replace("{node}", node)),
            wheel=shlex.quote(self.remote_wheel(node)),
            wheel_name=shlex.quote(self.wheel.name),
            master=shlex.quote(self.master),
            node=shlex.quote(node),
            labels=shlex.quote(labels),
            python=shlex.quote(self.python),
            tls="1" if self.ca_pem else "''",
            pip_args=self.pip_args,
            unit=_UNIT,
        )


@dataclass(frozen=True, slots=True)
class NodeResult:
    node: str
    ok: bool
    step: str  # the step it reached: copy, install
    message: str


def build_wheel(into: Path) -> Path:
    """A wheel of the shoal this command runs from, built from its source tree."""
    try:
        origin = json.loads(metadata.distribution("shoal").read_text("direct_url.json") or "{}")
    except metadata.PackageNotFoundError:
        origin = {}
    source = origin.get("url", "")
    if not source.startswith("file://"):
        raise ShoalError("shoal was not installed from a source tree here; pass --wheel PATH")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(into),
            source[len("file://") :],
        ],
        check=True,
        capture_output=True,
    )
    return next(into.glob("shoal-*.whl"))


class _Steps(EventHandler):  # type: ignore[misc]
    """Collects each node's output and exit code for one step."""

    def __init__(self, step: str, results: queue.Queue[NodeResult]) -> None:
        super().__init__()
        self._step = step
        self._results = results
        self._lines: dict[str, list[str]] = {}

    def ev_read(self, worker: StreamWorker, node: str, sname: str, msg: bytes) -> None:
        self._lines.setdefault(node, []).append(bytes(msg).decode(errors="replace"))

    def ev_hup(self, worker: StreamWorker, node: str, rc: int) -> None:
        message = "\n".join(self._lines.pop(node, [])) or f"exit code {rc}"
        self._results.put(NodeResult(node, rc == 0, self._step, message))

    def ev_close(self, worker: StreamWorker, timedout: bool) -> None:
        for node in worker.iter_keys_timeout() if timedout else ():
            self._results.put(NodeResult(node, False, self._step, "timed out"))


def bootstrap(nodes: NodeSet, plan: Plan, ssh: SshOptions, timeout: float = 600.0) -> Iterator[NodeResult]:
    """Copy, install and start on every node; a result per node as each finishes or fails."""
    results: queue.Queue[NodeResult] = queue.Queue()
    threading.Thread(target=_run, args=(nodes, plan, ssh, timeout, results), daemon=True).start()
    finished = 0
    while finished < len(nodes):
        result = results.get()
        if result.step == "copy" and result.ok:
            continue  # its install step follows
        finished += 1
        yield result


def _run(
    nodes: NodeSet, plan: Plan, ssh: SshOptions, timeout: float, results: queue.Queue[NodeResult]
) -> None:
    """The thread's body: one ClusterShell task, bound to this thread, runs both steps."""
    task = ssh_task(ssh, DEFAULT_FANOUT)
    copied: queue.Queue[NodeResult] = queue.Queue()
    copying = _Steps("copy", copied)
    for node in nodes:
        task.copy(str(plan.wheel), plan.remote_wheel(node), nodes=node, handler=copying, timeout=timeout)
    task.resume()
    while not copied.empty():
        result = copied.get()
        results.put(result)
        if result.ok:
            worker = task.shell(
                plan.script(result.node),
                nodes=result.node,
                handler=_Steps("install", results),
                timeout=timeout,
                stdin=True,
            )
            worker.write(plan.stdin())
            worker.set_write_eof()
    task.resume()
