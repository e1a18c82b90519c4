"""The eBPF collector inside the daemon: loaded once by a child process, read once per round.

``ebpf: auto`` loads it when everything it needs is there and otherwise logs one line saying
what is missing and how to fix it (``nstap_collector_up{collector="ebpf_drops"} 0``; the rest of
the daemon runs unchanged); ``on`` makes a missing prerequisite stop the daemon (exit code 2);
``off`` never loads it.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import structlog

from .collector import DropCollector, EbpfUnavailable
from .loader import LOAD_TIMEOUT, LOADER, load_in_child

log = structlog.get_logger("nstap.ebpf")


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
        self._failing = False
        self._closed = False

    async def load(self) -> None:
        """Compile and attach in a child process (a few seconds, none of them on this process's
        CPU); EbpfUnavailable only in mode ``on``."""
        if self.mode == "off":
            self.error = "ebpf: off in the configuration"
            return
        collector = DropCollector()
        started = time.monotonic()
        try:
            collector.take(await load_in_child(self.loader, self.load_timeout))
        except EbpfUnavailable as exc:
            self.error = str(exc)
            if self.mode == "on":
                raise
            log.warning("ebpf_unavailable", collector="ebpf_drops", error=self.error)
            return
        if self._closed:  # the daemon stopped while the child compiled
            collector.close()
            return
        self.collector = collector
        self.up = 1
        log.info("ebpf_loaded", collector="ebpf_drops", compile_seconds=round(collector.compile_seconds, 3),
                 load_seconds=round(time.monotonic() - started, 3), reasons=len(collector.reasons),
                 loader_pid=collector.loader_pid, loader_peak_rss_mib=round(collector.loader_peak_rss_kib / 1024, 1))

    def new_round(self) -> None:
        """Read the drop map (one batched lookup), and the flow map when it is due."""
        collector = self.collector
        if collector is None:
            return
        try:
            self.counts = collector.read()
            if collector.flows_due(time.time()):
                collector.read_flows()
        except Exception as exc:  # noqa: BLE001 - a failed map read must not stop the round's samples
            collector.read_errors += 1
            if not self._failing:
                self._failing = True
                log.warning("ebpf_read_failed", error=f"{type(exc).__name__}: {exc}")
        else:
            self._failing = False

    def host_counts(self, watched: set[int]) -> dict[str, int]:
        """Drops of every namespace that is not a watched container's, by reason: the host's."""
        out: dict[str, int] = {}
        for netns, reasons in self.counts.items():
            if netns in watched:
                continue
            for reason, count in reasons.items():
                out[reason] = out.get(reason, 0) + count
        return out

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
        """Delete the map entries of namespaces ``netns`` (no longer watched); how many went."""
        collector = self.collector
        if collector is None:
            return 0
        gone = collector.forget(netns)
        self.counts = {inode: reasons for inode, reasons in self.counts.items() if inode not in netns}
        return gone

    def close(self) -> None:
        """Detach the program (close its descriptors); a load still under way is dropped when it ends."""
        self._closed = True
        if self.collector is not None:
            self.collector.close()
            self.collector = None
            self.up = 0
