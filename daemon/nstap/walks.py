"""The host's budget for TCP socket-state walks, held at every moment rather than on average.

Each namespace spaces its own walks by their measured cost (SocketSampler: every ``cost / budget``
intervals), which keeps the daemon's walks within ``socket_walk.budget_ms`` per container-sample
on average. Namespaces that start together are walked together, though: at the daemon's start
every namespace's first walk is due at once, and a walk spaced by its cost falls due again at once
for all of them one spacing later. Beside 1,000 containers sharing the host's established hash (a
walk of it is 6-8 ms of kernel CPU however few sockets a namespace has, more on a busy host), the
walk thread then walked back to back for the first minutes: in two 120 s windows from a minute
after the start it used 88 and 141 us per container-sample (the budget: 50), and on a 2-core VM
the sampling rounds waited for a CPU: in each daemon's first three minutes, 60 and 24 rounds
started 50 ms to 1.8 s late
(docs/performance.md, "Walks held to their budget at every moment").

The pacer holds all namespaces' scheduled walks to the same budget at each round: a round credits
``budget x namespaces``, a scheduled walk starts only while the credit is positive, and a walk is
charged its estimated cost when it starts and its measured CPU when it ends; no more than BANKED
rounds' credit is kept while nothing is due. A due walk that finds no credit waits for a later
sample of its namespace, and each such wait is counted (``nstap_socket_walks_deferred_total``). A
walk asked for because a namespace's SYNs are being retried (SocketSampler.walk_soon: a fault, not a
schedule) is never refused, as before, but is charged like the others, so the scheduled ones
make up for it. Nor is a walk that costs no more than one sample's budget (a namespace with a
small hash of its own, ``tcp_child_ehash_entries``: about 16 us, walked every interval): such
walks cannot make a wave, and another namespace's dear walks must not hold them back. The credit stays between BANKED rounds' credit and DEBT_ROUNDS rounds' debt (a
storm of such walks is forgotten after that long): the pacer's state is three floats.
"""

from __future__ import annotations

BANKED = 2.0  # rounds of credit kept while no walk is due
DEBT_ROUNDS = 60.0  # rounds of credit the walks may owe at most
FIRST_ESTIMATE = 0.005  # CPU seconds charged at the start of a walk whose namespace was never walked (a walk of the host's hash: 6-8 ms)


class WalkPacer:
    """Admits the socket walks of every namespace within ``budget`` CPU seconds per container-sample."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.credit = 0.0  # CPU seconds of walking that may still start
        self._gain = 0.0  # the latest round's credit
        self.typical = FIRST_ESTIMATE  # what a walk costs here, lately (charged for namespaces never walked)

    def new_round(self, namespaces: int) -> None:
        """A sampling round of ``namespaces`` starts: credit its share of walking."""
        self._gain = gain = self.budget * namespaces
        self.credit = min(max(self.credit + gain, -gain * DEBT_ROUNDS), gain * BANKED)

    def admit(self, estimate: float | None, urgent: bool = False) -> float | None:
        """Whether a due walk may start now: the CPU seconds it was charged (hand them to
        :meth:`done`), or None if it must wait. ``estimate``: its namespace's recent walk cost,
        None if never walked; ``urgent``: asked for by a fault. Neither those nor a walk whose
        estimate is within one sample's budget are refused."""
        if self.budget <= 0:  # no budget to share: each namespace's own spacing (max_interval) alone
            return 0.0
        cheap = estimate is not None and estimate <= self.budget
        if not urgent and not cheap and self.credit <= 0:
            return None
        charged = self.typical if estimate is None else estimate
        self._charge(charged)
        return charged

    def done(self, charged: float, cost: float) -> None:
        """A walk admitted with ``charged`` ended having used ``cost`` CPU seconds (its charge
        again if it failed)."""
        if self.budget <= 0:
            return
        self._charge(cost - charged)
        self.typical = 0.8 * self.typical + 0.2 * cost

    def _charge(self, seconds: float) -> None:
        self.credit = min(max(self.credit - seconds, -self._gain * DEBT_ROUNDS), self._gain * BANKED)


__all__ = ["BANKED", "DEBT_ROUNDS", "FIRST_ESTIMATE", "WalkPacer"]
