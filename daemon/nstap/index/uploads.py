"""The upload queue: one row per finished capture whose objects are not all in the bucket yet.

It lives in the index so that it survives a restart; ``done`` names the objects already confirmed
(``pcap,evidence,...``), so a resumed upload starts where it stopped. A row goes when its capture
is uploaded (the capture's ``uploaded_at`` set in the same transaction) or is gone. The plain
methods run in the index's thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from .db import IndexDb


@dataclass
class UploadRow:
    """One queued capture."""

    capture_id: str
    queued_at: float
    attempts: int = 0
    next_at: float = 0.0
    done: str = ""
    error: str = ""

    @property
    def done_set(self) -> set[str]:
        return {p for p in self.done.split(",") if p}


class UploadIndex:
    """The uploads table."""

    def __init__(self, db: IndexDb) -> None:
        self.db = db

    def add(self, capture_id: str, now: float) -> bool:
        """Queue a capture (once); True if it was not queued yet."""
        return self.db.execute("INSERT OR IGNORE INTO uploads (capture_id, queued_at) VALUES (?, ?)", (capture_id, now)).rowcount > 0

    def backfill(self, now: float, states: tuple[str, ...]) -> int:
        """Queue every finished capture with a file that is neither uploaded nor queued (at start:
        captures taken before the bucket was configured, or whose queueing a stop cut off)."""
        marks = ",".join("?" * len(states))
        return self.db.execute(
            "INSERT OR IGNORE INTO uploads (capture_id, queued_at) SELECT id, ? FROM captures "
            f"WHERE file IS NOT NULL AND uploaded_at IS NULL AND state IN ({marks})", (now, *states),
        ).rowcount

    def due(self, now: float, limit: int, skip: tuple[str, ...] = ()) -> list[UploadRow]:
        """Rows whose next try is due, oldest first (``skip``: those being uploaded now)."""
        marks = ",".join("?" * len(skip))
        where = f" AND capture_id NOT IN ({marks})" if skip else ""
        rows = self.db.fetch(
            f"SELECT capture_id, queued_at, attempts, next_at, done, error FROM uploads WHERE next_at <= ?{where} ORDER BY queued_at LIMIT ?",
            (now, *skip, limit),
        )
        return [UploadRow(*r) for r in rows]

    def next_due(self) -> float | None:
        """When the earliest row is due (None: the queue is empty)."""
        return self.db.fetch("SELECT MIN(next_at) FROM uploads")[0][0]

    def count(self) -> int:
        return self.db.fetch("SELECT COUNT(*) FROM uploads")[0][0]

    def progress(self, capture_id: str, done: set[str]) -> None:
        self.db.execute("UPDATE uploads SET done = ? WHERE capture_id = ?", (",".join(sorted(done)), capture_id))

    def retry(self, capture_id: str, next_at: float, error: str) -> None:
        self.db.execute("UPDATE uploads SET attempts = attempts + 1, next_at = ?, error = ? WHERE capture_id = ?", (next_at, error[:500], capture_id))

    def finish(self, capture_id: str, now: float, done: set[str]) -> None:
        """The capture is in the bucket: its row goes, its capture says when and which objects."""
        self.db.execute("BEGIN")
        try:
            self.db.execute("DELETE FROM uploads WHERE capture_id = ?", (capture_id,))
            self.db.execute("UPDATE captures SET uploaded_at = ?, uploaded_objects = ? WHERE id = ?", (now, ",".join(sorted(done)), capture_id))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def drop(self, capture_id: str) -> None:
        """Give up on a capture (gone from the store, or refused for good)."""
        self.db.execute("DELETE FROM uploads WHERE capture_id = ?", (capture_id,))

    def of(self, capture_ids: list[str]) -> dict[str, UploadRow]:
        """The queue rows of these captures (those queued), by capture id."""
        out: dict[str, UploadRow] = {}
        for start in range(0, len(capture_ids), 500):  # well under SQLite's limit of bound values
            part = capture_ids[start : start + 500]
            rows = self.db.fetch(
                f"SELECT capture_id, queued_at, attempts, next_at, done, error FROM uploads WHERE capture_id IN ({','.join('?' * len(part))})", part,
            )
            out.update((r[0], UploadRow(*r)) for r in rows)
        return out

    def pending(self) -> set[str]:
        """Ids of the captures in the queue."""
        return {r[0] for r in self.db.fetch("SELECT capture_id FROM uploads")}
