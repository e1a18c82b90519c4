"""Every task the daemon starts, supervised: named, its death logged and counted, restarted with backoff.

asyncio reports an exception of a task nobody awaits only when the task is garbage-collected, if
ever: a loop that dies that way stops doing its job with no word. So no task of the daemon is
created bare. Long-lived loops (a runtime source, retention, the flight-recorder pump) are
*services*: when one fails, or returns although it should run for good, the failure is logged with
its traceback, counted in ``nstap_task_failures_total{task}``, and the service is started again
after a backoff that doubles with each consecutive failure (reset once it has run for a while).
Short tasks (a capture, an anomaly's index write) are *spawned*: their failure is logged and
counted the same way, and they are not restarted (whoever spawned them decides what a failure
means). Code that catches a failure itself and carries on reports it with :meth:`failed`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger("nstap.supervisor")

FailureCounter = Callable[[str], None]
FailureReport = Callable[[str, BaseException], None]


async def event_or_timeout(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds passed; True if it is set.

    Not ``asyncio.wait_for(event.wait(), timeout)``: on Python 3.11 that returns when the event
    was set in the loop iteration in which the waiting task is cancelled, and the cancellation is
    lost (CPython gh-86296, fixed in 3.12). A service loop that waits for a kick once a second then
    missed its stop now and then, and the daemon hung at SIGTERM until it was killed. Here a
    cancellation always goes through.
    """
    if event.is_set():
        return True
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def release(_: object = None) -> None:
        if not done.done():
            done.set_result(None)

    waiter = loop.create_task(event.wait())
    waiter.add_done_callback(release)
    timer = loop.call_later(timeout, release)
    try:
        await done
    finally:
        timer.cancel()
        waiter.cancel()
    return event.is_set()


def log_failure(task: str, exc: BaseException) -> None:
    """Report one failure with no supervisor to count it: an error line with the traceback."""
    log.error("task_failed", task=task, error=f"{type(exc).__name__}: {exc}", exc_info=exc)


class Service:
    """One long-lived task and its restart state."""

    def __init__(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self.run = run
        self.task: asyncio.Task | None = None
        self.restart: asyncio.TimerHandle | None = None
        self.failures = 0  # consecutive failures, for the backoff
        self.started_at = 0.0


class TaskSupervisor:
    """Creates, watches and restarts the daemon's tasks."""

    def __init__(
        self,
        count: FailureCounter | None = None,
        *,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        healthy_after: float = 60.0,
    ) -> None:
        self.failures: Counter[str] = Counter()
        self._count = count
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.healthy_after = healthy_after
        self._services: dict[str, Service] = {}
        self._spawned: set[asyncio.Task] = set()
        self._stopping = False

    # -- reporting -------------------------------------------------------------------------------

    def failed(self, task: str, exc: BaseException, event: str = "task_failed", **fields: Any) -> None:
        """Log one failure of ``task`` with its traceback and count it."""
        self.count(task)
        log.error(event, task=task, error=f"{type(exc).__name__}: {exc}", exc_info=exc, **fields)

    def count(self, task: str) -> None:
        """Count one failure of ``task`` without logging it (a repeat of one logged already)."""
        self.failures[task] += 1
        if self._count is not None:
            self._count(task)

    # -- services --------------------------------------------------------------------------------

    def service(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run ``run()`` as the long-lived task ``name``, restarted whenever it fails or returns."""
        if name in self._services:
            raise ValueError(f"service {name!r} is already running")
        service = self._services[name] = Service(name, run)
        self._start(service)

    def _start(self, service: Service) -> None:
        service.restart = None
        if self._stopping:
            return
        service.started_at = time.monotonic()
        service.task = asyncio.get_running_loop().create_task(service.run(), name=service.name)  # type: ignore[arg-type]
        service.task.add_done_callback(lambda task: self._service_ended(service, task))

    def _service_ended(self, service: Service, task: asyncio.Task) -> None:
        if self._stopping:
            return  # only the supervisor cancels its services, when the daemon stops
        if task.cancelled():
            exc: BaseException = RuntimeError("cancelled, although only the supervisor stops it")
        else:
            exc = task.exception() or RuntimeError("returned, although it should run until the daemon stops")
        if time.monotonic() - service.started_at >= self.healthy_after:
            service.failures = 0
        delay = min(self.min_backoff * 2**service.failures, self.max_backoff)
        service.failures += 1
        self.failed(service.name, exc, restart_in=round(delay, 3))
        service.restart = asyncio.get_running_loop().call_later(delay, self._start, service)

    # -- one-shot tasks --------------------------------------------------------------------------

    def spawn(self, kind: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Run ``coro`` as a task whose failure is logged and counted under ``kind`` (not restarted)."""
        task = asyncio.get_running_loop().create_task(coro, name=kind)
        self._spawned.add(task)
        task.add_done_callback(lambda t: self._spawned_ended(kind, t))
        return task

    def _spawned_ended(self, kind: str, task: asyncio.Task) -> None:
        self._spawned.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.failed(kind, exc)

    # -- shutdown --------------------------------------------------------------------------------

    async def stop_services(self) -> None:
        """Cancel every service and wait for them (spawned tasks are left to finish)."""
        self._stopping = True
        tasks = []
        for service in self._services.values():
            if service.restart is not None:
                service.restart.cancel()
            if service.task is not None:
                service.task.cancel()
                tasks.append(service.task)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._services.clear()

    async def stop(self) -> None:
        """Cancel every service and every spawned task, and wait for all of them."""
        await self.stop_services()
        while self._spawned:
            tasks = list(self._spawned)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
