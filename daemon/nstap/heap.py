"""The cyclic garbage collector, paused while a worker thread builds a large structure.

A full collection walks every object the process tracks while holding the GIL, and building a
structure of a million objects (a 20,000-rule firewall parsed, a conntrack table) sets off several
of them: each one stops the event loop's thread for up to 0.1 s. The structures built here hold no
reference cycles to collect, so the collector waits until the last builder is done.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_builders = 0


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection (in any thread) until every ``with`` block using this is left."""
    global _builders
    with _lock:
        _builders += 1
        if _builders == 1:
            gc.disable()
    try:
        yield
    finally:
        with _lock:
            _builders -= 1
            if _builders == 0:
                gc.enable()
