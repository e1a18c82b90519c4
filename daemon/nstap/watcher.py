"""Namespace watchers: one asyncio task per watched network namespace, and the pool that runs them.

A watcher opens its namespace's handles once, samples every interval with them, and closes them
when it is cancelled; the pool starts and cancels watchers so that exactly the registry's
namespaces are watched. Reads of /proc and netlink answers return at once (the kernel generates
them during the call), so they run on the event loop: a thread hop would cost more than the read.
Only the socket-table walk, which can take milliseconds, goes to a worker thread.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import structlog

from .instruments import Instruments
from .netns.handles import NamespaceGone, NamespaceHandles, NamespaceOpener
from .registry import ContainerRegistry, WatchedNamespace
from .samplers import Sampler, SamplerContext, SamplerSpec
from .samplers.sockets import SocketSampler
from .samples import NamespaceSample, SampleStore

log = structlog.get_logger("nstap.watcher")

ATTACH_RETRIES = (0.2, 1.0)
# Errors that mean "this namespace or its process went away" or "the kernel refused one read":
# the sample part is skipped and counted, the watcher carries on.
SAMPLE_ERRORS = (OSError, ValueError, IndexError, KeyError)


class NamespaceWatcher:
    """Samples one network namespace every interval until cancelled."""

    def __init__(
        self,
        namespace: WatchedNamespace,
        pool: WatcherPool,
    ) -> None:
        self.namespace = namespace
        self.pool = pool
        self.handles: NamespaceHandles | None = None
        self.samplers: list[Sampler] = []
        self._sockets: SocketSampler | None = None
        self._walk: asyncio.Future | None = None
        self._failing: dict[str, str] = {}  # sampler -> last error logged, to log once per streak
        self._syn_retransmits: int | None = None
        owner = namespace.owner
        self.log = log.bind(netns=namespace.inode, container=owner.name, container_id=owner.short_id, runtime=owner.runtime)

    async def run(self) -> None:
        """Attach, sample until cancelled, detach."""
        pool = self.pool
        try:
            self.handles = await self._attach()
        except NamespaceGone as exc:
            pool.instruments.sampler_errors.labels("attach").inc()
            self.log.info("watcher_attach_skipped", reason=str(exc))
            return
        except OSError as exc:
            pool.instruments.sampler_errors.labels("attach").inc()
            self.log.warning("watcher_attach_failed", error=str(exc), errno=errno.errorcode.get(exc.errno or 0, ""))
            return
        try:
            self.samplers = [spec.factory(self.handles, pool.context) for spec in pool.specs]
            for sampler in self.samplers:
                if isinstance(sampler, SocketSampler):
                    self._sockets = sampler
            pool.instruments.attaches.inc()
            self.log.info("watcher_attached", members=len(self.namespace.members), pid=self.namespace.owner.pid)
            await self._loop()
        finally:
            await self._detach()

    async def _attach(self) -> NamespaceHandles:
        last: OSError | None = None
        for delay in (0.0, *ATTACH_RETRIES):
            if delay:
                await asyncio.sleep(delay)
            for member in self.namespace.members:  # any member's process leads to the namespace
                try:
                    return await self.pool.opener.open(member.pid, self.namespace.inode)
                except NamespaceGone as exc:
                    last = exc
                except OSError as exc:
                    if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                        raise
                    last = exc
        assert last is not None
        raise last

    async def _loop(self) -> None:
        # The first sample is taken at once; the next ones are taken by the pool's ticker, which
        # runs every watcher's sample_once back to back on each tick. This task stays, owning the
        # namespace's handles, until it is cancelled.
        self.sample_once()
        ticker = self.pool.ticker
        ticker.add(self)
        try:
            await asyncio.get_running_loop().create_future()  # only cancellation ends it
        finally:
            ticker.discard(self)

    def sample_once(self) -> NamespaceSample | None:
        """Take one sample and hand it to the store; None if every sampler failed."""
        pool = self.pool
        started = time.perf_counter()
        taken_at = time.time()
        parts = {}
        failed = []
        for sampler in self.samplers:
            try:
                parts[sampler.name] = sampler.sample()
            except SAMPLE_ERRORS as exc:
                failed.append(sampler.name)
                self._sampler_failed(sampler.name, exc)
            else:
                if sampler.name in self._failing:
                    del self._failing[sampler.name]
                    self.log.info("sampler_recovered", sampler=sampler.name)
        protocols = parts.get("protocols")
        if protocols is not None and self._sockets is not None:
            syn = protocols.get("tcp_syn_retransmits")
            if syn is not None:
                if self._syn_retransmits is not None and syn > self._syn_retransmits:
                    self._sockets.walk_soon()  # SYNs are being retried: see which sockets wait, now
                self._syn_retransmits = syn
        self._schedule_walk()
        duration = time.perf_counter() - started
        pool.instruments.sample_duration.observe(duration)
        if not parts:
            return None
        sample = NamespaceSample(
            self.namespace.inode,
            taken_at,
            duration,
            interfaces=parts.get("interfaces"),
            protocols=parts.get("protocols"),
            sockets=parts.get("sockets"),
            failed=tuple(failed),
        )
        pool.store.put(sample)
        return sample

    def _sampler_failed(self, name: str, exc: BaseException) -> None:
        self.pool.instruments.sampler_errors.labels(name).inc()
        text = f"{type(exc).__name__}: {exc}"
        if self._failing.get(name) != text:
            self._failing[name] = text
            self.log.warning("sample_skipped", sampler=name, error=text)

    def _schedule_walk(self) -> None:
        sockets = self._sockets
        if sockets is None:
            return
        walk = self._walk
        if walk is not None:
            if not walk.done():
                return
            self._walk = None
            exc = walk.exception()
            if exc is None:
                result = walk.result()
                sockets.walk_done(result)
                self.pool.instruments.walk_duration.observe(result[2])
            else:
                sockets.walk_failed()
                self._sampler_failed("socket_walk", exc)
        if "sockets" not in self._failing and sockets.walk_due():
            self._walk = asyncio.get_running_loop().run_in_executor(self.pool.walk_executor, sockets.walk)

    async def _detach(self) -> None:
        walk = self._walk
        if walk is not None and not walk.done():
            # The worker thread is using one of our sockets: let it finish before closing it.
            try:
                await asyncio.shield(asyncio.wait_for(asyncio.shield(walk), 10))
            except BaseException:  # noqa: BLE001 - closing the handles below matters more than why
                pass
        if walk is not None and walk.done() and not walk.cancelled():
            walk.exception()  # consumed, so asyncio does not log it as never retrieved
        self.pool.store.drop(self.namespace.inode)
        for sampler in self.samplers:
            close = getattr(sampler, "close", None)
            if close is not None:
                close()
        if self.handles is not None:
            self.handles.close()
            self.pool.instruments.detaches.inc()
            self.log.info("watcher_detached")


class Ticker:
    """One timer for every watcher: on multiples of the interval (loop clock), samples them all.

    The loop wakes once per interval and the samples run back to back in one callback, without
    an asyncio task switch, future or timer per namespace; this roughly halves the sampling
    overhead that is not reading the kernel (CPU caches stay warm from one namespace to the next).
    """

    def __init__(self, interval: float, on_round: Callable[[], None] | None = None) -> None:
        self.interval = interval
        self.on_round = on_round  # called as each tick starts, before the samples
        self._watchers: dict[NamespaceWatcher, None] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, watcher: NamespaceWatcher) -> None:
        """Sample ``watcher`` on every tick from now on."""
        self._watchers[watcher] = None
        if self._timer is None:
            self._arm()

    def discard(self, watcher: NamespaceWatcher) -> None:
        """Stop sampling ``watcher``."""
        self._watchers.pop(watcher, None)

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._timer = loop.call_at((now // self.interval + 1) * self.interval, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.on_round is not None:
            self.on_round()
        for watcher in list(self._watchers):
            try:
                watcher.sample_once()
            except Exception:  # noqa: BLE001 - a bug in one namespace's sample must not stop the others
                watcher.log.exception("sample_failed")
                watcher.pool.instruments.sampler_errors.labels("sample").inc()
        if self._watchers:
            self._arm()

    def close(self) -> None:
        """Stop ticking."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._watchers.clear()


