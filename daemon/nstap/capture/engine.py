"""The capture engine: turns a capture request into one pcap in the store, within its limits.

Two ways to get the packets of [trigger - pre, trigger + post]:

* the namespace has a flight recorder (label ``nstap.capture=ring``, or ``capture.ring: all``):
  the pre-trigger records are read back from its ring and the following ones are taken as they
  arrive, so the pcap starts before the trigger;
* otherwise a tcpdump is started in the namespace for the post window (nothing can come from
  before the trigger, and the capture says so).

An anomaly's capture window starts from the anomaly's onset, not its detection:
``[min(onset - margin, trigger) - pre, trigger + post]``, where the margin (two sample intervals)
covers the onset estimate's own error; it reaches back at most ``max_pre_seconds`` before the
trigger. A ring that no longer holds the window's start makes the capture ``pre_truncated``.

A capture may also be taken on the host side (``side="host"``): a live tcpdump in nstap's own
namespace on the host end of the container's veth, where packets dropped before they enter the
namespace are seen. Every capture records an evidence snapshot of the namespace when it starts
and when it ends (:mod:`.evidence`).

tcpdump enters a namespace only through the descriptor its watcher holds (see
:meth:`nstap.watcher.WatcherPool.netns_fd`), duplicated for the child: a namespace that is not
watched is not captured, and a reused pid can never point a capture at another namespace.

Limits that always hold: snap length, a byte cap and a time cap per capture, a maximum of
concurrent captures (a slot is taken before the first ``await``, so simultaneous requests cannot
all pass), at most ``max_per_container_per_hour`` anomaly captures of one container, the store's
disk budget (see :mod:`.retention`), files 0600. A tcpdump that is missing or dies, or a disk
that is full, makes the capture "failed" with what it said; every capture ends with a state,
whatever goes wrong; the daemon carries on. Reading a ring back, hashing and filtering run off
the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import shutil
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from .. import labels as nstap_labels
from ..registry import ContainerRegistry, WatchedNamespace
from ..samples import SampleStore
from ..supervisor import TaskSupervisor
from .evidence import EvidenceRecorder
from .pcap import HEADER_LEN, PcapError, PcapHeader, PcapWriter, Record, StreamParser, read_file, sha256_file
from .ring import FlightRecorder, Span, WholeSegment, read_window
from .store import COMPLETE, EVICTED, FAILED, INCOMPLETE, RUNNING, AnomalyRow, CaptureRow, CaptureStore, new_id
from .tcpdump import CaptureToolMissing, TcpdumpProcess, Tools

if TYPE_CHECKING:
    from ..ebpf.service import EbpfService
    from ..nat.monitor import NatMonitor

log = structlog.get_logger("nstap.capture")

PUMP_INTERVAL = 0.25  # seconds between reads of the flight recorders' pipes
PUMP_READS = 4  # pipe-fulls (1 MiB each) one recorder is read at most per wake-up: 16 MiB/s
PUMP_BUDGET = 0.02  # seconds the pump may hold the event loop per wake-up
RING_RESTART_DELAY = 10.0  # seconds before a flight recorder whose tcpdump died is started again
ANOMALY_CAPTURE_PERIOD = 3600.0  # the window of capture.max_per_container_per_hour
MAX_UNSAVED = 1000  # finished captures whose index update failed, kept to be retried
RECENT_PER_CONTAINER = 10  # finished captures per container exported as nstap_capture_info
RECENT_CONTAINERS = 1000  # containers whose latest captures are remembered
SIDES = ("container", "host")
HOST_SIDE_KIND = "interface_drops"  # an anomaly of this kind on a host end captures there too


def capture_opted_out(namespace: WatchedNamespace) -> bool:
    """True if a container in the namespace, watched or not, is labelled ``nstap.capture=off``
    (it vetoes captures of it)."""
    return bool(namespace.vetoes)


class NamespaceHolder(Protocol):
    """Who holds the watched namespaces' descriptors (the watcher pool)."""

    def watched(self) -> Mapping[int, WatchedNamespace]: ...

    def netns_fd(self, inode: int) -> int | None: ...

    def subscribe(self, listener: Callable[[], None]) -> None: ...


