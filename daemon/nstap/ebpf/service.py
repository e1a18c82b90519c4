"""The eBPF collector inside the daemon: loaded once by a child process, read once per round.

``ebpf: auto`` loads it when everything it needs is there and otherwise logs one line saying
what is missing and how to fix it (``nstap_collector_up{collector="ebpf_drops"} 0``; the rest of
the daemon runs unchanged); ``on`` makes a missing prerequisite stop the daemon (exit code 2);
``off`` never loads it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import structlog

from .collector import DropCollector, EbpfUnavailable
from ..gate import ROUND
from ..threads import QuickJob, WorkerThread
from .loader import LOAD_TIMEOUT, LOADER, load_in_child
from .mibs import MibPass
from ..samplers.protocols import RoundCounters

log = structlog.get_logger("nstap.ebpf")

SWEEP_EVERY = 10.0  # seconds between sweeps of the entries of namespaces that no longer exist
SWEEP_OVERDUE = 6  # a sweep given up at the round's gate this many SWEEP_EVERYs runs through it (a round that leaves no room)
STOP_EVERY = 64  # processes stat'ed between looks at whether to give up


def live_netns(proc_root: str = "/proc", wanted: Collection[int] | None = None, stop: Callable[[], bool] | None = None) -> set[int] | None:
    """Inodes of the network namespaces some process is in now: a stat per process, some 3,000
    beside 1,000 containers (80-130 ms in a worker thread on a busy host). With ``wanted``, done
    as soon as all of those are found; with ``stop``, given up (None) when it says so."""
    inodes: set[int] = set()
    missing = set(wanted) if wanted is not None else None
    with os.scandir(proc_root) as entries:
        for i, entry in enumerate(entries):
            if stop is not None and i % STOP_EVERY == 0 and stop():
                return None
            if entry.name.isdigit():
                try:
                    inode = os.stat(f"{proc_root}/{entry.name}/ns/net").st_ino
                except OSError:
                    continue  # gone meanwhile, or a kernel thread
                inodes.add(inode)
                if missing is not None:
                    missing.discard(inode)
                    if not missing:
                        break
    return inodes


class EbpfService:
    """Owns the :class:`DropCollector`; the latest drop counts by namespace for the samplers."""

    def __init__(self, mode: str, loader: Sequence[str] = LOADER, load_timeout: float = LOAD_TIMEOUT) -> None:
        self.mode = mode
        self.loader = tuple(loader)  # the child that compiles and attaches (tests replace it)
        self.load_timeout = load_timeout
        self.collector: DropCollector | None = None
        self.up = 0
        self.error = ""
        self.counts: Mapping[int, Mapping[str, int]] = {}
        self.read_at = 0.0  # when the counts were read (wall clock; 0: not yet)
        self.host = HostDrops()
        self._failing = False
        self._closed = False
        self._thread = WorkerThread("nstap-ebpf")  # map reads and deletes, off the event loop
        self._read_job = QuickJob(self._thread, self._read)  # on the loop's thread while quick (nstap.threads)
        self._reading: asyncio.Future | None = None
        self._sweeping: asyncio.Future | None = None
        self._watched: set[int] = set()
        self._lost_logged = 0
        self._swept_at = time.monotonic()
        self._home = os.stat("/proc/self/ns/net").st_ino
        self.swept_total = 0  # entries of namespaces that no longer exist, deleted by the sweep
        # The protocol counters of every namespace in one pass (nstap.ebpf.mibs), read with the drops.
        self.mibs: MibPass | None = None
        self.mibs_error = ""
        self.mib_errors = 0
        self._mib_counts: dict[int, tuple[int, ...]] = {}
        self._mib_sockets: dict[int, tuple[int, ...]] = {}
        self._mib_round = -1  # the round whose early hook started the read of _mib_counts
        self._round = 0  # early hooks so far

    async def load(self) -> None:
        """Compile and attach in a child process (a few seconds, none of them on this process's
        CPU); EbpfUnavailable only in mode ``on``."""
        if self.mode == "off":
            self.error = "ebpf: off in the configuration"
            return
        collector = DropCollector()
        started = time.monotonic()
        mib_pass = None
        try:
            handover = await load_in_child(self.loader, self.load_timeout)
            prog, records = handover.fds.pop("prog:mibs", None), handover.fds.pop("map:mib_records", None)
            if prog is not None and records is not None:
                try:
                    report = handover.report
                    mib_pass = MibPass(
                        prog, records, tuple(str(k) for k in report.get("mib_keys") or ()), int(report["mib_batch"]),
                        tuple(str(k) for k in report.get("mib_socket_keys") or ()),
                    )
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    os.close(prog)
                    os.close(records)
                    handover.report["mibs_error"] = f"the MIB records cannot be mapped: {exc}"
            elif prog is not None or records is not None:
                os.close(prog if prog is not None else records)
            collector.take(handover)
        except EbpfUnavailable as exc:
            if mib_pass is not None:
                mib_pass.close()
            self.error = str(exc)
            if self.mode == "on":
                raise
            log.warning("ebpf_unavailable", collector="ebpf_drops", error=self.error)
            return
        if self._closed:  # the daemon stopped while the child compiled
            collector.close()
            if mib_pass is not None:
                mib_pass.close()
            return
        self.collector = collector
        self.mibs = mib_pass
        self.mibs_error = "" if mib_pass is not None else str(handover.report.get("mibs_error") or "not handed over")
        self.up = 1
        if mib_pass is None:
            log.warning("ebpf_mibs_unavailable", error=self.mibs_error, fallback="the protocol counters are read from /proc/net/snmp and netstat")
        elif not mib_pass.socket_keys:
            log.warning("ebpf_mib_sockets_unavailable", error=str(handover.report.get("mib_sockets_error") or "not learnt"),
                        fallback="the sockets in use are read from /proc/net/sockstat and sockstat6")
        log.info("ebpf_loaded", collector="ebpf_drops", mibs=mib_pass is not None, mib_sockets=bool(mib_pass and mib_pass.socket_keys),
                 compile_seconds=round(collector.compile_seconds, 3),
                 load_seconds=round(time.monotonic() - started, 3), reasons=len(collector.reasons),
                 loader_pid=collector.loader_pid, loader_peak_rss_mib=round(collector.loader_peak_rss_kib / 1024, 1))

    def new_round(self) -> asyncio.Future | None:
        """Start reading the drop map (one batched lookup; the flow map too when due), unless the
        last read is still going; the samples use the latest read done. In the eBPF thread, or
        on the loop's thread while the reads are quick and the thread idle (QuickJob). Returns
        the read started (the ticker times it: Ticker.lead)."""
        self._round += 1
        collector = self.collector
        if collector is None or self._closed or (self._reading is not None and not self._reading.done()):
            return None
        self._reading = self._read_job.start(collector, self._round)
        self._reading.add_done_callback(self._read_done)
        return self._reading

    async def refresh(self) -> None:
        """Read the maps now and wait for it (what a round does, awaited: for tools and tests)."""
        self.new_round()
        if self._reading is not None:
            await asyncio.gather(self._reading, return_exceptions=True)

    def _read(
        self, collector: DropCollector, round_: int,
    ) -> tuple[float, dict[int, dict[str, int]], int, tuple[dict[int, tuple[int, ...]], dict[int, tuple[int, ...]]] | None]:
        at = time.time()
        counts = collector.read()
        mib_counts = None
        if self.mibs is not None:
            try:
                mib_counts = self.mibs.read()
            except OSError as exc:  # the samplers read the files this round
                self.mib_errors += 1
                if self.mib_errors == 1 or self.mib_errors % 1000 == 0:
                    log.warning("ebpf_mibs_read_failed", error=str(exc), failures=self.mib_errors)
        if collector.flows_due(at):
            collector.read_flows()
        return at, counts, round_, mib_counts

    def counters_for(self, target: RoundCounters) -> None:
        """As the tick starts: ``target`` gets the protocol counters and sockets in use of every
        namespace read at this round's early hook, or none if that read is not done, failed, or
        there is no MIB pass (the samplers read the files then)."""
        fresh = self.mibs is not None and self._mib_round == self._round
        target.keys = self.mibs.keys if self.mibs is not None else ()
        target.values = self._mib_counts if fresh else {}
        target.socket_keys = self.mibs.socket_keys if self.mibs is not None else ()
        target.sockets = self._mib_sockets if fresh else {}

    def after_round(self) -> None:
        """A sampling round is done: every SWEEP_EVERY, the sweep of gone namespaces' entries
        (:meth:`_sweep`), in the eBPF thread in the time before the next tick's read.

        It ran inside the read, right before a tick: beside 1,000 containers its /proc scan took
        80-130 ms while the event loop's thread waited for the GIL, and the tick after it was 10-41 ms
        late every 20 s or so (a trace of every tick, 2026-12-05). Now it gives up when the
        round's gate closes before the tick (tried again after the next round; after
        SWEEP_OVERDUE periods it runs through)."""
        collector = self.collector
        if collector is None or self._closed or self._sweeping is not None:
            return
        since = time.monotonic() - self._swept_at
        if since < SWEEP_EVERY:
            return
        stop = None if since >= SWEEP_OVERDUE * SWEEP_EVERY else (lambda: ROUND.closed)
        self._sweeping = self._thread.submit(self._sweep, collector, self.counts, stop)
        self._sweeping.add_done_callback(self._swept)

    def _sweep(self, collector: DropCollector, counts: Mapping[int, Mapping[str, int]], stop: Callable[[], bool] | None = None) -> set[int] | None:
        """Delete the entries of unwatched namespaces that no longer exist (in the eBPF thread):
        those deleted, or None if ``stop`` said to give up first.

        A watched namespace's entries go when its watcher does (follow); those of a namespace
        nstap never watched (a build step's, an ``ip netns`` one, a container gone before its
        watcher came) stayed for good: the map filled on a host that makes namespaces all day, and
        a container on such a reused inode inherited them. Their drops were the host's and are in
        its totals already (HostDrops starts a namespace that comes back from zero)."""
        watched = self._watched  # replaced on the loop, never changed in place
        unwatched = {inode for inode in counts if inode and inode not in watched}
        unwatched |= {key[0] for key in collector.flow_keys() if key[0] and key[0] not in watched}
        unwatched.discard(self._home)  # the daemon's own (the host's): alive, and the rest is often nothing
        if not unwatched:
            return set()
        live = live_netns(wanted=unwatched, stop=stop)
        if live is None:
            return None
        dead = unwatched - live
        if dead:
            self.swept_total += collector.forget(dead)
        return dead

    def _swept(self, sweeping: asyncio.Future) -> None:
        self._sweeping = None
        if sweeping.cancelled():
            return
        exc = sweeping.exception()
        if exc is not None:
            log.warning("ebpf_sweep_failed", error=f"{type(exc).__name__}: {exc}")
        elif (dead := sweeping.result()) is None:
            return  # given up at the gate: after the next round
        elif dead:
            self.counts = {inode: reasons for inode, reasons in self.counts.items() if inode not in dead}
        self._swept_at = time.monotonic()

    def _read_done(self, reading: asyncio.Future) -> None:
        collector = self.collector
        if collector is None or reading.cancelled():
            return
        exc = reading.exception()
        if exc is not None:  # a failed map read must not stop the samples: they keep the last counts
            collector.read_errors += 1
            if not self._failing:
                self._failing = True
                log.warning("ebpf_read_failed", error=f"{type(exc).__name__}: {exc}")
            return
        self._failing = False
        self.read_at, self.counts, round_, mib_counts = reading.result()
        if mib_counts is not None:
            (self._mib_counts, self._mib_sockets), self._mib_round = mib_counts, round_
        self.host.update(self.counts, self._watched)
        if collector.lost > self._lost_logged:
            if not self._lost_logged:
                log.warning("ebpf_map_full", map="drops", max_entries=collector.drops.max_entries if collector.drops else 0,
                            uncounted=collector.lost, fix="fewer namespaces than the map holds; tell the developers")
            self._lost_logged = collector.lost

    def follow(self, watched: set[int]) -> None:
        """The watched namespaces now: the map entries of those no longer watched are deleted
        (in the eBPF thread), so that a churning host's map never fills with the dead and a new
        container on a reused namespace inode starts from zero."""
        gone = self._watched - watched
        self._watched = set(watched)
        collector = self.collector
        if gone and collector is not None and not self._closed:
            self.counts = {inode: reasons for inode, reasons in self.counts.items() if inode not in gone}
            forgetting = self._thread.submit(collector.forget, gone)
            forgetting.add_done_callback(self._forgot)

    def _forgot(self, forgetting: asyncio.Future) -> None:
        if not forgetting.cancelled() and forgetting.exception() is not None:
            log.warning("ebpf_forget_failed", error=str(forgetting.exception()))

    def host_counts(self) -> dict[str, int]:
        """Drops outside the watched containers' namespaces, by reason: monotonic (see HostDrops)."""
        return dict(self.host.totals)

    def retransmits(self, netns: set[int]) -> list[dict[str, Any]]:
        """The flows of ``netns`` that retransmitted in the last minute, most first."""
        if self.collector is None:
            return []
        return [f.to_json() for f in self.collector.top_flows(netns)]

    def evidence(self, netns: int) -> dict[str, Any]:
        """The namespace's drop counts by reason now and its top retransmitting flows."""
        if self.collector is None:
            return {"error": self.error or "not loaded"}
        return {"kernel_drops": dict(self.counts.get(netns, {})), "retransmit_flows": self.retransmits({netns})}

    def forget(self, netns: Collection[int]) -> int:
        """Delete the map entries of namespaces ``netns`` now (blocking); how many went."""
        collector = self.collector
        if collector is None:
            return 0
        gone = collector.forget(netns)
        self.counts = {inode: reasons for inode, reasons in self.counts.items() if inode not in netns}
        return gone

    def close(self) -> None:
        """Detach the program (close its descriptors) once a read under way is done; a load still
        under way is dropped when it ends."""
        self._closed = True
        self._thread.shutdown(wait=True)
        if self.collector is not None:
            self.collector.close()
            self.collector = None
            self.up = 0
        if self.mibs is not None:
            self.mibs.close()
            self.mibs = None


