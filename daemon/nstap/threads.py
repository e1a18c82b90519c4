"""The daemon's worker threads: a fixed set, each named in the kernel as in Python; and the jobs
started once a round that run on the event loop's thread instead while they are quick
(:class:`QuickJob`).

``top -H``, ``ps -L`` and /proc/<pid>/task/<tid>/comm then say which thread costs what
(``nstap-nat_0``, ``nstap-walk_0``, ...): the benchmark's breakdown per thread reads them there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)


def name_this_thread() -> None:
    """Give the calling thread its Python name in the kernel (truncated to 15 bytes)."""
    _libc.prctl(PR_SET_NAME, threading.current_thread().name.encode()[:15], 0, 0, 0)


class _Jobs:
    """How many jobs were given and have not finished (queued or running): those of one executor
    (:attr:`_Workers.jobs`, :attr:`WorkerThread.idle`), and in JOBS those of every executor of the
    daemon together (the sampling ticker starts a round at once only when there are none:
    Ticker._run_early)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.open = 0

    def given(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self.open += 1
        future.add_done_callback(self._done)  # finished, failed or cancelled before it ran

    def _done(self, _future: concurrent.futures.Future) -> None:
        with self._lock:
            self.open -= 1


JOBS = _Jobs()


def workers_idle() -> bool:
    """Whether no worker thread of the daemon (:func:`worker_threads`) has a job to run or running."""
    return JOBS.open == 0


class _Workers(ThreadPoolExecutor):
    """A ThreadPoolExecutor whose jobs are counted, its own (:attr:`jobs`) and in JOBS."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.jobs = _Jobs()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        future = super().submit(fn, *args, **kwargs)
        self.jobs.given(future)
        JOBS.given(future)
        return future


def worker_threads(name: str, workers: int = 1) -> _Workers:
    """An executor of ``workers`` threads called ``name_0``, ``name_1``, ... in Python and the kernel,
    all started now: a pool starts a thread on first use, or when jobs overlap, so the daemon's
    thread count would otherwise creep up over days for no work of its own (a 5,000-cycle churn
    ended with one more than after its first tenth), and a leak would hide among them. Its jobs
    are counted (:func:`workers_idle`)."""
    executor = _Workers(max_workers=workers, thread_name_prefix=name, initializer=name_this_thread)
    # Each job waits until every worker holds one, so each submit finds no idle thread and starts one.
    started = threading.Barrier(workers)
    for future in [ThreadPoolExecutor.submit(executor, started.wait, 10) for _ in range(workers)]:  # (not counted as jobs)
        future.result()
    return executor


QUICK = 0.002  # seconds: a QuickJob whose latest runs each took less runs on the event loop's thread
QUICK_RUNS = 8  # latest runs of a QuickJob that say whether it is quick


_WAITS: weakref.WeakKeyDictionary[asyncio.Future, list[float]] = weakref.WeakKeyDictionary()  # WorkerThread jobs' waits


def waited(future: asyncio.Future) -> float:
    """Seconds the job behind ``future`` (:meth:`WorkerThread.submit`) waited for the jobs given to
    its thread before it; 0 for any other future."""
    wait = _WAITS.get(future)
    return wait[0] if wait is not None else 0.0


class WorkerThread:
    """One named worker thread (:func:`worker_threads`) for one part of the daemon, which knows
    whether a job it was given is still to finish (:attr:`idle`): a :class:`QuickJob` of the same
    part then runs after it, in the thread, and never beside it."""

    def __init__(self, name: str) -> None:
        self.executor = worker_threads(name)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` in the thread (after the jobs given before it); how long it waited
        for them is :func:`waited`."""
        given = time.monotonic()
        wait = [0.0]

        def run() -> T:
            wait[0] = time.monotonic() - given
            return fn(*args)

        job = self.executor.submit(run)
        future = asyncio.wrap_future(job)
        _WAITS[future] = wait
        return future

    @property
    def idle(self) -> bool:
        """Whether every job given to the thread has finished (or was cancelled before it began)."""
        return self.executor.jobs.open == 0

    def shutdown(self, wait: bool = True) -> None:
        self.executor.shutdown(wait=wait)


class QuickJob:
    """A job the event loop starts once a round (a map read, a few counters), run on the loop's own
    thread while its latest QUICK_RUNS runs each took less than ``quick`` seconds and its worker
    thread is idle, and in that thread otherwise.

    A trip to a worker thread that slept costs two wake-ups, the thread's and then the loop's
    when the result is handed back, and on a VM whose caches went cold since the last one each
    costs hundreds of µs of CPU: more than a read of the eBPF drop map beside 50 containers
    (docs/performance.md, "Wake-ups"). Beside 1,000 containers that read takes tens of
    milliseconds, which the loop's thread must not spend: it then goes to the thread, and comes
    back when QUICK_RUNS runs in a row were quick again. Its first run is in the thread. Either
    way the caller gets a future (done at once when the job ran on the loop's thread).
    """

    def __init__(self, thread: WorkerThread, fn: Callable[..., T], quick: float = QUICK) -> None:
        self.thread = thread
        self.fn = fn
        self.quick = quick
        self.took: deque[float] = deque(maxlen=QUICK_RUNS)  # wall seconds of the latest runs, either way
        self.inline = 0  # runs on the loop's thread
        self.threaded = 0  # runs in the worker thread

    def start(self, *args: Any) -> asyncio.Future:
        """Run the job now on this thread, or start it in the worker thread."""
        took = self.took
        if self.thread.idle and took and max(took) < self.quick:  # idle first: no run of it is appending to took
            self.inline += 1
            future = asyncio.get_running_loop().create_future()
            try:
                result = self._timed(*args)
            except Exception as exc:  # noqa: BLE001 - handed to the caller, as the thread's future would
                future.set_exception(exc)
            else:
                future.set_result(result)
            return future
        self.threaded += 1
        return self.thread.submit(self._timed, *args)

    def _timed(self, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.took.append(time.perf_counter() - started)
