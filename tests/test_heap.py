"""The cyclic collector's schedule (nstap.heap): full collections after a sampling round, not
whenever the interpreter would start one; paused while a builder works."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import subprocess
import sys
import weakref
from pathlib import Path

from nstap.heap import NEVER, YOUNG, FullCollections, collector_paused

DAEMON = Path(__file__).resolve().parent.parent / "daemon"


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def old_cycle() -> weakref.ref:
    """A reference cycle that has reached the oldest generation, then become garbage: only a full
    collection frees it."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    gc.collect(1)  # young and middle collections promote it to the oldest generation
    ref = weakref.ref(a)
    del a, b
    gc.collect(1)
    assert ref() is not None  # the young collections do not reach it
    return ref


def full_collections() -> int:
    return gc.get_stats()[2]["collections"]


async def test_the_interpreter_starts_no_full_collection_the_rounds_do_at_most_every_period() -> None:
    thresholds = gc.get_threshold()
    now = [0.0]
    fc = FullCollections(every=10.0, clock=lambda: now[0])
    fc.take_over()
    try:
        assert gc.get_threshold() == (max(thresholds[0], YOUNG), thresholds[1], NEVER)
        garbage = old_cycle()
        before = full_collections()
        # Tens of thousands of objects that survive into the oldest generation: left to the
        # interpreter, a quarter of the survivors of the last full pass sets one off.
        kept = [[Node() for _ in range(1000)] for _ in range(300)]
        assert full_collections() == before and garbage() is not None
        now[0] = 9.9
        fc.after_round()  # not due yet
        assert full_collections() == before and fc.runs == 0 and garbage() is not None
        with collector_paused():  # a builder at work: none, even when due
            now[0] = 10.0
            fc.after_round()
            assert full_collections() == before and fc.runs == 0
        fc.after_round()
        assert fc.runs == 1 and full_collections() == before + 1 and garbage() is None
        now[0] = 15.0
        fc.after_round()
        assert fc.runs == 1  # the next one 10 s after that one
        del kept
    finally:
        fc.give_back()
    assert gc.get_threshold() == thresholds


async def test_young_collections_wait_for_young_net_allocations_and_still_free_young_cycles() -> None:
    """Rounds that make their samples and then free the last round's (3,000 tracked objects more
    at each round's peak, as many fewer after it) start no young collection, each of which would
    walk every young object alive (at the interpreter's 700, 97 of them in these 50 rounds).
    Lasting net growth does, after YOUNG objects, and frees the cyclic garbage made meanwhile."""
    fc = FullCollections(every=3600.0)
    fc.take_over()
    try:
        gc.collect(0)
        young = gc.get_stats()[0]["collections"]
        samples = [(Node(), [i]) for i in range(1000)]
        for _ in range(50):  # 50 "rounds" of 1,000 samples (3,000 tracked objects), each replacing the last
            samples = [(Node(), [i]) for i in range(1000)]
        assert gc.get_stats()[0]["collections"] == young
        a, b = Node(), Node()
        a.other, b.other = b, a
        garbage = weakref.ref(a)
        del a, b
        kept = [[] for _ in range(YOUNG // 2)]  # net growth, but not YOUNG yet
        assert gc.get_stats()[0]["collections"] == young and garbage() is not None
        kept += [[] for _ in range(YOUNG // 2 + 100)]
        assert gc.get_stats()[0]["collections"] > young and garbage() is None
        del kept, samples
    finally:
        fc.give_back()


async def test_a_due_collection_waits_for_a_round_that_leaves_it_room() -> None:
    """A round that ended close to the next tick (at 1,000 containers on a loaded host, rounds of
    0.5-0.9 s) leaves too little room for a full collection of 100-200 ms: run there, it delayed
    the next tick's early reads and the tick. A due collection waits for a round that leaves
    ROOM_FACTOR times the wall time of the longest recent one, and runs anyway once it is
    OVERDUE periods old."""
    now = [0.0]
    fc = FullCollections(every=10.0, clock=lambda: now[0])
    fc.take_over()
    kept = [[Node() for _ in range(1000)] for _ in range(200)]  # a heap a collection takes a while to walk
    try:
        now[0] = 10.0
        fc.after_round(0.0)  # none measured yet: no room needed
        assert fc.runs == 1 and fc.need() > 0.0
        garbage = old_cycle()
        now[0] = 20.0
        fc.after_round(fc.need() * 0.9)  # due, but it would not fit
        assert fc.runs == 1 and fc.deferred == 1 and garbage() is not None
        fc.after_round(fc.need() * 1.1)  # a round that leaves room
        assert fc.runs == 2 and garbage() is None
        garbage = old_cycle()
        for t in (30.0, 45.0, 59.9):  # due from 30 s; no round leaves it room
            now[0] = t
            fc.after_round(0.0)
        assert fc.runs == 2 and fc.deferred == 4 and garbage() is not None
        now[0] = 20.0 + fc.OVERDUE * 10.0  # overdue: a host whose rounds fill every interval gets one all the same
        fc.after_round(0.0)
        assert fc.runs == 3 and garbage() is None
    finally:
        del kept
        fc.give_back()


async def test_with_no_round_a_timer_runs_the_full_collections() -> None:
    """No namespace watched, so no round: cyclic garbage is still freed, every two periods."""
    fc = FullCollections(every=0.1)
    fc.take_over()
    try:
        garbage = old_cycle()
        await asyncio.sleep(0.45)
        assert fc.runs >= 1 and garbage() is None
    finally:
        fc.give_back()
    runs = fc.runs
    await asyncio.sleep(0.3)
    assert fc.runs == runs  # given back: its timer is gone


ARENAS = r"""
import ctypes, os, sys, threading
from nstap.heap import limit_malloc_arenas
print(limit_malloc_arenas() if sys.argv[1] == "limit" else None, flush=True)
ready, done = threading.Barrier(9), threading.Event()
def worker():
    held = [bytes(20_000) for _ in range(50)]  # C's malloc, from this thread (below the mmap threshold)
    ready.wait()
    done.wait()
threads = [threading.Thread(target=worker) for _ in range(8)]
for t in threads: t.start()
ready.wait()
ctypes.CDLL(None).malloc_stats()  # one "Arena N:" block per arena, on stderr
done.set()
for t in threads: t.join()
"""


def arenas(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    run = subprocess.run([sys.executable, "-c", ARENAS, mode], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(DAEMON), **(env or {})}, check=True)
    return run.stdout.strip(), len(re.findall(r"^Arena \d+:", run.stderr, re.M))


def test_eight_allocating_threads_share_two_malloc_arenas() -> None:
    """glibc's own limit (eight per core) gives each of eight threads an arena that keeps its
    peak; limited, they share two. An operator's MALLOC_ARENA_MAX is left as it is."""
    assert arenas("none")[1] >= 8
    assert arenas("limit") == ("True", 2)
    assert arenas("limit", {"MALLOC_ARENA_MAX": "3"}) == ("False", 3)
