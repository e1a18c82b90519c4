"""The namespace's own firewall: has it changed? (nftables generation id, legacy tables present)

Reading a container's rules takes a child process (``iptables-save`` inside its namespace), far
too dear for every sample. What is cheap is knowing whether they changed, and cheapest is being
told: a socket subscribed to the namespace's nftables notifications becomes readable on every
commit there, and the event loop notes it. Only then is the generation id asked for (about 5 µs
on a kept nfnetlink socket); a namespace whose firewall does not change costs nothing per sample.
Changes made with iptables-legacy are not notified and do not move the generation id: whether
legacy tables exist (``ip_tables_names``) is polled every LEGACY_EVERY samples, and the NAT monitor
reads such tables every ``nat.interval``.
"""

from __future__ import annotations

import asyncio

from ..netns import netlink
from ..netns.handles import NamespaceHandles
from ..samples import FirewallSample

LEGACY_EVERY = 10  # samples between two looks at whether legacy iptables tables exist


class FirewallSampler:
    """Samples one namespace's firewall generation."""

    name = "firewall"

    def __init__(self, handles: NamespaceHandles) -> None:
        self._sock = handles.nfnl
        self._events = handles.nft_events
        self._legacy = [handles.proc[n] for n in ("ip_tables_names", "ip6_tables_names") if n in handles.proc]
        self._changed = True
        self._samples = 0
        self._last: FirewallSample | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        if self._events is not None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._events.fileno(), self._notified)

    def _notified(self) -> None:
        # Told once, the loop stops listening until the next sample has looked: a container that
        # commits all the time wakes the loop at most once per sample.
        assert self._loop is not None and self._events is not None
        self._loop.remove_reader(self._events.fileno())
        self._changed = True

    def sample(self) -> FirewallSample:
        """The generation id (0 without nf_tables) and whether legacy tables exist; the previous
        sample again when nothing was committed and the legacy tables are not due for a look."""
        last = self._last
        legacy_due = self._samples % LEGACY_EVERY == 0
        self._samples += 1
        if last is not None and not self._changed and not legacy_due:
            return last
        if self._changed or last is None:
            if self._changed and self._loop is not None and self._events is not None:
                netlink.drain(self._events)  # what is queued now is covered by the read below
                self._loop.add_reader(self._events.fileno(), self._notified)
            generation = netlink.nft_generation(self._sock) if self._sock is not None else 0
            self._changed = self._sock is not None and self._events is None  # without notifications: asked every sample
        else:
            generation = last.generation
        legacy = any(f.read().strip() for f in self._legacy) if legacy_due or last is None else last.legacy
        if last is not None and (generation, legacy) == last:
            return last
        self._last = FirewallSample(generation, legacy)
        return self._last

    def close(self) -> None:
        """Stop watching notifications (before the handles close)."""
        if self._loop is not None and self._events is not None:
            self._loop.remove_reader(self._events.fileno())
            self._loop = None
