"""The flight-recorder fleet: one ring-buffer tcpdump per watched namespace that wants one.

A namespace gets a recorder when ``capture.ring`` is ``all``, or ``labeled`` and a member says
``nstap.capture=ring``; never when a member, watched or not, says ``nstap.capture=off``. The
fleet follows the watched namespaces and their members' labels, empties the recorders' pipes a
few times a second within a time budget, replaces a recorder whose tcpdump died, and says when
traffic makes a ring reach back less than ``capture.ring_seconds``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import structlog

from .. import labels as nstap_labels
from ..registry import WatchedNamespace
from ..supervisor import TaskSupervisor
from .ring import FlightRecorder
from .tcpdump import Tools

log = structlog.get_logger("nstap.capture")

PUMP_INTERVAL = 0.25  # seconds between reads of the flight recorders' pipes
PUMP_READS = 4  # pipe-fulls (1 MiB each) one recorder is read at most per wake-up: 16 MiB/s
PUMP_BUDGET = 0.02  # seconds the pump may hold the event loop per wake-up
RING_RESTART_DELAY = 10.0  # seconds before a flight recorder whose tcpdump died is started again


class NamespaceHolder(Protocol):
    """Who holds the watched namespaces' descriptors (the watcher pool)."""

    def watched(self) -> Mapping[int, WatchedNamespace]: ...

    def netns_fd(self, inode: int) -> int | None: ...

    def subscribe(self, listener: Callable[[], None]) -> None: ...


def capture_opted_out(namespace: WatchedNamespace) -> bool:
    """True if a container in the namespace, watched or not, is labelled ``nstap.capture=off``
    (it vetoes captures of it)."""
    return bool(namespace.vetoes)


