"""The latest finished captures per container: what ``nstap_capture_info`` exports and the
dashboards link to, kept across restarts (loaded from the index) and told of evictions."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

from ..index.captures import EVICTED, RUNNING, CaptureRow

PER_CONTAINER = 10  # finished captures per container exported as nstap_capture_info
CONTAINERS = 1000  # containers whose latest captures are remembered


class RecentCapture(NamedTuple):
    id: str
    container: str
    runtime: str
    reason: str
    state: str
    created_at: float


class RecentCaptures:
    """Per container short id, its latest finished captures (a gone container's are kept, for a
    while: it may come back; the exporter shows those of running containers only)."""

    def __init__(self) -> None:
        self._by_container: dict[str, deque[RecentCapture]] = {}

    def remember(self, row: CaptureRow, state: str) -> None:
        if not row.container_id:
            return
        recent = self._by_container.pop(row.container_id, None) or deque(maxlen=PER_CONTAINER)
        recent.append(RecentCapture(row.id, row.container, row.runtime, row.reason, state, row.created_at))
        self._by_container[row.container_id] = recent  # the most recently used last
        while len(self._by_container) > CONTAINERS:
            del self._by_container[next(iter(self._by_container))]

    def load(self, rows: Iterable[CaptureRow]) -> None:
        """Remember finished rows, newest first as the index lists them."""
        for row in reversed(list(rows)):  # oldest first, so that each deque ends with the newest
            if row.state != RUNNING:
                self.remember(row, row.state)

    def evicted(self, ids: list[str]) -> None:
        """Captures the store evicted: their links say so (the capture page explains)."""
        gone = set(ids)
        for recent in self._by_container.values():
            for i, entry in enumerate(recent):
                if entry.id in gone:
                    recent[i] = entry._replace(state=EVICTED)

    def items(self) -> list[tuple[str, list[RecentCapture]]]:
        return [(cid, list(q)) for cid, q in self._by_container.items()]

    def __len__(self) -> int:
        return len(self._by_container)
