"""A capture's evidence: the namespace's state when the capture started and when it ended.

One JSON document per capture, stored next to its pcap (same budget, same 0600): the anomaly that
triggered it (what tripped, onset, detection), a snapshot at the start and one at the end (TCP
and UDP sockets, interfaces of both veth ends with counters and addresses, routes, neighbours, the
namespace's firewall), and the protocol counters that moved over the capture (like ``nstat``).
The document is written when the start snapshot is in (a daemon that dies mid-capture still
leaves it) and again, complete, at the end.

Snapshots run off the sampling path: sockets and counters in a worker thread that enters the
namespace (:class:`nstap.netns.evidence.NamespaceRunner`), the rest in short child processes. A
namespace that vanished meanwhile gives a snapshot that says so, never an exception.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from ..netns import evidence as ns_evidence
from ..index import AnomalyRow, CaptureRow
from .store import CaptureStore

log = structlog.get_logger("nstap.capture")

FORMAT_VERSION = 1


class EvidenceRecorder:
    """Takes the snapshots of captures and files them in the store."""

    def __init__(self, store: CaptureStore, socket_limit: int = ns_evidence.SOCKET_LIMIT) -> None:
        self.store = store
        self.socket_limit = socket_limit
        self.runner = ns_evidence.NamespaceRunner()
        self.failed_total = 0

    async def snapshot(self, ns_fd: int, host_peers: list[str], extra: Callable[[], Awaitable[dict[str, Any]]] | None = None) -> dict[str, Any]:
        """One snapshot of the namespace behind ``ns_fd`` (kept open by the caller until this returns)."""
        taken_at = time.time()
        limit = self.socket_limit
        inside: Any
        try:
            inside = await self.runner.run(ns_fd, lambda: ns_evidence.sockets_and_counters_here(limit=limit))
        except OSError as exc:
            inside = {"error": f"cannot read the namespace's sockets: {exc}"}
        ip, firewall, host = await asyncio.gather(
            ns_evidence.ip_state(ns_fd), ns_evidence.firewall_rules(ns_fd), ns_evidence.host_interfaces(host_peers)
        )
        snap: dict[str, Any] = {"taken_at": taken_at, **inside, **ip, "host_interfaces": host, "firewall": firewall}
        snap["failed_neighbours"] = ns_evidence.interesting_neighbours(ip.get("neighbours", []))
        if extra is not None:
            snap.update(await extra())  # the NAT monitor's and the eBPF collector's views
        return snap

    async def record(
        self,
        row: CaptureRow,
        anomaly: AnomalyRow | None,
        ns_fd: int,
        host_peers: list[str],
        capture_done: Callable[[], Any],
        extra: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        """Snapshot now, file it, wait for ``capture_done()`` (an awaitable), snapshot again, file
        the whole. ``ns_fd`` stays the caller's to close. Never raises (but a cancel)."""
        try:
            doc: dict[str, Any] = {
                "version": FORMAT_VERSION,
                "capture": {k: v for k, v in row.to_json().items() if k not in ("downloadable", "has_evidence")},
                "anomaly": anomaly.to_json() if anomaly is not None else None,
            }
            doc["start"] = await self.snapshot(ns_fd, host_peers, extra)
            await self._save(row.id, doc)
            await capture_done()
            doc["end"] = await self.snapshot(ns_fd, host_peers, extra)
            if anomaly is not None:
                doc["anomaly"] = anomaly.to_json()  # as it is now: its cause may have been named since the start
            before, after = doc["start"].get("counters"), doc["end"].get("counters")
            if before and after:
                doc["counter_deltas"] = ns_evidence.counter_deltas(before, after)
                doc["counter_seconds"] = round(doc["end"]["taken_at"] - doc["start"]["taken_at"], 3)
            drops_before = (doc["start"].get("ebpf") or {}).get("kernel_drops")
            drops_after = (doc["end"].get("ebpf") or {}).get("kernel_drops")
            if drops_before is not None and drops_after is not None:
                # The drop reasons the kernel counted in the namespace during the capture's window.
                doc["kernel_drop_deltas"] = {
                    r: n - drops_before.get(r, 0) for r, n in sorted(drops_after.items()) if n > drops_before.get(r, 0)
                }
            await self._save(row.id, doc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - evidence is a bonus: its failure never touches the capture
            self.failed_total += 1
            log.warning("evidence_failed", capture_id=row.id, container=row.container, error=f"{type(exc).__name__}: {exc}")

    async def _save(self, capture_id: str, doc: dict[str, Any]) -> None:
        data = json.dumps(doc, separators=(",", ":"), default=str).encode()
        try:
            evicted = await self.store.save_evidence(capture_id, data)
        except (OSError, sqlite3.Error) as exc:
            self.failed_total += 1
            log.warning("evidence_save_failed", capture_id=capture_id, error=str(exc))
            return
        if evicted:
            log.info("captures_evicted", count=len(evicted), store_bytes=self.store.total_bytes)

    def close(self) -> None:
        self.runner.close()
