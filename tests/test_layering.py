"""Pure modules stay pure: no asyncio, sockets, subprocesses, clocks or unseeded randomness."""

from __future__ import annotations

import ast
from pathlib import Path

import shoal

ROOT = Path(shoal.__file__).parent
FORBIDDEN = {
    "asyncio",
    "socket",
    "subprocess",
    "time",
    "random",
    "os",
    "threading",
    "httpx",
    "websockets",
    "sqlite3",
}


def pure_modules() -> list[Path]:
    return sorted([*ROOT.glob("core/**/*.py"), *ROOT.glob("**/state.py")])


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_there_are_pure_modules_to_check() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in pure_modules()}
    assert {"core/scheduler.py", "master/state.py", "agent/state.py"} <= names


def test_pure_modules_import_no_io() -> None:
    offenders = {
        p.relative_to(ROOT).as_posix(): sorted(imported(p) & FORBIDDEN)
        for p in pure_modules()
        if imported(p) & FORBIDDEN
    }
    assert offenders == {}
