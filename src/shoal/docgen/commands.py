"""The `shoal` command tree as reference sections: each command and subcommand with its help,
its usage and a row per argument and option.

The tree is read as `shoal --help` reads it: the top-level names from the lazy group's
table (`shoal.cli.COMMANDS`), each command loaded as Typer builds it, subcommands from its
group. Options are described through click's own `get_help_record`, so the page says what
`--help` says (names, metavar, help, default, range, environment variable); hidden
commands and options are left out, as `--help` leaves them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from shoal.docgen.fields import anchor, prose


@dataclass(frozen=True, slots=True)
class Command:
    path: str  # "shoal token create"
    command: Any  # a click (Typer) command or group
    context: Any  # its click context, its parents' above it

    @property
    def subcommands(self) -> list[str]:
        lister = getattr(self.command, "list_commands", None)
        return [] if lister is None else list(lister(self.context))


def tree() -> Iterator[Command]:
    """Every command under `shoal`, each followed by its subcommands, as `--help` lists them."""
    import typer

    from shoal.cli import app, load

    root = typer.main.get_command(app)
    context = root.context_class(root, info_name="shoal")
    yield Command("shoal", root, context)
    for name in root.list_commands(context):
        yield from _under(load(name), f"shoal {name}", context)


def _under(command: Any, path: str, parent: Any) -> Iterator[Command]:
    if getattr(command, "hidden", False):
        return
    context = command.context_class(command, info_name=path.rsplit(" ", 1)[-1], parent=parent)
    node = Command(path, command, context)
    yield node
    for name in node.subcommands:
        yield from _under(command.get_command(context, name), f"{path} {name}", context)


def options(node: Command) -> Iterator[tuple[str, str, str]]:
    """(names with metavar, help, extras such as default and range) of each parameter shown."""
    for param in node.command.params:
        record = param.get_help_record(node.context)
        if record is None:  # hidden, or --help itself
            continue
        names, text = record
        help_text, extras = _split_extras(text)
        yield names, help_text, extras


def _split_extras(text: str) -> tuple[str, str]:
    """click appends `  [default: 3; 1<=x<=64]` to an option's help: kept apart."""
    found = re.fullmatch(r"(.*?)\s*\[([^\[\]]*(?:default|required|env var|<=|>=|<|>)[^\[\]]*)\]", text, re.S)
    if found is None:
        return text.strip(), ""
    return found.group(1).strip(), found.group(2).strip()


def usage(node: Command) -> str:
    """The command line, as `--help` gives it."""
    pieces = node.command.collect_usage_pieces(node.context)
    return " ".join([node.path, *pieces])


def paragraphs(text: str | None) -> str:
    """A command's help as Markdown paragraphs: each paragraph's lines joined."""
    if not text:
        return ""
    text = text.replace("\b\n", "")  # click's marker for a paragraph not to rewrap
    parts = re.split(r"\n\s*\n", text.strip())
    return "\n\n".join(prose(" ".join(p.split())) for p in parts if p.strip())


def summary(node: Command) -> str:
    """The first paragraph of a command's help, as the command list gives it."""
    return paragraphs(node.command.help).split("\n\n", 1)[0]


def page(head: list[str]) -> list[str]:
    """The whole CLI reference under `head`: a table of commands, then a section for each."""
    nodes = list(tree())
    lines = [*head, "", "| Command | What it does |", "| --- | --- |"]
    for node in nodes[1:]:
        link = f"[`{node.path}`](#{anchor(node.path)})"
        lines.append(f"| {link} | {_cell(summary(node))} |")
    for node in nodes[1:]:
        lines += ["", f"## {node.path}", "", paragraphs(node.command.help), ""]
        lines += ["```", usage(node), "```"]
        if subs := node.subcommands:
            lines += [
                "",
                "Subcommands: " + ", ".join(f"[`{s}`](#{anchor(f'{node.path} {s}')})" for s in subs),
            ]
        rows = list(options(node))
        if rows:
            lines += ["", "| Argument or option | Description | Default, limits |", "| --- | --- | --- |"]
            lines += [f"| `{_cell(n)}` | {_cell(prose(h))} | {_cell(prose(x))} |" for n, h, x in rows]
    return [*lines, ""]


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")
