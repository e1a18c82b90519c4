"""The capture store: the capture files and their rows in the index, kept in step.

The invariants between files and rows live here and nowhere else:

* a capture's file is made before its row, so a row is never left "running" for a file that
  could not be made (the caller is told why); a file is never without a row: a pcap found
  without one at start is indexed as an incomplete capture rather than deleted;
* a capture still "running" when the daemon stopped or crashed is marked "incomplete" (with what
  its file holds) at the next start; a filtered flight-recorder capture's packets that were
  still in ``<id>.unfiltered`` are kept for :meth:`CaptureEngine.recover` to filter; a leftover
  of no capture and any half-written file (``*.tmp``) are removed;
* the store keeps to a byte budget (pcaps, evidence, unfiltered packets and the index itself)
  and a maximum age by evicting finished captures oldest first, never the last capture of one
  container to make room for another's (:mod:`.retention`); an evicted capture keeps its row
  (state "evicted") and loses every file; evidence that arrives for an evicted capture is not
  written;
* the index's own entries are pruned by age and count (:class:`nstap.index.Index`);
* with a bucket (``storage.s3``) the store is a cache: a finished capture is queued for upload
  (:class:`nstap.index.uploads.UploadIndex`) and, while queued, is evicted neither by age nor
  ahead of uploaded captures; only when the uploaded ones do not make the budget does a queued
  one go (counted in ``evicted_before_upload``, logged) and leave the queue.

The data dir and its directories are 0700 and every file in them 0600. File and row work both
run in the index's thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ..index import Index, IndexRetention, new_id
from ..index.captures import EVICTED, FINISHED, INCOMPLETE, RUNNING, CaptureRow
from .files import CaptureFiles
from .retention import HeldCapture, plan_evictions

log = structlog.get_logger("nstap.capture")

PRUNE_EVERY = 60.0  # seconds between passes over the index's tables


@dataclass(frozen=True)
class Retention:
    """How much the store may keep: bytes (pcaps, evidence and the index itself) and age of the
    captures; age and number of the index's entries."""

    max_bytes: int
    max_age_seconds: float
    index_max_age: float = 30 * 86400.0
    index_max_rows: int = 100_000


