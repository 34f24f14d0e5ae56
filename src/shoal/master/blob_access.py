"""Which blobs a node may fetch from the master's store and put into it, on a master that
knows each node by its certificate.

A node fetches a blob only when the master gave it a reason: a copy order sent to it
(`shoal copy`), or the saved state of a run the ledger has placed on it (a checkpoint to
restore). It puts blobs only when asked: the file of a pull (`shoal copy --rcopy`) while
that order runs, or the saved state of a checkpointing run of its own. What each node put
is noted, so that a blob it then names as its run's saved state, or as the file it pulled,
is one it really had: a node cannot name a blob it was never given as its own run's state,
to be handed it when the run starts again. Orders live in memory while they run, uploads
for as long as blobs are kept.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from typing import TYPE_CHECKING

from shoal.model import Migrate, TaskRecord
from shoal.wire import (
    CopyFiles,
    ExecEnd,
    ExecStart,
    FetchFile,
    FileFetched,
    Frame,
    Register,
    RunReport,
    RunReports,
)

if TYPE_CHECKING:
    from shoal.master.ledger import Ledger

log = logging.getLogger("shoal.master")
Order = ExecStart | CopyFiles | FetchFile


class BlobAccess:
    def __init__(self, keep: float) -> None:
        self._keep = keep  # seconds an upload is remembered: as long as the blob is kept
        self._copies: defaultdict[str, Counter[str]] = defaultdict(Counter)  # node -> blob -> orders
        self._pulls: Counter[str] = Counter()  # node -> pull orders running
        self._put: defaultdict[str, dict[str, float]] = defaultdict(dict)  # node -> blob -> when

    # --- orders of the parallel shell ---------------------------------------------------

    def ordered(self, node: str, order: Order) -> None:
        match order:
            case CopyFiles(files=files):
                self._copies[node].update({f.blob for f in files})
            case FetchFile():
                self._pulls[node] += 1

    def finished(self, node: str, order: Order) -> None:
        match order:
            case CopyFiles(files=files):
                self._copies[node].subtract({f.blob for f in files})
                if not +self._copies[node]:
                    del self._copies[node]
            case FetchFile():
                self._pulls[node] -= 1
                if self._pulls[node] <= 0:
                    del self._pulls[node]

    # --- what a node may do -------------------------------------------------------------

    def may_fetch(self, ledger: Ledger, node: str, blob: str) -> bool:
        if self._copies.get(node, Counter())[blob] > 0:
            return True
        return any(t.checkpoint == blob for t in _checkpointing(ledger, node))

    def may_put(self, ledger: Ledger, node: str) -> bool:
        return self._pulls[node] > 0 or bool(_checkpointing(ledger, node))

    def put_by(self, node: str, blob: str, now: float) -> None:
        mine = self._put[node]
        for old in [b for b, at in mine.items() if at < now - self._keep]:
            del mine[old]
        mine[blob] = now

    def had(self, ledger: Ledger, node: str, blob: str, now: float) -> bool:
        """Whether `node` held `blob`: it put it lately, or may fetch it (an agent does not
        put again what the master lets it see it has already)."""
        put = self._put.get(node, {}).get(blob)
        return (put is not None and put >= now - self._keep) or self.may_fetch(ledger, node, blob)

    def vouched(self, ledger: Ledger, node: str, frame: Frame, now: float) -> Frame:
        """`frame` from `node` with every blob it names one it held: a run's saved state it
        did not hold is dropped (the run starts again without it), and a pulled file it did
        not upload fails that node's pull."""
        match frame:
            case FileFetched(exec_id=exec_id, blob=blob) if not self.had(ledger, node, blob, now):
                log.warning("%s named blob %s as the file it pulled, and did not upload it", node, blob)
                return ExecEnd(exec_id=exec_id, code=1, error=f"{node} did not upload the file it named")
            case Register(runs=reports) | RunReports(reports=reports):
                kept = [self._report_vouched(ledger, node, r, now) for r in reports]
                if kept != reports:
                    field = "runs" if isinstance(frame, Register) else "reports"
                    return frame.model_copy(update={field: kept})
        return frame

    def _report_vouched(self, ledger: Ledger, node: str, report: RunReport, now: float) -> RunReport:
        if report.checkpoint is None or self.had(ledger, node, report.checkpoint, now):
            return report
        log.warning(
            "%s reported run %s with saved state %s it did not upload; the run starts again without it",
            node,
            report.run_id,
            report.checkpoint,
        )
        return report.model_copy(update={"checkpoint": None})


def _checkpointing(ledger: Ledger, node: str) -> list[TaskRecord]:
    """The tasks on `node` whose state moves with them (saved there, restored there)."""
    return [
        t
        for t in ledger.active_tasks()
        if t.node == node and ledger.jobs[t.job_id].spec.migrate is Migrate.CHECKPOINT
    ]
