"""A service keeper as a shoal framework (a tiny Marathon): K replicas of a command, alive.

    python examples/keeper.py --replicas 3 --command 'python -m http.server $SHOAL_PORT_HTTP' --port http

It launches replicas on offers (at most `--per-node` on a node, so one lost machine costs
few of them), and whenever a replica ends, fails or is lost with its node, launches another.
It suppresses offers while all replicas run. It fails over: started again with the
framework id it printed (`--framework-id`), within its failover timeout, it reconciles and
takes up the replicas still running instead of starting new ones. Ctrl-C tears it down.
"""

from __future__ import annotations

import argparse
import logging

from shoal.client import ApiError
from shoal.framework import Driver, OfferInfo, Scheduler, TaskLaunch, TaskStatus
from shoal.model import Resources

log = logging.getLogger("keeper")


class Keeper(Scheduler):
    def __init__(self, replicas: int, command: str, ask: Resources, ports: list[str], per_node: int) -> None:
        self.want = replicas
        self.command = command
        self.ask = ask
        self.ports = ports
        self.per_node = per_node
        self.live: dict[str, str | None] = {}  # replica name -> its node
        self.serial = 0  # of the next replica's name
        self.suppressed = False

    def registered(self, driver: Driver, framework_id: str) -> None:
        log.info("framework %s: keeping %d replicas", framework_id, self.want)
        driver.reconcile()  # after a failover: which replicas still run?

    def resource_offers(self, driver: Driver, offers: list[OfferInfo]) -> None:
        for offer in offers:
            batch = self._fill(offer)
            if not batch:
                driver.decline([offer.id], refuse_seconds=2.0)
                continue
            try:
                driver.launch([offer.id], batch)
            except ApiError as e:
                log.warning("launch refused (%s); trying on the next offers", e)
                for task in batch:
                    self.live.pop(task.name, None)
        self._steer(driver)

    def _fill(self, offer: OfferInfo) -> list[TaskLaunch]:
        batch = []
        room = offer.resources
        here = sum(1 for node in self.live.values() if node == offer.node)
        while len(self.live) < self.want and here < self.per_node and self.ask.shortfall(room) is None:
            name = f"replica-{self.serial}"
            self.serial += 1
            self.live[name] = offer.node
            batch.append(TaskLaunch(name=name, command=self.command, resources=self.ask, ports=self.ports))
            room = room - self.ask
            here += 1
        return batch

    def status_update(self, driver: Driver, status: TaskStatus) -> None:
        if status.state.terminal:
            if self.live.pop(status.task, None) is not None:
                log.info(
                    "%s %s on %s %s: replacing it",
                    status.task,
                    status.state.value,
                    status.node,
                    status.message,
                )
        else:
            self.live[status.task] = status.node
            self.serial = max(self.serial, int(status.task.rsplit("-", 1)[1]) + 1)
        self._steer(driver)

    def _steer(self, driver: Driver) -> None:
        """Offers only while a replica is missing."""
        full = len(self.live) >= self.want
        if full and not self.suppressed:
            driver.suppress()
        elif not full and self.suppressed:
            driver.revive()
        self.suppressed = full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--command", required=True)
    parser.add_argument("--cpus", type=float, default=0.1)
    parser.add_argument("--mem", type=int, default=64, help="MiB")
    parser.add_argument("--port", action="append", default=[], help="a named port each replica is given")
    parser.add_argument("--per-node", type=int, default=1)
    parser.add_argument("--role", default="default")
    parser.add_argument("--framework-id", help="take up this framework (after a failover)")
    parser.add_argument("--failover-timeout", type=float, default=300.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    keeper = Keeper(
        args.replicas, args.command, Resources(cpus=args.cpus, mem=args.mem), args.port, args.per_node
    )
    driver = Driver(
        keeper,
        name="keeper",
        role=args.role,
        framework_id=args.framework_id,
        failover_timeout=args.failover_timeout,
    )
    try:
        driver.run()
    except KeyboardInterrupt:
        driver.stop()


if __name__ == "__main__":
    main()
