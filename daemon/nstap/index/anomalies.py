"""The anomalies table: one row per anomaly event, from its onset to its resolution.

What the detectors' incident tracker writes (:mod:`nstap.detect.incidents`) and the API and the
capture page read; it knows nothing of captures but their ids.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .db import IndexDb
from .ids import well_formed


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
    cause: str = "unknown"  # the cause's kind (nstap.detect.cause), updated while it lasts
    cause_text: str = ""  # the cause in one sentence

    def to_json(self) -> dict[str, Any]:
        """The row as the API shows it."""
        out = asdict(self)
        out["cause"] = {"kind": self.cause, "text": out.pop("cause_text")}
        out["active"] = self.resolved_at is None
        out["detected_after"] = round(self.first_seen - self.started_at, 3) if self.started_at is not None else None
        return out


class AnomalyIndex:
    """The anomalies table."""

    def __init__(self, db: IndexDb) -> None:
        self.db = db

    async def save(self, row: AnomalyRow) -> None:
        """Insert or update an anomaly event."""
        await self.db.run(self._save, row)

    def _save(self, row: AnomalyRow) -> None:
        data = asdict(row)
        data["numbers"] = json.dumps(row.numbers, sort_keys=True)
        updates = ",".join(f"{k} = excluded.{k}" for k in data if k != "id")
        self.db.execute(
            f"INSERT INTO anomalies ({','.join(data)}) VALUES ({','.join('?' * len(data))}) ON CONFLICT(id) DO UPDATE SET {updates}",
            tuple(data.values()),
        )

    async def get(self, anomaly_id: str) -> AnomalyRow | None:
        """One anomaly event by id (None for an id that is not well-formed or not known)."""
        if not well_formed(anomaly_id):
            return None
        rows = await self.db.run(self._select, "SELECT * FROM anomalies WHERE id = ?", (anomaly_id,))
        return rows[0] if rows else None

    async def list(
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
            args += [container] * 4
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
        return await self.db.run(self._select, sql, (*args, limit))

    def _select(self, sql: str, args: tuple) -> list[AnomalyRow]:
        cur = self.db.execute(sql, args)
        names = [d[0] for d in cur.description]
        out = []
        for r in cur.fetchall():
            data = dict(zip(names, r))
            data["numbers"] = json.loads(data["numbers"] or "{}")
            out.append(AnomalyRow(**data))
        return out

    def close_open(self) -> int:
        """End the events a daemon that stopped left open, at their last sighting (blocking: the
        index's thread, at open); returns how many."""
        return self.db.execute("UPDATE anomalies SET resolved_at = last_seen WHERE resolved_at IS NULL").rowcount

    def prune(self, horizon: float, keep: int) -> int:
        """Delete ended events last seen before ``horizon`` or past the newest ``keep`` (blocking)."""
        gone = self.db.execute("DELETE FROM anomalies WHERE resolved_at IS NOT NULL AND last_seen < ?", (horizon,)).rowcount
        return gone + self.db.execute(
            "DELETE FROM anomalies WHERE resolved_at IS NOT NULL AND id NOT IN (SELECT id FROM anomalies ORDER BY first_seen DESC LIMIT ?)", (keep,)
        ).rowcount
