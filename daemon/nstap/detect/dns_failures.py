"""DNS lookups that fail: the share of failed or timed-out lookups against the namespace's own baseline."""

from __future__ import annotations

from collections import deque

from ..dns.lookups import Lookups, Name, Server
from ..samples import NamespaceSample
from .base import Finding, Param
from .cause import DNS_EMBEDDED_DOWN, DNS_NXDOMAIN_STORM, DNS_RESOLVER_FAILING, DNS_UPSTREAM_UNREACHABLE, UNKNOWN_CAUSE, Cause

KIND = "dns_failures"
PARAMS = {
    "threshold": Param(0.2, 0.0, 1.0, low_open=True, help="share of lookups that failed over the window, above the baseline's share"),
    "min_failures": Param(5.0, 1.0, 1e12, help="failed lookups over the window, at least"),
    "window": Param(10.0, 2.0, 3600.0, help="seconds of the window"),
    "short_window": Param(2.0, 0.5, 600.0, help="seconds of the short window (a fault that just began, not yet diluted by the window's good lookups)"),
    "baseline": Param(300.0, 10.0, 86400.0, help="seconds before the window whose share of failures is the namespace's normal"),
}
EMBEDDED = "127.0.0.11"  # Docker's embedded resolver
FAILED = ("NXDOMAIN", "SERVFAIL", "REFUSED", "other", "timeout")


def outcomes(now: Lookups, before: Lookups | None) -> dict[str, int]:
    """Lookups by outcome between two reads (a namespace's counts only grow)."""
    out: dict[str, int] = {}
    old = before.requests if before is not None else {}
    for key, n in now.requests.items():
        grew = n - old.get(key, 0)
        if grew > 0:
            out[key[0]] = out.get(key[0], 0) + grew
    return out


def _server_deltas(now: Lookups, before: Lookups | None) -> list[tuple[Server, int, int, int]]:
    """(server, queries, failures, timeouts) that grew between two reads, most troubled first."""
    old = {(s.address, s.port): s for s in (before.servers if before is not None else ())}
    out = []
    for s in now.servers:
        o = old.get((s.address, s.port))
        q, f, t = (s.queries - o.queries, s.failures - o.failures, s.timeouts - o.timeouts) if o is not None else (s.queries, s.failures, s.timeouts)
        if q > 0 or f > 0 or t > 0:
            out.append((s, max(q, 0), max(f, 0), max(t, 0)))
    out.sort(key=lambda d: (-(d[2] + d[3]), -d[1], d[0].address))
    return out


def _storm(names: tuple[Name, ...]) -> tuple[str, list[str]] | None:
    """The name tried with the most search-domain suffixes (NXDOMAIN for each): (its first label, the names)."""
    by_first: dict[str, list[str]] = {}
    for n in names:
        if n.rcode == "NXDOMAIN":
            by_first.setdefault(n.name.split(".", 1)[0], []).append(n.name)
    if not by_first:
        return None
    first, tried = max(by_first.items(), key=lambda item: (len(item[1]), item[0]))
    return (first, sorted(tried, key=len)) if len(tried) >= 2 else None


def dns_cause(now: Lookups, before: Lookups | None) -> Cause:
    """Why the lookups between two reads failed, from what the collector saw: timeouts to the
    embedded resolver or an upstream, SERVFAIL/REFUSED from which server, NXDOMAIN for a name tried
    with several search suffixes."""
    grew = outcomes(now, before)
    failed = {k: grew.get(k, 0) for k in FAILED if grew.get(k, 0)}
    if not failed:
        return UNKNOWN_CAUSE
    total = sum(grew.values())
    servers = _server_deltas(now, before)
    worst, top = max(failed.items(), key=lambda item: (item[1], item[0]))
    if worst == "timeout":
        upstream = [d for d in servers if d[0].address != EMBEDDED and d[3] > 0]
        if upstream:
            s, q, _f, t = upstream[0]
            via = " (forwarded by the embedded resolver)" if s.forwarded else ""
            return Cause(DNS_UPSTREAM_UNREACHABLE, f"{top} of {total} lookups unanswered after {now.timeout:g} s: "
                                                   f"{s.address}:{s.port}{via} did not answer {t} of {q} queries")
        embedded = [d for d in servers if d[0].address == EMBEDDED and d[3] > 0]
        if embedded:
            _s, q, _f, t = embedded[0]
            return Cause(DNS_EMBEDDED_DOWN, f"{top} of {total} lookups unanswered after {now.timeout:g} s: Docker's embedded resolver "
                                            f"{EMBEDDED} did not answer {t} of {q} queries, and asked no upstream server")
        return Cause(DNS_UPSTREAM_UNREACHABLE, f"{top} of {total} lookups unanswered after {now.timeout:g} s")
    if worst in ("SERVFAIL", "REFUSED", "other"):
        failing = [d for d in servers if d[2] > 0]
        where = f" from {failing[0][0].address}:{failing[0][0].port}" if failing else ""
        example = next((n.name for n in now.names if n.rcode == worst), "")
        text = f"{worst}{where} for {top} of {total} lookups" + (f" (e.g. {example})" if example else "")
        if failing and failing[0][0].address == EMBEDDED:
            upstream = [d for d in servers if d[0].address != EMBEDDED and d[3] > 0]
            if upstream:
                s = upstream[0][0]
                return Cause(DNS_UPSTREAM_UNREACHABLE, f"{text}: its upstream {s.address}:{s.port} did not answer {upstream[0][3]} queries")
        return Cause(DNS_RESOLVER_FAILING, text)
    storm = _storm(now.names)
    if storm is not None:
        first, tried = storm
        shown = ", ".join(tried[:4]) + (", ..." if len(tried) > 4 else "")
        return Cause(DNS_NXDOMAIN_STORM, f"{top} NXDOMAIN of {total} lookups: {first!r} tried with {len(tried)} search suffixes ({shown})")
    example = next((n for n in now.names if n.rcode == "NXDOMAIN"), None)
    return Cause(DNS_NXDOMAIN_STORM, f"{top} NXDOMAIN of {total} lookups" + (f", most for {example.name} ({example.count})" if example else ""))


