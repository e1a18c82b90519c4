"""The process's heap: the cyclic garbage collector, paused while a worker thread builds a large
structure, its young collections made rare and its full collections run by the daemon after a
sampling round (:class:`FullCollections`); and how many arenas C's allocator keeps
(:func:`limit_malloc_arenas`).

A full collection walks every object the process tracks while holding the GIL, and building a
structure of a million objects (a 20,000-rule firewall parsed, a conntrack table) sets off several
of them: each one stops the event loop's thread for up to 0.1 s. The structures built here hold no
reference cycles to collect, so the collector waits until the last builder is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_builders = 0


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection (in any thread) until every ``with`` block using this is left."""
    global _builders
    with _lock:
        _builders += 1
        if _builders == 1:
            gc.disable()
    try:
        yield
    finally:
        with _lock:
            _builders -= 1
            if _builders == 0:
                gc.enable()


M_ARENA_MAX = -8  # glibc's mallopt parameter
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """At most ``arenas`` glibc malloc arenas in this process (call before starting threads).

    glibc gives each thread that allocates its own arena, up to eight per core, and an arena keeps
    the pages of its largest moment. The daemon's worker threads take turns at the large reads (a
    5,000-rule firewall's text and parse, a conntrack table), so RSS became the sum of each
    arena's peak and kept climbing as a read landed on a thread that had not held one before:
    113 to 133 MiB over 30 s in the hostile-container test, 111-121 MiB and flat in its second
    half with two arenas. The threads allocate with the GIL held, so sharing arenas costs them no
    waiting (the 50-container bench: 0.236-0.246 ms per container-sample with two, 0.233-0.237
    with one per thread, within its run-to-run spread). An operator's own ``MALLOC_ARENA_MAX`` is
    kept; with another C library (musl) nothing changes. True if set.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return mallopt(M_ARENA_MAX, arenas) == 1


NEVER = 2**31 - 1  # a threshold no count reaches: the interpreter never starts that collection itself
FULL_EVERY = 60.0  # seconds between the full collections the daemon starts itself
# Net new tracked objects (allocated less freed) that start a young collection: the interpreter's
# default is 700. See FullCollections.
YOUNG = 20_000


class FullCollections:
    """Full collections (the oldest generation) at moments the daemon picks: after a sampling round.

    Left to the interpreter, a full collection starts whenever a quarter as many objects as
    survived the last one have reached the oldest generation, in whatever thread allocates at that
    moment. Beside 1,000 containers that was every 4 to 15 s, each walking some 180,000 objects
    for 50 to 200 ms with the GIL held: ticks started 30 to 45 ms late (the p99 of
    ``nstap_tick_lag_seconds``), and the passes took 3 to 9 ms a second. Taken over, the
    interpreter runs only the young collections; :meth:`after_round` runs a full one at most every
    ``every`` seconds, when a round is done and the next tick is furthest away, and never while a
    worker thread builds a large structure (:func:`collector_paused`). With no round to run after
    (no namespace watched), a timer runs it every ``2 * every`` seconds. Cyclic garbage that reached
    the oldest generation waits at most that long to be freed.

    A round that ends late leaves little room before the next tick (at 1,000 containers on a
    loaded 2-core host, rounds of 0.5-0.9 s): a collection there delays the next tick's early
    reads and the tick itself. So one runs only when the room the ticker reports is at least
    ROOM_FACTOR times the wall time of the longest of the latest collections; otherwise it waits
    for a round that leaves more, for at most OVERDUE periods (a host whose rounds fill every
    interval still gets one then). The daemon passes the room before the next scrape too
    (ApiServer.quiet): a collection that ran while a scrape was answered held its response back.

    Young collections start after YOUNG net new tracked objects, not the interpreter's 700. A
    young collection walks every tracked object made since the last one that is still alive,
    however few were made: a round makes each namespace's new sample and frees the last, so the
    count barely moves while the round's objects fill the young generation, and whichever thread
    pushed it past 700 (the eBPF read, a render, the loop itself) walked them all. Beside 1,000
    containers on a slow 2-core VM that was 4 young collections a second (up to 216 ms each) and
    a middle one every 3 s (up to 170 ms), with the GIL held: 25-29 µs of CPU per
    container-sample, ticks late. What a collection walks is bounded by what is alive, not by the
    threshold, which only sets how often: at YOUNG, 6 young collections in 120 s and no middle one
    (docs/performance.md, "Young collections made rare"). Cyclic garbage in the young generation
    waits for YOUNG net allocations instead of 700: a few MiB at most.
    """

    ROOM_FACTOR = 2.0
    OVERDUE = 4  # periods a due collection waits for room at most
    TOOK = 4  # collections whose wall time is remembered

    def __init__(self, every: float = FULL_EVERY, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.clock = clock
        self.last = clock()
        self.runs = 0
        self.deferred = 0  # rounds after which a due collection waited for more room
        self._took: deque[float] = deque(maxlen=self.TOOK)  # wall seconds of the latest collections
        self._thresholds: tuple[int, int, int] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def take_over(self) -> None:
        """From now on the interpreter starts no full collection itself (call on the event loop)."""
        if self._thresholds is None:
            self._thresholds = gc.get_threshold()
            young, middle, _ = self._thresholds
            gc.set_threshold(max(young, YOUNG), middle, NEVER)
            self.last = self.clock()
            self._timer = asyncio.get_running_loop().call_later(self.every, self._idle)

    def give_back(self) -> None:
        """The interpreter's own schedule again."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._thresholds is not None:
            gc.set_threshold(*self._thresholds)
            self._thresholds = None

    def need(self) -> float:
        """Seconds of room before the next tick a collection needs to run after a round."""
        return self.ROOM_FACTOR * max(self._took, default=0.0)

    def after_round(self, room: float = math.inf) -> None:
        """A sampling round is done, ``room`` seconds before the next tick needs the event loop's
        thread: a full collection if one is due and fits (the event loop's thread)."""
        since = self.clock() - self.last
        if since < self.every:
            return
        if room < self.need() and since < self.OVERDUE * self.every:
            self.deferred += 1
            return
        self._collect()

    def _idle(self) -> None:
        if self.clock() - self.last >= 2 * self.every:  # no round ran one
            self._collect()
        self._timer = asyncio.get_running_loop().call_later(self.every, self._idle)

    def _collect(self) -> None:
        if not gc.isenabled():  # a builder is at work (collector_paused): after the next round
            return
        started = time.perf_counter()
        gc.collect(2)
        self._took.append(time.perf_counter() - started)
        self.last = self.clock()
        self.runs += 1