class HostDrops:
    """The host's drops by reason: every namespace that is not a watched container's, counted so
    that the total only grows.

    Summing the map's entries of unwatched namespaces at each read made the total jump when a
    container stopped (its namespace's drops became the host's) and go back when its entries were
    deleted: a counter reset to Prometheus. Here each read adds what each unwatched namespace's
    counts grew by since the last read; a namespace watched at the last read starts from what it
    holds now (its drops were the container's), a counter that went down (deleted, then counted
    again) from zero.
    """

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self._last: dict[int, Mapping[str, int]] = {}  # unwatched namespace -> its counts at the last read
        self._watched: set[int] = set()

    def update(self, counts: Mapping[int, Mapping[str, int]], watched: set[int]) -> None:
        """Add one read of the drop map."""
        totals = self.totals
        last: dict[int, Mapping[str, int]] = {}
        for netns, reasons in counts.items():
            if netns in watched:
                continue
            before = self._last.get(netns)
            if before is None:
                before = reasons if netns in self._watched else {}
            for reason, count in reasons.items():
                old = before.get(reason, 0)
                grew = count - old if count >= old else count
                if grew:
                    totals[reason] = totals.get(reason, 0) + grew
            last[netns] = reasons
        self._last = last  # only the namespaces in this read: bounded by the map
        self._watched = set(watched)
