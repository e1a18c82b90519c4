"""The capture store: pcap files plus an SQLite index under the data dir.

Every capture gets its row before its file exists, so nothing written is ever unaccounted for:
a capture still "running" when the daemon stops or crashes is marked "incomplete" (with what its
file holds) at the next start, and a pcap file without a row is indexed as an incomplete capture
rather than deleted. The data dir and its directories are 0700 and every file in them 0600 (the
index's WAL and shared-memory files included), tightened at every start if they were not. The
store keeps to a disk budget and a maximum age by evicting finished captures oldest first, never
the last capture of one container to make room for another's (see :mod:`.retention`); an
evicted capture keeps its row (state "evicted").

SQLite calls are quick but blocking, so they run in one dedicated thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import structlog

from .pcap import PcapError, read_file, sha256_file
from .retention import HeldCapture, plan_evictions
from ..threads import worker_threads

log = structlog.get_logger("nstap.capture")

ID_PATTERN = re.compile(r"^[0-9A-Za-z][0-9A-Za-z-]{0,63}$")
RUNNING, COMPLETE, INCOMPLETE, FAILED, EVICTED = "running", "complete", "incomplete", "failed", "evicted"
FINISHED = (COMPLETE, INCOMPLETE, FAILED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS captures (
    id TEXT PRIMARY KEY,
    container TEXT NOT NULL DEFAULT '',
    container_id TEXT NOT NULL DEFAULT '',
    runtime TEXT NOT NULL DEFAULT '',
    netns INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT '',
    anomaly_id TEXT,
    mode TEXT NOT NULL DEFAULT '',
    trigger_at REAL NOT NULL DEFAULT 0,
    window_start REAL NOT NULL DEFAULT 0,
    window_end REAL NOT NULL DEFAULT 0,
    filter TEXT NOT NULL DEFAULT '',
    snaplen INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    file TEXT,
    bytes INTEGER NOT NULL DEFAULT 0,
    packets INTEGER NOT NULL DEFAULT 0,
    pre_packets INTEGER NOT NULL DEFAULT 0,
    kernel_drops INTEGER NOT NULL DEFAULT 0,
    sha256 TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    finished_at REAL,
    onset_at REAL,
    pre_truncated INTEGER NOT NULL DEFAULT 0,
    side TEXT NOT NULL DEFAULT 'container',
    interface TEXT NOT NULL DEFAULT '',
    evidence TEXT
);
CREATE INDEX IF NOT EXISTS captures_created ON captures (created_at);
CREATE TABLE IF NOT EXISTS anomalies (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    container TEXT NOT NULL,
    container_id TEXT NOT NULL,
    runtime TEXT NOT NULL,
    netns INTEGER NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    resolved_at REAL,
    findings INTEGER NOT NULL DEFAULT 1,
    numbers TEXT NOT NULL DEFAULT '{}',
    summary TEXT NOT NULL DEFAULT '',
    capture_id TEXT,
    started_at REAL
);
CREATE INDEX IF NOT EXISTS anomalies_first ON anomalies (first_seen);
CREATE TABLE IF NOT EXISTS alerts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    status TEXT NOT NULL,
    alertname TEXT NOT NULL DEFAULT '',
    fingerprint TEXT NOT NULL DEFAULT '',
    starts_at TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '{}',
    capture_id TEXT,
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS alerts_fp ON alerts (fingerprint, starts_at);
CREATE INDEX IF NOT EXISTS alerts_capture ON alerts (capture_id);
CREATE INDEX IF NOT EXISTS alerts_received ON alerts (received_at);
CREATE TABLE IF NOT EXISTS revoked_sessions (
    value TEXT PRIMARY KEY,
    issued_at REAL NOT NULL
);
"""
# Columns added since the first release: an index made by an older daemon gets them at open.
MIGRATIONS = {
    "captures": {
        "onset_at": "REAL",
        "pre_truncated": "INTEGER NOT NULL DEFAULT 0",
        "side": "TEXT NOT NULL DEFAULT 'container'",
        "interface": "TEXT NOT NULL DEFAULT ''",
        "evidence": "TEXT",
    },
    "anomalies": {"started_at": "REAL"},
}


