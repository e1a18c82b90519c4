"""The namespace's own firewall: has it changed? (nftables generation id, legacy tables present)

Reading a container's rules takes a child process (``iptables-save`` inside its namespace), far
too dear for every sample. What is cheap is knowing whether they changed: the nftables generation
id moves on every commit in the namespace (about 5 µs on a kept nfnetlink socket), and
``ip_tables_names`` says whether legacy iptables tables exist there (changes made with
iptables-legacy do not move the generation id: those are polled). The NAT monitor reads the rules
when this says so.
"""

from __future__ import annotations

from ..netns import netlink
from ..netns.handles import NamespaceHandles
from ..samples import FirewallSample


class FirewallSampler:
    """Samples one namespace's firewall generation."""

    name = "firewall"

    def __init__(self, handles: NamespaceHandles) -> None:
        self._sock = handles.nfnl
        self._legacy = [handles.proc[n] for n in ("ip_tables_names", "ip6_tables_names") if n in handles.proc]

    def sample(self) -> FirewallSample:
        """The generation id (0 without nf_tables) and whether legacy tables exist."""
        generation = netlink.nft_generation(self._sock) if self._sock is not None else 0
        legacy = any(f.read().strip() for f in self._legacy)
        return FirewallSample(generation, legacy)
