"""A parameter sweep as a shoal framework: N short tasks, each retried when it fails.

    python examples/sweep.py --tasks 200 --command 'python simulate.py --seed {i}' --cpus 0.5

It is offered resources, packs as many pending tasks into each offer as fit, retries a
failed task up to `--retries` times, suppresses offers while it has nothing to launch, and
tears itself down when every task has finished or given up. The URL and token come from
the shoal client configuration (`shoal login`, or SHOAL_URL and SHOAL_TOKEN). The last line
it prints is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, deque

from rich.progress import Progress

from shoal.client import ApiError
from shoal.framework import Driver, OfferInfo, Scheduler, TaskLaunch, TaskStatus
from shoal.model import Resources, TaskState


class Sweep(Scheduler):
    def __init__(
        self, total: int, command: str, ask: Resources, retries: int, progress: Progress | None
    ) -> None:
        self.total = total
        self.command = command
        self.ask = ask
        self.retries = retries
        self.todo: deque[int] = deque(range(total))
        self.running: dict[str, int] = {}  # task name -> parameter index
        self.failures: Counter[int] = Counter()
        self.done: set[int] = set()
        self.gave_up: set[int] = set()
        self.suppressed = False
        self.progress = progress
        self.bar = progress.add_task("sweep", total=total) if progress else None

    def resource_offers(self, driver: Driver, offers: list[OfferInfo]) -> None:
        for offer in offers:
            batch = self._fill(offer.resources)
            if not batch:
                driver.decline([offer.id], refuse_seconds=1.0)
                continue
            try:
                driver.launch([offer.id], batch)
            except ApiError:  # the offer went away meanwhile: run them on a later one
                self.todo.extendleft(reversed([self.running.pop(t.name) for t in batch]))
        if not self.todo and not self.suppressed:
            driver.suppress()
            self.suppressed = True

    def _fill(self, room: Resources) -> list[TaskLaunch]:
        batch = []
        while self.todo and self.ask.shortfall(room) is None:
            i = self.todo.popleft()
            name = f"p{i}.{self.failures[i]}"
            self.running[name] = i
            batch.append(
                TaskLaunch(name=name, command=self.command.replace("{i}", str(i)), resources=self.ask)
            )
            room = room - self.ask
        return batch

    def status_update(self, driver: Driver, status: TaskStatus) -> None:
        if not status.state.terminal or status.task not in self.running:
            return
        i = self.running.pop(status.task)
        if status.state is TaskState.FINISHED:
            self.done.add(i)
        else:
            self.failures[i] += 1
            if self.failures[i] <= self.retries:
                self.todo.append(i)
                if self.suppressed:
                    driver.revive()
                    self.suppressed = False
            else:
                self.gave_up.add(i)
        if self.progress is not None and self.bar is not None:
            self.progress.update(self.bar, completed=len(self.done) + len(self.gave_up))
        if len(self.done) + len(self.gave_up) == self.total:
            driver.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--command", default="true", help="{i} is the task's parameter index")
    parser.add_argument("--cpus", type=float, default=0.1)
    parser.add_argument("--mem", type=int, default=32, help="MiB")
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--role", default="default")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    args = parser.parse_args()
    ask = Resources(cpus=args.cpus, mem=args.mem)
    started = time.monotonic()
    with Progress(disable=args.json, transient=True) as progress:
        sweep = Sweep(args.tasks, args.command, ask, args.retries, None if args.json else progress)
        Driver(sweep, name="sweep", role=args.role).run()
    seconds = time.monotonic() - started
    print(
        json.dumps(
            {
                "tasks": args.tasks,
                "finished": len(sweep.done),
                "failed": len(sweep.gave_up),
                "retried": sum(sweep.failures.values()),
                "seconds": round(seconds, 3),
                "tasks_per_s": round(args.tasks / seconds, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
