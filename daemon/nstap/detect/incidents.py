"""Findings become anomaly events: one event per container and kind while it lasts, damped.

An ongoing anomaly extends its event (last seen, number of findings, latest numbers) instead of
creating new ones. It is resolved after ``resolve_after`` seconds without a finding; a finding
within ``cooldown`` seconds of that reopens the same event rather than starting another, so a
flapping link makes one event, not fifty. A new event asks for a capture; reopening does not.

Every event carries its onset (``started_at``, the detector's estimate of when the fault began)
beside its detection (``first_seen``); its capture's window starts from the onset. Every event
has a cause (:mod:`.cause_finder`): named at detection from what the window shows so far, named
again at most every EXPLAIN_EVERY seconds while it lasts (the first evidence may be thin), fixed
at its end; a detector that knows why gives it with its finding.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

import structlog

from ..index import AnomalyIndex, AnomalyRow, new_id
from ..registry import WatchedNamespace
from ..samples import NamespaceSample
from ..supervisor import TaskSupervisor
from .base import Finding
from .cause import UNKNOWN, UNKNOWN_CAUSE, Cause
from .cause_finder import CauseFinder, Start

log = structlog.get_logger("nstap.detect")

SAVE_EVERY = 5.0  # seconds between index updates of an ongoing event
EXPLAIN_EVERY = 1.0  # seconds between namings of an ongoing event's cause
MARGIN_SAMPLES = 2  # sample intervals a capture reaches back before the onset (its estimate's error)

HOST_ID = "host"  # the container_id of the host's own events (conntrack pressure)

CaptureStarter = Callable[[WatchedNamespace, AnomalyRow, float], Awaitable[str | None]]


@dataclass
class Incident:
    """An anomaly event being tracked."""

    row: AnomalyRow
    active: bool = True
    saved_at: float = 0.0
    dirty: bool = False  # changed since its last write to the index
    flushing: bool = False
    start: Start | None = None  # what its cause's window is measured from
    explained_at: float = float("-inf")
    peer: int | None = None  # the namespace its cause blames (peer_anomaly)


class IncidentTracker:
    """Turns findings into anomaly events, persists them, and asks for their captures."""

    def __init__(
        self,
        anomalies: AnomalyIndex,
        start_capture: CaptureStarter | None,
        cooldown: float,
        resolve_after: float,
        supervisor: TaskSupervisor | None = None,
        causes: CauseFinder | None = None,
    ) -> None:
        self.anomalies = anomalies
        self.causes = causes
        self.start_capture = start_capture
        self.cooldown = cooldown
        self.resolve_after = resolve_after
        self.supervisor = supervisor or TaskSupervisor()
        self.incidents: dict[tuple[int, str], Incident] = {}
        self._of: dict[int, dict[str, Incident]] = {}  # netns -> kind -> its incident: quiet() looks at one namespace's
        self.anomalies_total: Counter[tuple[str, str, str, str, str]] = Counter()  # (container, id, runtime, kind, cause at detection)
        self._tasks: set[asyncio.Task] = set()

    def found(
        self, ns: WatchedNamespace, finding: Finding, at: float, interval: float = 0.0, capture: bool = True,
        sample: NamespaceSample | None = None, previous: NamespaceSample | None = None,
    ) -> Incident:
        """Record a finding in namespace ``ns`` at time ``at`` (``interval``: the namespace's sampling
        interval, which sets how far before the onset its capture reaches; ``capture`` False for
        findings of the host, which has no namespace of its own to capture; ``sample`` the sample
        it was found in and ``previous`` the one before, for its cause)."""
        key = (ns.inode, finding.kind)
        inc = self.incidents.get(key)
        row_numbers = dict(finding.numbers)
        if inc is not None and (inc.active or at - (inc.row.resolved_at or at) <= self.cooldown):
            row = inc.row
            row.last_seen = at
            row.findings += 1
            row.numbers = row_numbers
            row.summary = finding.summary
            changed = self._explain(inc, ns, finding, sample, at)
            if not inc.active:
                inc.active = True
                row.resolved_at = None
                self._log("anomaly_reopened", row)
                self._save(inc, at)
            elif changed or at - inc.saved_at >= SAVE_EVERY:
                self._save(inc, at)
            return inc
        owner = ns.owner
        row = AnomalyRow(
            id=new_id(at),
            kind=finding.kind,
            container=owner.name,
            container_id=owner.short_id,
            runtime=owner.runtime,
            netns=ns.inode,
            first_seen=at,
            last_seen=at,
            numbers=row_numbers,
            summary=finding.summary,
            started_at=min(finding.started_at, at) if finding.started_at is not None else at,
        )
        inc = self.incidents[key] = self._of.setdefault(ns.inode, {})[finding.kind] = Incident(row)
        if self.causes is not None:
            inc.start = self.causes.start(ns, previous)
        self._explain(inc, ns, finding, sample, at)
        self.anomalies_total[(owner.name, owner.short_id, owner.runtime, finding.kind, row.cause)] += 1
        self._log("anomaly_detected", row)
        self._save(inc, at)
        if self.start_capture is not None and capture:
            self._spawn("anomaly-capture", self._capture(ns, inc, at, MARGIN_SAMPLES * interval))
        return inc

    def _explain(self, inc: Incident, ns: WatchedNamespace, finding: Finding, sample: NamespaceSample | None, at: float) -> bool:
        """Name the event's cause again if it is time; True if it changed (logged)."""
        row = inc.row
        if self.causes is None or inc.start is None:
            cause: Cause = finding.cause or UNKNOWN_CAUSE
        elif at - inc.explained_at < EXPLAIN_EVERY:
            return False
        else:
            inc.explained_at = at
            active = {netns: [i.row for i in mine.values() if i.active] for netns, mine in self._of.items()}
            clients = sorted({i.row.container for i in self.incidents.values() if i.active and i.peer == ns.inode})
            cause, inc.peer = self.causes.explain(ns, row, sample, inc.start, active, clients, finding.cause)
        if (cause.kind, cause.text) == (row.cause, row.cause_text):
            return False
        if cause.kind == UNKNOWN and row.cause != UNKNOWN:
            return False  # the evidence went (a rule deleted, a container unpaused): the cause found stays
        first = not row.cause_text
        row.cause, row.cause_text = cause.kind, cause.text
        if not first:
            self._log("anomaly_cause", row)
        return True

    async def _capture(self, ns: WatchedNamespace, inc: Incident, at: float, margin: float) -> None:
        assert self.start_capture is not None
        inc.row.capture_id = await self.start_capture(ns, inc.row, margin)
        if inc.row.capture_id is not None:
            self._save(inc, at)

    def quiet(self, netns: int, seen: set[str], at: float, kinds: Collection[str] | None = None) -> None:
        """A look at ``netns`` found only the kinds in ``seen`` (of those in ``kinds``, or of every
        kind): resolve its events of those kinds that were quiet for long enough."""
        mine = self._of.get(netns)
        if not mine:
            return
        for kind, inc in mine.items():
            if kinds is not None and kind not in kinds:
                continue
            if inc.active and kind not in seen and at - inc.row.last_seen >= self.resolve_after:
                self._resolve(inc, at)

    def has_active(self, netns: int, kinds: Collection[str]) -> bool:
        """Whether ``netns`` has an event of one of ``kinds`` going on."""
        mine = self._of.get(netns)
        return bool(mine) and any(inc.active for kind, inc in mine.items() if kind in kinds)

    def forget(self, netns: int, at: float | None = None) -> None:
        """The namespace is gone: resolve its events and stop tracking them."""
        at = at if at is not None else time.time()
        for kind, inc in self._of.pop(netns, {}).items():
            del self.incidents[(netns, kind)]
            if inc.active:
                self._resolve(inc, at)

    def prune(self, current: set[str]) -> None:
        """Forget the event counts of containers (by short id) that are not in ``current`` any more
        (the host's own events are kept)."""
        for key in [k for k in self.anomalies_total if k[1] not in current and k[1] != HOST_ID]:
            del self.anomalies_total[key]

    def _resolve(self, inc: Incident, at: float) -> None:
        inc.active = False
        inc.row.resolved_at = at
        self._log("anomaly_resolved", inc.row)
        self._save(inc, at)

    def active_causes(self) -> list[tuple[str, str, str, str, str]]:
        """(container, id, runtime, kind, cause) of the events going on now."""
        return [(i.row.container, i.row.container_id, i.row.runtime, i.row.kind, i.row.cause) for i in self.incidents.values() if i.active]

    def active(self) -> list[AnomalyRow]:
        """The events going on now."""
        return [inc.row for inc in self.incidents.values() if inc.active]

    def _save(self, inc: Incident, at: float) -> None:
        """Write the incident's current state soon; writes of one incident never overtake each other."""
        inc.saved_at = at
        inc.dirty = True
        if not inc.flushing:
            inc.flushing = True
            self._spawn("anomaly-save", self._flush(inc))

    async def _flush(self, inc: Incident) -> None:
        try:
            while inc.dirty:
                inc.dirty = False
                # A snapshot of the state now: the row keeps changing while it is written.
                row = AnomalyRow(**{**inc.row.__dict__, "numbers": dict(inc.row.numbers)})
                try:
                    await self.anomalies.save(row)
                except (OSError, sqlite3.Error) as exc:
                    # The index cannot take it now (a full disk): the event stays in memory, dirty,
                    # and is written again at its next change.
                    inc.dirty = True
                    log.warning("anomaly_save_failed", anomaly_id=row.id, kind=row.kind, container=row.container, error=str(exc))
                    return
        finally:
            inc.flushing = False

    def _spawn(self, kind: str, coro) -> None:
        task = self.supervisor.spawn(kind, coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _log(self, event: str, row: AnomalyRow) -> None:
        log.info(
            event, anomaly_id=row.id, kind=row.kind, container=row.container, container_id=row.container_id,
            runtime=row.runtime, netns=row.netns, summary=row.summary, numbers=row.numbers, cause=row.cause, cause_text=row.cause_text,
            started_at=row.started_at, first_seen=row.first_seen, last_seen=row.last_seen, capture_id=row.capture_id,
        )

    async def close(self) -> None:
        """Resolve every open event (the daemon stops) and wait until all are saved."""
        now = time.time()
        for inc in self.incidents.values():
            if inc.active:
                self._resolve(inc, now)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
