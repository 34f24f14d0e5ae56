"""The `shoal` command and the client start without the server stacks or numpy.

Each check runs in a fresh interpreter: this test process has imported them already.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from shoal.cli import COMMANDS, app, load

HEAVY = ("numpy", "fastapi", "uvicorn", "starlette")
CLIENT_COMMANDS = (
    "run",
    "jobs",
    "job",
    "logs",
    "kill",
    "history",
    "nodes",
    "submit",
    "token",
    "services",
    "service",
)
# Prints the top-level packages imported; an entry of None is an import refused on purpose.
REPORT = "import json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m, v in sys.modules.items() if v})))"


def imported_after(code: str) -> set[str]:
    """The top-level packages a fresh interpreter holds after running `code`."""
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\n{REPORT}"], capture_output=True, text=True, check=True
    )
    return set(json.loads(result.stdout.splitlines()[-1]))


@pytest.mark.parametrize(
    "code",
    [
        "import shoal.cli",
        "import shoal.client",
        f"from shoal.cli import load\nfor name in {CLIENT_COMMANDS}:\n    load(name)",
    ],
    ids=["cli", "client", "client-commands"],
)
def test_the_client_path_imports_no_server_stack_or_numpy(code: str) -> None:
    # cryptography neither: a client trusts the cluster CA through the ssl module alone.
    assert imported_after(code).isdisjoint({*HEAVY, "cryptography"})


def test_help_imports_no_subcommand_and_no_client() -> None:
    loaded = imported_after(
        "import contextlib\nfrom shoal.cli import app\n"
        "with contextlib.suppress(SystemExit):\n    app(['--help'])"
    )
    assert {"httpx", "pydantic", "numpy"}.isdisjoint(loaded)


def test_an_agent_starts_without_the_http_client_rich_or_numpy() -> None:
    loaded = imported_after("from shoal.cli import load\nload('agent')\nimport shoal.agent.server")
    assert {"httpx", "rich", *HEAVY}.isdisjoint(loaded)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_listed_summary_is_its_commands_own_help(name: str) -> None:
    command = load(name)
    own = " ".join((command.help or "").split("\n\n")[0].split())
    assert COMMANDS[name].summary == own


def test_a_listed_command_parses_and_helps_as_itself() -> None:
    runner = CliRunner()
    jobs = runner.invoke(app, ["jobs", "--help"])
    assert jobs.exit_code == 0 and "--json" in jobs.output
    create = runner.invoke(app, ["token", "create", "--help"])
    assert create.exit_code == 0 and "--framework-role" in create.output
    wrong = runner.invoke(app, ["job", "not-a-number"])
    assert wrong.exit_code == 2