BASELINE_EVERY = 10.0  # seconds between the baseline's points (counts only: bounded however long the baseline)


class DnsFailureDetector:
    """Trips when, over the last ``window`` seconds or the last ``short_window`` (a fault that just
    began, not yet diluted by the window's good lookups), at least ``min_failures`` lookups failed
    (NXDOMAIN, SERVFAIL, REFUSED, other, or no answer after ``dns.timeout``) and their share of the
    lookups is ``threshold`` above the share of the ``baseline`` seconds before (a namespace whose
    search path always makes some lookups fail has that as its normal). Until there is a baseline
    of a window's length, NXDOMAIN answers do not count (they may be that normal); SERVFAIL,
    REFUSED and timeouts do.

    The onset is the last sample before the run of samples in which lookups failed; for
    timeouts, less ``dns.timeout`` (they are counted when the timeout is over)."""

    kind = KIND

    def __init__(self, threshold: float, min_failures: float = 5.0, window: float = 10.0, baseline: float = 300.0, short_window: float = 2.0) -> None:
        self.threshold = threshold
        self.min_failures = min_failures
        self.window = window
        self.short_window = short_window
        self.baseline = baseline
        self._points: deque[tuple[float, Lookups, int, int]] = deque()  # the window's samples: (time, lookups, failed, total)
        self._coarse: deque[tuple[float, int, int]] = deque()  # the baseline's: (time, failed, total), every BASELINE_EVERY s
        self._lookups: Lookups | None = None
        self._counts = (0, 0)  # (failed, total) of _lookups

    def observe(self, sample: NamespaceSample) -> Finding | None:
        lookups = sample.dns
        if lookups is None:
            return None
        now = sample.taken_at
        if lookups is self._lookups:  # the same totals as the last sample's (Tally reuses an unchanged one)
            failed, total = self._counts
        else:
            failed, total = self._counts = lookups.failed(), lookups.total()
            self._lookups = lookups
        points, coarse = self._points, self._coarse
        if points and (failed < points[-1][2] or total < points[-1][3]):
            points.clear()  # counts that went back: start again
            coarse.clear()
        points.append((now, lookups, failed, total))
        while len(points) > 2 and points[1][0] <= now - self.window:
            points.popleft()
        if not coarse or now - coarse[-1][0] >= BASELINE_EVERY:
            coarse.append((now, failed, total))
        while len(coarse) > 2 and coarse[1][0] <= now - self.window - self.baseline:
            coarse.popleft()
        if len(points) < 2 or failed - points[0][2] < self.min_failures:
            return None  # (the window's start has the fewest failures: no reference has enough)
        base_share = self._base_share(points[0][0])
        for ref in (points[0], self._short_reference(now)):
            bad = failed - ref[2]
            if base_share is None:  # no baseline yet: NXDOMAIN may be this namespace's normal (a search path), the rest never is
                bad -= outcomes(lookups, ref[1]).get("NXDOMAIN", 0)
            share = bad / max(total - ref[3], 1)
            if bad >= self.min_failures and share >= self.threshold and share - (base_share or 0.0) >= self.threshold:
                break
        else:
            return None
        grew = outcomes(lookups, ref[1])
        worst = max((k for k in FAILED if grew.get(k)), key=lambda k: grew[k])
        return Finding(
            KIND,
            f"{share:.0%} of DNS lookups failed over {now - ref[0]:.0f}s ({failed - ref[2]} of {total - ref[3]}, most {worst})",
            {"share": round(share, 4), "failed": failed - ref[2], "lookups": total - ref[3], "baseline_share": None if base_share is None else round(base_share, 4),
             "seconds": round(now - ref[0], 1), **{f"rcode_{k}": v for k, v in sorted(grew.items())}},
            started_at=self._onset(lookups.timeout),
            cause=dns_cause(lookups, ref[1]),
        )

    def _short_reference(self, now: float) -> tuple[float, Lookups, int, int]:
        """The newest point at least ``short_window`` old (with a quarter interval of slack for
        sampling jitter); the one before the last at least."""
        points = self._points
        for i in range(len(points) - 2, -1, -1):
            if points[i][0] <= now - self.short_window * 0.75:
                return points[i]
        return points[0]

    def _base_share(self, window_start: float) -> float | None:
        """The share of failed lookups over the baseline before the window (0 without lookups);
        None while the namespace has been watched for less than a window before it."""
        before = [p for p in self._coarse if p[0] <= window_start]
        if len(before) < 2 or before[-1][0] - before[0][0] < self.window:
            return None
        first, last = before[0], before[-1]
        total = last[2] - first[2]
        return (last[1] - first[1]) / total if total > 0 else 0.0

    def _onset(self, timeout: float) -> float:
        points = self._points
        start = len(points) - 1
        timeouts = False
        for i in range(len(points) - 1, 0, -1):
            if points[i][2] == points[i - 1][2]:
                break
            start = i - 1
            grew = outcomes(points[i][1], points[i - 1][1])
            timeouts = timeouts or grew.get("timeout", 0) > 0
        return points[start][0] - (timeout if timeouts else 0.0)
