"""Who a run runs as on this node: the Unix user its task names, else the agent's
`task_user`, else the agent's own user; root only where the agent allows it.

Becoming another user takes `setpriv` (util-linux): the agent, as root, starts a process
that sets its uid, gid and supplementary groups and then executes the command, so what
needs root (joining the run's cgroups, recording its exit) is done before and after by a
process that keeps it.

No variable of a run reaches a process that keeps root: one such as LD_PRELOAD, BASH_ENV or
a shell function would run the user's code in it. The processes on root's side get
`ROOT_ENV` alone; the run's variables cross the change of user as arguments of `env -i`,
which the new user's process executes: they are in no environment before it.
"""

from __future__ import annotations

import os
import pwd
import shutil
from dataclasses import dataclass

LOGIN_PATH = "/usr/local/bin:/usr/bin:/bin"  # as login.defs gives users
ROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}  # all the agent's root-side processes see
_ENV = shutil.which("env", path=ROOT_ENV["PATH"]) or "/usr/bin/env"
_SETPRIV = shutil.which("setpriv")


class UserRefused(PermissionError):
    """A run may not run here as the user it would (unknown here, root not allowed, ...)."""


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary, the primary included
    home: str

    @property
    def switches(self) -> bool:
        """Whether running as it takes a change of user from the agent's."""
        return self.uid != os.geteuid()

    def env(self) -> dict[str, str]:
        """The variables a login as this user would have: not the agent's PATH, whose
        directories may be root's own (a job may set its PATH in its env)."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name, "PATH": LOGIN_PATH}


def lookup(name: str) -> Identity:
    """The user `name` of this node; UserRefused when it has none."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise UserRefused(f"there is no user {name} on this node") from None
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return Identity(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)


def owner(uid: int) -> Identity:
    """The user of this node whose uid is `uid`; UserRefused when it has none."""
    if uid == os.geteuid():
        return own()
    try:
        return lookup(pwd.getpwuid(uid).pw_name)
    except KeyError:
        raise UserRefused(f"there is no user with uid {uid} on this node") from None


def own() -> Identity:
    """The agent's own user (a uid without a name, as in some containers, goes by its number)."""
    uid = os.geteuid()
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return Identity(str(uid), uid, os.getegid(), tuple(os.getgroups()), os.environ.get("HOME", "/"))
    return Identity(entry.pw_name, uid, entry.pw_gid, tuple(os.getgroups()), entry.pw_dir)


class Users:
    """The rules of one agent: `task_user` for runs that name none (None: the agent's own),
    and whether anything may run as root."""

    def __init__(self, task_user: str | None, allow_root: bool) -> None:
        self.task_user = task_user
        self.allow_root = allow_root
        self._setpriv = _SETPRIV

    def of_run(self, asked: str | None) -> Identity:
        """Who a run that names the user `asked` (None: none) runs as; UserRefused, saying
        why and what to change, when it may not run here."""
        name = asked or self.task_user
        who = lookup(name) if name is not None else own()
        if who.uid == 0 and not self.allow_root:
            if name is None:
                raise UserRefused(
                    "it names no user and this agent runs as root, which it does not allow tasks "
                    "(allow_root is off): name a user in the job, or set the agent's task_user"
                )
            raise UserRefused(
                f"it would run as {name} (uid 0), and this agent does not run tasks as root "
                "(allow_root is off): name another user"
            )
        self.may_become(who)
        return who

    def may_become(self, who: Identity) -> None:
        """UserRefused when this agent cannot start processes as `who`."""
        if not who.switches:
            return
        if os.geteuid() != 0:
            raise UserRefused(
                f"this agent runs as {own().name}, not root: it cannot start tasks as {who.name}"
            )
        if self._setpriv is None:
            raise UserRefused(
                f"setpriv (util-linux) is not installed on this node: it cannot run as {who.name}"
            )

    def become(self, who: Identity) -> list[str]:
        """The words that put before a command run it as `who` (none: it runs as the agent)."""
        self.may_become(who)
        return become(who)

    def shell(self, who: Identity, env: dict[str, str], script: str, *args: str) -> list[str]:
        """The argv that runs `sh -c script args` as `who` with the variables `env` and no
        others; started with `ROOT_ENV`, it hands none of `env` to a process of root's. The
        variables take as much room as arguments as in an environment: the kernel counts both
        against the same limit (ARG_MAX), and each string against 128 KiB."""
        # After `--` every NAME=VALUE is a variable, a name such as "-u" too; /bin/sh, with no
        # "=", is the command.
        assignments = [f"{name}={value}" for name, value in env.items()]
        return [*self.become(who), _ENV, "-i", "--", *assignments, "/bin/sh", "-c", script, *args]


def become(who: Identity) -> list[str]:
    """The words that put before a command run it as `who` (none: it runs as the agent);
    UserRefused when this agent cannot."""
    if not who.switches:
        return []
    if os.geteuid() != 0 or _SETPRIV is None:
        raise UserRefused(f"this agent cannot start processes as {who.name} (it needs root and setpriv)")
    groups = ",".join(map(str, who.groups))
    return [_SETPRIV, f"--reuid={who.uid}", f"--regid={who.gid}", f"--groups={groups}", "--"]
