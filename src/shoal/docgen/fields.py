"""Pydantic models as reference tables: one section per place a model is used, one row per
field with its type, default, limits and description.

Types and limits come from the model's JSON schema (what the API validates against, so what
the page says is what a submission meets); defaults and descriptions from its fields.
A model nested in another gets a section of its own, named by the path to it in a spec
(`resources`, `services[]`, `services[].check`), and the rows name each field by its whole
path, so a reader (or a test) finds `services[].check.interval` by searching for it.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

Schema = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Section:
    """A model where a spec holds it: `path` is "" for the top level."""

    path: str
    model: type[BaseModel]


def sections(model: type[BaseModel], path: str = "") -> Iterator[Section]:
    """`model` at `path`, then every model its fields hold, depth first, in field order.
    A list's items are `path[]`; a table's values (`queues.NAME`) are `path.NAME`."""
    yield Section(path, model)
    for name, field in model.model_fields.items():
        for suffix, nested in _nested(field.annotation):
            yield from sections(nested, _join(path, name) + suffix)


def _nested(annotation: Any, suffix: str = "") -> Iterator[tuple[str, type[BaseModel]]]:
    """The models an annotation holds, each with how its path goes on: "" (the field
    itself), "[]" (items of a list) or ".NAME" (values of a table)."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        yield suffix, annotation
        return
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        yield from _nested(args[0], suffix)
    elif origin in (list, tuple, set, frozenset):
        for arg in args:
            yield from _nested(arg, suffix + "[]")
    elif origin is dict:
        yield from _nested(args[1], suffix + ".NAME")
    elif origin in (typing.Union, types.UnionType):
        for arg in args:
            yield from _nested(arg, suffix)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def prose(text: str) -> str:
    """`text` safe as Markdown: a `<` outside code (SHOAL_PORT_<NAME>) would open an HTML tag."""
    parts = text.split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def anchor(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def heading(section: Section, top: str) -> str:
    return f"`{section.path}`: {section.model.__name__}" if section.path else top


@dataclass(frozen=True, slots=True)
class Notes:
    """What the models do not say themselves, keyed "Model.field": descriptions of fields
    that have none, and defaults that are not fixed values (a path under the user's home)."""

    descriptions: Mapping[str, str]
    defaults: Mapping[str, str]
    env_prefix: str = ""  # settings read from the environment: SHOAL_<FIELD>


def table(section: Section, notes: Notes, links: Mapping[str, str]) -> list[str]:
    """The rows of one section: a Markdown table, one row per field. `links`: a nested
    model's path -> the anchor of its section."""
    model = section.model
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})
    env = notes.env_prefix and not section.path
    head = ["Field", *(["Environment"] if env else []), "Type", "Default", "Limits", "Description"]
    lines = [_row(head), _row(["---"] * len(head))]
    for name, field in model.model_fields.items():
        path = _join(section.path, name)
        prop = schema["properties"].get(field.alias or name, {})
        key = f"{model.__name__}.{name}"
        cells = [
            f"`{path}`",
            *([f"`{notes.env_prefix}{name.upper()}`"] if env else []),
            _kind(prop, defs),
            notes.defaults.get(key) or _default(field),
            "; ".join(_limits(prop, defs)),
            _description(field, notes.descriptions.get(key, ""), path, links),
        ]
        lines.append(_row(cells))
    return lines


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"


def _description(field: FieldInfo, note: str, path: str, links: Mapping[str, str]) -> str:
    """The field's description (else its note), and where its nested table is described."""
    text = prose(field.description or note)
    for nested in (path, f"{path}[]", f"{path}.NAME"):
        if nested in links:
            see = f"see [`{nested}`](#{links[nested]})"
            return f"{text} ({see})" if text else see
    return text


def docstring(model: type[BaseModel]) -> str:
    """A class's docstring as Markdown paragraphs (lines of a paragraph joined)."""
    text = inspect.cleandoc(model.__doc__ or "")
    return "\n\n".join(prose(" ".join(p.split())) for p in text.split("\n\n") if p.strip())