def new_id(now: float | None = None) -> str:
    """A sortable, URL- and path-safe id: UTC time plus randomness."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now if now is not None else time.time()))
    return f"{stamp}-{secrets.token_hex(4)}"


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

    def to_json(self) -> dict[str, Any]:
        """The row as the API shows it (without the internal file names)."""
        out = asdict(self)
        out.pop("file")
        out.pop("evidence")
        out["pre_truncated"] = bool(self.pre_truncated)
        out["downloadable"] = self.file is not None and self.state != RUNNING
        out["has_evidence"] = self.evidence is not None and self.state != EVICTED
        return out


@dataclass
class AnomalyRow:
    """One anomaly event's index entry."""

    id: str
    kind: str
    container: str
    container_id: str
    runtime: str
    netns: int
    first_seen: float
    last_seen: float
    resolved_at: float | None = None
    findings: int = 1
    numbers: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    capture_id: str | None = None
    started_at: float | None = None  # the onset: when the fault began, as the detector estimates it

    def to_json(self) -> dict[str, Any]:
        """The row as the API shows it."""
        out = asdict(self)
        out["active"] = self.resolved_at is None
        out["detected_after"] = round(self.first_seen - self.started_at, 3) if self.started_at is not None else None
        return out


_CAPTURE_FIELDS = [f.name for f in fields(CaptureRow)]
_ANOMALY_FIELDS = [f.name for f in fields(AnomalyRow)]


@dataclass(frozen=True)
class Retention:
    """How much the store may keep: bytes (pcaps, evidence and the index itself) and age of the
    captures; age and number of the index's entries."""

    max_bytes: int
    max_age_seconds: float
    index_max_age: float = 30 * 86400.0
    index_max_rows: int = 100_000


PRUNE_EVERY = 60.0  # seconds between passes over the index's tables


