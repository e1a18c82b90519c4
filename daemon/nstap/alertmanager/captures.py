"""One alert -> one capture, the same whether Alertmanager pushed it (the webhook) or nstap pulled it.

An alert is known by its fingerprint (a hash of its labels, the same on every cluster member) and
its ``startsAt``: the alerts table remembers the capture each firing alert started, so an alert
pushed and pulled, or pulled from two members, or repeated, is captured once. The check and the
capture run under a lock per alert, so a push and a pull arriving together cannot both capture.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any, Protocol

import structlog

from ..api.server import BadRequest
from ..capture.engine import CaptureEngine
from ..capture.model import CaptureRefused, CaptureTarget
from ..index.alerts import AlertIndex
from ..runtime.records import ContainerRecord

log = structlog.get_logger("nstap.alertmanager")


class Targets(Protocol):
    """What names a container to capture (the API's resolver)."""

    def resolve(self, ref: Any) -> tuple[ContainerRecord, CaptureTarget]: ...

    async def anomaly_capture(self, ref: str, kind: str | None) -> str | None: ...


def normal_time(value: str) -> str:
    """``startsAt`` as UTC with milliseconds: the webhook sends nanoseconds (RFC 3339 nano) and
    the v2 API milliseconds, for the same alert; unparsable text is kept as it is."""
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        moment = moment.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        return value
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class AlertCaptures:
    """Starts the capture a firing alert asks for, once per alert, and records every alert."""

    def __init__(self, alerts: AlertIndex, engine: CaptureEngine, targets: Targets) -> None:
        self.alerts = alerts
        self.engine = engine
        self.targets = targets
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}  # alert -> lock, holders and waiters

    @asynccontextmanager
    async def _alone(self, key: tuple[str, str]) -> AsyncIterator[None]:
        """Hold the alert's lock; the last one out forgets it (so the dict holds only alerts being handled)."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    async def handle(self, alert: Any, source: str = "webhook") -> dict[str, Any]:
        """Act on one alert in the webhook's shape (status, labels, fingerprint, startsAt); the result says what was done."""
        if not isinstance(alert, dict):
            return {"status": "skipped", "reason": "alert is not an object"}
        labels = alert.get("labels")
        if not isinstance(labels, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            return {"status": "skipped", "reason": "labels must be strings"}
        status = alert.get("status")
        name = labels.get("alertname", "")[:128]
        fingerprint = str(alert.get("fingerprint", ""))[:64]
        starts_at = normal_time(str(alert.get("startsAt", ""))[:64])
        result: dict[str, Any] = {"alertname": name, "fingerprint": fingerprint, "status": status}
        if status not in ("firing", "resolved"):
            result.update(status="skipped", reason="status must be firing or resolved")
            return result
        ref = labels.get("container_id") or labels.get("container")
        capture_id = None
        if status == "firing" and ref:
            async with self._alone((fingerprint, starts_at)):  # the check, the capture and the row: one at a time per alert
                capture_id, note = await self._capture(ref, name, labels, fingerprint, starts_at)
                await self.alerts.record(status, name, fingerprint, starts_at, dict(labels), capture_id, note)
        elif status == "resolved" and fingerprint:
            # Pushed by the webhook and pulled from the cluster, or from two members: one row.
            async with self._alone((fingerprint, starts_at)):
                if await self.alerts.resolved(fingerprint, starts_at):
                    note = "resolution already recorded"
                else:
                    note = "recorded"
                    await self.alerts.record(status, name, fingerprint, starts_at, dict(labels), capture_id, note)
        else:
            note = "recorded" if status == "resolved" else "no container or container_id label"
            await self.alerts.record(status, name, fingerprint, starts_at, dict(labels), capture_id, note)
        log.info("alert_received", source=source, alertname=name, status=status, container=ref, capture_id=capture_id, note=note)
        result.update(capture_id=capture_id, note=note)
        return result

    async def _capture(self, ref: str, name: str, labels: Mapping[str, str], fingerprint: str, starts_at: str) -> tuple[str | None, str]:
        """The capture for a firing alert: the one it already has, its anomaly's, or a new one."""
        capture_id = await self.alerts.capture_for(fingerprint, starts_at) if fingerprint else None
        if capture_id is not None:
            return capture_id, "already captured for this alert"
        capture_id = await self.targets.anomaly_capture(ref, labels.get("kind"))
        if capture_id is not None:
            return capture_id, "the anomaly's own capture"
        try:
            _record, target = self.targets.resolve(ref)
            row = await self.engine.capture(target, "alertmanager", kind=name)
        except BadRequest as exc:
            return None, str(exc)
        except CaptureRefused as exc:
            return None, f"refused: {exc}"
        return row.id, "capture started"
