"""Listen overflows and drops: connections a listener could not take because its accept queue was full."""

from __future__ import annotations

from ..samples import NamespaceSample
from .base import Finding, Param, increase

KIND = "tcp_listen_overflows"
PARAMS = {"min_increase": Param(1.0, 1.0, 1e12, help="overflows or drops since the last sample")}


class ListenOverflowDetector:
    """Trips when TcpExt ListenOverflows or ListenDrops went up by ``min_increase`` since the last
    sample; the onset is that last sample."""

    kind = KIND

    def __init__(self, min_increase: float) -> None:
        self.min_increase = min_increase
        self._before: tuple[int, int] | None = None
        self._before_at = 0.0

    def observe(self, sample: NamespaceSample) -> Finding | None:
        p = sample.protocols
        if p is None or "tcp_listen_overflows" not in p:
            return None
        now = (p["tcp_listen_overflows"], p.get("tcp_listen_drops", 0))
        before, self._before = self._before, now
        before_at, self._before_at = self._before_at, sample.taken_at
        if before is None:
            return None
        overflows, drops = increase(now[0], before[0]), increase(now[1], before[1])
        if max(overflows, drops) < self.min_increase:
            return None
        full = []
        if sample.sockets is not None:
            full = [f"{q.port} ({q.length}/{q.limit})" for q in sample.sockets.listen if q.limit and q.length >= q.limit]
        return Finding(
            KIND,
            f"{overflows} listen overflows, {drops} listen drops" + (f"; full accept queue on port {', '.join(full)}" if full else ""),
            {"overflows": overflows, "drops": drops, "full_queues": ", ".join(full)},
            started_at=before_at,
        )
