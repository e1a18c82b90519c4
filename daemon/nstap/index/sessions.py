"""The revoked-sessions table: capture-page sessions ended by a logout, kept across restarts
until they would have expired anyway."""

from __future__ import annotations

from .db import IndexDb


class SessionIndex:
    """The revoked_sessions table."""

    def __init__(self, db: IndexDb) -> None:
        self.db = db

    async def revoke(self, value: str, issued_at: float) -> None:
        """Remember a session ended by a logout (it stays ended across restarts)."""
        await self.db.run(self.db.execute, "INSERT OR IGNORE INTO revoked_sessions (value, issued_at) VALUES (?, ?)", (value, issued_at))

    async def revoked(self, since: float) -> dict[str, float]:
        """The sessions ended by a logout that were issued after ``since`` (older ones expired,
        and are deleted here: the table holds at most a session lifetime's logouts)."""
        await self.db.run(self.db.execute, "DELETE FROM revoked_sessions WHERE issued_at < ?", (since,))
        return dict(await self.db.run(self.db.fetch, "SELECT value, issued_at FROM revoked_sessions ORDER BY issued_at", ()))
