"""Process exits seen directly by the kernel: a pidfd per container process, polled by the event loop.

The runtime's ``die`` event is one way to learn that a container stopped; the kernel is another,
and it works while the runtime's socket is down or its event stream lost an event. A pidfd
becomes readable when its process exits, at no cost until then.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable


class ProcessExits:
    """Calls back once when a watched process exits."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._watches: dict[str, tuple[int, int]] = {}  # key -> (pid, pidfd)

    def watch(self, key: str, pid: int, on_exit: Callable[[str], None]) -> bool:
        """Watch ``pid`` under ``key`` (replacing an earlier watch of another pid); False if already gone."""
        current = self._watches.get(key)
        if current is not None:
            if current[0] == pid:
                return True
            self.forget(key)
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        self._watches[key] = (pid, fd)
        self._loop.add_reader(fd, self._fired, key, fd, on_exit)
        return True

    def _fired(self, key: str, fd: int, on_exit: Callable[[str], None]) -> None:
        current = self._watches.get(key)
        if current is None or current[1] != fd:
            return
        self.forget(key)
        on_exit(key)

    def forget(self, key: str) -> None:
        """Stop watching ``key``."""
        entry = self._watches.pop(key, None)
        if entry is not None:
            self._loop.remove_reader(entry[1])
            os.close(entry[1])

    def forget_all(self) -> None:
        """Stop watching everything."""
        for key in list(self._watches):
            self.forget(key)

    def __len__(self) -> int:
        return len(self._watches)