class CaptureStore:
    """The captures' files and their index rows."""

    def __init__(self, data_dir: Path, retention: Retention) -> None:
        self.files = CaptureFiles(data_dir / "captures")
        self.dir = self.files.dir
        self.db_path = data_dir / "nstap.db"
        self.retention = retention
        self.index = Index(self.db_path, IndexRetention(retention.index_max_age, retention.index_max_rows))
        self._rows = self.index.captures
        self.total_bytes = 0  # bytes of capture files on disk, kept current for the exporter
        self.unfiltered: list[CaptureRow] = []  # captures whose packets wait in <id>.unfiltered (found at open)
        self.index_bytes = 0  # bytes of the SQLite index (database and WAL), within the byte budget
        self._pruned_at = float("-inf")
        self.evicted_listeners: list[Callable[[list[str]], None]] = []  # told (on the loop) which captures went
        self.uploads_enabled = False  # storage.s3: finished captures are queued for the bucket
        self.evicted_before_upload = 0  # queued captures the byte budget forced out before their upload
        self.upload_listeners: list[Callable[[], None]] = []  # told (from the index's thread) when a capture is queued

    @property
    def pruned_total(self) -> int:
        """Index entries deleted by age or count."""
        return self.index.pruned_total

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> dict[str, int]:
        """Open (creating) the store and recover from an unclean stop; returns what was recovered."""
        return await self.index.db.run(self._open)

    def _open(self) -> dict[str, int]:
        self.files.make_dirs()
        self.index.db.open()
        now = time.time()
        recovered = {"incomplete": 0, "orphans": 0, "anomalies_closed": 0, "to_filter": 0, "leftovers_removed": 0}
        self.unfiltered = []
        for raw in self.files.unfiltered():
            rows = self._rows.select("file = ?", (raw.with_suffix(".pcap").name,))
            if rows and rows[0].state in (RUNNING, INCOMPLETE) and rows[0].filter:
                self.unfiltered.append(rows[0])
                recovered["to_filter"] += 1
            else:
                raw.unlink(missing_ok=True)
                recovered["leftovers_removed"] += 1
        recovered["leftovers_removed"] += self.files.remove_half_written()
        waiting = {r.id for r in self.unfiltered}
        for row in self._rows.select("state = ?", (RUNNING,)):
            if row.id not in waiting:
                self._finish_from_file(row, INCOMPLETE, "daemon stopped before the capture finished", now)
                recovered["incomplete"] += 1
        known = self._rows.file_names()
        for path in self.files.pcaps():
            if path.name not in known:
                mtime = path.stat().st_mtime
                row = CaptureRow(id=new_id(mtime), state=RUNNING, created_at=mtime, reason="recovered", file=path.name)
                self._rows.insert(row)
                self._finish_from_file(row, INCOMPLETE, "file found without an index entry", now)
                recovered["orphans"] += 1
        recovered["anomalies_closed"] = self.index.anomalies.close_open()
        if self.uploads_enabled:
            recovered["upload_queued"] = self.index.uploads.backfill(now, FINISHED)
        self.total_bytes = self.files.disk_bytes()
        self.index_bytes = self.index.db.bytes()
        return recovered

    def _finish_from_file(self, row: CaptureRow, state: str, error: str, now: float) -> None:
        size, packets, digest = self.files.summary(row.file)
        if size == 0 and row.file:
            # Killed before the pcap's header was written: an empty file no tool can read is not
            # kept as if it were a capture; the row says why it has none.
            self.files.remove((row.file,))
            self._rows.update(row.id, state=state, error=f"{error}; no packet was written", file=None, bytes=0, packets=0, sha256="", finished_at=now)
            return
        self._rows.update(row.id, state=state, error=error, bytes=size, packets=packets, sha256=digest, finished_at=now)

    async def close(self) -> None:
        """Close the index."""
        await self.index.db.close()

    # -- captures --------------------------------------------------------------------------------

    def path_of(self, row: CaptureRow) -> Path | None:
        """The pcap file of a capture, if it has one on disk."""
        return self._existing(row, row.file)

    def evidence_path(self, row: CaptureRow) -> Path | None:
        """The evidence file of a capture, if it has one on disk."""
        return self._existing(row, row.evidence)

    def _existing(self, row: CaptureRow, name: str | None) -> Path | None:
        if not name or row.state == EVICTED:
            return None
        path = self.files.path(name)
        return path if path.is_file() else None

    def unfiltered_path(self, row: CaptureRow) -> Path:
        """Where a filtered flight-recorder capture's packets wait to be filtered into its pcap."""
        assert row.file is not None
        return self.files.unfiltered_path(row.file)

    async def create(self, row: CaptureRow, unfiltered: bool = False) -> CaptureRow:
        """Create a new capture's empty 0600 file (and, with ``unfiltered``, the file its packets
        wait in to be filtered), then index it (state running); returns the row."""
        return await self.index.db.run(self._create, row, unfiltered)

    def _create(self, row: CaptureRow, unfiltered: bool) -> CaptureRow:
        row.file = self.files.pcap_name(row.id)
        self.files.create(row.file)
        try:
            if unfiltered:
                self.files.create_unfiltered(row.file)
            self._rows.insert(row)
        except BaseException:
            self.files.remove((row.file, self.files.unfiltered_path(row.file).name if unfiltered else None))
            raise
        return row

    async def finish(self, capture_id: str, **values: Any) -> None:
        """Record a capture's outcome (state, bytes, packets, drops, sha256, error ...)."""
        await self.index.db.run(self._finish, capture_id, values)

    def _finish(self, capture_id: str, values: dict[str, Any]) -> None:
        values.setdefault("finished_at", time.time())
        self._rows.update(capture_id, **values)
        if self.uploads_enabled and values.get("state") in FINISHED:
            if self.index.uploads.add(capture_id, values["finished_at"]):
                for listener in self.upload_listeners:
                    listener()
        self.total_bytes = self.files.disk_bytes()

    async def mark_incomplete(self, capture_id: str, error: str) -> None:
        """End a capture that was interrupted: incomplete, with what its file holds."""
        await self.index.db.run(self._mark_incomplete, capture_id, error, (RUNNING,))

    async def filtered_at_start(self, capture_id: str, error: str) -> None:
        """A capture whose packets were filtered at this start (see ``unfiltered``): incomplete,
        with what its pcap holds now."""
        await self.index.db.run(self._mark_incomplete, capture_id, error, (RUNNING, INCOMPLETE))

    def _mark_incomplete(self, capture_id: str, error: str, states: tuple[str, ...]) -> None:
        row = self._rows.one(capture_id)
        if row is not None and row.state in states:
            self._finish_from_file(row, INCOMPLETE, error, time.time())
        self.total_bytes = self.files.disk_bytes()

    async def save_evidence(self, capture_id: str, data: bytes) -> list[str]:
        """Store a capture's evidence (JSON) next to its pcap, 0600, written whole or not at all.

        Evidence counts against the byte budget, and a finished capture's arrives after the
        budget was applied for its pcap: applied again then. Returns the ids this evicted.
        """
        return self._evicted(await self.index.db.run(self._save_evidence, capture_id, data))

    def _save_evidence(self, capture_id: str, data: bytes) -> list[str]:
        row = self._rows.one(capture_id)
        if row is None or row.state == EVICTED:
            # Its capture was evicted while the evidence was being taken: a file written now would
            # be nobody's, unreachable and counted against the budget for good.
            return []
        name = self.files.evidence_name(capture_id)
        self.files.write_whole(name, data)
        self._rows.update(capture_id, evidence=name)
        if row.state in FINISHED:
            return self._enforce(time.time())
        self.total_bytes = self.files.disk_bytes()
        return []

    # -- retention -------------------------------------------------------------------------------

    async def enforce(self, now: float | None = None) -> list[str]:
        """Evict finished captures, oldest first, past the age limit or the byte budget (and
        prune the index's entries every PRUNE_EVERY seconds)."""
        return self._evicted(await self.index.db.run(self._enforce, now if now is not None else time.time()))

    def _evicted(self, ids: list[str]) -> list[str]:
        if ids:
            for listener in self.evicted_listeners:
                listener(ids)
        return ids

    def _enforce(self, now: float) -> list[str]:
        if now - self._pruned_at >= PRUNE_EVERY:
            self._pruned_at = now
            self.index.prune(now)
        rows = self._rows.select("file IS NOT NULL AND state != ?", (EVICTED,))
        by_id = {r.id: r for r in rows}
        held = [HeldCapture(r.id, r.container_id, r.created_at, self.files.size((r.file, r.evidence)), r.state in FINISHED) for r in rows]
        # The index lives in the same budget: the captures get what its database leaves, counted
        # at the size its file has once the write-ahead log is folded in (at a checkpoint, or when
        # the daemon stops), so a restart does not shrink the budget and evict what it kept.
        self.index_bytes = self.index.db.bytes()
        budget = max(self.retention.max_bytes - self.index.db.folded_bytes(), 0)
        queued = self.index.uploads.pending() if self.uploads_enabled else set()
        if not queued:
            evicted = plan_evictions(held, budget, self.retention.max_age_seconds, now)
        else:
            # First as if the queued captures were still running (kept, counted): age and budget
            # take uploaded captures only. Then, if that does not make the budget, the budget alone
            # over what is left: a queued capture that goes then goes before its upload.
            evicted = plan_evictions([h._replace(finished=h.finished and h.id not in queued) for h in held], budget, self.retention.max_age_seconds, now)
            gone = set(evicted)
            left = [h for h in held if h.id not in gone]
            forced = plan_evictions(left, budget, float("inf"), now)
            for capture_id in forced:
                if capture_id in queued:
                    self.evicted_before_upload += 1
                    self.index.uploads.drop(capture_id)
                    log.warning("capture_evicted_before_upload", capture_id=capture_id, store_max_bytes=self.retention.max_bytes)
            evicted += forced
        for capture_id in evicted:
            row = by_id[capture_id]
            self.files.remove((row.file, row.evidence))
            self._rows.update(capture_id, state=EVICTED, file=None, evidence=None)
        self.total_bytes = self.files.disk_bytes()
        return evicted
