"""The capture engine: admits a capture request, runs it into one pcap in the store, records its
outcome.

Two ways to get the packets of [trigger - pre, trigger + post] (:mod:`.writer`):

* the namespace has a flight recorder (:mod:`.fleet`): the pre-trigger records are read back
  from its ring and the following ones are taken as they arrive, so the pcap starts before the
  trigger;
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
all pass), the anomaly captures' per-container quota (:mod:`.quota`), the store's disk budget,
files 0600. A tcpdump that is missing or dies, or a disk that is full, makes the capture
"failed" with what it said; every capture ends with a state, whatever goes wrong; the daemon
carries on. Reading a ring back, a live capture's packets, hashing and filtering run off the
event loop. Outcomes go to the index through :mod:`.outcomes`.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from ..index import AnomalyRow, CaptureRow, new_id
from ..index.captures import FAILED, RUNNING
from ..registry import ContainerRegistry
from ..samples import SampleStore
from ..supervisor import TaskSupervisor
from . import writer
from .writer import STOPPED
from .evidence import EvidenceRecorder
from .fleet import NamespaceHolder, RecorderFleet, capture_opted_out
from .model import SIDES, CaptureRefused, CaptureSettings, CaptureStats, CaptureTarget
from .quota import SlotQuota
from .outcomes import CaptureOutcomes
from .ring import FlightRecorder
from .store import CaptureStore
from .tcpdump import CaptureToolMissing, Tools

if TYPE_CHECKING:
    from ..dns.service import DnsService
    from ..ebpf.service import EbpfService
    from ..nat.monitor import NatMonitor

log = structlog.get_logger("nstap.capture")


__all__ = ["CaptureEngine", "CaptureRefused", "CaptureSettings", "CaptureStats", "CaptureTarget", "SIDES", "capture_opted_out"]


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
        try:
            self.tools: Tools | None = Tools.find(settings.snaplen, settings.buffer_kib)
            self.tools_error = ""
        except CaptureToolMissing as exc:
            self.tools, self.tools_error = None, str(exc)
        self.fleet = RecorderFleet(
            self.tools, namespaces, data_dir / "ring", self.supervisor, settings.ring, settings.ring_bytes, settings.ring_segments, settings.ring_seconds
        )
        self.quota = SlotQuota(settings.max_per_container_per_hour, settings.max_concurrent)
        self.outcomes = CaptureOutcomes(store)
        self.evidence = EvidenceRecorder(store) if settings.evidence else None
        self.nat: NatMonitor | None = None  # set by the daemon: its view joins each capture's evidence
        self.ebpf: EbpfService | None = None  # likewise
        self.dns: DnsService | None = None  # likewise
        self._evidence_tasks: set[asyncio.Task] = set()
        self._evidence_of: dict[str, asyncio.Task] = {}  # capture id -> its evidence task
        self._home_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)  # host-side captures
        self._running: dict[str, asyncio.Task] = {}
        self._running_rows: dict[str, CaptureRow] = {}  # the rows of the captures in _running
        self._reserved = 0  # slots taken by captures being created (between the check and the task)
        self._closed = False
        self.captures_total: Counter[tuple[str, str, str, str]] = Counter()  # (container, id, runtime, reason)
        self.refused_total: Counter[str] = Counter({"concurrency": 0, "per_container_limit": 0, "store": 0})

    @property
    def rings(self) -> dict[int, FlightRecorder]:
        """The flight recorders, by namespace inode."""
        return self.fleet.rings

    # -- start and stop --------------------------------------------------------------------------

    async def recover(self) -> int:
        """Filter the packets of the filtered captures a daemon that died left unfiltered (the
        store found them at open); returns how many. Their pcap then holds what it should have
        held, and the capture is incomplete (the daemon died before its end)."""
        for row in list(self.store.unfiltered):
            raw = self.store.unfiltered_path(row)
            error = f"{STOPPED}; its packets were filtered at the next start"
            if self.tools is None:
                error = f"{STOPPED}; its packets could not be filtered: {self.tools_error}"
            else:
                try:
                    await self.tools.filter_file(raw, self.store.files.path(row.file), row.filter)  # type: ignore[arg-type]
                except (OSError, ValueError) as exc:
                    error = f"{STOPPED}; filtering its packets failed: {exc}"
            raw.unlink(missing_ok=True)
            await self.store.filtered_at_start(row.id, error)
            log.info("capture_recovered", capture_id=row.id, container=row.container, error=error)
        count = len(self.store.unfiltered)
        self.store.unfiltered = []
        return count

    async def load_recent(self) -> None:
        """Fill :attr:`recent` from the index: a restart keeps the dashboards' links to captures."""
        await self.outcomes.load()

    def start(self) -> None:
        """Follow the watched namespaces: a flight recorder for every one that wants one."""
        if self.tools is None:
            log.warning("capture_unavailable", error=self.tools_error)
        self.registry.subscribe(self._registry_changed)  # members (and their labels) of attached ones
        self.fleet.start()

    def _registry_changed(self) -> None:
        current = {r.short_id for r in self.registry.containers()}
        for key in [k for k in self.captures_total if k[1] not in current]:
            del self.captures_total[key]  # they would grow for ever
        self.quota.prune(current)
        self.fleet.sync()

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
        await self.fleet.stop()
        if self.evidence is not None:
            self.evidence.close()
        os.close(self._home_fd)

    # -- admission -------------------------------------------------------------------------------

    async def check_filter(self, bpf: str) -> None:
        """FilterError if tcpdump does not accept ``bpf`` (CaptureRefused if there is no tcpdump)."""
        if self.tools is None:
            raise CaptureRefused(self.tools_error, 503)
        await self.tools.check_filter(bpf)

    def _refuse(self, why: str, message: str, status: int) -> CaptureRefused:
        self.refused_total[why] += 1
        return CaptureRefused(message, status)

    def _admit(self, target: CaptureTarget, side: str) -> None:
        """CaptureRefused unless a capture of ``target`` may start now."""
        if side not in SIDES:
            raise CaptureRefused(f"side must be one of {', '.join(SIDES)}", 400)
        if self.tools is None:
            raise CaptureRefused(self.tools_error, 503)
        namespace = self.namespaces.watched().get(target.netns)
        if namespace is None:
            raise CaptureRefused(f"the network namespace of {target.container} is not watched (yet, or any more)", 409)
        if capture_opted_out(namespace):
            raise CaptureRefused(f"the network namespace of {target.container} opted out of captures (nstap.capture=off)", 403)
        if len(self._running) + self._reserved >= self.settings.max_concurrent:
            raise self._refuse("concurrency", f"{self.settings.max_concurrent} captures are already running", 429)

    def _host_interface(self, target: CaptureTarget, interface: str | None) -> str:
        peers = self.host_peers(target.netns)
        if interface is not None and interface not in peers:
            raise CaptureRefused(f"{interface!r} is not a host-side interface of {target.container} (known: {', '.join(peers) or 'none'})", 400)
        if not peers:
            raise CaptureRefused(f"no host-side interface of {target.container} is known (no veth, or not sampled yet)", 409)
        return interface or peers[0]

    def _way_in(self, target: CaptureTarget, side: str, ring: FlightRecorder | None) -> int | None:
        """The descriptor a live tcpdump enters its namespace through (None for a ring capture),
        duplicated: it stays valid whatever happens to the watcher meanwhile."""
        if side == "host":
            return os.dup(self._home_fd)
        if ring is not None:
            return None
        held = self.namespaces.netns_fd(target.netns)
        if held is None:
            raise CaptureRefused(f"the network namespace of {target.container} is not watched (yet, or any more)", 409)
        return os.dup(held)

    def _row(self, target: CaptureTarget, reason: str, ring: FlightRecorder | None, window: tuple[float, float, float], **fields: Any) -> CaptureRow:
        start, trigger, end = window
        row = CaptureRow(
            id=new_id(trigger), state=RUNNING, created_at=time.time(), container=target.container, container_id=target.container_id,
            runtime=target.runtime, netns=target.netns, reason=reason, mode="ring" if ring is not None else "live", trigger_at=trigger,
            window_start=start if ring is not None else trigger, window_end=end, snaplen=self.settings.snaplen, **fields,
        )
        if ring is not None:
            row.pre_truncated = ring.holds_since() > row.window_start + 0.05
        return row

    def _window(self, pre_seconds: float | None, post_seconds: float | None, trigger_at: float | None, onset_at: float | None, margin: float) -> tuple[float, float, float]:
        """(start, trigger, end) of a capture's window."""
        s = self.settings
        post = min(max(post_seconds if post_seconds is not None else s.post_seconds, 0.0), s.max_seconds)
        pre = min(max(pre_seconds if pre_seconds is not None else s.pre_seconds, 0.0), s.max_seconds)
        trigger = trigger_at if trigger_at is not None else time.time()
        anchor = trigger if onset_at is None else min(trigger, onset_at - max(margin, 0.0))
        return max(anchor - pre, trigger - max(s.max_pre_seconds, pre)), trigger, trigger + post

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
        self._admit(target, side)
        host_if = self._host_interface(target, interface) if side == "host" else ""
        ring = self.fleet.running(target.netns) if side == "container" else None
        fd = self._way_in(target, side, ring)
        row = self._row(
            target, reason, ring, self._window(pre_seconds, post_seconds, trigger_at, onset_at, margin),
            kind=kind, anomaly_id=anomaly_id, filter=bpf, onset_at=onset_at, side=side, interface=host_if,
        )
        self._reserved += 1  # this slot is taken from here on, across the await below
        created = False
        try:
            row = await self.store.create(row, unfiltered=ring is not None and bool(bpf))
            created = True
        except (OSError, sqlite3.Error) as exc:
            log.warning("capture_store_failed", container=target.container, container_id=target.container_id, error=str(exc))
            raise self._refuse("store", f"cannot create the capture in the store: {exc}", 507) from None
        finally:
            self._reserved -= 1
            if fd is not None and (self._closed or not created):
                os.close(fd)
        if self._closed:  # the daemon began to stop while the row was created
            await self._mark_incomplete(row)
            raise CaptureRefused("the daemon is stopping", 503)
        asked_pre = pre_seconds is not None and pre_seconds > 0  # said so: a capture without it tells why
        task = self.supervisor.spawn("capture", self._run(row, ring, asked_pre, fd))
        if fd is not None:
            task.add_done_callback(lambda _task: os.close(fd))
        self._running[row.id] = task
        self._running_rows[row.id] = row
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
        nat, ebpf, dns = self.nat, self.ebpf, self.dns
        namespace = self.registry.namespaces().get(row.netns)
        netns = row.netns

        async def extra() -> dict[str, Any]:
            out: dict[str, Any] = {}
            if nat is not None and namespace is not None:
                out["nat"] = await nat.evidence(namespace)  # forwards, own firewall, conntrack entries
            if ebpf is not None:
                out["ebpf"] = ebpf.evidence(netns)  # drop reasons so far, top retransmitting flows
            if dns is not None:
                out["dns"] = await dns.evidence(netns)  # lookups by outcome, failing names, servers
            return out

        task = self.supervisor.spawn(
            "evidence", self.evidence.record(row, anomaly, fd, self.host_peers(row.netns), lambda: asyncio.wait({capture}), extra)
        )
        self._evidence_tasks.add(task)
        self._evidence_of[row.id] = task
        task.add_done_callback(self._evidence_tasks.discard)
        task.add_done_callback(lambda _task, cid=row.id: self._evidence_of.pop(cid, None))
        task.add_done_callback(lambda _task: os.close(fd))

    # -- run -------------------------------------------------------------------------------------

    async def _run(self, row: CaptureRow, ring: FlightRecorder | None, asked_pre: bool, fd: int | None) -> None:
        """Take the capture and record its outcome; the row always ends with a state, whatever fails.

        Its concurrency slot is held until the outcome is recorded (filtering and hashing included).
        """
        try:
            try:
                outcome = await self._take(row, ring, asked_pre, fd)
            except asyncio.CancelledError:
                # Stopped after the packets were in (while filtering, hashing or recording): the
                # file is kept and indexed as incomplete with what it holds, then the cancel goes on.
                await asyncio.shield(self._mark_incomplete(row))
                raise
            except Exception as exc:  # noqa: BLE001 - a bug must not leave the capture "running" for good
                self.supervisor.failed("capture", exc, capture_id=row.id)
                outcome = {"state": FAILED, "error": f"internal error: {type(exc).__name__}: {exc}"}
            await self.outcomes.record(row, outcome)
        finally:
            self._running.pop(row.id, None)
            self._running_rows.pop(row.id, None)

    async def _mark_incomplete(self, row: CaptureRow) -> None:
        try:
            await self.store.mark_incomplete(row.id, STOPPED)
        except (OSError, sqlite3.Error) as exc:  # the next start marks it incomplete then
            log.warning("capture_index_failed", capture_id=row.id, error=str(exc))

    async def _take(self, row: CaptureRow, ring: FlightRecorder | None, asked_pre: bool, fd: int | None) -> dict[str, Any]:
        path = self.store.files.path(row.file)  # type: ignore[arg-type]
        # With a filter, the ring's unfiltered records are written aside and filtered by tcpdump.
        raw_path = self.store.unfiltered_path(row) if (ring is not None and row.filter) else path
        source = writer.Source(ring, self.tools, fd, row.filter, row.interface or "any")
        return await writer.take(source, path, raw_path, (row.window_start, row.window_end, row.trigger_at), self.settings.max_bytes, asked_pre)

    async def retry_unsaved(self) -> None:
        """Write the outcomes the index could not take before (see :class:`CaptureOutcomes`)."""
        await self.outcomes.retry_unsaved()

    def recording(self, capture_id: str) -> bool:
        """True while the capture runs or its evidence is being taken (its upload waits for both)."""
        return capture_id in self._running or capture_id in self._evidence_of

    def unsaved(self, capture_id: str) -> dict[str, Any] | None:
        """The outcome of a finished capture the index has not taken yet, if any."""
        return self.outcomes.unsaved(capture_id)

    def when_done(self, capture_id: str, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the running capture ``capture_id`` has ended (outcome recorded)."""
        self._running[capture_id].add_done_callback(lambda _task: callback())

    def running_of(self, netns: int) -> list[CaptureRow]:
        """The captures of namespace ``netns`` running now."""
        return [r for r in self._running_rows.values() if r.netns == netns]

    def running_count(self) -> int:
        """Captures in progress."""
        return len(self._running)

    def stats(self) -> CaptureStats:
        """The read model the exporter scrapes (call on the event loop)."""
        now = time.time()
        fleet, store, done = self.fleet, self.store, self.outcomes
        return CaptureStats(
            reach=[(inode, r.reach(now)) for inode, r in fleet.rings.items() if r.running],
            total=dict(self.captures_total), refused=dict(self.refused_total), bytes=done.bytes_total,
            kernel_drops=done.kernel_drops_total, failed=done.failed_total, running=len(self._running),
            store_bytes=store.total_bytes, store_max_bytes=store.retention.max_bytes, index_bytes=store.index_bytes,
            index_pruned=store.pruned_total, recent=done.recent.items(),  # type: ignore[arg-type]
            rings=sum(1 for r in fleet.rings.values() if r.running), ring_restarts=fleet.restarts_total,
            ring_lost=fleet.lost_total, ring_backlog=fleet.backlog, pumps_cut=fleet.pumps_cut_total,
        )
