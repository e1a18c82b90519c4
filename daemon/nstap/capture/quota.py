"""The slot quota of anomaly captures: what one container that keeps tripping may take.

Two limits per container: at most ``per_hour`` anomaly captures started in the last hour, and at
most ``share`` of them running at once (half the concurrent slots). Every anomaly capture holds a
slot from :meth:`SlotQuota.take` until its :class:`Slot` is released, whichever side it is taken
on (the namespace, or the host end of its veth), so host-side captures count by construction.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Collection

PERIOD = 3600.0  # the window of capture.max_per_container_per_hour


class Slot:
    """One running anomaly capture's hold on its container's share; release it once."""

    def __init__(self, quota: SlotQuota, container_id: str) -> None:
        self._quota, self.container_id = quota, container_id
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._quota._release(self.container_id)


class SlotQuota:
    """Per-container counts of anomaly captures: started in the last hour, and running."""

    def __init__(self, per_hour: int, max_concurrent: int) -> None:
        self.per_hour = per_hour
        self.share = max(1, max_concurrent // 2)
        self._started: dict[str, deque[float]] = {}  # container id -> when its anomaly captures started
        self._running: dict[str, int] = {}  # container id -> its anomaly captures running now

    def refusal(self, container_id: str, now: float | None = None, first: bool = True) -> str:
        """Why one more anomaly capture of this container is one too many now ("" if it is not).
        ``first`` is the first capture of an anomaly (it counts against the hour); later ones
        (the host side) only need a running slot."""
        if first:
            now = now if now is not None else time.time()
            history = self._started.setdefault(container_id, deque())
            while history and now - history[0] > PERIOD:
                history.popleft()
            if len(history) >= self.per_hour:
                return f"{self.per_hour} anomaly captures of this container in the last hour"
        running = self._running.get(container_id, 0)
        return f"{running} anomaly captures of this container are running (at most {self.share} at a time)" if running >= self.share else ""

    def take(self, container_id: str, now: float | None = None, first: bool = True) -> Slot:
        """Hold a running slot (and, with ``first``, count the capture in the hour) — check
        :meth:`refusal` first; call before any await, so captures of one tick count too."""
        if first:
            self._started.setdefault(container_id, deque()).append(now if now is not None else time.time())
        self._running[container_id] = self._running.get(container_id, 0) + 1
        return Slot(self, container_id)

    def forget_start(self, container_id: str, now: float) -> None:
        """A capture counted at ``now`` that did not start after all: it does not count in the hour."""
        history = self._started.get(container_id)
        if history is not None and now in history:
            history.remove(now)

    def _release(self, container_id: str) -> None:
        left = self._running.get(container_id, 0) - 1
        if left > 0:
            self._running[container_id] = left
        else:
            self._running.pop(container_id, None)

    def running(self, container_id: str) -> int:
        """Anomaly captures of the container running now."""
        return self._running.get(container_id, 0)

    def prune(self, current: Collection[str], now: float | None = None) -> None:
        """Forget containers that are gone once their hour is over: a container that crash-loops
        leaves and comes back with the same id, and must not get a fresh quota each time."""
        horizon = (now if now is not None else time.time()) - PERIOD
        for cid in [c for c, h in self._started.items() if c not in current and (not h or h[-1] < horizon)]:
            del self._started[cid]

    def __len__(self) -> int:
        """Containers remembered (bounded: gone ones leave after their hour)."""
        return len(self._started)
