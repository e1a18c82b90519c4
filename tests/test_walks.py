"""The host-wide pacing of TCP socket-state walks (nstap.walks): the arithmetic, then real
namespaces that all want a walk at once."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from collections.abc import Iterator

import pytest

from conftest import tool
from nstap.instruments import Instruments
from nstap.netns.handles import NamespaceOpener
from nstap.registry import ContainerRegistry
from nstap.runtime.records import ContainerRecord
from nstap.samplers import SAMPLERS, SamplerContext
from nstap.samples import SampleStore
from nstap.walks import BANKED, DEBT_ROUNDS, WalkPacer
from nstap.watcher import WatcherPool
from prometheus_client import CollectorRegistry


def test_walks_all_due_at_once_are_spread_over_rounds_within_the_budget() -> None:
    """1,000 namespaces whose first walks are all due at the same round (a daemon's start): each
    round starts walks worth its credit and no more (plus the one walk that takes the credit below
    zero), and over the rounds the walks use the budget."""
    budget, namespaces, cost = 0.00005, 1000, 0.007
    pacer = WalkPacer(budget)
    due = namespaces
    rounds = 0
    while due and rounds < 1000:
        pacer.new_round(namespaces)
        rounds += 1
        this_round = 0.0
        while due:
            charged = pacer.admit(None if due == namespaces else cost)
            if charged is None:
                break
            pacer.done(charged, cost)
            due -= 1
            this_round += cost
        assert this_round <= budget * namespaces + cost
    # 7 s of walking at 50 ms a round: 140 rounds, where all 1,000 walks were due at the first
    assert due == 0 and 139 <= rounds <= 141, rounds


def test_credit_is_banked_for_two_rounds_at_most() -> None:
    pacer = WalkPacer(0.001)
    for _ in range(100):
        pacer.new_round(10)  # nothing due for 100 rounds
    assert pacer.credit == pytest.approx(BANKED * 0.01)
    started = 0
    for _ in range(100):
        if pacer.admit(0.004) is None:
            break
        started += 1
    assert started == 5  # 20 ms of credit: five walks charged 4 ms, the last taking it to 0


def test_a_fault_walk_is_never_refused_but_is_paid_for() -> None:
    pacer = WalkPacer(0.0001)
    pacer.new_round(10)  # 1 ms a round
    assert pacer.admit(0.005) is not None  # credit 1 ms -> -4 ms
    assert pacer.admit(0.005) is None  # a scheduled walk waits
    assert pacer.admit(0.005, urgent=True) == 0.005  # a walk asked for by retried SYNs does not
    for _ in range(8):
        pacer.new_round(10)
        assert pacer.admit(0.001) is None  # -9 ms, repaid at 1 ms a round
    pacer.new_round(10)
    pacer.new_round(10)
    assert pacer.admit(0.001) is not None


def test_a_cheap_walk_is_not_held_back_by_another_namespaces_dear_one() -> None:
    """A namespace with a small hash of its own walks every interval at ~16 µs, within one sample's
    budget; another's walk of the host's hash (7 ms) puts the credit in debt for many rounds, and
    the cheap one goes on regardless (charged), where the dear ones wait."""
    pacer = WalkPacer(0.00005)
    pacer.new_round(10)  # 0.5 ms a round
    assert pacer.admit(0.007) is not None  # -> -6.5 ms
    for _ in range(5):
        pacer.new_round(10)
        assert pacer.admit(0.000016) == 0.000016
        assert pacer.admit(0.007) is None
        assert pacer.admit(None) is None  # never walked: charged the typical walk, so it waits too


def test_the_credit_stays_within_its_bounds() -> None:
    """Whatever the walks cost and however many are urgent, the credit stays between BANKED rounds'
    credit and DEBT_ROUNDS rounds' debt: the pacer's state does not grow with time."""
    rng = random.Random(7)
    pacer = WalkPacer(0.00005)
    namespaces = 200
    gain = 0.00005 * namespaces
    for _ in range(5000):
        if rng.random() < 0.3:
            namespaces = rng.randint(1, 2000)
            gain = 0.00005 * namespaces
        pacer.new_round(namespaces)
        for _ in range(rng.randint(0, 20)):
            charged = pacer.admit(rng.choice([None, rng.uniform(0, 0.02)]), urgent=rng.random() < 0.2)
            if charged is not None:
                pacer.done(charged, rng.uniform(0, 0.05))
            assert -gain * DEBT_ROUNDS - 1e-12 <= pacer.credit <= gain * BANKED + 1e-12
    assert 0 <= pacer.typical < 0.05


def test_without_a_budget_every_walk_goes() -> None:
    """socket_walk.budget_ms: 0 spaces each namespace's walks by max_interval alone, as before."""
    pacer = WalkPacer(0.0)
    pacer.new_round(1000)
    assert all(pacer.admit(0.007) == 0.0 for _ in range(100))


# -- real namespaces -------------------------------------------------------------------------------

HOLDER = """
import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(8)
c = socket.create_connection(s.getsockname()); a, _ = s.accept()
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture
def busy_namespaces() -> Iterator[list[int]]:
    """Six namespaces of their own (``unshare -n``), each with a listener and an established
    connection on loopback: sockets other than listeners, so each wants a walk from the start."""
    procs = []
    try:
        for _ in range(6):
            proc = subprocess.Popen(
                [tool("unshare"), "-n", "sh", "-c", f"ip link set lo up && exec {sys.executable} -c '{HOLDER}'"],
                stdout=subprocess.PIPE, text=True,
            )
            procs.append(proc)
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        yield [proc.pid for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


async def test_namespaces_that_start_together_are_not_walked_together(busy_namespaces: list[int]) -> None:
    """Every namespace's first walk is due at once; the walks that start by any round cost no more
    CPU than the budget of the samples taken so far and one walk, and the rest wait (counted), then
    go. Before the pacer all six walked at their first sample."""
    budget = 0.0001  # 100 µs per container-sample: 0.6 ms a round for six, where one walk of the host's hash is ms
    opener = NamespaceOpener()
    prom = CollectorRegistry()
    instruments = Instruments(prom)
    context = SamplerContext(interval=0.2, host_links=None, walk_budget=budget, max_walk_interval=60.0, max_listen_ports=64)
    pool = WatcherPool(ContainerRegistry(), opener, list(SAMPLERS.values()), context, SampleStore(), instruments)
    for n, pid in enumerate(busy_namespaces):
        record = ContainerRecord(id=f"{n:02d}" * 32, name=f"busy{n}", runtime="test", pid=pid, status="running", image="i")
        pool.registry.upsert(record.with_netns(os.stat(f"/proc/{pid}/ns/net").st_ino, 0))
    pool.start()
    try:
        walked = instruments.walk_duration
        for _ in range(30):  # 6 s
            await asyncio.sleep(0.2)
            samples = instruments.sample_duration.count
            # the budget of the samples so far, and the walk that took the credit below zero
            # (one walk of the host's hash: 1-7 ms here, so six at once do not fit)
            one_walk = max(walked.sum / walked.count if walked.count else 0.0, 0.002)
            assert walked.sum <= budget * samples + 2 * one_walk, (walked.count, walked.sum, samples)
        assert len(pool.watched()) == 6
        assert instruments.walks_deferred._value.get() > 0  # due walks waited
        assert walked.count >= 2  # and went
    finally:
        await pool.stop()
        opener.close()
