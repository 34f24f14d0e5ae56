"""The reference pages under docs/reference are what the code makes of itself now.

Each page is made again in memory (`shoal.docgen`) and compared with the file committed; a
command, option, spec field or setting added, changed or removed without running the
generator fails here, and the message says the one command that brings the pages up to
date. Apart from that comparison, the command tree and the job spec's models are walked
here on their own, so a page that leaves something out fails even when the generator and
the committed file agree.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from shoal import docgen
from shoal.cli import COMMANDS, load
from shoal.model import JobSpec

DOCS = Path(__file__).resolve().parents[1] / "docs"
REGENERATE = f"run `{docgen.REGENERATE}` and commit docs/reference"


def committed(page: str) -> str:
    path = DOCS / page
    assert path.exists(), f"{page} is missing: {REGENERATE}"
    return path.read_text()


@pytest.mark.parametrize("page", list(docgen.PAGES))
def test_each_reference_page_is_what_the_code_makes_now(page: str) -> None:
    made = docgen.PAGES[page]()
    have = committed(page)
    if have != made:
        diff = difflib.unified_diff(
            have.splitlines(), made.splitlines(), "committed", "made now", lineterm=""
        )
        shown = "\n".join(list(diff)[:40])
        pytest.fail(f"docs/{page} is stale: {REGENERATE}\n{shown}", pytrace=False)


def _commands() -> list[tuple[str, typing.Any, typing.Any]]:
    """Every command and subcommand shown (path, command, context), walked here apart from
    the generator."""
    found: list[tuple[str, typing.Any, typing.Any]] = []

    def walk(command: typing.Any, path: str, parent: typing.Any) -> None:
        if command.hidden:
            return
        context = command.context_class(command, info_name=path.rsplit(" ", 1)[-1], parent=parent)
        found.append((path, command, context))
        for name in getattr(command, "list_commands", lambda _: [])(context):
            walk(command.get_command(context, name), f"{path} {name}", context)

    for name in COMMANDS:
        walk(load(name), f"shoal {name}", None)
    return found


def _section(page: str, heading: str) -> str:
    """The text of the `## heading` section of a page, up to the next one."""
    marker = f"\n## {heading}\n"
    assert marker in page, f"{heading} is not in docs/reference/cli.md: {REGENERATE}"
    return page.split(marker, 1)[1].split("\n## ", 1)[0]


def test_every_command_and_option_is_in_the_cli_reference() -> None:
    page = committed("reference/cli.md")
    missing = []
    for path, command, context in _commands():
        if f"\n## {path}\n" not in page:
            missing.append(path)
            continue
        section = _section(page, path)
        for param in command.params:
            record = param.get_help_record(context)  # None: hidden, as from --help
            if record is None:
                continue
            names = record[0].replace("|", "\\|")  # as a table's cell has it: <admin\|user\|reader>
            if f"`{names}`" not in section:
                missing.append(f"{path} {record[0]}")
    assert not missing, f"not in docs/reference/cli.md: {', '.join(missing)}; {REGENERATE}"


def _models(annotation: typing.Any) -> list[tuple[str, type[BaseModel]]]:
    """The models an annotation holds, with "[]" for those inside a list."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [("", annotation)]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _models(args[0])
    inner = "[]" if origin in (list, tuple) else ""
    if origin in (list, tuple, typing.Union, types.UnionType):
        return [(inner + suffix, m) for arg in args for suffix, m in _models(arg)]
    return []


def _field_paths(model: type[BaseModel], path: str = "") -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        here = f"{path}.{name}" if path else name
        paths.append(here)
        for suffix, nested in _models(field.annotation):
            paths += _field_paths(nested, here + suffix)
    return paths


def test_every_job_spec_field_is_in_the_job_spec_reference() -> None:
    page = committed("reference/jobspec.md")
    paths = _field_paths(JobSpec)
    assert "services[].check.interval" in paths and "resources.cpus" in paths  # the walk reaches down
    missing = [p for p in paths if f"| `{p}` |" not in page]
    assert not missing, f"not in docs/reference/jobspec.md: {', '.join(missing)}; {REGENERATE}"


def test_check_names_the_stale_pages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert docgen.main(["--docs", str(tmp_path), "--check"]) == 1
    assert docgen.REGENERATE in capsys.readouterr().out
    assert docgen.main(["--docs", str(tmp_path)]) == 0
    assert docgen.main(["--docs", str(tmp_path), "--check"]) == 0
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.md")) == sorted(docgen.PAGES)


@pytest.mark.parametrize("name", ["master", "agent"])
def test_the_example_settings_files_load(name: str) -> None:
    # docs/ops/*.toml are copied to machines as they are: they must stay valid settings.
    from shoal.config import AgentSettings, MasterSettings, load_settings

    model = {"master": MasterSettings, "agent": AgentSettings}[name]
    load_settings(model, DOCS / "ops" / f"{name}.toml")
