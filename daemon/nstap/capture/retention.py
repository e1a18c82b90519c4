"""Which captures the store evicts: a pure decision over what it holds, tested as tables.

The store keeps within an age limit and a disk budget, with one rule of fairness: a container
that keeps tripping fills the store with its own captures, and the budget must be made from
those, not from the one capture a quiet container has. A container's captures that count are the
finished ones with packets (a failed, empty capture is not one worth keeping). So:

1. every finished capture older than the age limit goes;
2. while over budget, the oldest capture of the container that holds the most bytes *and has more
   than one* goes (a noisy container pays first);
3. only when every container is down to its last capture, and the finished captures alone exceed
   the budget, do last captures go, oldest first. Running captures are never evicted, and the
   room they will take is not made at another container's expense: once they finish they are
   their container's spares, and the next pass takes those.
"""

from __future__ import annotations

from collections import deque
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
    evicted: list[str] = []
    kept: list[HeldCapture] = []
    for c in ordered:
        if c.finished and now - c.created_at > max_age:
            evicted.append(c.id)
        else:
            kept.append(c)
    total = sum(c.size for c in kept)
    worth: dict[str, deque[HeldCapture]] = {}  # container -> its finished captures with packets, oldest first
    for c in kept:
        if c.finished and c.size > 0:
            worth.setdefault(c.container_id, deque()).append(c)
    held_bytes = {cid: sum(c.size for c in q) for cid, q in worth.items()}
    while total > max_bytes:
        spare = [cid for cid, q in worth.items() if len(q) > 1]
        if not spare:
            break
        cid = max(spare, key=lambda k: (held_bytes[k], len(worth[k]), k))
        c = worth[cid].popleft()
        evicted.append(c.id)
        total -= c.size
        held_bytes[cid] -= c.size
    finished_total = sum(c.size for q in worth.values() for c in q)
    for c in sorted((q[0] for q in worth.values() if q), key=lambda c: (c.created_at, c.id)):
        if finished_total <= max_bytes:
            break
        evicted.append(c.id)
        finished_total -= c.size
    return evicted
