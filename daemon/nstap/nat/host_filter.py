"""The host's own filter table on a published port's path: which of its DROP/REJECT verdicts a
probe met.

A DNATed connection crosses the host's ``filter FORWARD`` chain on its way to the container. When
nothing there accepts it (a runtime's accept rules flushed by a firewall reload, a DROP added to
``DOCKER-USER``, Docker's ``FORWARD`` policy DROP over a Podman network whose CNI/netavark rules
are gone), the SYN is dropped silently and the probe times out while the DNAT rule, the listener
and the container's own firewall all look fine. That is found by counting: the packet counters of
every DROP/REJECT rule reachable from ``FORWARD`` and of the chain's policy, read just before and
just after one more probe of the port; those that grew by the probe's SYNs name the verdict.

Only after a probe timed out (a bounded rate: nat.probe.rate), one ``iptables-save -t filter -c``
(~4 ms at a few hundred rules) each side, ``ip6tables-save`` for a probe over IPv6. Another
client's packets dropped by the same verdict in that second count too: the text says what was
counted, during what.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from ..netns.evidence import run_tool
from .rules import Ruleset, parse_save

READ_TIMEOUT = 2.0
READ_CAP = 16 << 20
MAX_CHAINS = 512  # chains followed from FORWARD (a hostile or huge ruleset is bounded)
DENY = ("DROP", "REJECT")


def forward_verdicts(rules: Ruleset) -> dict[str, int]:
    """The DROP/REJECT verdicts reachable from filter FORWARD, by their text, with their packet
    counters: the rules in every chain FORWARD jumps to (transitively), and FORWARD's policy."""
    table = rules.tables.get("filter", {})
    out: dict[str, int] = {}
    forward = table.get("FORWARD")
    if forward is None:
        return out
    if forward.policy in DENY:
        out[f"filter FORWARD policy {forward.policy}"] = forward.policy_packets
    seen = {"FORWARD"}
    todo = ["FORWARD"]
    while todo and len(seen) <= MAX_CHAINS:
        chain = table.get(todo.pop())
        if chain is None:
            continue
        for rule in chain.rules:
            if rule.target in DENY:
                out[f"filter {chain.name} rule {rule.position}: {rule.text}"] = rule.packets
            elif rule.target in table and rule.target not in seen:
                seen.add(rule.target)
                todo.append(rule.target)
    return out


async def read_forward_verdicts(version: int = 4) -> dict[str, int] | None:
    """The host's FORWARD verdict counters of one IP version now (``iptables-save`` or
    ``ip6tables-save``); None when they cannot be read."""
    tool = "ip6tables-save" if version == 6 else "iptables-save"
    text, error = await run_tool([tool, "-t", "filter", "-c"], None, READ_TIMEOUT, READ_CAP)
    if error or not text:
        return None
    return forward_verdicts(parse_save(text, version))


def grown(before: Mapping[str, int], after: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    """The verdicts whose counters grew between two reads (most packets first)."""
    out = [(text, n - before[text]) for text, n in after.items() if text in before and n > before[text]]
    return tuple(sorted(out, key=lambda item: -item[1]))


async def verdicts_met(probe_again: Callable[[], Awaitable[bool]], version: int = 4) -> tuple[tuple[str, int], ...]:
    """The host's FORWARD DROP/REJECT verdicts (of the probe's IP version) that counted packets
    while ``probe_again`` ran (which returns whether it failed too: if it got through, nothing is
    blamed)."""
    before = await read_forward_verdicts(version)
    if before is None:
        return ()
    failed = await probe_again()
    after = await read_forward_verdicts(version)
    if not failed or after is None:
        return ()
    return grown(before, after)
