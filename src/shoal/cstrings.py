"""Strings a task's process is given as C strings: its arguments, variables and working
directory, which end at the first NUL byte. One holding a NUL could not be given to any
process, so a spec is refused with it at once, naming the field, not failed later on each
node it is placed on.

A record stored before the rule (validated with the context `{"stored": True}`) loads as it
was accepted: its agents refuse its runs, saying why.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from pydantic import AfterValidator, ValidationInfo

Text = TypeVar("Text", str, list[str])


def nul_free(value: Text, info: ValidationInfo) -> Text:
    """`value`, a string or a command's arguments, unless one holds a NUL byte."""
    if (info.context or {}).get("stored"):
        return value
    for i, text in enumerate([value] if isinstance(value, str) else value):
        if "\0" in text:
            where = "" if isinstance(value, str) else f"argument {i} "
            raise ValueError(f"{where}holds a NUL byte, which no process can be given")
    return value


CString = Annotated[str, AfterValidator(nul_free)]
