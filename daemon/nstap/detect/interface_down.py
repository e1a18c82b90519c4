"""An interface that was up and is not."""

from __future__ import annotations

from ..samples import NamespaceSample
from .base import Finding, Param

KIND = "interface_down"
PARAMS: dict[str, Param] = {}


class InterfaceDownDetector:
    """Trips while an interface that has been seen up (container side or host side) is down; the
    onset is the first sample that saw it down."""

    kind = KIND

    def __init__(self) -> None:
        self._seen_up: set[tuple[str, str]] = set()
        self._down_since: dict[tuple[str, str], float] = {}

    def observe(self, sample: NamespaceSample) -> Finding | None:
        if sample.interfaces is None:
            return None
        down = []
        for i in sample.interfaces:
            key = (i.name, i.side)
            if i.up:
                self._seen_up.add(key)
                self._down_since.pop(key, None)
            elif key in self._seen_up:
                down.append(f"{i.name} ({i.side})")
                self._down_since.setdefault(key, sample.taken_at)
        if not down:
            return None
        since = min(self._down_since.values())
        return Finding(KIND, "down: " + ", ".join(down), {"interfaces": ", ".join(down)}, started_at=since)