class WatcherPool:
    """Runs one :class:`NamespaceWatcher` per namespace in the registry, no more, no less."""

    def __init__(
        self,
        registry: ContainerRegistry,
        opener: NamespaceOpener,
        specs: list[SamplerSpec],
        context: SamplerContext,
        store: SampleStore,
        instruments: Instruments,
    ) -> None:
        self.registry = registry
        self.opener = opener
        self.specs = specs
        self.context = context
        self.interval = context.interval
        self.store = store
        self.instruments = instruments
        self.walk_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nstap-walk")
        host = context.host_links
        self.ticker = Ticker(self.interval, host.new_round if host is not None else None)
        self.watchers: dict[int, tuple[NamespaceWatcher, asyncio.Task]] = {}
        self._closed = False

    def start(self) -> None:
        """Follow the registry from now on."""
        self.registry.subscribe(self.reconcile)
        self.reconcile()

    def reconcile(self) -> None:
        """Start watchers for new namespaces, cancel those whose namespace left the registry."""
        if self._closed:
            return
        wanted = self.registry.namespaces()
        for inode, (watcher, task) in list(self.watchers.items()):
            if inode not in wanted:
                task.cancel()
                del self.watchers[inode]
            else:
                watcher.namespace = wanted[inode]  # owner or members may have changed
        for inode, namespace in wanted.items():
            if inode not in self.watchers:
                watcher = NamespaceWatcher(namespace, self)
                task = asyncio.get_running_loop().create_task(watcher.run(), name=f"watch-netns-{inode}")
                self.watchers[inode] = (watcher, task)
                task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("watcher_crashed", task=task.get_name(), error=repr(exc), exc_info=exc)

    def watched(self) -> dict[int, WatchedNamespace]:
        """The namespaces with an attached watcher."""
        return {inode: w.namespace for inode, (w, t) in self.watchers.items() if w.handles is not None and not t.done()}

    async def stop(self) -> None:
        """Cancel every watcher and wait until their handles are closed."""
        self._closed = True
        tasks = [task for _w, task in self.watchers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.watchers.clear()
        self.ticker.close()
        self.walk_executor.shutdown(wait=True)
