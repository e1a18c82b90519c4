"""Findings from the NAT monitor: broken port forwards, a missing MASQUERADE, conntrack pressure.

These are not sample detectors (they read the host's rules and conntrack table, not a namespace's
counters); the NAT monitor hands their findings to the same incident tracker, so they become
anomaly events with onsets, captures and resolution like every other kind. Pure functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..nat.forwards import Forward, Masquerade
from .base import Finding

FORWARD_KINDS = {"missing": "nat_missing", "stale": "nat_stale", "shadowed": "nat_shadowed"}
MASQUERADE_KIND = "nat_masquerade_missing"
CONTAINER_KINDS = (*FORWARD_KINDS.values(), MASQUERADE_KIND)
HOST_KINDS = ("conntrack_full", "conntrack_drops")
KINDS = (*CONTAINER_KINDS, *HOST_KINDS)
HELP = {  # what each kind means (docs/reference/detectors.md)
    "nat_missing": "a published port has no DNAT rule that decides it (or the rule is in a chain nothing jumps to), or no docker-proxy socket holds it",
    "nat_stale": "the deciding DNAT rule points at an address no running container has, or at the wrong port of this one",
    "nat_shadowed": "an earlier rule sends the port's packets elsewhere (another container, a REDIRECT) or ends their NAT before the right DNAT",
    MASQUERADE_KIND: "no MASQUERADE on POSTROUTING for the container's IPv4 network (a runtime's default network, or a subnet seen masqueraded before)",
    "conntrack_full": "the host's conntrack entries reached nat.conntrack_full_ratio of nf_conntrack_max (a host event: no capture)",
    "conntrack_drops": "conntrack's drop, insert_failed or early_drop statistic grew (a host event: no capture)",
}
MAX_LISTED = 10  # forwards named in one finding
CONNTRACK_DROP_STATS = ("drop", "insert_failed", "early_drop")


def forward_findings(forwards: Iterable[Forward], masquerades: Iterable[Masquerade], onset: Mapping[str, float | None]) -> list[Finding]:
    """One finding per broken kind of one container: its forwards in that state, each with the
    rule that decided it. ``onset``: kind -> when the state was last seen fine (None: unknown)."""
    by_kind: dict[str, list[Forward]] = {}
    for forward in forwards:
        kind = FORWARD_KINDS.get(forward.state)
        if kind is not None:
            by_kind.setdefault(kind, []).append(forward)
    out = []
    for kind, broken in by_kind.items():
        first = broken[0]
        numbers: dict[str, object] = {
            "forwards": len(broken),
            "broken": [f.describe() for f in broken[:MAX_LISTED]],
            "rules": [f.rule for f in broken[:MAX_LISTED]],
        }
        summary = f"{len(broken)} published port(s) {first.state}: {first.describe()}"
        if first.rule:
            summary += f" [{first.rule}]"
        out.append(Finding(kind, summary[:500], numbers, onset.get(kind)))
    missing = [m for m in masquerades if m.state != "ok"]
    if missing:
        m = missing[0]
        numbers = {"networks": [f"{x.network} {x.subnet} from {x.source}: {x.detail}" for x in missing[:MAX_LISTED]]}
        out.append(Finding(MASQUERADE_KIND, f"no MASQUERADE for {m.source} on network {m.network} ({m.subnet}): {m.detail}"[:500], numbers, onset.get(MASQUERADE_KIND)))
    return out


def conntrack_findings(
    entries: int,
    limit: int,
    stats: Mapping[str, int],
    before: Mapping[str, int] | None,
    full_ratio: float,
    at_before: float | None,
) -> list[Finding]:
    """``conntrack_full`` above ``full_ratio`` of the limit; ``conntrack_drops`` when drop,
    insert_failed or early_drop grew since the previous reading (taken at ``at_before``)."""
    out = []
    if limit and entries >= full_ratio * limit:
        out.append(Finding("conntrack_full", f"conntrack table {entries}/{limit} entries ({entries / limit:.0%})",
                           {"entries": entries, "limit": limit, "ratio": round(entries / limit, 4)}, at_before))
    if before is not None:
        grew = {k: stats.get(k, 0) - before.get(k, 0) for k in CONNTRACK_DROP_STATS if stats.get(k, 0) > before.get(k, 0)}
        if grew:
            words = ", ".join(f"{k} +{v}" for k, v in grew.items())
            out.append(Finding("conntrack_drops", f"conntrack dropped flows: {words}", dict(grew), at_before))
    return out
