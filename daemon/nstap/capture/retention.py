"""Which captures the store evicts: a pure decision over what it holds, tested as tables.

The store keeps within an age limit and a disk budget, oldest first, with one rule of fairness: a
container that keeps tripping fills the store with its own captures, and the budget must be made
from those, not from the one capture a quiet container has. So, to get under the budget, the
oldest capture of a container that *has another one* goes first; only when every container is down
to its last capture do last captures go, oldest first. The age limit applies to every capture.
Running captures are never evicted (but count as their container's capture).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple


class HeldCapture(NamedTuple):
    """What the decision needs to know of one capture with a file in the store."""

    id: str
    container_id: str
    created_at: float
    size: int
    finished: bool


def plan_evictions(held: Sequence[HeldCapture], max_bytes: int, max_age: float, now: float) -> list[str]:
    """The ids to evict, in the order to evict them."""
    ordered = sorted(held, key=lambda c: (c.created_at, c.id))
    total = sum(c.size for c in ordered)
    per_container = Counter(c.container_id for c in ordered)
    evicted: list[str] = []
    gone: set[str] = set()

    def evict(c: HeldCapture) -> None:
        nonlocal total
        evicted.append(c.id)
        gone.add(c.id)
        total -= c.size
        per_container[c.container_id] -= 1

    for c in ordered:
        if c.finished and now - c.created_at > max_age:
            evict(c)
    for only_spares in (True, False):
        for c in ordered:
            if total <= max_bytes:
                return evicted
            if c.id in gone or not c.finished:
                continue
            if only_spares and per_container[c.container_id] <= 1:
                continue
            evict(c)
    return evicted
