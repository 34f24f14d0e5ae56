"""Where a job's tasks may go, beyond the resources they ask for: soft preferences for node
attributes (affinities), a spread over an attribute's values, ports (static ones are a
resource of the node), and colocation with other jobs and services."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shoal.expressions import parse

NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")  # of a port, or of a custom resource


class Affinity(BaseModel):
    """A soft preference: nodes matching `expr` gain (or, negative, lose) `weight` in score."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    expr: str
    weight: int = Field(50, ge=-100, le=100)

    @field_validator("expr")
    @classmethod
    def _parses(cls, value: str) -> str:
        parse(value)
        return value


class Spread(BaseModel):
    """Spread a job's tasks over the values of an attribute, with target percentages
    (values not named share what is left; none named: an even spread)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attribute: str = Field(min_length=1, max_length=64)
    targets: dict[str, float] = Field(default_factory=dict)

    @field_validator("targets")
    @classmethod
    def _percentages(cls, value: dict[str, float]) -> dict[str, float]:
        if any(v < 0 for v in value.values()) or sum(value.values()) > 100 + 1e-9:
            raise ValueError("targets are percentages: each >= 0, together <= 100")
        return value


class PortSpec(BaseModel):
    """A named port each task is given: a free one of its node's range, or `static`, the same
    number on every node (a node holds one task with that port at a time)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="the task sees it as SHOAL_PORT_<NAME>")
    static: int | None = Field(None, ge=1, le=65535)

    @field_validator("name")
    @classmethod
    def _port_name(cls, value: str) -> str:
        if not NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a port name (lowercase, digits, _)")
        return value


class Colocation(BaseModel):
    """Where a job goes relative to another job or service: nodes running tasks of it gain
    (or, negative, lose) `weight`; `hard` makes it a rule (negative: never on such a node;
    positive: only on such nodes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: str | None = Field(None, min_length=1, max_length=128, description="a job's name")
    service: str | None = Field(None, min_length=1, max_length=63, description="a service's name")
    weight: int = Field(-100, ge=-100, le=100)
    hard: bool = False

    @model_validator(mode="after")
    def _one_target(self) -> Colocation:
        if (self.job is None) == (self.service is None):
            raise ValueError("give exactly one of job or service")
        if self.weight == 0:
            raise ValueError("weight 0 says nothing: give -100..-1 to avoid, 1..100 to prefer")
        return self
