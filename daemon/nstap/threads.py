"""The daemon's worker threads: a fixed set, each named in the kernel as in Python.

``top -H``, ``ps -L`` and /proc/<pid>/task/<tid>/comm then say which thread costs what
(``nstap-nat_0``, ``nstap-walk_0``, ...): the benchmark's breakdown per thread reads them there.
"""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor

PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)


def name_this_thread() -> None:
    """Give the calling thread its Python name in the kernel (truncated to 15 bytes)."""
    _libc.prctl(PR_SET_NAME, threading.current_thread().name.encode()[:15], 0, 0, 0)


def worker_threads(name: str, workers: int = 1) -> ThreadPoolExecutor:
    """An executor of ``workers`` threads called ``name_0``, ``name_1``, ... in Python and the kernel,
    all started now: a pool starts a thread on first use, or when jobs overlap, so the daemon's
    thread count would otherwise creep up over days for no work of its own (a 5,000-cycle churn
    ended with one more than after its first tenth), and a leak would hide among them."""
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name, initializer=name_this_thread)
    # Each job waits until every worker holds one, so each submit finds no idle thread and starts one.
    started = threading.Barrier(workers)
    for future in [executor.submit(started.wait, 10) for _ in range(workers)]:
        future.result()
    return executor
