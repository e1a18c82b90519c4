"""A listener that stopped accepting: connections wait in its accept queue and none leaves it.

The kernel completes handshakes whether or not the process accepts them: a paused, frozen or
stopped server keeps gaining connections in its accept queue, and once the queue is full its
clients' SYNs overflow. Clients that give up after a second add only one overflow a second each,
and before the queue is full none at all, so no per-sample overflow threshold sees it. What does
see it: every connection completed since the last sample (Tcp PassiveOpens) is still in the
accept queue (the listeners' summed queue length grew by at least as much), and the queue was
not empty to begin with; or a queue stays at its limit. A process that accepts takes them off
the queue within milliseconds, so one whole interval of that is a process not accepting.

That takes a sample before the first queued connection and a whole interval after it: two or
three samples after the fault. When the namespace's processes are known not to run (paused,
frozen, stopped: asked only of a queue that was empty the sample before and holds every
connection completed since), the first sample that shows a queued connection is enough.
"""

from __future__ import annotations

from collections.abc import Callable

from ..samples import ListenQueue, NamespaceSample
from .base import Finding, Param
from .cause import ACCEPT_QUEUE_FULL, PROCESS_NOT_ACCEPTING, Cause

KIND = "tcp_accept_stalled"
PARAMS = {"seconds": Param(1.0, 0.5, 3600.0, help="seconds with connections waiting and none accepted")}
SLACK = 0.25  # share of an interval a sample may come early (sampling jitter)


def waiting(listen: tuple[ListenQueue, ...]) -> int:
    """Connections waiting in the namespace's accept queues."""
    return sum(q.length for q in listen)


class AcceptStallDetector:
    """Trips once, for ``seconds``, the accept queues held connections and none was accepted (see
    the module's docstring). The onset is the last sample whose queues were empty before the run:
    the first connection nobody accepted came after it.

    ``held`` (set by the pipeline): what keeps the namespace's processes from running, in a
    sentence ("" if nothing does); asked only of a queue that just filled (see the module's
    docstring)."""

    kind = KIND

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.held: Callable[[], str] | None = None
        self._before: tuple[float, int, int, frozenset[str]] | None = None  # (time, waiting, passive opens, full ports)
        self._empty_at: float | None = None  # the last sample whose queues were empty
        self._stalled_since: float | None = None  # the first sample of the run of intervals without an accept

    def observe(self, sample: NamespaceSample) -> Finding | None:
        p, s = sample.protocols, sample.sockets
        if p is None or s is None or "tcp_passive_opens" not in p:
            return None
        now = sample.taken_at
        queued = waiting(s.listen)
        full = frozenset(q.port for q in s.listen if q.limit and q.length >= q.limit)
        before, self._before = self._before, (now, queued, p["tcp_passive_opens"], full)
        if queued == 0:
            self._empty_at, self._stalled_since = now, None
            return None
        if before is None:
            return None
        then, queued_before, passive_before, full_before = before
        completed = p["tcp_passive_opens"] - passive_before
        if queued_before == 0 and 0 < completed <= queued and self.held is not None:
            held = self.held()
            if held:  # nothing in the namespace can accept: the first connection queued is the stall
                self._stalled_since = then
                return self._finding(s.listen, queued, completed, now - then, then, full, Cause(PROCESS_NOT_ACCEPTING, held))
        none_accepted = queued_before > 0 and completed >= 0 and queued - queued_before >= completed
        if not (none_accepted or full & full_before):
            self._stalled_since = None
            return None
        if self._stalled_since is None:
            self._stalled_since = then
        stalled = now - self._stalled_since
        if stalled < self.seconds - SLACK * (now - then):
            return None
        # The last empty queue, unless the queues held connections long before this run (a busy
        # listener that was accepting): then one interval before the first without an accept.
        onset = max(self._empty_at if self._empty_at is not None else float("-inf"), self._stalled_since - (now - then))
        return self._finding(s.listen, queued, completed, stalled, onset, full, None)

    @staticmethod
    def _finding(
        listen: tuple[ListenQueue, ...], queued: int, completed: int, stalled: float, onset: float, full: frozenset[str], cause: Cause | None,
    ) -> Finding:
        where = ", ".join(f"{q.port} ({q.length}/{q.limit})" for q in listen if q.length)
        if cause is None and full:
            cause = Cause(ACCEPT_QUEUE_FULL, f"the accept queue of port {', '.join(sorted(full))} is full ({where}) and nothing is accepted")
        return Finding(
            KIND,
            f"{queued} connections waiting in the accept queue of port {where}, none accepted for {stalled:.0f}s",
            {"waiting": queued, "queues": where, "completed": completed, "stalled_seconds": round(stalled, 1)},
            started_at=onset,
            cause=cause,
        )
