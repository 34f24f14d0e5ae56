"""Two-level scheduling: write a framework that is offered resources and places its own tasks.

See `shoal.framework.driver` for the SDK and `shoal.framework.protocol` for the wire API.
The driver is loaded on first use: the master reads the protocol's models, and must not
bring in the SDK's HTTP client and event loop with them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shoal.framework.protocol import OfferInfo, TaskLaunch, TaskStatus

if TYPE_CHECKING:
    from shoal.framework.driver import AsyncDriver, Driver, Scheduler

__all__ = ["AsyncDriver", "Driver", "OfferInfo", "Scheduler", "TaskLaunch", "TaskStatus"]

_DRIVER = frozenset({"AsyncDriver", "Driver", "Scheduler"})


def __getattr__(name: str) -> Any:
    if name in _DRIVER:
        from shoal.framework import driver

        return getattr(driver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
