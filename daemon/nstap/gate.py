"""The sampling round's gate: background Python work in worker threads waits while a round runs.

A worker thread running Python (a firewall of 50,000 rules parsed, a socket table of 100,000
counted) takes the GIL from the event loop's thread every time that thread makes a system call,
and the loop's thread waits a switch interval (5 ms) to get it back: a round of samples is
hundreds of reads, so it took 20 to 50 times as long (300 reads: 7 ms alone, 150-400 ms beside one
parsing thread) and ticks were skipped. The ticker closes the gate shortly before each tick and
opens it when the round is done; long Python loops in worker threads call :meth:`RoundGate.pause`
between steps, and wait there (without the GIL) while it is closed, but never past MAX_WAIT after
it closed, so that a round that never ends (or a gate left closed) cannot stop them for good. The workers lose the round's few
milliseconds per interval; the round loses nothing.
"""

from __future__ import annotations

import threading
import time

MAX_WAIT = 0.25  # seconds after the gate closed when workers go on, whether it opened or not


class RoundGate:
    """Open between sampling rounds, closed from shortly before a tick until its round is done."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self._main = threading.main_thread().ident
        self._closed_at = 0.0

    def close(self) -> None:
        """A round is about to start (event loop's thread)."""
        self._closed_at = time.monotonic()
        self._open.clear()

    def open(self) -> None:
        """The round is done (event loop's thread)."""
        self._open.set()

    @property
    def closed(self) -> bool:
        """Whether a round is running or about to."""
        return not self._open.is_set()

    def pause(self) -> None:
        """Wait while a round runs (until MAX_WAIT after the gate closed); at once if none does.
        Never waits in the event loop's (main) thread: the round itself goes through parsers
        that call this."""
        if not self._open.is_set() and threading.get_ident() != self._main:
            left = self._closed_at + MAX_WAIT - time.monotonic()
            if left > 0:
                self._open.wait(left)


ROUND = RoundGate()  # the daemon's one ticker closes it; parsers in worker threads pause on it
