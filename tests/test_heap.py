"""The cyclic collector's schedule (nstap.heap): full collections after a sampling round, not
whenever the interpreter would start one; paused while a builder works."""

from __future__ import annotations

import asyncio
import gc
import weakref

from nstap.heap import NEVER, FullCollections, collector_paused


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
        assert gc.get_threshold() == (thresholds[0], thresholds[1], NEVER)
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
