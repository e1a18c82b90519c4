"""The capture engine: turns a capture request into one pcap in the store, within its limits.

Two ways to get the packets of [trigger - pre, trigger + post]:

* the namespace has a flight recorder (label ``nstap.capture=ring``, or ``capture.ring: all``):
  the pre-trigger records are read back from its ring and the following ones are taken as they
  arrive, so the pcap starts before the trigger;
* otherwise a tcpdump is started in the namespace for the post window (nothing can come from
  before the trigger, and the capture says so).

Limits that always hold: snap length, a byte cap and a time cap per capture, a maximum of
concurrent captures, the store's disk budget (oldest evicted first), files 0600. A tcpdump that
is missing or dies makes the capture "failed" with what it said; the daemon carries on.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import structlog

from ..registry import ContainerRegistry, WatchedNamespace
from .pcap import PcapError, PcapHeader, PcapWriter, Record, read_file, sha256_file
from .ring import FlightRecorder
from .store import COMPLETE, FAILED, INCOMPLETE, RUNNING, AnomalyRow, CaptureRow, CaptureStore, new_id
from .tcpdump import CaptureToolMissing, TcpdumpProcess, Tools

log = structlog.get_logger("nstap.capture")

RING_LABEL = "nstap.capture"
PUMP_INTERVAL = 0.25  # seconds between reads of the flight recorders' pipes
RING_RESTART_DELAY = 10.0  # seconds before a flight recorder whose tcpdump died is started again
OFF_VALUES = ("off", "false", "no", "never")


def capture_opted_out(labels: dict[str, str] | object) -> bool:
    """True for a container labelled ``nstap.capture=off``: its packets are never captured."""
    value = labels.get(RING_LABEL, "") if isinstance(labels, dict) else ""
    return value.strip().lower() in OFF_VALUES


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
    max_seconds: float = 120.0
    max_bytes: int = 20 * 1024 * 1024
    max_concurrent: int = 4
    ring: str = "labeled"  # "off", "labeled" (nstap.capture=ring), "all"
    ring_bytes: int = 8 * 1024 * 1024
    ring_segments: int = 4


@dataclass(frozen=True)
class CaptureTarget:
    """The namespace to capture, and the container whose name the capture carries."""

    container: str
    container_id: str
    runtime: str
    netns: int
    pid: int

    @classmethod
    def of(cls, namespace: WatchedNamespace) -> CaptureTarget:
        """The target for a watched namespace (named after its owner)."""
        owner = namespace.owner
        return cls(owner.name, owner.short_id, owner.runtime, namespace.inode, owner.pid)


class CaptureFile:
    """The pcap being written for one capture: the window, the byte cap, the counts."""

    def __init__(self, path: Path, start: float, end: float, trigger: float, max_bytes: int) -> None:
        self.path = path
        self.start, self.end, self.trigger = start, end, trigger
        self.max_bytes = max_bytes
        self._f = open(path, "wb")  # created 0600 by the store
        self.writer: PcapWriter | None = None
        self.pre_packets = 0
        self.capped = False

    def add(self, header: PcapHeader, records: list[Record]) -> None:
        """Write the records that fall in the window, until the byte cap.

        Each batch is handed to the kernel at once, so a daemon that dies mid-capture leaves
        every packet it had received in the file (marked incomplete at the next start).
        """
        if self.writer is None:
            self.writer = PcapWriter(self._f, header)
        try:
            for record in records:
                if not self.start <= record.ts <= self.end:
                    continue
                if self.writer.bytes + len(record.data) > self.max_bytes:
                    self.capped = True
                    return
                self.writer.add(record)
                if record.ts < self.trigger:
                    self.pre_packets += 1
        finally:
            self._f.flush()

    def close(self) -> None:
        self._f.close()


class CaptureEngine:
    """Starts captures and flight recorders and files their pcaps in the store."""

    def __init__(
        self,
        settings: CaptureSettings,
        store: CaptureStore,
        registry: ContainerRegistry,
        data_dir: Path,
        proc_root: Path,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.proc_root = proc_root
        self.ring_dir = data_dir / "ring"
        try:
            self.tools: Tools | None = Tools.find(settings.snaplen, settings.buffer_kib)
            self.tools_error = ""
        except CaptureToolMissing as exc:
            self.tools, self.tools_error = None, str(exc)
        self.rings: dict[int, FlightRecorder] = {}
        self._ring_tasks: set[asyncio.Task] = set()
        self._running: dict[str, asyncio.Task] = {}
        self._closed = False
        self._pump_task: asyncio.Task | None = None
        self._ring_serial = itertools.count(1)
        self.ring_restarts_total = 0
        # Counters for the exporter.
        self.captures_total: Counter[tuple[str, str, str, str]] = Counter()  # (container, id, runtime, reason)
        self.bytes_total = 0
        self.kernel_drops_total = 0
        self.failed_total = 0
        self.refused_total = 0

    # -- flight recorders ----------------------------------------------------------------------

    def start(self) -> None:
        """Follow the registry: a flight recorder for every namespace that wants one."""
        if self.tools is None:
            log.warning("capture_unavailable", error=self.tools_error)
        # Rings left by a daemon that died hold old packets nobody can reach any more: gone.
        shutil.rmtree(self.ring_dir, ignore_errors=True)
        self.ring_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.registry.subscribe(self.sync_rings)
        self.sync_rings()
        self._pump_task = asyncio.get_running_loop().create_task(self._pump_rings(), name="ring-pump")

    async def _pump_rings(self) -> None:
        """Empty every flight recorder's pipe a few times a second (one wake-up for all of them);
        a recorder whose tcpdump died is replaced after RING_RESTART_DELAY."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(PUMP_INTERVAL)
            now = loop.time()
            dead = []
            for inode, recorder in list(self.rings.items()):
                was_running = recorder.running
                recorder.pump()
                if was_running and not recorder.running:
                    log.warning("ring_stopped", netns=inode, recorder=recorder.name, error=recorder.error)
                if recorder.ended_at and now - recorder.ended_at >= RING_RESTART_DELAY:
                    dead.append(inode)
            for inode in dead:
                self._spawn(self.rings.pop(inode).stop())
                self.ring_restarts_total += 1
            if dead:
                self.sync_rings()

    def wants_ring(self, namespace: WatchedNamespace) -> bool:
        """True if the namespace gets a flight recorder (config ``ring`` and the members' labels)."""
        mode = self.settings.ring
        if any(capture_opted_out(m.labels) for m in namespace.members):
            return False
        if mode == "all":
            return True
        if mode == "labeled":
            return any(m.labels.get(RING_LABEL, "").strip().lower() == "ring" for m in namespace.members)
        return False

    def sync_rings(self) -> None:
        """Start and stop flight recorders so that exactly the namespaces that want one have one."""
        if self._closed or self.tools is None:
            return
        wanted = {inode: ns for inode, ns in self.registry.namespaces().items() if self.wants_ring(ns)}
        for inode in list(self.rings):
            if inode not in wanted:
                self._spawn(self.rings.pop(inode).stop())
        for inode, ns in wanted.items():
            if inode not in self.rings:
                target = CaptureTarget.of(ns)
                recorder = FlightRecorder(
                    f"{target.container}-{inode}",
                    self.tools.argv(self.proc_root, target.pid),
                    self.ring_dir / f"{inode}-{next(self._ring_serial)}",
                    self.settings.ring_bytes,
                    self.settings.ring_segments,
                )
                self.rings[inode] = recorder
                self._spawn(self._start_ring(recorder, target))

    async def _start_ring(self, recorder: FlightRecorder, target: CaptureTarget) -> None:
        try:
            await recorder.start()
        except OSError as exc:
            recorder.error = str(exc)
            recorder.ended_at = asyncio.get_running_loop().time()  # tried again after RING_RESTART_DELAY
            log.warning("ring_failed", container=target.container, container_id=target.container_id, error=str(exc))
            return
        log.info("ring_started", container=target.container, container_id=target.container_id, netns=target.netns, ring_bytes=self.settings.ring_bytes)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._ring_tasks.add(task)
        task.add_done_callback(self._ring_tasks.discard)

    # -- captures --------------------------------------------------------------------------------

    async def check_filter(self, bpf: str) -> None:
        """FilterError if tcpdump does not accept ``bpf`` (CaptureRefused if there is no tcpdump)."""
        if self.tools is None:
            raise CaptureRefused(self.tools_error, 503)
        await self.tools.check_filter(bpf)

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
    ) -> CaptureRow:
        """Start a capture now; returns its row (state "running"). CaptureRefused if it cannot start."""
        s = self.settings
        if self.tools is None:
            raise CaptureRefused(self.tools_error, 503)
        if len(self._running) >= s.max_concurrent:
            self.refused_total += 1
            raise CaptureRefused(f"{s.max_concurrent} captures are already running", 429)
        post = min(max(post_seconds if post_seconds is not None else s.post_seconds, 0.0), s.max_seconds)
        pre = min(max(pre_seconds if pre_seconds is not None else s.pre_seconds, 0.0), s.max_seconds)
        trigger = trigger_at if trigger_at is not None else time.time()
        ring = self.rings.get(target.netns)
        ring_ok = ring is not None and ring.running
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
            window_start=trigger - pre if ring_ok else trigger,
            window_end=trigger + post,
            filter=bpf,
            snaplen=s.snaplen,
        )
        row = await self.store.create(row)
        asked_pre = pre_seconds is not None and pre > 0  # said so: a capture without it tells why
        task = asyncio.create_task(self._run(row, target, ring if ring_ok else None, bpf, asked_pre))
        self._running[row.id] = task
        self.captures_total[(target.container, target.container_id, target.runtime, reason)] += 1
        log.info(
            "capture_started", capture_id=row.id, container=target.container, container_id=target.container_id,
            reason=reason, kind=kind, mode=row.mode, window_start=row.window_start, window_end=row.window_end,
        )
        return row

    async def _run(self, row: CaptureRow, target: CaptureTarget, ring: FlightRecorder | None, bpf: str, asked_pre: bool) -> None:
        path = self.store.dir / row.file  # type: ignore[operator]
        # With a filter, the ring's unfiltered records are written aside and filtered by tcpdump.
        raw_path = path.with_suffix(".unfiltered") if (ring is not None and bpf) else path
        if raw_path != path:
            os.close(os.open(raw_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
        out = CaptureFile(raw_path, row.window_start, row.window_end, row.trigger_at, self.settings.max_bytes)
        state, error, drops = COMPLETE, "", 0
        try:
            if ring is not None:
                drops, error = await self._from_ring(ring, out)
            else:
                drops, error = await self._live(target, bpf, out)
                if error and (out.writer is None or out.writer.packets == 0):
                    state = FAILED
        except asyncio.CancelledError:
            state, error = INCOMPLETE, "daemon stopped before the capture finished"
        except (OSError, PcapError) as exc:
            state, error = FAILED, str(exc)
        finally:
            out.close()
            self._running.pop(row.id, None)
        if out.capped and not error:
            error = f"byte cap of {self.settings.max_bytes} reached"
        if raw_path != path and state != FAILED:
            try:
                await self.tools.filter_file(raw_path, path, bpf)  # type: ignore[union-attr]
            except (OSError, ValueError) as exc:
                state, error = FAILED, f"filtering failed: {exc}"
            raw_path.unlink(missing_ok=True)
        size, packets, digest, pre_packets = self._summary(path, out)
        if ring is None and asked_pre and not error:
            error = "no flight recorder for this container: the capture starts at the trigger"
        await self.store.finish(
            row.id, state=state, error=error, bytes=size, packets=packets, pre_packets=pre_packets, kernel_drops=drops, sha256=digest
        )
        self.bytes_total += size
        self.kernel_drops_total += drops
        if state == FAILED:
            self.failed_total += 1
        evicted = await self.store.enforce()
        log.info(
            "capture_finished", capture_id=row.id, container=row.container, container_id=row.container_id, state=state,
            packets=packets, pre_packets=pre_packets, bytes=size, kernel_drops=drops, error=error, evicted=len(evicted),
        )

    def _summary(self, path: Path, out: CaptureFile) -> tuple[int, int, str, int]:
        try:
            size = path.stat().st_size
        except OSError:
            return 0, 0, "", 0
        if size == 0:
            return 0, 0, "", 0
        if path == out.path and out.writer is not None:
            return size, out.writer.packets, out.writer.sha256(), out.pre_packets
        try:
            _, records = read_file(path)  # filtered: count what tcpdump kept
        except PcapError:
            records = []
        return size, len(records), sha256_file(path), sum(1 for r in records if r.ts < out.trigger)

    async def _from_ring(self, ring: FlightRecorder, out: CaptureFile) -> tuple[int, str]:
        before = await ring.process.request_stats()

        def take(batch: list[Record]) -> None:
            out.add(ring.process.header, batch)  # type: ignore[arg-type]

        # Pumping, subscribing and reading the ring back happen without an await in between: every
        # record is either already in the ring or handed to the listener, none is both or neither.
        ring.pump()
        ring.subscribe(take)
        try:
            past = ring.records_between(out.start, out.end)
            if ring.process.header is not None:
                out.add(ring.process.header, past)
            # Until the end (+0.2 s: packets stamped before it, still in flight), or the byte cap.
            while not out.capped and (remaining := out.end + 0.2 - time.time()) > 0:
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

    async def _live(self, target: CaptureTarget, bpf: str, out: CaptureFile) -> tuple[int, str]:
        assert self.tools is not None
        proc = TcpdumpProcess(self.tools.argv(self.proc_root, target.pid, bpf))
        try:
            await proc.start()
        except OSError as exc:
            return 0, f"cannot start tcpdump: {exc}"

        async def read() -> None:
            async for batch in proc.records():
                if batch:
                    out.add(proc.header, batch)  # type: ignore[arg-type]
                if out.capped:
                    return

        reader = asyncio.create_task(read())
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
        elif reader in done and not out.capped:
            error = "tcpdump stopped early: " + (proc.error_text() or f"exit code {code}")
        return proc.stats.get("dropped", 0), error

    async def for_anomaly(self, namespace: WatchedNamespace, anomaly: AnomalyRow) -> str | None:
        """Capture around an anomaly that just started; the capture id, or None if not captured."""
        if any(capture_opted_out(m.labels) for m in namespace.members):
            return None
        try:
            row = await self.capture(
                CaptureTarget.of(namespace), "anomaly", kind=anomaly.kind, anomaly_id=anomaly.id, trigger_at=anomaly.first_seen
            )
        except CaptureRefused as exc:
            log.warning("anomaly_capture_refused", anomaly_id=anomaly.id, container=anomaly.container, error=str(exc))
            return None
        return row.id

    def running_count(self) -> int:
        """Captures in progress."""
        return len(self._running)

    async def stop(self) -> None:
        """Mark running captures incomplete, stop every flight recorder."""
        self._closed = True
        if self._pump_task is not None:
            self._pump_task.cancel()
            await asyncio.gather(self._pump_task, return_exceptions=True)
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(r.stop() for r in self.rings.values()), return_exceptions=True)
        self.rings.clear()
        await asyncio.gather(*self._ring_tasks, return_exceptions=True)

