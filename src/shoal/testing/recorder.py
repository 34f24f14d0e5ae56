"""A framework scheduler for tests: it keeps what it hears, and lets a test decide offers."""

from __future__ import annotations

import threading
from collections.abc import Callable

from shoal.framework import Driver, OfferInfo, Scheduler, TaskStatus
from shoal.model import TaskState


class Recorder(Scheduler):
    """Keeps what it hears; `on_offers` decides what to do with offers."""

    def __init__(self, on_offers: Callable[[Driver, list[OfferInfo]], None] | None = None) -> None:
        self.on_offers = on_offers
        self.offers: list[OfferInfo] = []
        self.rescinded: list[str] = []
        self.updates: list[TaskStatus] = []
        self.subscriptions = 0
        self.lock = threading.Lock()

    def registered(self, driver: Driver, framework_id: str) -> None:
        with self.lock:
            self.subscriptions += 1

    def resource_offers(self, driver: Driver, offers: list[OfferInfo]) -> None:
        with self.lock:
            self.offers.extend(offers)
        if self.on_offers is not None:
            self.on_offers(driver, offers)

    def offer_rescinded(self, driver: Driver, offer_id: str) -> None:
        with self.lock:
            self.rescinded.append(offer_id)

    def outstanding(self) -> list[OfferInfo]:
        """The offers heard of and not rescinded (used ones included), newest last."""
        with self.lock:
            return [o for o in self.offers if o.id not in self.rescinded]

    def status_update(self, driver: Driver, status: TaskStatus) -> None:
        with self.lock:
            self.updates.append(status)

    def states(self, task: str) -> list[TaskState]:
        with self.lock:
            return [u.state for u in self.updates if u.task == task]

    def finished_any(self) -> bool:
        with self.lock:
            return any(u.state is TaskState.FINISHED for u in self.updates)
