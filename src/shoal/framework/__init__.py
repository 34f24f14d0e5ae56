"""Two-level scheduling: write a framework that is offered resources and places its own tasks.

See `shoal.framework.driver` for the SDK and `shoal.framework.protocol` for the wire API.
"""

from shoal.framework.driver import AsyncDriver, Driver, Scheduler
from shoal.framework.protocol import OfferInfo, TaskLaunch, TaskStatus

__all__ = ["AsyncDriver", "Driver", "OfferInfo", "Scheduler", "TaskLaunch", "TaskStatus"]
