"""The suite starts a few hundred Python processes (masters, agents, `shoal` commands), each
importing shoal afresh. Where Python is told to write no bytecode (PYTHONDONTWRITEBYTECODE),
each of them would compile shoal's modules from source again: they are compiled once here,
before the first test, and every process reads them (the variable stops writes, not reads).
For the same reason pytest may keep the test modules it rewrites for their asserts, as it
does by default: a second run reads them rather than rewriting every module again."""

from __future__ import annotations

import compileall
import sys
from pathlib import Path

import pytest

import shoal

sys.dont_write_bytecode = False  # before the test modules are collected and rewritten


def pytest_sessionstart(session: pytest.Session) -> None:
    compileall.compile_dir(Path(shoal.__file__).parent, quiet=2)