class CaptureRefused(Exception):
    """A capture that cannot start now (limits, no tcpdump); ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class CaptureSettings:
    """Limits and defaults of captures and flight recorders."""

    snaplen: int = 256
    buffer_kib: int = 4096
    pre_seconds: float = 10.0
    post_seconds: float = 10.0
    max_pre_seconds: float = 60.0  # how far before the trigger an anomaly's window may start
    max_seconds: float = 120.0
    max_bytes: int = 20 * 1024 * 1024
    max_concurrent: int = 4
    max_per_container_per_hour: int = 6
    ring: str = "labeled"  # "off", "labeled" (nstap.capture=ring), "all"
    ring_bytes: int = 8 * 1024 * 1024
    ring_segments: int = 16
    ring_seconds: float = 60.0  # the reach a ring should have; a shorter one is logged
    evidence: bool = True


@dataclass(frozen=True)
class CaptureTarget:
    """The namespace to capture, and the container whose name the capture carries."""

    container: str
    container_id: str
    runtime: str
    netns: int

    @classmethod
    def of(cls, namespace: WatchedNamespace) -> CaptureTarget:
        """The target for a watched namespace (named after its owner)."""
        owner = namespace.owner
        return cls(owner.name, owner.short_id, owner.runtime, namespace.inode)


class CaptureFile:
    """The pcap being written for one capture: the window, the byte cap, the counts.

    A write that fails (a full disk) is not raised: the file keeps what it got, ``write_error``
    says why, and later records are not written.
    """

    def __init__(self, path: Path, start: float, end: float, trigger: float, max_bytes: int) -> None:
        self.path = path
        self.start, self.end, self.trigger = start, end, trigger
        self.max_bytes = max_bytes
        self._f = open(path, "wb")  # created 0600 by the store
        self.writer: PcapWriter | None = None
        self.pre_packets = 0
        self.capped = False
        self.write_error = ""

    @property
    def packets(self) -> int:
        """Records written so far."""
        return self.writer.packets if self.writer is not None else 0

    def add(self, header: PcapHeader, records: list[Record]) -> None:
        """Write the records that fall in the window, until the byte cap.

        Each batch is handed to the kernel at once, so a daemon that dies mid-capture leaves
        every packet it had received in the file (marked incomplete at the next start).
        """
        if self.write_error:
            return
        try:
            if self.writer is None:
                self.writer = PcapWriter(self._f, header)
            for record in records:
                if not self.start <= record.ts <= self.end:
                    continue
                if self.writer.bytes + len(record.data) > self.max_bytes:
                    self.capped = True
                    return
                self.writer.add(record)
                if record.ts < self.trigger:
                    self.pre_packets += 1
        except OSError as exc:
            self.write_error = exc.strerror or str(exc)
        finally:
            if not self.write_error:
                try:
                    self._f.flush()
                except OSError as exc:
                    self.write_error = exc.strerror or str(exc)

    def add_window(self, header: PcapHeader, parts: list[Span | WholeSegment]) -> None:
        """Write what :func:`read_window` found, until the byte cap (blocking: a worker thread).

        Whole segments are copied from the ring's file into this one by the kernel
        (``copy_file_range``): a full ring never passes through the daemon's memory. Closes the
        segments' descriptors.
        """
        try:
            for part in parts:
                if self.write_error or self.capped:
                    return
                if self.writer is None:
                    self.writer = PcapWriter(self._f, header)
                size = part.bytes if isinstance(part, WholeSegment) else len(part.data)
                try:
                    if self.writer.bytes + size > self.max_bytes:
                        # The byte cap falls inside this part: record by record, up to it.
                        data = os.pread(part.fd, part.bytes, HEADER_LEN) if isinstance(part, WholeSegment) else part.data
                        self.add(header, StreamParser.with_header(header).feed(data))
                        continue
                    if isinstance(part, WholeSegment):
                        if os.fstat(part.fd).st_size < HEADER_LEN + part.bytes:  # never, unless someone cut it
                            self.add(header, StreamParser.with_header(header).feed(os.pread(part.fd, part.bytes, HEADER_LEN)))
                            continue
                        self._f.flush()
                        _copy(part.fd, self._f.fileno(), HEADER_LEN, part.bytes)
                        self.writer.add_copied(part.bytes, part.records)
                    else:
                        self.writer.add_records(part.data, part.records)
                        self._f.flush()
                except OSError as exc:
                    self.write_error = exc.strerror or str(exc)
                    return
                self.pre_packets += part.pre
        finally:
            for part in parts:
                if isinstance(part, WholeSegment):
                    os.close(part.fd)

    def close(self) -> None:
        try:
            self._f.close()
        except OSError as exc:  # the last flush failed: what was written before stays
            self.write_error = self.write_error or exc.strerror or str(exc)


def _copy(src: int, dst: int, offset: int, count: int) -> None:
    """Append ``count`` bytes of ``src`` from ``offset`` to ``dst``, in the kernel when it can."""
    while count > 0:
        try:
            done = os.copy_file_range(src, dst, count, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            done = os.write(dst, os.pread(src, min(count, 1 << 20), offset))
        if done == 0:
            raise OSError(errno.EIO, "the ring segment is shorter than it was")
        offset += done
        count -= done


class CaptureEngine:
    """Starts captures and flight recorders and files their pcaps in the store."""

    def __init__(
        self,
        settings: CaptureSettings,
        store: CaptureStore,
        namespaces: NamespaceHolder,
        registry: ContainerRegistry,
        data_dir: Path,
        supervisor: TaskSupervisor | None = None,
        samples: SampleStore | None = None,
    ) -> None:
        self.settings = settings
        self.samples = samples
        self.store = store
        self.namespaces = namespaces
        self.registry = registry
        self.supervisor = supervisor or TaskSupervisor()
        self.ring_dir = data_dir / "ring"
        try:
            self.tools: Tools | None = Tools.find(settings.snaplen, settings.buffer_kib)
            self.tools_error = ""
        except CaptureToolMissing as exc:
            self.tools, self.tools_error = None, str(exc)
        self.evidence = EvidenceRecorder(store) if settings.evidence else None
        store.evicted_listeners.append(self._evicted)
        self.nat: NatMonitor | None = None  # set by the daemon: its view joins each capture's evidence
        self.ebpf: EbpfService | None = None  # likewise
        self._evidence_tasks: set[asyncio.Task] = set()
        self._home_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)  # host-side captures
        self._short_logged: set[str] = set()  # recorders whose short reach was logged
        self.rings: dict[int, FlightRecorder] = {}
        self._ring_tasks: set[asyncio.Task] = set()
        self._running: dict[str, asyncio.Task] = {}
        self._reserved = 0  # slots taken by captures being created (between the check and the task)
        self._anomaly_captures: dict[str, deque[float]] = {}  # container id -> when its anomaly captures started
        self._anomaly_running: dict[str, int] = {}  # container id -> its anomaly captures running now
        self._unsaved: dict[str, dict[str, Any]] = {}  # capture id -> outcome the index could not take yet
        self._closed = False
        self._ring_serial = itertools.count(1)
        self.ring_restarts_total = 0
        self.ring_backlog = 0  # bytes waiting in the recorders' pipes after the last pump
        self.pumps_cut_total = 0  # pumps that ran out of PUMP_BUDGET before every recorder
        self.ring_lost_stopped = 0  # records lost by recorders that were stopped since
        # Counters for the exporter.
        self.captures_total: Counter[tuple[str, str, str, str]] = Counter()  # (container, id, runtime, reason)
        self.refused_total: Counter[str] = Counter({"concurrency": 0, "per_container_limit": 0, "store": 0})
        self.bytes_total = 0
        self.kernel_drops_total = 0
        # The latest finished captures per container (short id): what dashboards link to.
        self.recent: dict[str, deque[tuple[str, str, str, str, str, float]]] = {}
        self.failed_total = 0

    async def recover(self) -> int:
        """Filter the packets of the filtered captures a daemon that died left unfiltered (the
        store found them at open); returns how many. Their pcap then holds what it should have
        held, and the capture is incomplete (the daemon died before its end)."""
        for row in list(self.store.unfiltered):
            path = self.store.dir / row.file  # type: ignore[operator]
            raw = path.with_suffix(".unfiltered")
            error = "daemon stopped before the capture finished; its packets were filtered at the next start"
            if self.tools is None:
                error = f"daemon stopped before the capture finished; its packets could not be filtered: {self.tools_error}"
            else:
                try:
                    await self.tools.filter_file(raw, path, row.filter)
                except (OSError, ValueError) as exc:
                    error = f"daemon stopped before the capture finished; filtering its packets failed: {exc}"
            raw.unlink(missing_ok=True)
            await self.store.filtered_at_start(row.id, error)
            log.info("capture_recovered", capture_id=row.id, container=row.container, error=error)
        count = len(self.store.unfiltered)
        self.store.unfiltered = []
        return count

    async def load_recent(self) -> None:
        """Fill :attr:`recent` from the store: a restart keeps the dashboards' links to captures."""
        rows = await self.store.list(limit=RECENT_PER_CONTAINER * 100)
        for row in reversed(rows):  # oldest first, so that each deque ends with the newest
            if row.state != RUNNING:
                self._remember(row, row.state)

    def _evicted(self, ids: list[str]) -> None:
        """Captures the store evicted: their links say so (the capture page explains)."""
        gone = set(ids)
        for recent in self.recent.values():
            for i, entry in enumerate(recent):
                if entry[0] in gone:
                    recent[i] = (*entry[:4], EVICTED, entry[5])

    def _remember(self, row: CaptureRow, state: str) -> None:
        """Keep a finished capture among its container's latest (a gone container's are kept, for
        a while: it may come back; the exporter shows those of running containers only)."""
        if not row.container_id:
            return
        recent = self.recent.pop(row.container_id, None) or deque(maxlen=RECENT_PER_CONTAINER)
        recent.append((row.id, row.container, row.runtime, row.reason, state, row.created_at))
        self.recent[row.container_id] = recent  # the most recently used last
        while len(self.recent) > RECENT_CONTAINERS:
            del self.recent[next(iter(self.recent))]

    # -- flight recorders ----------------------------------------------------------------------

    def start(self) -> None:
        """Follow the watched namespaces: a flight recorder for every one that wants one."""
        if self.tools is None:
            log.warning("capture_unavailable", error=self.tools_error)
        # Rings left by a daemon that died hold old packets nobody can reach any more: gone.
        shutil.rmtree(self.ring_dir, ignore_errors=True)
        self.ring_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.namespaces.subscribe(self.sync_rings)  # attached and detached namespaces
        self.registry.subscribe(self._registry_changed)  # members (and their labels) of attached ones
        self.sync_rings()
        self.supervisor.service("ring-pump", self._pump_rings)

    def _registry_changed(self) -> None:
        self._prune()
        self.sync_rings()

    async def _pump_rings(self) -> None:
        """Empty the flight recorders' pipes a few times a second (one wake-up for all of them);
        a recorder whose tcpdump died is replaced after RING_RESTART_DELAY.

        Filing packets runs on the event loop, so it is bounded: at most PUMP_READS pipe-fulls of
        one recorder and PUMP_BUDGET seconds for all of them per wake-up, starting where the last
        one stopped, so that heavy traffic in flight recorders cannot delay the samples. What is
        left waits in the pipes (``nstap_flight_recorder_backlog_bytes``); a pipe that stays full
        makes tcpdump fall behind, and the kernel's drops are in the capture's statistics.
        """
        loop = asyncio.get_running_loop()
        start = 0
        while True:
            await asyncio.sleep(PUMP_INTERVAL)
            now = loop.time()
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
                self.ring_restarts_total += 1
            if dead:
                self.sync_rings()
            self.ring_backlog = sum(r.backlog() for r in self.rings.values())

    def _check_reach(self, recorder: FlightRecorder) -> None:
        """Log once per recorder when traffic makes its ring reach back less than ``ring_seconds``."""
        want = self.settings.ring_seconds
        if not recorder.running or not recorder.dropped_until or recorder.name in self._short_logged:
            return
        reach = recorder.reach()
        if reach >= want:
            return
        self._short_logged.add(recorder.name)
        suggested = int(self.settings.ring_bytes * want / max(reach, 0.1))
        log.warning(
            "flight_recorder_short", recorder=recorder.name, reach_seconds=round(reach, 1), ring_seconds=want,
            ring_bytes=self.settings.ring_bytes, suggested_ring_bytes=suggested,
        )

    def wants_ring(self, namespace: WatchedNamespace) -> bool:
        """True if the namespace gets a flight recorder (config ``ring`` and the members' labels)."""
        mode = self.settings.ring
        if capture_opted_out(namespace):
            return False
        if mode == "all":
            return True
        if mode == "labeled":
            return any(nstap_labels.wants_ring(m.labels) for m in namespace.members)
        return False

    def sync_rings(self) -> None:
        """Start and stop flight recorders so that exactly the watched namespaces that want one have one."""
        if self._closed or self.tools is None:
            return
        wanted = {inode: ns for inode, ns in self.namespaces.watched().items() if self.wants_ring(ns)}
        for inode in list(self.rings):
            if inode not in wanted:
                self._stop_ring(self.rings.pop(inode))
        for inode, ns in wanted.items():
            if inode in self.rings:
                continue
            held = self.namespaces.netns_fd(inode)
            if held is None:
                continue
            target = CaptureTarget.of(ns)
            fd = os.dup(held)  # the child's way in, kept open until it has started
            recorder = FlightRecorder(
                f"{target.container}-{inode}",
                self.tools.argv(fd),
                self.ring_dir / f"{inode}-{next(self._ring_serial)}",
                self.settings.ring_bytes,
                self.settings.ring_segments,
            )
            recorder.on_listener_error = lambda exc: self.supervisor.failed("capture", exc)
            self.rings[inode] = recorder
            task = self._track(self.supervisor.spawn("ring", self._start_ring(recorder, target, fd)))
            task.add_done_callback(lambda _task, fd=fd: os.close(fd))

    async def _start_ring(self, recorder: FlightRecorder, target: CaptureTarget, fd: int) -> None:
        try:
            started = await recorder.start(pass_fds=(fd,))
        except OSError as exc:
            recorder.error = str(exc)
            recorder.ended_at = asyncio.get_running_loop().time()  # tried again after RING_RESTART_DELAY
            log.warning("ring_failed", container=target.container, container_id=target.container_id, error=str(exc))
            return
        if started:
            log.info("ring_started", container=target.container, container_id=target.container_id, netns=target.netns, ring_bytes=self.settings.ring_bytes)

    def _stop_ring(self, recorder: FlightRecorder) -> None:
        self.ring_lost_stopped += recorder.records_lost  # its count is final: it is not pumped again
        self._short_logged.discard(recorder.name)  # bounded by the recorders running
        self._track(self.supervisor.spawn("ring", recorder.stop()))

    @property
    def ring_lost_total(self) -> int:
        """Packets flight recorders read but could not write to their ring (a full disk), ever."""
        return self.ring_lost_stopped + sum(r.records_lost for r in self.rings.values())

    def _track(self, task: asyncio.Task) -> asyncio.Task:
        self._ring_tasks.add(task)
        task.add_done_callback(self._ring_tasks.discard)
        return task

    # -- captures --------------------------------------------------------------------------------

    async def check_filter(self, bpf: str) -> None:
        """FilterError if tcpdump does not accept ``bpf`` (CaptureRefused if there is no tcpdump)."""
        if self.tools is None:
            raise CaptureRefused(self.tools_error, 503)
        await self.tools.check_filter(bpf)

    def _refuse(self, why: str, message: str, status: int) -> CaptureRefused:
        self.refused_total[why] += 1
        return CaptureRefused(message, status)

    async def capture(
        self,
        target: CaptureTarget,
        reason: str,
        *,
        kind: str = "",
        anomaly_id: str | None = None,
        post_seconds: float | None = None,
        pre_seconds: float | None = None,
        bpf: str = "",
        trigger_at: float | None = None,
        onset_at: float | None = None,
        margin: float = 0.0,
        side: str = "container",
        interface: str | None = None,
        anomaly: AnomalyRow | None = None,
    ) -> CaptureRow:
        """Start a capture now; returns its row (state "running"). CaptureRefused if it cannot start.

        ``onset_at`` (an anomaly's onset) moves the window's start back to ``onset_at - margin -
        pre``, within ``max_pre_seconds`` of the trigger. ``side="host"`` captures the host end of
        the container's veth (``interface``, by default its first one).
        """
        s = self.settings
        if side not in SIDES:
            raise CaptureRefused(f"side must be one of {', '.join(SIDES)}", 400)
        if self.tools is None:
            raise CaptureRefused(self.tools_error, 503)
        namespace = self.namespaces.watched().get(target.netns)
        if namespace is None:
            raise CaptureRefused(f"the network namespace of {target.container} is not watched (yet, or any more)", 409)
        if capture_opted_out(namespace):
            raise CaptureRefused(f"the network namespace of {target.container} opted out of captures (nstap.capture=off)", 403)
        if len(self._running) + self._reserved >= s.max_concurrent:
            raise self._refuse("concurrency", f"{s.max_concurrent} captures are already running", 429)
        post = min(max(post_seconds if post_seconds is not None else s.post_seconds, 0.0), s.max_seconds)
        pre = min(max(pre_seconds if pre_seconds is not None else s.pre_seconds, 0.0), s.max_seconds)
        trigger = trigger_at if trigger_at is not None else time.time()
        anchor = trigger if onset_at is None else min(trigger, onset_at - max(margin, 0.0))
        earliest = trigger - max(s.max_pre_seconds, pre)
        host_if = ""
        if side == "host":
            peers = self.host_peers(target.netns)
            if interface is not None and interface not in peers:
                raise CaptureRefused(f"{interface!r} is not a host-side interface of {target.container} (known: {', '.join(peers) or 'none'})", 400)
            if not peers:
                raise CaptureRefused(f"no host-side interface of {target.container} is known (no veth, or not sampled yet)", 409)
            host_if = interface or peers[0]
        ring = self.rings.get(target.netns) if side == "container" else None
        ring_ok = ring is not None and ring.running
        fd = None
        if side == "host":
            fd = os.dup(self._home_fd)
        elif not ring_ok:
            held = self.namespaces.netns_fd(target.netns)
            if held is None:
                raise CaptureRefused(f"the network namespace of {target.container} is not watched (yet, or any more)", 409)
            fd = os.dup(held)  # the live tcpdump's way in, whatever happens to the watcher meanwhile
        row = CaptureRow(
            id=new_id(trigger),
            state=RUNNING,
            created_at=time.time(),
            container=target.container,
            container_id=target.container_id,
            runtime=target.runtime,
            netns=target.netns,
            reason=reason,
            kind=kind,
            anomaly_id=anomaly_id,
            mode="ring" if ring_ok else "live",
            trigger_at=trigger,
            window_start=max(anchor - pre, earliest) if ring_ok else trigger,
            window_end=trigger + post,
            filter=bpf,
            snaplen=s.snaplen,
            onset_at=onset_at,
            side=side,
            interface=host_if,
        )
        if ring_ok:
            assert ring is not None
            row.pre_truncated = ring.holds_since() > row.window_start + 0.05
        self._reserved += 1  # this slot is taken from here on, across the await below
        try:
            row = await self.store.create(row)
        except (OSError, sqlite3.Error) as exc:
            if fd is not None:
                os.close(fd)
            log.warning("capture_store_failed", container=target.container, container_id=target.container_id, error=str(exc))
            raise self._refuse("store", f"cannot create the capture in the store: {exc}", 507) from None
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        finally:
            self._reserved -= 1
        if self._closed:  # the daemon began to stop while the row was created
            if fd is not None:
                os.close(fd)
            await self._mark_incomplete(row)
            raise CaptureRefused("the daemon is stopping", 503)
        asked_pre = pre_seconds is not None and pre > 0  # said so: a capture without it tells why
        task = self.supervisor.spawn("capture", self._run(row, ring if ring_ok else None, bpf, asked_pre, fd))
        if fd is not None:
            task.add_done_callback(lambda _task: os.close(fd))
        self._running[row.id] = task
        self.captures_total[(target.container, target.container_id, target.runtime, reason)] += 1
        self._start_evidence(row, anomaly, task)
        log.info(
            "capture_started", capture_id=row.id, container=target.container, container_id=target.container_id,
            reason=reason, kind=kind, mode=row.mode, side=side, interface=host_if, window_start=row.window_start,
            window_end=row.window_end, onset_at=onset_at, pre_truncated=row.pre_truncated,
        )
        return row

    def host_peers(self, netns: int) -> list[str]:
        """The host ends of the namespace's veths, as its latest sample saw them."""
        sample = self.samples.get(netns) if self.samples is not None else None
        if sample is None or not sample.interfaces:
            return []
        return [i.name for i in sample.interfaces if i.side == "host"]

    def _start_evidence(self, row: CaptureRow, anomaly: AnomalyRow | None, capture: asyncio.Task) -> None:
        """Snapshot the namespace now and when ``capture`` ends (a task of its own; the capture never waits)."""
        if self.evidence is None:
            return
        held = self.namespaces.netns_fd(row.netns)
        if held is None:
            return
        fd = os.dup(held)
        nat, ebpf = self.nat, self.ebpf
        namespace = self.registry.namespaces().get(row.netns)
        netns = row.netns

        async def extra() -> dict[str, Any]:
            out: dict[str, Any] = {}
            if nat is not None and namespace is not None:
                out["nat"] = await nat.evidence(namespace)  # forwards, own firewall, conntrack entries
            if ebpf is not None:
                out["ebpf"] = ebpf.evidence(netns)  # drop reasons so far, top retransmitting flows
            return out

        task = self.supervisor.spawn(
            "evidence", self.evidence.record(row, anomaly, fd, self.host_peers(row.netns), lambda: asyncio.wait({capture}), extra)
        )
        self._evidence_tasks.add(task)
        task.add_done_callback(self._evidence_tasks.discard)
        task.add_done_callback(lambda _task: os.close(fd))

    async def _run(self, row: CaptureRow, ring: FlightRecorder | None, bpf: str, asked_pre: bool, fd: int | None) -> None:
        """Take the capture and record its outcome; the row always ends with a state, whatever fails.

        Its concurrency slot is held until the outcome is recorded (filtering and hashing included).
        """
        try:
            try:
                outcome = await self._take(row, ring, bpf, asked_pre, fd)
            except asyncio.CancelledError:
                # Stopped after the packets were in (while filtering, hashing or recording): the
                # file is kept and indexed as incomplete with what it holds, then the cancel goes on.
                await asyncio.shield(self._mark_incomplete(row))
                raise
            except Exception as exc:  # noqa: BLE001 - a bug must not leave the capture "running" for good
                self.supervisor.failed("capture", exc, capture_id=row.id)
                outcome = {"state": FAILED, "error": f"internal error: {type(exc).__name__}: {exc}"}
            await self._record(row, outcome)
        finally:
            self._running.pop(row.id, None)

    async def _mark_incomplete(self, row: CaptureRow) -> None:
        try:
            await self.store.mark_incomplete(row.id, "daemon stopped before the capture finished")
        except (OSError, sqlite3.Error) as exc:  # the next start marks it incomplete then
            log.warning("capture_index_failed", capture_id=row.id, error=str(exc))

    async def _take(self, row: CaptureRow, ring: FlightRecorder | None, bpf: str, asked_pre: bool, fd: int | None) -> dict[str, Any]:
        path = self.store.dir / row.file  # type: ignore[operator]
        # With a filter, the ring's unfiltered records are written aside and filtered by tcpdump.
        raw_path = path.with_suffix(".unfiltered") if (ring is not None and bpf) else path
        state, error, drops = COMPLETE, "", 0
        out: CaptureFile | None = None
        try:
            if raw_path != path:
                os.close(os.open(raw_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
            out = CaptureFile(raw_path, row.window_start, row.window_end, row.trigger_at, self.settings.max_bytes)
            if ring is not None:
                drops, error = await self._from_ring(ring, out)
            else:
                assert fd is not None
                drops, error = await self._live(fd, bpf, out, row.interface or "any")
            if error and out.packets == 0:
                state = FAILED
        except asyncio.CancelledError:
            state, error = INCOMPLETE, "daemon stopped before the capture finished"
        except (OSError, PcapError) as exc:
            state, error = FAILED, str(exc)
        finally:
            if out is not None:
                out.close()
        if out is None:
            return {"state": state, "error": error}
        if out.write_error:
            error = f"cannot write the capture: {out.write_error}"
            state = FAILED if out.packets == 0 else state
        if out.capped and not error:
            error = f"byte cap of {self.settings.max_bytes} reached"
        if raw_path != path:
            if state == INCOMPLETE:
                # The daemon stops: no time to filter. The packets stay in raw_path, which the next
                # start filters (CaptureStore.open, CaptureEngine.recover).
                return {"state": state, "error": error}
            if state != FAILED:
                try:
                    await self.tools.filter_file(raw_path, path, bpf)  # type: ignore[union-attr]
                except (OSError, ValueError) as exc:
                    state, error = FAILED, f"filtering failed: {exc}"
            raw_path.unlink(missing_ok=True)
        size, packets, digest, pre_packets = await asyncio.to_thread(self._summary, path, out)
        if ring is None and asked_pre and not error:
            error = "no flight recorder for this container: the capture starts at the trigger"
        return {"state": state, "error": error, "bytes": size, "packets": packets, "pre_packets": pre_packets, "kernel_drops": drops, "sha256": digest}

    async def _record(self, row: CaptureRow, outcome: dict[str, Any]) -> None:
        """Write a capture's outcome to the index (kept and retried if the index cannot take it now)."""
        outcome.setdefault("finished_at", time.time())
        state = outcome["state"]
        self.bytes_total += outcome.get("bytes", 0)
        self.kernel_drops_total += outcome.get("kernel_drops", 0)
        if state == FAILED:
            self.failed_total += 1
        self._remember(row, state)
        saved = await self._save_outcome(row.id, outcome)
        evicted: list[str] = []
        if saved:
            await self.retry_unsaved()
            try:
                evicted = await self.store.enforce()
            except (OSError, sqlite3.Error) as exc:
                log.warning("capture_retention_failed", error=str(exc))
        log.info(
            "capture_finished", capture_id=row.id, container=row.container, container_id=row.container_id, state=state,
            packets=outcome.get("packets", 0), pre_packets=outcome.get("pre_packets", 0), bytes=outcome.get("bytes", 0),
            kernel_drops=outcome.get("kernel_drops", 0), error=outcome.get("error", ""), evicted=len(evicted),
        )

    async def _save_outcome(self, capture_id: str, outcome: dict[str, Any]) -> bool:
        try:
            await self.store.finish(capture_id, **outcome)
        except (OSError, sqlite3.Error) as exc:
            if capture_id not in self._unsaved:
                log.warning("capture_index_failed", capture_id=capture_id, error=str(exc))
            if len(self._unsaved) < MAX_UNSAVED or capture_id in self._unsaved:
                self._unsaved[capture_id] = outcome
            return False
        self._unsaved.pop(capture_id, None)
        return True

    async def retry_unsaved(self) -> None:
        """Write the outcomes the index could not take before (a full disk that has room again)."""
        for capture_id, outcome in list(self._unsaved.items()):
            if not await self._save_outcome(capture_id, outcome):
                return

    def unsaved(self, capture_id: str) -> dict[str, Any] | None:
        """The outcome of a finished capture the index has not taken yet, if any."""
        return self._unsaved.get(capture_id)

    @staticmethod
    def _summary(path: Path, out: CaptureFile) -> tuple[int, int, str, int]:
        """Size, packets, sha256 and pre-trigger packets of the finished file (blocking: a thread)."""
        try:
            size = path.stat().st_size
        except OSError:
            return 0, 0, "", 0
        if size == 0:
            return 0, 0, "", 0
        if path == out.path and out.writer is not None and not out.write_error:
            digest = out.writer.sha256() if out.writer.hashed else sha256_file(path)
            return size, out.writer.packets, digest, out.pre_packets
        try:
            _, records = read_file(path)  # filtered or cut short: count what the file holds
        except (OSError, PcapError):
            records = []
        return size, len(records), sha256_file(path), sum(1 for r in records if r.ts < out.trigger)

    async def _from_ring(self, ring: FlightRecorder, out: CaptureFile) -> tuple[int, str]:
        before = await ring.process.request_stats()
        pending: list[Record] | None = []  # records that arrive while the ring is read back

        def take(batch: list[Record]) -> None:
            if pending is not None:
                pending.extend(batch)
            elif ring.process.header is not None:
                out.add(ring.process.header, batch)

        # Pumping, subscribing and opening the ring's segments happen without an await in between:
        # every record is either in the segments as far as they are read back, or handed to the
        # listener, none is both or neither.
        ring.pump()
        ring.subscribe(take)
        try:
            snapshot = ring.window(out.start, out.end)
            header = ring.process.header
            if header is not None:
                # In a worker thread; the listener only buffers meanwhile. Shielded: a cancel (the
                # daemon stopping) waits for the thread, which writes the file the caller closes.
                work = asyncio.get_running_loop().run_in_executor(
                    None, lambda: out.add_window(header, read_window(header, snapshot, out.start, out.end, out.trigger))
                )
                try:
                    await asyncio.shield(work)
                except asyncio.CancelledError:
                    await asyncio.gather(work, return_exceptions=True)
                    raise
                out.add(header, pending)
            else:
                for view in snapshot:
                    os.close(view.fd)
            pending = None
            # Until the end (+0.2 s: packets stamped before it, still in flight), or the byte cap.
            while not out.capped and not out.write_error and (remaining := out.end + 0.2 - time.time()) > 0:
                await asyncio.sleep(min(remaining, PUMP_INTERVAL))
            ring.pump()  # what arrived since the engine's last pump
        finally:
            ring.unsubscribe(take)
        if out.writer is None and ring.process.header is not None:
            out.add(ring.process.header, [])
        after = await ring.process.request_stats()
        drops = max(0, after.get("dropped", 0) - before.get("dropped", 0))
        if not ring.running:
            return drops, ring.error or "the flight recorder stopped during the capture"
        return drops, ""

    async def _live(self, fd: int, bpf: str, out: CaptureFile, interface: str = "any") -> tuple[int, str]:
        assert self.tools is not None
        proc = TcpdumpProcess(self.tools.argv(fd, bpf, interface))
        try:
            await proc.start(pass_fds=(fd,))
        except OSError as exc:
            return 0, f"cannot start tcpdump: {exc}"

        async def read() -> None:
            async for batch in proc.records():
                if batch:
                    out.add(proc.header, batch)  # type: ignore[arg-type]
                if out.capped or out.write_error:
                    return

        reader = asyncio.create_task(read())  # awaited below, whatever happens
        try:
            remaining = out.end - time.time()
            done, _ = await asyncio.wait({reader}, timeout=max(remaining, 0) + 0.2)
        finally:
            code = await proc.stop()
            try:
                await asyncio.wait_for(reader, 5)
            except (asyncio.TimeoutError, PcapError):
                reader.cancel()
        if out.writer is None and proc.header is not None:
            out.add(proc.header, [])
        error = ""
        if out.writer is None:
            error = proc.error_text() or f"tcpdump exited with {code} before writing anything"
        elif reader in done and not out.capped and not out.write_error:
            error = "tcpdump stopped early: " + (proc.error_text() or f"exit code {code}")
        return proc.stats.get("dropped", 0), error

    async def for_anomaly(self, namespace: WatchedNamespace, anomaly: AnomalyRow, margin: float = 0.0) -> str | None:
        """Capture around an anomaly that just started, from its onset (less ``margin``); the
        capture id, or None if not captured. Drops on the host end of a veth are captured there
        too (a second capture, under the same limits).

        At most ``max_per_container_per_hour`` anomaly captures per container, and at most half
        the concurrent slots at a time, host-side captures included: a container that keeps
        tripping cannot hold every capture slot or fill the store for the others.
        """
        if capture_opted_out(namespace):
            return None
        target = CaptureTarget.of(namespace)
        now = time.time()
        history = self._anomaly_captures.setdefault(target.container_id, deque())
        while history and now - history[0] > ANOMALY_CAPTURE_PERIOD:
            history.popleft()
        limit = self.settings.max_per_container_per_hour
        why = f"{limit} anomaly captures of this container in the last hour" if len(history) >= limit else self._over_share(target.container_id)
        if why:
            self._refuse_anomaly(anomaly, why)
            return None
        history.append(now)  # before the await: anomalies in the same tick count too
        row_id = await self._anomaly_capture(target, anomaly, onset_at=anomaly.started_at, margin=margin)
        if row_id is None:
            history.remove(now)
            return None
        for interface in self._host_side_too(anomaly, target.netns):
            why = self._over_share(target.container_id)
            if why:
                self._refuse_anomaly(anomaly, why, side="host")
                continue
            host_id = await self._anomaly_capture(target, anomaly, side="host", interface=interface)
            if host_id is not None:
                log.info("anomaly_host_capture", anomaly_id=anomaly.id, capture_id=host_id, interface=interface)
        return row_id

    def _over_share(self, container_id: str) -> str:
        """Why one more anomaly capture of this container would be one too many now ("" if not)."""
        share = max(1, self.settings.max_concurrent // 2)
        running = self._anomaly_running.get(container_id, 0)
        return f"{running} anomaly captures of this container are running (at most {share} at a time)" if running >= share else ""

    def _refuse_anomaly(self, anomaly: AnomalyRow, why: str, **fields: Any) -> None:
        self.refused_total["per_container_limit"] += 1
        log.warning(
            "anomaly_capture_refused", anomaly_id=anomaly.id, kind=anomaly.kind, container=anomaly.container,
            container_id=anomaly.container_id, error=why, **fields,
        )

    async def _anomaly_capture(self, target: CaptureTarget, anomaly: AnomalyRow, **options: Any) -> str | None:
        """One capture of an anomaly, holding one of its container's anomaly slots until it ends."""
        container_id = target.container_id
        self._anomaly_running[container_id] = self._anomaly_running.get(container_id, 0) + 1
        try:
            row = await self.capture(target, "anomaly", kind=anomaly.kind, anomaly_id=anomaly.id, trigger_at=anomaly.first_seen, anomaly=anomaly, **options)
        except CaptureRefused as exc:
            self._anomaly_ended(container_id)
            log.warning(
                "anomaly_capture_refused", anomaly_id=anomaly.id, kind=anomaly.kind, container=anomaly.container,
                container_id=anomaly.container_id, error=str(exc), side=options.get("side", "container"),
            )
            return None
        except BaseException:
            self._anomaly_ended(container_id)
            raise
        self._running[row.id].add_done_callback(lambda _task: self._anomaly_ended(container_id))
        return row.id

    def _host_side_too(self, anomaly: AnomalyRow, netns: int) -> list[str]:
        """The host-side interfaces whose drops tripped an ``interface_drops`` anomaly, and the host
        end of a container whose port forward or masquerade broke (the NAT happens on the host: the
        packets that do not make it through show there)."""
        if anomaly.kind.startswith("nat_"):
            return self.host_peers(netns)[:1]
        if anomaly.kind != HOST_SIDE_KIND:
            return []
        peers = self.host_peers(netns)
        tripped = set()
        for key, value in anomaly.numbers.items():  # "<interface>.<side>.<counter>"; names may hold dots
            parts = key.rsplit(".", 2)
            if len(parts) == 3 and parts[1] == "host" and value:
                tripped.add(parts[0])
        return [p for p in peers if p in tripped][:1]

    def _anomaly_ended(self, container_id: str) -> None:
        left = self._anomaly_running.get(container_id, 0) - 1
        if left > 0:
            self._anomaly_running[container_id] = left
        else:
            self._anomaly_running.pop(container_id, None)

    def _prune(self) -> None:
        """Forget the per-container counts of containers that are gone (they would grow for ever).

        The anomaly-capture history of a container that left is kept while it is within the hour:
        a container that crash-loops leaves and comes back with the same id, and must not get a
        fresh quota each time.
        """
        current = {r.short_id for r in self.registry.containers()}
        for key in [k for k in self.captures_total if k[1] not in current]:
            del self.captures_total[key]
        horizon = time.time() - ANOMALY_CAPTURE_PERIOD
        for cid in [c for c, h in self._anomaly_captures.items() if c not in current and (not h or h[-1] < horizon)]:
            del self._anomaly_captures[cid]

    def running_count(self) -> int:
        """Captures in progress."""
        return len(self._running)

    async def stop(self) -> None:
        """Mark running captures incomplete, stop every flight recorder.

        Evidence goes first: a capture that ends because the daemon stops must not set off its
        end snapshot (child processes started while everything is being torn down)."""
        self._closed = True
        for task in list(self._evidence_tasks):
            task.cancel()
        await asyncio.gather(*list(self._evidence_tasks), return_exceptions=True)
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(r.stop() for r in self.rings.values()), return_exceptions=True)
        self.rings.clear()
        while self._ring_tasks:
            await asyncio.gather(*list(self._ring_tasks), return_exceptions=True)
        if self.evidence is not None:
            self.evidence.close()
        os.close(self._home_fd)
