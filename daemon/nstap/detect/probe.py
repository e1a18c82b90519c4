"""``port_unreachable``: a published port a probe could not connect to, and the broken step.

Pure functions from what nstap holds when a probe fails: the forward's verified state (the NAT
monitor's), the listener on the container port (the socket sampler's), the container's own
firewall counters (their growth since the previous look), and the probe's error. The cause names
the first broken step along the path a client takes: the DNAT rule, the listener, its accept
queue, the host's FORWARD verdicts (counted around a second probe after a timeout:
:mod:`nstap.nat.host_filter`; a SYN they drop never reaches the container), the container's
firewall, the route; ``unknown`` when none of them explains it.

An anomaly is raised only for a port whose listener exists now or was seen since the container
started: a container that publishes a port it never serves (still starting, or never meant to)
is not an incident, and the verdict says so; one whose server died is (cause ``no_listener``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .base import Finding
from .cause import ACCEPT_QUEUE_FULL, FIREWALL_DROP, NAT_MISSING, NAT_SHADOWED, NO_LISTENER, NO_ROUTE, UNKNOWN, Cause

KIND = "port_unreachable"
KINDS = (KIND,)
HELP = {KIND: "a probe of a published port whose listener exists (or existed since the container started) failed; the cause names the first broken step"}
MAX_LISTED = 10


@dataclass(frozen=True, slots=True)
class Listener:
    """The container port's listener as the latest sample saw it: present (None: unknown) and its
    accept queue (length, limit; 0, 0 when unknown)."""

    present: bool | None
    length: int = 0
    limit: int = 0
    loopback: bool = False  # bound to loopback only: nothing listens on the address the port forwards to


@dataclass(frozen=True, slots=True)
class FailedProbe:
    """One failed probe and what was known of its port at that moment."""

    forward: str  # the forward described (``tcp 0.0.0.0:8080 -> 172.17.0.2:80 ok``)
    state: str  # the forward's verified state: ok, missing, shadowed, stale
    rule: str  # the rule that decides it ("" when none)
    detail: str  # why the forward is not ok
    protocol: str
    container_port: int
    error: str  # refused, timeout, unreachable: ...
    path: str
    listener: Listener
    drops: tuple[tuple[str, int], ...] = ()  # (rule text, packets since the previous look) of the container's DROP/REJECT rules
    last_ok: float | None = None
    host_drops: tuple[tuple[str, int], ...] = ()  # (verdict, packets) of the host's FORWARD DROP/REJECT verdicts a second probe met


def probe_cause(p: FailedProbe) -> Cause:
    """The first broken step of a failed probe's path (see the module doc)."""
    if p.state == "missing":
        return Cause(NAT_MISSING, f"no DNAT rule sends {p.forward.rsplit(' ', 1)[0]} to the container: {p.detail or 'missing'}")
    if p.state == "shadowed":
        return Cause(NAT_SHADOWED, f"{p.detail or 'an earlier rule decides first'} [{p.rule}]" if p.rule else p.detail or "an earlier rule decides first")
    if p.listener.present is False:
        return Cause(NO_LISTENER, f"nothing listens on {p.protocol} port {p.container_port} in the container (probe: {p.error})")
    if p.listener.present and p.listener.loopback:
        return Cause(NO_LISTENER, f"{p.protocol} port {p.container_port} listens on loopback only in the container: nothing listens on the address the "
                                  f"published port forwards to (probe: {p.error}); bind it to 0.0.0.0 or the container's address")
    if p.listener.present and p.listener.limit and p.listener.length >= p.listener.limit:
        return Cause(ACCEPT_QUEUE_FULL, f"{p.protocol} port {p.container_port}'s accept queue is full ({p.listener.length}/{p.listener.limit}): the server does not accept")
    if p.host_drops:
        verdict, packets = p.host_drops[0]
        return Cause(FIREWALL_DROP, f"the host's firewall dropped the probe: {verdict} counted {packets} packet(s) during a second probe along {p.path}")
    if p.drops:
        rule, packets = max(p.drops, key=lambda d: d[1])
        return Cause(FIREWALL_DROP, f"the container's firewall dropped {packets} packet(s) since the last probe: {rule}")
    if p.error.startswith("unreachable"):
        return Cause(NO_ROUTE, f"no route along {p.path}: {p.error}")
    return Cause(UNKNOWN, f"probe {p.error} along {p.path}; rule, listener, queue and firewall look fine")


def probe_findings(failed: Iterable[FailedProbe]) -> list[Finding]:
    """One ``port_unreachable`` finding for one container's failed probes (none if none failed);
    its cause is the first port's, its onset the latest successful probe of any of them."""
    failed = list(failed)
    if not failed:
        return []
    first = failed[0]
    cause = probe_cause(first)
    oks = [p.last_ok for p in failed if p.last_ok is not None]
    numbers: Mapping[str, object] = {
        "ports": len(failed),
        "failed": [f"{p.forward}: {p.error} ({p.path})" for p in failed[:MAX_LISTED]],
        "causes": [probe_cause(p).kind for p in failed[:MAX_LISTED]],
    }
    summary = f"{len(failed)} published port(s) unreachable: {first.forward.rsplit(' ', 1)[0]} {first.error} ({cause.kind})"
    return [Finding(KIND, summary[:500], numbers, max(oks) if oks else None, cause)]


def wants_anomaly(listener: Listener, seen_listening: bool) -> bool:
    """Whether a failed probe is an incident: its listener exists, or existed since the container started."""
    return bool(listener.present) or seen_listening


__all__ = ["KIND", "KINDS", "FailedProbe", "Listener", "probe_cause", "probe_findings", "wants_anomaly"]
