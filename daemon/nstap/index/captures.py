"""The captures table: one row per capture, what it is of, how it ended and which files it has.

The rows alone; the files they name, and the invariants between the two (a row for every file,
a file for every row that says so), belong to :class:`nstap.capture.store.CaptureStore`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .db import IndexDb
from .ids import well_formed

RUNNING, COMPLETE, INCOMPLETE, FAILED, EVICTED = "running", "complete", "incomplete", "failed", "evicted"
FINISHED = (COMPLETE, INCOMPLETE, FAILED)


@dataclass
class CaptureRow:
    """One capture's index entry."""

    id: str
    state: str
    created_at: float
    container: str = ""
    container_id: str = ""
    runtime: str = ""
    netns: int = 0
    reason: str = ""
    kind: str = ""
    anomaly_id: str | None = None
    mode: str = ""
    trigger_at: float = 0.0
    window_start: float = 0.0
    window_end: float = 0.0
    filter: str = ""
    snaplen: int = 0
    error: str = ""
    file: str | None = None
    bytes: int = 0
    packets: int = 0
    pre_packets: int = 0
    kernel_drops: int = 0
    sha256: str = ""
    finished_at: float | None = None
    onset_at: float | None = None  # the anomaly's onset, for an anomaly capture
    pre_truncated: bool = False  # the ring no longer reached back to window_start
    side: str = "container"  # "container", or "host": the host end of the container's veths
    interface: str = ""  # the host-side interfaces captured ("" on the container side)
    evidence: str | None = None  # the evidence file's name, once recorded
    uploaded_at: float | None = None  # when its objects were confirmed in the bucket (storage.s3)
    uploaded_objects: str = ""  # which objects the upload confirmed ("pcap,evidence,..."; kept after an eviction)

    def to_json(self) -> dict[str, Any]:
        """The row as the API shows it (without the internal file names)."""
        out = asdict(self)
        out.pop("file")
        out.pop("evidence")
        out.pop("uploaded_objects")  # the API shows them with their keys (storage.location)
        out["pre_truncated"] = bool(self.pre_truncated)
        out["downloadable"] = self.file is not None and self.state != RUNNING
        out["has_evidence"] = self.evidence is not None and self.state != EVICTED
        local = self.file is not None and self.state != EVICTED
        out["location"] = "both" if local and self.uploaded_at else "local" if local else "bucket" if self.uploaded_at else "gone"
        return out


FIELDS = frozenset(f.name for f in fields(CaptureRow))


class CaptureIndex:
    """The captures table. The plain methods run in the index's thread (the store calls them
    there, next to its file work); ``get`` and ``list`` are for the event loop."""

    def __init__(self, db: IndexDb) -> None:
        self.db = db

    # -- in the index's thread ------------------------------------------------------------------

    def select(self, where: str = "", args: tuple = (), order: str = "created_at") -> list[CaptureRow]:
        """Rows matching ``where`` (SQL after WHERE), in ``order``."""
        cur = self.db.execute(f"SELECT * FROM captures{' WHERE ' + where if where else ''} ORDER BY {order}", args)
        names = [d[0] for d in cur.description]
        return [CaptureRow(**dict(zip(names, r))) for r in cur.fetchall()]

    def one(self, capture_id: str) -> CaptureRow | None:
        """The row of ``capture_id``, if any."""
        rows = self.select("id = ?", (capture_id,))
        return rows[0] if rows else None

    def insert(self, row: CaptureRow) -> None:
        data = asdict(row)
        self.db.execute(f"INSERT INTO captures ({','.join(data)}) VALUES ({','.join('?' * len(data))})", tuple(data.values()))

    def update(self, capture_id: str, **values: Any) -> None:
        bad = set(values) - FIELDS
        if bad:
            raise ValueError(f"unknown capture fields {bad}")
        sets = ",".join(f"{k} = ?" for k in values)
        self.db.execute(f"UPDATE captures SET {sets} WHERE id = ?", (*values.values(), capture_id))

    def file_names(self) -> set[str]:
        """The pcap file names the rows hold."""
        return {r[0] for r in self.db.fetch("SELECT file FROM captures WHERE file IS NOT NULL")}

    def prune(self, horizon: float, keep: int) -> int:
        """Delete evicted captures' rows older than ``horizon`` or past the newest ``keep`` (a
        capture with its file is the byte budget's, not the index's); returns how many went."""
        gone = self.db.execute("DELETE FROM captures WHERE state = ? AND created_at < ?", (EVICTED, horizon)).rowcount
        return gone + self.db.execute(
            "DELETE FROM captures WHERE state = ? AND id NOT IN (SELECT id FROM captures ORDER BY created_at DESC LIMIT ?)", (EVICTED, keep)
        ).rowcount

    # -- on the event loop ----------------------------------------------------------------------

    async def get(self, capture_id: str) -> CaptureRow | None:
        """One capture by id (None for an id that is not well-formed or not known)."""
        if not well_formed(capture_id):
            return None
        return await self.db.run(self.one, capture_id)

    async def list(
        self,
        container: str | None = None,
        kind: str | None = None,
        reason: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        state: str | None = None,
    ) -> list[CaptureRow]:
        """Captures, newest first, filtered."""
        where, args = [], []
        for clause, value in (("state = ?", state), ("kind = ?", kind), ("reason = ?", reason)):
            if value:
                where.append(clause)
                args.append(value)
        if container:
            where.append("(container = ? OR container_id = ? OR substr(container_id, 1, length(?)) = ?)")
            args += [container] * 4
        if since is not None:
            where.append("created_at >= ?")
            args.append(since)
        if until is not None:
            where.append("created_at <= ?")
            args.append(until)
        return await self.db.run(self.select, " AND ".join(where), (*args,), f"created_at DESC LIMIT {int(limit)}")
