"""What became of each finished capture: its outcome in the index (kept and retried when the index
cannot take it), the totals the exporter reads, and the recent captures per container.

The engine hands every capture's outcome here exactly once; the store's retention runs after each
saved one (a finished capture is what can push the store over its budget).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import structlog

from ..index import CaptureRow
from ..index.captures import FAILED
from .recent import RecentCaptures
from .store import CaptureStore

log = structlog.get_logger("nstap.capture")

MAX_UNSAVED = 1000  # finished captures whose index update failed, kept to be retried


class CaptureOutcomes:
    """Records finished captures' outcomes in the store's index; owns their totals."""

    def __init__(self, store: CaptureStore) -> None:
        self.store = store
        self.recent = RecentCaptures()
        store.evicted_listeners.append(self.recent.evicted)
        self._unsaved: dict[str, dict[str, Any]] = {}  # capture id -> outcome the index could not take yet
        self.bytes_total = 0
        self.kernel_drops_total = 0
        self.failed_total = 0

    async def load(self) -> None:
        """The recent captures per container, from the index (at start)."""
        self.recent.load(await self.store.index.captures.list(limit=100 * 10))

    async def record(self, row: CaptureRow, outcome: dict[str, Any]) -> None:
        """Write a capture's outcome to the index (kept and retried if the index cannot take it now)."""
        outcome.setdefault("finished_at", time.time())
        state = outcome["state"]
        self.bytes_total += outcome.get("bytes", 0)
        self.kernel_drops_total += outcome.get("kernel_drops", 0)
        if state == FAILED:
            self.failed_total += 1
        self.recent.remember(row, state)
        saved = await self._save(row.id, outcome)
        evicted: list[str] = []
        if saved:
            await self.retry_unsaved()
            try:
                evicted = await self.store.enforce()
            except (OSError, sqlite3.Error) as exc:
                log.warning("capture_retention_failed", error=str(exc))
        log.info(
            "capture_finished", capture_id=row.id, container=row.container, container_id=row.container_id, state=state,
            packets=outcome.get("packets", 0), pre_packets=outcome.get("pre_packets", 0), bytes=outcome.get("bytes", 0),
            kernel_drops=outcome.get("kernel_drops", 0), error=outcome.get("error", ""), evicted=len(evicted),
        )

    async def _save(self, capture_id: str, outcome: dict[str, Any]) -> bool:
        try:
            await self.store.finish(capture_id, **outcome)
        except (OSError, sqlite3.Error) as exc:
            if capture_id not in self._unsaved:
                log.warning("capture_index_failed", capture_id=capture_id, error=str(exc))
            if len(self._unsaved) < MAX_UNSAVED or capture_id in self._unsaved:
                self._unsaved[capture_id] = outcome
            return False
        self._unsaved.pop(capture_id, None)
        return True

    async def retry_unsaved(self) -> None:
        """Write the outcomes the index could not take before (a full disk that has room again)."""
        for capture_id, outcome in list(self._unsaved.items()):
            if not await self._save(capture_id, outcome):
                return

    def unsaved(self, capture_id: str) -> dict[str, Any] | None:
        """The outcome of a finished capture the index has not taken yet, if any."""
        return self._unsaved.get(capture_id)
