"""The layers hold: pure modules reach no I/O, the master's modules form no import cycle,
and the domain types know nothing of the decisions made with them.

Imports are read from the source (AST), never executed, and followed through shoal's own
modules: a pure module that imports a shoal module that imports httpx is not pure. Python
runs every package's `__init__` on the way to a submodule, so those count as imported too.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import shoal

ROOT = Path(shoal.__file__).parent
FORBIDDEN = frozenset(
    {
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
        "fastapi",
        "starlette",
        "uvicorn",
    }
)
# Pure beyond the glob of core/ and every state.py: the ledger, its desks, the event types,
# the domain types and the constraint expressions.
NAMED_PURE = (
    "master/ledger.py",
    "master/frameworks.py",
    "master/moves.py",
    "master/events.py",
    "master/shapes.py",
    "master/book.py",
    "master/outbox.py",
    "master/views.py",
    "master/offer_lines.py",
    "master/buckets.py",
    "master/listings.py",
    "master/history.py",
    "master/stream.py",
    "master/run_as.py",
    "model.py",
    "expressions.py",
)


@dataclass(frozen=True, slots=True)
class Import:
    module: str  # absolute, dotted: "shoal.core.plan", "numpy"
    typing_only: bool  # under `if TYPE_CHECKING:`, never run


def pure_modules() -> list[Path]:
    named = [ROOT / name for name in NAMED_PURE]
    return sorted({*ROOT.glob("core/**/*.py"), *ROOT.glob("**/state.py"), *named})


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_of(module: str) -> Path | None:
    """The file of a shoal module or package; None for anything else."""
    if module.split(".")[0] != "shoal":
        return None
    base = ROOT.parent.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _lazy_attribute(node: ast.AST) -> bool:
    """A module's `__getattr__` (PEP 562): what it imports loads when someone asks the module
    for that name, never as a side effect of importing the module."""
    return isinstance(node, ast.FunctionDef) and node.name == "__getattr__"


def _statements(body: Iterable[ast.AST], typing_only: bool) -> Iterator[tuple[ast.AST, bool]]:
    """Every node under `body`, with whether it sits in an `if TYPE_CHECKING:` block."""
    for node in body:
        if _lazy_attribute(node):
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _statements(node.body, True)
            yield from _statements(node.orelse, typing_only)
            continue
        yield node, typing_only
        yield from _statements(ast.iter_child_nodes(node), typing_only)


def _absolute(node: ast.ImportFrom, path: Path) -> str:
    if node.level == 0:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


@cache
def imports(path: Path) -> tuple[Import, ...]:
    """What `path` imports, anywhere in it (function bodies included: they run when called)."""
    found: list[Import] = []
    for node, typing_only in _statements(ast.parse(path.read_text()).body, False):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, typing_only) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, path)
            # `from shoal.core import preemption` names the module shoal.core.preemption;
            # `from shoal.core.plan import Plan` names shoal.core.plan
            submodules = [f"{module}.{a.name}" for a in node.names if source_of(f"{module}.{a.name}")]
            named = [module] if len(submodules) < len(node.names) else []
            found += [Import(m, typing_only) for m in named + submodules]
    return tuple(found)


def _with_packages(module: str) -> list[str]:
    """`module` and every package Python runs on the way to it."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def runtime_edges(module: str) -> list[str]:
    """The shoal modules that importing `module` runs, one step away."""
    path = source_of(module)
    if path is None:
        return []
    reached = {m for i in imports(path) if not i.typing_only for m in _with_packages(i.module)}
    return sorted(m for m in reached if m != module and source_of(m) is not None)


def all_edges(module: str) -> list[str]:
    """The shoal modules `module` names, type-only imports included, packages not."""
    path = source_of(module)
    if path is None:
        return []
    return sorted({i.module for i in imports(path) if source_of(i.module) is not None} - {module})


def reached_from(start: str, edges: Callable[[str], list[str]]) -> dict[str, str | None]:
    """Every module reachable from `start`, each with the module it was first reached from."""
    parent: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for nxt in edges(module):
            if nxt not in parent:
                parent[nxt] = module
                queue.append(nxt)
    return parent


def chain(parent: dict[str, str | None], module: str) -> str:
    steps = [module]
    while (before := parent[steps[-1]]) is not None:
        steps.append(before)
    return " -> ".join(reversed(steps))


def io_reached(path: Path) -> list[str]:
    """How `path` reaches a forbidden module, one line per offence; empty when pure."""
    parent = reached_from(module_name(path), runtime_edges)
    offences = []
    for module, path in ((m, source_of(m)) for m in parent):
        assert path is not None  # the walk reaches shoal's own modules only
        direct = {i.module.split(".")[0] for i in imports(path) if not i.typing_only}
        offences += [f"{chain(parent, module)} imports {name}" for name in sorted(direct & FORBIDDEN)]
    return offences


def cycles(modules: Iterable[str]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for nxt in all_edges(module):
            if nxt not in index:
                visit(nxt)
                low[module] = min(low[module], low[nxt])
            elif nxt in stack:
                low[module] = min(low[module], index[nxt])
        if low[module] == index[module]:
            component = []
            while (top := stack.pop()) != module:
                component.append(top)
            component.append(module)
            if len(component) > 1:
                found.append(sorted(component))

    for module in modules:
        if module not in index:
            visit(module)
    return found


def every_module() -> list[str]:
    return sorted(module_name(p) for p in ROOT.rglob("*.py"))


def test_there_are_pure_modules_to_check() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in pure_modules()}
    assert {"core/scheduler.py", "master/state.py", "agent/state.py", *NAMED_PURE} <= names
    missing = sorted(p.relative_to(ROOT).as_posix() for p in pure_modules() if not p.is_file())
    assert missing == []


def test_the_import_walk_sees_what_python_runs() -> None:
    # from shoal.core import preemption: the submodule; shoal.core.plan: its packages too
    assert "shoal.core.preemption" in runtime_edges("shoal.core.scheduler")
    assert {"shoal", "shoal.core", "shoal.core.plan"} <= set(runtime_edges("shoal.core.fairness"))
    assert "shoal.client" in runtime_edges("shoal.framework.driver")
    # the framework package loads its driver on first use only (PEP 562)
    assert "shoal.framework.driver" not in runtime_edges("shoal.framework")
    typed = [i for i in imports(ROOT / "config.py") if i.typing_only]
    assert {"shoal.core.scheduler", "shoal.master.moves"} <= {i.module for i in typed}
    assert "shoal.master.moves" in all_edges("shoal.config")


def test_pure_modules_reach_no_io() -> None:
    offenders = {
        p.relative_to(ROOT).as_posix(): offences for p in pure_modules() if (offences := io_reached(p))
    }
    assert offenders == {}


def test_no_import_cycle_through_the_master() -> None:
    # Type-only imports count: a desk names the ledger's API, never MasterState.
    through_master = [c for c in cycles(every_module()) if any(m.startswith("shoal.master") for m in c)]
    assert through_master == []


def test_model_knows_nothing_of_the_core() -> None:
    parent = reached_from("shoal.model", all_edges)
    assert [chain(parent, m) for m in parent if m.startswith("shoal.core")] == []