class CaptureStore:
    """The SQLite index and the pcap files of every capture."""

    def __init__(self, data_dir: Path, retention: Retention) -> None:
        self.dir = data_dir / "captures"
        self.db_path = data_dir / "nstap.db"
        self.retention = retention
        self._executor = worker_threads("nstap-store")
        self._db: sqlite3.Connection | None = None
        self.total_bytes = 0  # bytes of capture files on disk, kept current for the exporter
        self.unfiltered: list[CaptureRow] = []  # captures whose packets wait in <id>.unfiltered (found at open)
        self.index_bytes = 0  # bytes of the SQLite index (database and WAL), within the byte budget
        self.pruned_total = 0  # index entries deleted by age or count
        self._pruned_at = float("-inf")
        self.evicted_listeners: list[Callable[[list[str]], None]] = []  # told (on the loop) which captures went

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> dict[str, int]:
        """Open (creating) the store and recover from an unclean stop; returns what was recovered."""
        return await self._run(self._open)

    def _open(self) -> dict[str, int]:
        for directory in (self.dir.parent, self.dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(directory, 0o700)
        # Created 0600 before SQLite opens it (SQLite gives its -wal and -shm files the database's
        # mode); files an older daemon left with a wider mode are tightened.
        os.close(os.open(self.db_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        for path in (self.db_path, *(self.db_path.with_name(self.db_path.name + s) for s in ("-wal", "-shm"))):
            if path.exists():
                os.chmod(path, 0o600)
        db = sqlite3.connect(self.db_path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        for table, columns in MIGRATIONS.items():
            have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            for name, decl in columns.items():
                if name not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
        self._db = db
        recovered = {"incomplete": 0, "orphans": 0, "anomalies_closed": 0, "to_filter": 0, "leftovers_removed": 0}
        now = time.time()
        # A filtered flight-recorder capture writes the ring's packets aside (<id>.unfiltered) and
        # filters them into its pcap at the end: a daemon that died before that left its packets
        # there. They are filtered at this start (CaptureEngine.recover), not lost; a file of no
        # capture that could be filtered is removed, as is any half-written evidence (*.tmp).
        self.unfiltered = []
        for raw in sorted(self.dir.glob("*.unfiltered")):
            rows = self._select("SELECT * FROM captures WHERE file = ?", (raw.with_suffix(".pcap").name,))
            if rows and rows[0].state in (RUNNING, INCOMPLETE) and rows[0].filter:
                self.unfiltered.append(rows[0])
                recovered["to_filter"] += 1
            else:
                raw.unlink(missing_ok=True)
                recovered["leftovers_removed"] += 1
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
            recovered["leftovers_removed"] += 1
        waiting = {r.id for r in self.unfiltered}
        for row in self._select("SELECT * FROM captures WHERE state = ?", (RUNNING,)):
            if row.id not in waiting:
                self._finish_from_file(row, INCOMPLETE, "daemon stopped before the capture finished", now)
                recovered["incomplete"] += 1
        known = {r[0] for r in db.execute("SELECT file FROM captures WHERE file IS NOT NULL")}
        for path in sorted(self.dir.glob("*.pcap")):
            if path.name in known:
                continue
            row = CaptureRow(id=new_id(path.stat().st_mtime), state=RUNNING, created_at=path.stat().st_mtime, reason="recovered", file=path.name)
            self._insert(row)
            self._finish_from_file(row, INCOMPLETE, "file found without an index entry", now)
            recovered["orphans"] += 1
        cur = db.execute("UPDATE anomalies SET resolved_at = last_seen WHERE resolved_at IS NULL")
        recovered["anomalies_closed"] = cur.rowcount
        self.total_bytes = self._disk_bytes()
        self.index_bytes = self._index_bytes()
        return recovered

    def _finish_from_file(self, row: CaptureRow, state: str, error: str, now: float) -> None:
        path = self.dir / row.file if row.file else None
        size = packets = 0
        digest = ""
        if path is not None and path.exists():
            size = path.stat().st_size
            digest = sha256_file(path)
            try:
                packets = len(read_file(path)[1])
            except PcapError:
                packets = 0
        self._update(row.id, state=state, error=error, bytes=size, packets=packets, sha256=digest, finished_at=now)

    async def close(self) -> None:
        """Close the index."""
        await self._run(self._close)
        self._executor.shutdown(wait=True)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- captures --------------------------------------------------------------------------------

    def path_of(self, row: CaptureRow) -> Path | None:
        """The pcap file of a capture, if it has one on disk."""
        if not row.file or row.state == EVICTED:
            return None
        path = self.dir / row.file
        return path if path.is_file() else None

    def evidence_path(self, row: CaptureRow) -> Path | None:
        """The evidence file of a capture, if it has one on disk."""
        if not row.evidence or row.state == EVICTED:
            return None
        path = self.dir / row.evidence
        return path if path.is_file() else None

    async def save_evidence(self, capture_id: str, data: bytes) -> list[str]:
        """Store a capture's evidence (JSON) next to its pcap, 0600, written whole or not at all.

        Evidence counts against the byte budget, and a finished capture's arrives after the
        budget was applied for its pcap: applied again then. Returns the ids this evicted.
        """
        return self._evicted(await self._run(self._save_evidence, capture_id, data))

    def _save_evidence(self, capture_id: str, data: bytes) -> list[str]:
        rows = self._select("SELECT * FROM captures WHERE id = ?", (capture_id,))
        if not rows or rows[0].state == EVICTED:
            # Its capture was evicted while the evidence was being taken: a file written now would
            # be nobody's, unreachable and counted against the budget for good.
            return []
        name = f"{capture_id}.evidence.json"
        tmp = self.dir / (name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, self.dir / name)
        self._update(capture_id, evidence=name)
        rows = self._select("SELECT * FROM captures WHERE id = ?", (capture_id,))
        if rows and rows[0].state in FINISHED:
            return self._enforce(time.time())
        self.total_bytes = self._disk_bytes()
        return []

    async def create(self, row: CaptureRow) -> CaptureRow:
        """Index a new capture (state running) and create its empty 0600 file; returns the row."""
        return await self._run(self._create, row)

    def _create(self, row: CaptureRow) -> CaptureRow:
        # The file first: a row is never left "running" for a file that could not be made (a full
        # disk, no descriptors); the caller is told why.
        row.file = f"{row.id}.pcap"
        path = self.dir / row.file
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.close(fd)
        try:
            self._insert(row)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return row

    async def finish(self, capture_id: str, **values: Any) -> None:
        """Record a capture's outcome (state, bytes, packets, drops, sha256, error ...)."""
        await self._run(self._finish, capture_id, values)

    def _finish(self, capture_id: str, values: dict[str, Any]) -> None:
        values.setdefault("finished_at", time.time())
        self._update(capture_id, **values)
        self.total_bytes = self._disk_bytes()

    async def mark_incomplete(self, capture_id: str, error: str) -> None:
        """End a capture that was interrupted: incomplete, with what its file holds."""
        await self._run(self._mark_incomplete, capture_id, error)

    def _mark_incomplete(self, capture_id: str, error: str, states: tuple[str, ...] = (RUNNING,)) -> None:
        for row in self._select(f"SELECT * FROM captures WHERE id = ? AND state IN ({','.join('?' * len(states))})", (capture_id, *states)):
            self._finish_from_file(row, INCOMPLETE, error, time.time())
        self.total_bytes = self._disk_bytes()

    async def filtered_at_start(self, capture_id: str, error: str) -> None:
        """A capture whose packets were filtered at this start (see ``unfiltered``): incomplete,
        with what its pcap holds now."""
        await self._run(self._mark_incomplete, capture_id, error, (RUNNING, INCOMPLETE))

    async def get(self, capture_id: str) -> CaptureRow | None:
        """One capture by id (None for an id that is not well-formed or not known)."""
        if not isinstance(capture_id, str) or not ID_PATTERN.match(capture_id):
            return None
        rows = await self._run(self._select, "SELECT * FROM captures WHERE id = ?", (capture_id,))
        return rows[0] if rows else None

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
        if state:
            where.append("state = ?")
            args.append(state)
        if container:
            where.append("(container = ? OR container_id = ? OR substr(container_id, 1, length(?)) = ?)")
            args += [container, container, container, container]
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if reason:
            where.append("reason = ?")
            args.append(reason)
        if since is not None:
            where.append("created_at >= ?")
            args.append(since)
        if until is not None:
            where.append("created_at <= ?")
            args.append(until)
        sql = "SELECT * FROM captures" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY created_at DESC LIMIT ?"
        return await self._run(self._select, sql, (*args, limit))

    def _select(self, sql: str, args: tuple) -> list[CaptureRow]:
        assert self._db is not None
        cur = self._db.execute(sql, args)
        names = [d[0] for d in cur.description]
        return [CaptureRow(**dict(zip(names, r))) for r in cur.fetchall()]

    def _insert(self, row: CaptureRow) -> None:
        assert self._db is not None
        data = asdict(row)
        cols = ",".join(data)
        self._db.execute(f"INSERT INTO captures ({cols}) VALUES ({','.join('?' * len(data))})", tuple(data.values()))

    def _update(self, capture_id: str, **values: Any) -> None:
        assert self._db is not None
        bad = set(values) - set(_CAPTURE_FIELDS)
        if bad:
            raise ValueError(f"unknown capture fields {bad}")
        sets = ",".join(f"{k} = ?" for k in values)
        self._db.execute(f"UPDATE captures SET {sets} WHERE id = ?", (*values.values(), capture_id))

    # -- retention -------------------------------------------------------------------------------

    async def enforce(self, now: float | None = None) -> list[str]:
        """Evict finished captures, oldest first, past the age limit or the byte budget."""
        return self._evicted(await self._run(self._enforce, now if now is not None else time.time()))

    def _evicted(self, ids: list[str]) -> list[str]:
        if ids:
            for listener in self.evicted_listeners:
                listener(ids)
        return ids

    def _enforce(self, now: float) -> list[str]:
        if now - self._pruned_at >= PRUNE_EVERY:
            self._pruned_at = now
            self.pruned_total += self._prune(now)
        rows = self._select("SELECT * FROM captures WHERE file IS NOT NULL AND state != ? ORDER BY created_at", (EVICTED,))
        by_id = {r.id: r for r in rows}
        held = [HeldCapture(r.id, r.container_id, r.created_at, self._size(r), r.state in FINISHED) for r in rows]
        # The index lives in the same budget: the captures get what its database file leaves (its
        # write-ahead log, at most SQLite's checkpoint size of ~4 MiB, is folded into it there).
        self.index_bytes = self._index_bytes()
        budget = max(self.retention.max_bytes - self._db_file_bytes(), 0)
        evicted = plan_evictions(held, budget, self.retention.max_age_seconds, now)
        for capture_id in evicted:
            row = by_id[capture_id]
            for name in (row.file, row.evidence):
                if name:
                    (self.dir / name).unlink(missing_ok=True)
            self._update(capture_id, state=EVICTED, file=None, evidence=None)
        self.total_bytes = self._disk_bytes()
        return evicted

    def _prune(self, now: float) -> int:
        """Delete the index's entries past its age or count: ended anomalies, alerts, evicted
        captures' entries (a capture with its file is the byte budget's). Returns how many went."""
        assert self._db is not None
        keep, horizon = self.retention.index_max_rows, now - self.retention.index_max_age
        gone = 0
        for sql, args in (
            ("DELETE FROM anomalies WHERE resolved_at IS NOT NULL AND last_seen < ?", (horizon,)),
            ("DELETE FROM anomalies WHERE resolved_at IS NOT NULL AND id NOT IN (SELECT id FROM anomalies ORDER BY first_seen DESC LIMIT ?)", (keep,)),
            ("DELETE FROM alerts WHERE received_at < ?", (horizon,)),
            ("DELETE FROM alerts WHERE seq NOT IN (SELECT seq FROM alerts ORDER BY seq DESC LIMIT ?)", (keep,)),
            ("DELETE FROM captures WHERE state = ? AND created_at < ?", (EVICTED, horizon)),
            ("DELETE FROM captures WHERE state = ? AND id NOT IN (SELECT id FROM captures ORDER BY created_at DESC LIMIT ?)", (EVICTED, keep)),
        ):
            gone += self._db.execute(sql, args).rowcount
        if gone:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return gone

    def _db_file_bytes(self) -> int:
        try:
            return self.db_path.stat().st_size
        except OSError:
            return 0

    def _index_bytes(self) -> int:
        """Bytes of the index on disk: the database and its write-ahead log."""
        total = 0
        for path in (self.db_path, self.db_path.with_name(self.db_path.name + "-wal")):
            try:
                total += path.stat().st_size
            except OSError:
                pass
        return total

    def _size(self, row: CaptureRow) -> int:
        """Bytes a capture holds on disk: its pcap and its evidence."""
        size = 0
        for name in (row.file, row.evidence):
            try:
                size += (self.dir / name).stat().st_size if name else 0
            except OSError:
                pass
        return size

    def _disk_bytes(self) -> int:
        total = 0
        for pattern in ("*.pcap", "*.evidence.json", "*.unfiltered"):
            for p in self.dir.glob(pattern):
                try:
                    total += p.stat().st_size
                except OSError:
                    pass  # evicted meanwhile
        return total

    # -- anomalies and alerts -------------------------------------------------------------------

    async def save_anomaly(self, row: AnomalyRow) -> None:
        """Insert or update an anomaly event."""
        await self._run(self._save_anomaly, row)

    def _save_anomaly(self, row: AnomalyRow) -> None:
        assert self._db is not None
        data = asdict(row)
        data["numbers"] = json.dumps(row.numbers, sort_keys=True)
        cols = ",".join(data)
        updates = ",".join(f"{k} = excluded.{k}" for k in data if k != "id")
        self._db.execute(
            f"INSERT INTO anomalies ({cols}) VALUES ({','.join('?' * len(data))}) ON CONFLICT(id) DO UPDATE SET {updates}",
            tuple(data.values()),
        )

    async def anomaly(self, anomaly_id: str) -> AnomalyRow | None:
        """One anomaly event by id (None for an id that is not well-formed or not known)."""
        if not isinstance(anomaly_id, str) or not ID_PATTERN.match(anomaly_id):
            return None
        rows = await self._run(self._select_anomalies, "SELECT * FROM anomalies WHERE id = ?", (anomaly_id,))
        return rows[0] if rows else None

    async def anomalies(
        self,
        container: str | None = None,
        kind: str | None = None,
        since: float | None = None,
        until: float | None = None,
        active: bool | None = None,
        limit: int = 100,
    ) -> list[AnomalyRow]:
        """Anomaly events, newest first, filtered."""
        where, args = [], []
        if container:
            where.append("(container = ? OR container_id = ? OR substr(container_id, 1, length(?)) = ?)")
            args += [container, container, container, container]
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if since is not None:
            where.append("last_seen >= ?")
            args.append(since)
        if until is not None:
            where.append("first_seen <= ?")
            args.append(until)
        if active is not None:
            where.append("resolved_at IS NULL" if active else "resolved_at IS NOT NULL")
        sql = "SELECT * FROM anomalies" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY first_seen DESC LIMIT ?"
        return await self._run(self._select_anomalies, sql, (*args, limit))

    def _select_anomalies(self, sql: str, args: tuple) -> list[AnomalyRow]:
        assert self._db is not None
        cur = self._db.execute(sql, args)
        names = [d[0] for d in cur.description]
        out = []
        for r in cur.fetchall():
            data = dict(zip(names, r))
            data["numbers"] = json.loads(data["numbers"] or "{}")
            out.append(AnomalyRow(**data))
        return out

    async def revoke_session(self, value: str, issued_at: float) -> None:
        """Remember a capture-page session ended by a logout (it stays ended across restarts)."""
        await self._run(self._exec, "INSERT OR IGNORE INTO revoked_sessions (value, issued_at) VALUES (?, ?)", (value, issued_at))

    async def revoked_sessions(self, since: float) -> dict[str, float]:
        """The sessions ended by a logout that were issued after ``since`` (older ones expired)."""
        await self._run(self._exec, "DELETE FROM revoked_sessions WHERE issued_at < ?", (since,))
        return dict(await self._run(self._fetch, "SELECT value, issued_at FROM revoked_sessions ORDER BY issued_at", ()))

    async def record_alert(self, status: str, alertname: str, fingerprint: str, starts_at: str, labels: dict[str, str], capture_id: str | None, note: str) -> None:
        """Remember one alert received from Alertmanager (firing or resolved)."""
        await self._run(
            self._exec,
            "INSERT INTO alerts (received_at, status, alertname, fingerprint, starts_at, labels, capture_id, note) VALUES (?,?,?,?,?,?,?,?)",
            (time.time(), status, alertname, fingerprint, starts_at, json.dumps(labels, sort_keys=True), capture_id, note),
        )

    async def capture_for_alert(self, fingerprint: str, starts_at: str) -> str | None:
        """The capture an earlier notification of the same firing alert already started, if any."""
        rows = await self._run(
            self._fetch,
            "SELECT capture_id FROM alerts WHERE fingerprint = ? AND starts_at = ? AND status = 'firing' AND capture_id IS NOT NULL ORDER BY seq DESC LIMIT 1",
            (fingerprint, starts_at),
        )
        return rows[0][0] if rows else None

    async def alerts(self, limit: int = 100) -> list[dict[str, Any]]:
        """The alerts received, newest first."""
        rows = await self._run(
            self._fetch, "SELECT received_at, status, alertname, fingerprint, starts_at, labels, capture_id, note FROM alerts ORDER BY seq DESC LIMIT ?", (limit,)
        )
        return [self._alert(r) for r in rows]

    async def alerts_for_capture(self, capture_id: str, limit: int = 20) -> list[dict[str, Any]]:
        """The alerts that asked for (or were answered with) this capture, newest first."""
        rows = await self._run(
            self._fetch,
            "SELECT received_at, status, alertname, fingerprint, starts_at, labels, capture_id, note FROM alerts WHERE capture_id = ? "
            "ORDER BY seq DESC LIMIT ?",
            (capture_id, limit),
        )
        return [self._alert(r) for r in rows]

    @staticmethod
    def _alert(r: tuple) -> dict[str, Any]:
        keys = ("received_at", "status", "alertname", "fingerprint", "starts_at", "labels", "capture_id", "note")
        return {**dict(zip(keys, r)), "labels": json.loads(r[5])}

    def _exec(self, sql: str, args: Iterable) -> None:
        assert self._db is not None
        self._db.execute(sql, tuple(args))

    def _fetch(self, sql: str, args: Iterable) -> list[tuple]:
        assert self._db is not None
        return self._db.execute(sql, tuple(args)).fetchall()
