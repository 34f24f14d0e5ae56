"""Services: what a job offers (in its spec), what registers from outside, and how the
registry shows them.

Names are DNS labels (RFC 1123), since every service is also a name under
`service.shoal`: lowercase letters, digits and hyphens, at most 63, no hyphen at either end.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from shoal.checks import CheckStatus, HealthCheck

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
MAX_TAGS = 32
MAX_META = 64
RESERVED = "shoal-"  # the prefix of the services shoal itself registers
AGENT_SERVICE = RESERVED + "agent"
MASTER_SERVICE = RESERVED + "master"
ROUTES = frozenset({"register", "deregister"})  # words of the API's paths: no registration's id


def label(value: str) -> str:
    """`value` if it is a DNS label (RFC 1123), else a ValueError saying what one is."""
    if not _LABEL.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a DNS label: 1-63 lowercase letters, digits and '-', "
            "not starting or ending with '-'"
        )
    return value


def ipv4(value: str) -> str:
    """`value` if it is an IPv4 address (DNS answers A records), else a ValueError."""
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address") from None


def _unreserved(value: str) -> str:
    if value.startswith(RESERVED):
        raise ValueError(f"names starting {RESERVED!r} are shoal's own (its masters and agents)")
    return value


def _distinct(value: list[str]) -> list[str]:
    if len(set(value)) != len(value):
        raise ValueError("tags repeat")
    return value


def _meta_sizes(value: dict[str, str]) -> dict[str, str]:
    for key, item in value.items():
        if not key or len(key) > 128 or len(item) > 512:
            raise ValueError(f"meta {key!r}: keys are 1-128 characters, values at most 512")
    return value


IPv4 = Annotated[str, AfterValidator(ipv4)]
Label = Annotated[str, AfterValidator(label)]
ServiceName = Annotated[str, AfterValidator(label), AfterValidator(_unreserved)]
Tags = Annotated[list[Label], Field(max_length=MAX_TAGS), AfterValidator(_distinct)]
Meta = Annotated[dict[str, str], Field(max_length=MAX_META), AfterValidator(_meta_sizes)]


class ServiceSpec(BaseModel):
    """A service a job's tasks offer: each running task is an endpoint, its node's address and
    the task's port `port`; it answers queries while its check passes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ServiceName = Field(description="a DNS label: NAME.service.shoal")
    port: str = Field(description="a named port of the job")
    tags: Tags = Field(default_factory=list)
    meta: Meta = Field(default_factory=dict)
    check: HealthCheck | None = Field(None, description="none: passing while the task runs")


class Registration(BaseModel):
    """A service shoal does not run, registered over the API. It stays while its TTL check is
    refreshed (`.../pass`) and is dropped when the TTL lapses."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="unique among registrations: registering it again replaces it")
    name: ServiceName = Field(description="a DNS label: NAME.service.shoal")
    address: IPv4 = Field(description="an IPv4 address")
    port: int = Field(ge=1, le=65535)
    tags: Tags = Field(default_factory=list)
    meta: Meta = Field(default_factory=dict)
    ttl: float = Field(30.0, ge=1, le=86_400, description="seconds it stays without a pass")

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _ID.fullmatch(value):
            raise ValueError("1-128 letters, digits and '._:-', starting with a letter or digit")
        if value in ROUTES:
            raise ValueError(f"{value!r} is a word of the API's paths; choose another id")
        return value


class RegistrationRecord(BaseModel):
    """A registration as stored: who made it (only they or an admin may remove it), and what
    its TTL check last said (when the TTL runs out is not stored: a restarted master gives
    every registration its whole TTL again)."""

    owner: str
    spec: Registration
    status: CheckStatus = CheckStatus.PASSING  # a service registering itself is up
    output: str = "registered"
    since: float = 0.0


EndpointKind = Literal["task", "external", "agent", "master"]


class Endpoint(BaseModel):
    """One place a service answers, with what its check last said."""

    model_config = ConfigDict(frozen=True)

    id: str  # a task's: "TASK_ID/SERVICE"; a registration's: its id; a node's: its name
    service: str
    kind: EndpointKind
    address: str
    port: int
    node: str | None = None
    tags: tuple[str, ...] = ()
    meta: dict[str, str] = Field(default_factory=dict)
    status: CheckStatus = CheckStatus.PASSING
    output: str = ""
    since: float = 0.0
    task_id: str | None = None


class ServiceSummary(BaseModel):
    """A service as `GET /v1/services` lists it."""

    name: str
    tags: list[str]
    passing: int = 0
    warning: int = 0
    critical: int = 0
