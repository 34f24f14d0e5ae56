"""Health checks: how to tell that a task serves, and what a check last said.

A task may have its own check (the job's `health`, which make-before-break moves wait on)
and one per service it offers. The agent runs them; each result goes to the master with
the run's state, keyed by the check's name: `TASK_CHECK` for the task's own, the service's
name otherwise.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

TASK_CHECK = ""  # the key of the job's own check (service names are never empty)
OUTPUT_LIMIT = 512  # characters of a check's output kept


class HealthCheck(BaseModel):
    """How to tell that a task serves: exactly one of a command (exit 0), a TCP connect, or an
    HTTP GET (2xx or 3xx; 429 is a warning) to one of the task's named ports on its node.

    A verdict changes only after enough checks in a row say the new status, so a flapping
    task does not flap its endpoints (Consul's names): `successes_before_passing` to pass,
    `failures_before_critical` for any change away from passing (to warning or critical) or
    between warning and critical. Only passing endpoints answer, so a warning is damped as a
    failure is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: str | None = Field(None, min_length=1, description="run with the task's environment")
    tcp: str | None = Field(None, description="a named port of the task")
    http: str | None = Field(None, description="PORT_NAME/path, e.g. web/healthz")
    interval: float = Field(1.0, ge=0.05, le=3600, description="seconds between checks")
    timeout: float = Field(2.0, ge=0.05, le=600, description="seconds a check may take")
    failures_before_critical: int = Field(
        1, ge=1, le=100, description="checks in a row to turn warning or critical"
    )
    successes_before_passing: int = Field(1, ge=1, le=100, description="passed checks in a row to pass")

    @model_validator(mode="after")
    def _one_kind(self) -> HealthCheck:
        if sum(x is not None for x in (self.command, self.tcp, self.http)) != 1:
            raise ValueError("give exactly one of command, tcp or http")
        return self

    @property
    def port(self) -> str | None:
        """The named port the check uses, if any."""
        return self.tcp or (self.http.split("/", 1)[0] if self.http else None)


class CheckStatus(str, enum.Enum):
    PASSING = "passing"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(slots=True)
class CheckResult:
    """A check's verdict (after damping), the output of the check that decided it, and since
    when it has said so."""

    status: CheckStatus
    output: str = ""
    since: float = 0.0


def serves(names: Collection[str], checks: Mapping[str, CheckResult]) -> bool | None:
    """Whether a run with the checks `names` serves, as a make-before-break move judges it:
    every one of them passes, its own and its services' (a new copy that took over with a
    service check still failing would leave that service without the old copy's endpoint).
    None: it has no check."""
    if not names:
        return None
    return all(n in checks and checks[n].status is CheckStatus.PASSING for n in names)