# --- types, limits and defaults ----------------------------------------------------------


def _kind(schema: Schema, defs: Schema) -> str:
    """A schema's type in words: `string`, `list of strings`, `"fifo" | "fair"`, `table`."""
    if "$ref" in schema:
        target = defs[schema["$ref"].rsplit("/", 1)[-1]]
        return _kind(target, defs) if "enum" in target else "table"
    if "enum" in schema:
        return " | ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    if "anyOf" in schema:
        kinds = [_kind(s, defs) for s in schema["anyOf"] if s.get("type") != "null"]
        return " or ".join(dict.fromkeys(kinds))
    kind = schema.get("type")
    if kind == "array":
        if "prefixItems" in schema:
            return "[" + ", ".join(_kind(s, defs) for s in schema["prefixItems"]) + "]"
        return "list of " + _plural(_kind(schema.get("items", {}), defs))
    if kind == "object":
        values = schema.get("additionalProperties")
        return "table of " + _plural(_kind(values, defs)) if isinstance(values, dict) else "table"
    if schema.get("format") == "password":
        return "string (secret)"
    return {"number": "number", "integer": "integer", "boolean": "boolean"}.get(
        kind or "", schema.get("format") or kind or "any"
    )


def _plural(kind: str) -> str:
    if kind.startswith(("list of", "table of", "[", "`")) or " or " in kind:
        return kind if not kind.startswith("`") else f"({kind})"
    return "tables" if kind == "table" else kind + "s"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _limits(schema: Schema, defs: Schema) -> list[str]:
    """What a value must meet beyond its type, in words."""
    if "anyOf" in schema:
        return [x for s in schema["anyOf"] for x in _limits(s, defs)]
    found = _range(schema)
    found += _sizes(schema, "minLength", "maxLength", "characters")
    if "prefixItems" not in schema:
        found += _sizes(schema, "minItems", "maxItems", "items")
    found += _sizes(schema, "minProperties", "maxProperties", "entries")
    if pattern := schema.get("pattern"):
        found.append(f"matches `{pattern}`")
    for inner, noun in (("items", "item"), ("additionalProperties", "value")):
        if isinstance(schema.get(inner), dict) and (limits := _limits(schema[inner], defs)):
            found.append(f"each {noun}: {', '.join(limits)}")
    return found


def _range(schema: Schema) -> list[str]:
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and high is not None:
        return [f"{_number(low)} to {_number(high)}"]
    above, below = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    lower = f"at least {_number(low)}" if low is not None else None
    lower = f"above {_number(above)}" if above is not None else lower
    upper = f"at most {_number(high)}" if high is not None else None
    upper = f"below {_number(below)}" if below is not None else upper
    return [", ".join(x for x in (lower, upper) if x)] if lower or upper else []


def _sizes(schema: Schema, low_key: str, high_key: str, unit: str) -> list[str]:
    low, high = schema.get(low_key), schema.get(high_key)
    if low is not None and high is not None:
        return [f"{low} to {high} {unit}"]
    if low is not None:
        return ["not empty"] if low == 1 else [f"at least {low} {unit}"]
    return [f"at most {high} {unit}"] if high is not None else []


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    factory: Callable[[], Any] | None = field.default_factory  # type: ignore[assignment]
    value = factory() if factory is not None else field.default
    return _value(value)


def _value(value: Any) -> str:
    if value is None or value is PydanticUndefined or isinstance(value, SecretStr):
        return "unset"
    if isinstance(value, BaseModel):
        return "see below" if not value.model_fields_set else f"`{value.model_dump_json()}`"
    if isinstance(value, dict) and any(isinstance(v, BaseModel) for v in value.values()):
        return ", ".join(f"`{k}` (see below)" for k in value)
    return f"`{json.dumps(to_jsonable_python(value))}`"
