"""The alerts table: every notification Alertmanager sent, and the capture it started."""

from __future__ import annotations

import json
import time
from typing import Any

from .db import IndexDb

COLUMNS = ("received_at", "status", "alertname", "fingerprint", "starts_at", "labels", "capture_id", "note")


class AlertIndex:
    """The alerts table."""

    def __init__(self, db: IndexDb) -> None:
        self.db = db

    async def record(self, status: str, alertname: str, fingerprint: str, starts_at: str, labels: dict[str, str], capture_id: str | None, note: str) -> None:
        """Remember one alert received from Alertmanager (firing or resolved)."""
        values = (time.time(), status, alertname, fingerprint, starts_at, json.dumps(labels, sort_keys=True), capture_id, note)
        await self.db.run(self.db.execute, f"INSERT INTO alerts ({','.join(COLUMNS)}) VALUES ({','.join('?' * len(COLUMNS))})", values)

    async def capture_for(self, fingerprint: str, starts_at: str) -> str | None:
        """The capture an earlier notification of the same firing alert already started, if any."""
        rows = await self.db.run(
            self.db.fetch,
            "SELECT capture_id FROM alerts WHERE fingerprint = ? AND starts_at = ? AND status = 'firing' AND capture_id IS NOT NULL ORDER BY seq DESC LIMIT 1",
            (fingerprint, starts_at),
        )
        return rows[0][0] if rows else None

    async def resolved(self, fingerprint: str, starts_at: str) -> bool:
        """Whether this alert's resolution is recorded already (pushed by the webhook, or pulled)."""
        rows = await self.db.run(
            self.db.fetch, "SELECT 1 FROM alerts WHERE fingerprint = ? AND starts_at = ? AND status = 'resolved' LIMIT 1", (fingerprint, starts_at)
        )
        return bool(rows)

    async def unresolved(self, limit: int) -> list[dict[str, Any]]:
        """The alerts recorded firing whose resolution is not recorded, newest first, one row each
        (its labels, and the capture it got if any): what the puller held when the daemon stopped."""
        rows = await self.db.run(
            self.db.fetch,
            "SELECT alertname, fingerprint, starts_at, labels, MAX(capture_id) FROM alerts a"
            " WHERE status = 'firing' AND fingerprint != '' AND NOT EXISTS"
            " (SELECT 1 FROM alerts r WHERE r.fingerprint = a.fingerprint AND r.starts_at = a.starts_at AND r.status = 'resolved')"
            " GROUP BY fingerprint, starts_at ORDER BY MAX(seq) DESC LIMIT ?",
            (limit,),
        )
        return [
            {"alertname": r[0], "fingerprint": r[1], "starts_at": r[2], "labels": json.loads(r[3]), "capture_id": r[4]}
            for r in rows
        ]

    async def list(self, limit: int = 100) -> list[dict[str, Any]]:
        """The alerts received, newest first."""
        rows = await self.db.run(self.db.fetch, f"SELECT {','.join(COLUMNS)} FROM alerts ORDER BY seq DESC LIMIT ?", (limit,))
        return [self._alert(r) for r in rows]

    async def for_capture(self, capture_id: str, limit: int = 20) -> list[dict[str, Any]]:
        """The alerts that asked for (or were answered with) this capture, newest first."""
        rows = await self.db.run(
            self.db.fetch, f"SELECT {','.join(COLUMNS)} FROM alerts WHERE capture_id = ? ORDER BY seq DESC LIMIT ?", (capture_id, limit)
        )
        return [self._alert(r) for r in rows]

    @staticmethod
    def _alert(r: tuple) -> dict[str, Any]:
        return {**dict(zip(COLUMNS, r)), "labels": json.loads(r[5])}

    def prune(self, horizon: float, keep: int) -> int:
        """Delete alerts received before ``horizon`` or past the newest ``keep`` (blocking)."""
        gone = self.db.execute("DELETE FROM alerts WHERE received_at < ?", (horizon,)).rowcount
        return gone + self.db.execute("DELETE FROM alerts WHERE seq NOT IN (SELECT seq FROM alerts ORDER BY seq DESC LIMIT ?)", (keep,)).rowcount
