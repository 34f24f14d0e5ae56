"""Which Unix user a job's tasks run as: the master decides on submission. Pure.

The master's settings map API principals (token names) to the users they may run as,
`run_as = {alice = ["alice"], ci = ["build", "test"]}`, the first being the principal's
default. Admins may name any user: whether root may run is each agent's to say
(`allow_root`), as is whether the user exists there. A job that names no user, from a
principal with no mapping, is left without one and runs as each agent's `task_user`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from shoal.errors import SpecError
from shoal.framework.protocol import Accept
from shoal.model import JobSpec

RunAs = Mapping[str, Sequence[str]]


def resolve_user(
    run_as: RunAs, principal: str, admin: bool, asked: str | None, field: str = "user"
) -> str | None:
    """The user a job `principal` submits runs as, given the user it `asked` for (None:
    none); SpecError (403, naming `field`) when the principal may not run as it."""
    allowed = run_as.get(principal, ())
    if asked is None:
        return allowed[0] if allowed else None
    if admin or asked in allowed:
        return asked
    if allowed:
        reason = (
            f"{principal} may run tasks as {', '.join(allowed)}, not {asked}: name one of those, "
            f"or leave user out to run as {allowed[0]}"
        )
    else:
        reason = (
            f"{principal} may not choose the user its tasks run as (the master's run_as maps it to "
            "none): leave user out, or ask an admin to add it to run_as"
        )
    raise SpecError(field, reason, status=403)


def job_as(spec: JobSpec, run_as: RunAs, principal: str, admin: bool) -> JobSpec:
    """`spec` with the user its tasks run as filled in (see `resolve_user`)."""
    user = resolve_user(run_as, principal, admin, spec.user)
    return spec if user == spec.user else spec.model_copy(update={"user": user})


def accept_as(call: Accept, run_as: RunAs, principal: str, admin: bool) -> Accept:
    """A framework's ACCEPT with the user of each task filled in, for the framework's
    `principal`; `admin`: whether the caller is an admin's."""
    tasks = [
        launch.model_copy(
            update={"user": resolve_user(run_as, principal, admin, launch.user, f"tasks.{i}.user")}
        )
        for i, launch in enumerate(call.tasks)
    ]
    return call.model_copy(update={"tasks": tasks})
