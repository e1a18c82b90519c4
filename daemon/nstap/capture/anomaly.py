"""Anomaly captures: a capture around every anomaly that starts, from its onset, within the
container's slot quota (:mod:`.quota`); drops on the host end of a veth, and a broken port
forward or masquerade, are captured on the host side too, under the same quota."""

from __future__ import annotations

import time
from typing import Any

import structlog

from ..index import AnomalyRow
from ..registry import WatchedNamespace
from .engine import CaptureEngine
from .fleet import capture_opted_out
from .model import CaptureRefused, CaptureTarget
from .quota import SlotQuota

log = structlog.get_logger("nstap.capture")

HOST_SIDE_KIND = "interface_drops"  # an anomaly of this kind on a host end captures there too
# Anomalies whose capture holds only what they are about (their flows): DNS, to any server, and
# to Docker's embedded resolver (whose queries its own NAT rules send to a random port).
KIND_FILTERS = {"dns_failures": "port 53 or host 127.0.0.11"}


class AnomalyCaptures:
    """Starts the captures of anomalies through the engine, within the quota."""

    def __init__(self, engine: CaptureEngine) -> None:
        self.engine = engine
        self.quota: SlotQuota = engine.quota

    async def for_anomaly(self, namespace: WatchedNamespace, anomaly: AnomalyRow, margin: float = 0.0) -> str | None:
        """Capture around an anomaly that just started, from its onset (less ``margin``); the
        capture id, or None if not captured.

        Within the container's quota: a container that keeps tripping cannot hold every capture
        slot or fill the store for the others.
        """
        if capture_opted_out(namespace):
            return None
        target = CaptureTarget.of(namespace)
        row_id = self._covering(target.netns, anomaly, margin)
        if row_id is not None:
            # One fault trips several detectors at once (a paused listener: a stalled accept
            # queue, overflows, SYN-ACK retransmissions): one pcap holds them all.
            log.info("anomaly_capture_shared", anomaly_id=anomaly.id, kind=anomaly.kind, container=anomaly.container, capture_id=row_id)
        else:
            now = time.time()
            why = self.quota.refusal(target.container_id, now)
            if why:
                self._refused(anomaly, why)
                return None
            row_id = await self._capture(target, anomaly, now, onset_at=anomaly.started_at, margin=margin, bpf=KIND_FILTERS.get(anomaly.kind, ""))
            if row_id is None:
                self.quota.forget_start(target.container_id, now)
                return None
        await self._host_side(target, anomaly, margin)
        return row_id

    async def _host_side(self, target: CaptureTarget, anomaly: AnomalyRow, margin: float) -> None:
        """The host end of a veth whose drops tripped the anomaly, captured there too (unless a
        running host-side capture of that interface holds it already), within the same quota."""
        for interface in self.host_side_too(anomaly, self.engine.host_peers(target.netns)):
            if self._covering(target.netns, anomaly, margin, side="host", interface=interface) is not None:
                continue
            why = self.quota.refusal(target.container_id, first=False)
            if why:
                self._refused(anomaly, why, side="host")
                continue
            host_id = await self._capture(target, anomaly, None, side="host", interface=interface)
            if host_id is not None:
                log.info("anomaly_host_capture", anomaly_id=anomaly.id, capture_id=host_id, interface=interface)

    def _covering(self, netns: int, anomaly: AnomalyRow, margin: float, side: str = "container", interface: str = "") -> str | None:
        """A running anomaly capture of the namespace on ``side`` (and ``interface``) whose window
        holds this anomaly from its onset (a live one: from its detection) to a second past its
        detection."""
        onset = (anomaly.started_at if anomaly.started_at is not None else anomaly.first_seen) - margin
        for row in self.engine.running_of(netns):
            if row.reason != "anomaly" or row.side != side or row.interface != interface or row.window_end < anomaly.first_seen + 1:
                continue
            if row.mode == "live" and row.window_start <= anomaly.first_seen or row.window_start <= onset + 0.05:
                return row.id
        return None

    def _refused(self, anomaly: AnomalyRow, why: str, **fields: Any) -> None:
        self.engine.refused_total["per_container_limit"] += 1
        log.warning(
            "anomaly_capture_refused", anomaly_id=anomaly.id, kind=anomaly.kind, container=anomaly.container,
            container_id=anomaly.container_id, error=why, **fields,
        )

    async def _capture(self, target: CaptureTarget, anomaly: AnomalyRow, first: float | None, **options: Any) -> str | None:
        """One capture of an anomaly, holding one of its container's slots until it ends
        (``first``: when the anomaly's first capture was counted in the hour; None for the others)."""
        slot = self.quota.take(target.container_id, first, first=first is not None)
        try:
            row = await self.engine.capture(
                target, "anomaly", kind=anomaly.kind, anomaly_id=anomaly.id, trigger_at=anomaly.first_seen, anomaly=anomaly, **options
            )
        except CaptureRefused as exc:
            slot.release()
            log.warning(
                "anomaly_capture_refused", anomaly_id=anomaly.id, kind=anomaly.kind, container=anomaly.container,
                container_id=anomaly.container_id, error=str(exc), side=options.get("side", "container"),
            )
            return None
        except BaseException:
            slot.release()
            raise
        self.engine.when_done(row.id, slot.release)
        return row.id

    @staticmethod
    def host_side_too(anomaly: AnomalyRow, peers: list[str]) -> list[str]:
        """Of the namespace's host-side interfaces ``peers``: the one whose drops tripped an
        ``interface_drops`` anomaly, or the first for a broken port forward or masquerade (the
        NAT happens on the host: the packets that do not make it through show there)."""
        if anomaly.kind.startswith("nat_"):
            return peers[:1]
        if anomaly.kind != HOST_SIDE_KIND:
            return []
        tripped = set()
        for key, value in anomaly.numbers.items():  # "<interface>.<side>.<counter>"; names may hold dots
            parts = key.rsplit(".", 2)
            if len(parts) == 3 and parts[1] == "host" and value:
                tripped.add(parts[0])
        return [p for p in peers if p in tripped][:1]