class RecorderFleet:
    """The flight recorders, by namespace inode."""

    def __init__(
        self,
        tools: Tools | None,
        namespaces: NamespaceHolder,
        ring_dir: Path,
        supervisor: TaskSupervisor,
        mode: str = "labeled",
        ring_bytes: int = 8 * 1024 * 1024,
        ring_segments: int = 16,
        ring_seconds: float = 60.0,
    ) -> None:
        self.tools = tools
        self.namespaces = namespaces
        self.ring_dir = ring_dir
        self.supervisor = supervisor
        self.mode, self.ring_bytes, self.ring_segments, self.ring_seconds = mode, ring_bytes, ring_segments, ring_seconds
        self.rings: dict[int, FlightRecorder] = {}
        self._tasks: set[asyncio.Task] = set()
        self._short_logged: set[str] = set()  # recorders whose short reach was logged
        self._serial = itertools.count(1)
        self._closed = False
        self.restarts_total = 0
        self.backlog = 0  # bytes waiting in the recorders' pipes after the last pump
        self.pumps_cut_total = 0  # pumps that ran out of PUMP_BUDGET before every recorder
        self.lost_stopped = 0  # records lost by recorders that were stopped since
        self._ringing = asyncio.Event()  # set when a recorder starts: the pump sleeps without one

    def start(self) -> None:
        """Start following the watched namespaces (rings a dead daemon left are removed first:
        they hold old packets nobody can reach any more)."""
        shutil.rmtree(self.ring_dir, ignore_errors=True)
        self.ring_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.namespaces.subscribe(self.sync)  # attached and detached namespaces
        self.sync()
        self.supervisor.service("ring-pump", self._pump)

    def running(self, inode: int) -> FlightRecorder | None:
        """The namespace's recorder, if it is running."""
        ring = self.rings.get(inode)
        return ring if ring is not None and ring.running else None

    def wants_ring(self, namespace: WatchedNamespace) -> bool:
        """True if the namespace gets a flight recorder (config ``ring`` and the members' labels)."""
        if capture_opted_out(namespace):
            return False
        if self.mode == "all":
            return True
        if self.mode == "labeled":
            return any(nstap_labels.wants_ring(m.labels) for m in namespace.members)
        return False

    def sync(self) -> None:
        """Start and stop flight recorders so that exactly the watched namespaces that want one have one."""
        if self._closed or self.tools is None:
            return
        wanted = {inode: ns for inode, ns in self.namespaces.watched().items() if self.wants_ring(ns)}
        for inode in list(self.rings):
            if inode not in wanted:
                self._stop_ring(self.rings.pop(inode))
        for inode, ns in wanted.items():
            if inode not in self.rings:
                self._start_ring(inode, ns)

    def _start_ring(self, inode: int, namespace: WatchedNamespace) -> None:
        assert self.tools is not None
        held = self.namespaces.netns_fd(inode)
        if held is None:
            return
        owner = namespace.owner
        fd = os.dup(held)  # the child's way in, kept open until it has started
        recorder = FlightRecorder(
            f"{owner.name}-{inode}", self.tools.argv(fd), self.ring_dir / f"{inode}-{next(self._serial)}", self.ring_bytes, self.ring_segments
        )
        recorder.on_listener_error = lambda exc: self.supervisor.failed("capture", exc)
        self.rings[inode] = recorder
        self._ringing.set()
        task = self._track(self.supervisor.spawn("ring", self._run_ring(recorder, owner.name, owner.short_id, inode, fd)))
        task.add_done_callback(lambda _task: os.close(fd))

    async def _run_ring(self, recorder: FlightRecorder, container: str, container_id: str, inode: int, fd: int) -> None:
        try:
            started = await recorder.start(pass_fds=(fd,))
        except OSError as exc:
            recorder.error = str(exc)
            recorder.ended_at = asyncio.get_running_loop().time()  # tried again after RING_RESTART_DELAY
            log.warning("ring_failed", container=container, container_id=container_id, error=str(exc))
            return
        if started:
            log.info("ring_started", container=container, container_id=container_id, netns=inode, ring_bytes=self.ring_bytes)

    def _stop_ring(self, recorder: FlightRecorder) -> None:
        self.lost_stopped += recorder.records_lost  # its count is final: it is not pumped again
        self._short_logged.discard(recorder.name)  # bounded by the recorders running
        self._track(self.supervisor.spawn("ring", recorder.stop()))

    def _track(self, task: asyncio.Task) -> asyncio.Task:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def lost_total(self) -> int:
        """Packets flight recorders read but could not write to their ring (a full disk), ever."""
        return self.lost_stopped + sum(r.records_lost for r in self.rings.values())

    async def _pump(self) -> None:
        """Empty the flight recorders' pipes a few times a second (one wake-up for all of them);
        a recorder whose tcpdump died is replaced after RING_RESTART_DELAY.

        Filing packets runs on the event loop, so it is bounded: at most PUMP_READS pipe-fulls of
        one recorder and PUMP_BUDGET seconds for all of them per wake-up, starting where the last
        one stopped, so that heavy traffic in flight recorders cannot delay the samples. What is
        left waits in the pipes (``nstap_flight_recorder_backlog_bytes``); a pipe that stays full
        makes tcpdump fall behind, and the kernel's drops are in the capture's statistics.
        """
        start = 0
        while True:
            if not self.rings:
                # No recorder, nothing to pump: no wake-up until one starts. (Each wake-up of the
                # event loop costs CPU of its own, up to hundreds of microseconds on a VM whose
                # caches went cold meanwhile: docs/performance.md, "Wake-ups".)
                self._ringing.clear()
                await self._ringing.wait()
            await asyncio.sleep(PUMP_INTERVAL)
            start = self.pump_once(start)

    def pump_once(self, start: int = 0) -> int:
        """One wake-up of the pump, from the ``start``-th recorder; returns where the next starts."""
        now = asyncio.get_running_loop().time()
        dead = []
        rings = list(self.rings.items())
        start = start % len(rings) if rings else 0
        deadline = time.perf_counter() + PUMP_BUDGET
        for n, (inode, recorder) in enumerate(rings[start:] + rings[:start]):
            if time.perf_counter() >= deadline:
                self.pumps_cut_total += 1
                start += n  # the next wake-up starts with the first left out
                break
            was_running = recorder.running
            recorder.pump(PUMP_READS)
            if was_running and not recorder.running:
                log.warning("ring_stopped", netns=inode, recorder=recorder.name, error=recorder.error)
            self._check_reach(recorder)
            if recorder.ended_at and now - recorder.ended_at >= RING_RESTART_DELAY:
                dead.append(inode)
        for inode in dead:
            self._stop_ring(self.rings.pop(inode))
            self.restarts_total += 1
        if dead:
            self.sync()
        self.backlog = sum(r.backlog() for r in self.rings.values())
        return start

    def _check_reach(self, recorder: FlightRecorder) -> None:
        """Log once per recorder when traffic makes its ring reach back less than ``ring_seconds``."""
        want = self.ring_seconds
        if not recorder.running or not recorder.dropped_until or recorder.name in self._short_logged:
            return
        reach = recorder.reach()
        if reach >= want:
            return
        self._short_logged.add(recorder.name)
        log.warning(
            "flight_recorder_short", recorder=recorder.name, reach_seconds=round(reach, 1), ring_seconds=want,
            ring_bytes=self.ring_bytes, suggested_ring_bytes=int(self.ring_bytes * want / max(reach, 0.1)),
        )

    async def stop(self) -> None:
        """Stop every recorder and wait for them."""
        self._closed = True
        await asyncio.gather(*(r.stop() for r in self.rings.values()), return_exceptions=True)
        self.rings.clear()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
