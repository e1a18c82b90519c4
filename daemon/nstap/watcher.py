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
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from .gate import ROUND, RoundGate
from .instruments import Instruments, LoopHistogram
from .netns.handles import NamespaceGone, NamespaceHandles, NamespaceOpener
from .registry import ContainerRegistry, WatchedNamespace
from .samplers import Sampler, SamplerContext, SamplerSpec
from .samplers.sockets import SocketSampler
from .samples import NamespaceSample, SampleStore
from .supervisor import TaskSupervisor
from .threads import waited, worker_threads, workers_idle
from .walks import WalkPacer

if TYPE_CHECKING:
    from .dns.lookups import Lookups

log = structlog.get_logger("nstap.watcher")

ATTACH_RETRIES = (0.2, 1.0)
RETRY_MIN, RETRY_MAX = 0.5, 30.0  # seconds before a watcher that ended is started again (doubling)
RETRY_HEALTHY = 60.0  # a watcher that lived this long starts its next backoff from RETRY_MIN
MAX_SAMPLE_EVERY = 60.0  # seconds: the longest interval of a namespace whose samples cost too much
SUSTAINED = 3  # samples in a row over the budget before a namespace is sampled less often
# What an ordinary namespace makes a sample read (listeners, interfaces, link announcements since
# the last sample): a namespace within it is never slowed, whatever its samples cost in CPU. Its
# CPU then says how cold or busy the machine is, not what the namespace holds: on a VM whose
# caches go cold while the daemon waits for the next tick, the first reads of an idle busybox
# container's /proc/net files take 0.2-1.2 ms of CPU (25 us warm), and such containers were
# sampled every 2-3 s.
ORDINARY_WORK = 64
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
        self._walk_charged = 0.0  # what the host's walk budget was charged for the walk in flight
        self._failing: dict[str, str] = {}  # sampler -> last error logged, to log once per streak
        self._syn_retransmits: int | None = None
        self._sample_failing = False
        self.costs: deque[float] = deque(maxlen=SUSTAINED)  # CPU seconds of its latest samples
        self.every = 1  # sampled on every ``every``-th tick (more than 1 when its samples cost too much)
        self.skip = 0  # ticks to skip before the next sample
        self._profile: dict[str, float] | None = None  # CPU seconds by sampler, while its cost is over the budget
        # Work the loop did for this namespace between its samples (link announcements received),
        # charged to its next sample: each sampler's take_loop_cpu(), if it has one.
        self._loop_cpu: list[Callable[[], float]] = []
        self._work: list[Callable[[], int]] = []  # each sampler's work(), if it has one: see account()
        self.work = 0  # what the namespace made its latest sample read (listeners, interfaces, announcements)
        owner = namespace.owner
        self.log = log.bind(netns=namespace.inode, container=owner.name, container_id=owner.short_id, runtime=owner.runtime)

    async def run(self) -> None:
        """Attach, sample until cancelled, detach.

        Returns early when the namespace cannot be attached (its process went away, or the host
        is out of descriptors); the pool then tries again with backoff for as long as the
        namespace is in the registry.
        """
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
            self._loop_cpu = [take for take in (getattr(s, "take_loop_cpu", None) for s in self.samplers) if take is not None]
            self._work = [work for work in (getattr(s, "work", None) for s in self.samplers) if work is not None]
            pool.instruments.attaches.inc()
            self.log.info("watcher_attached", members=len(self.namespace.members), pid=self.namespace.owner.pid)
            pool.attached(self)
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
        # runs every watcher's sample_guarded back to back on each tick. This task stays, owning
        # the namespace's handles, until it is cancelled.
        started = time.thread_time()
        self.sample_guarded()
        self.account(time.thread_time() - started)
        ticker = self.pool.ticker
        ticker.add(self)
        try:
            await asyncio.get_running_loop().create_future()  # only cancellation ends it
        finally:
            ticker.discard(self)

    def sample_guarded(self) -> None:
        """:meth:`sample_once`, with a failure that no sampler expected reported instead of raised.

        A bug in one namespace's sample must not stop the others, nor this namespace's next
        sample. Every such failure is counted; the first of a streak is logged with its traceback.
        """
        try:
            self.sample_once()
        except Exception as exc:  # noqa: BLE001 - see the docstring
            self.pool.instruments.sampler_errors.labels("sample").inc()
            if not self._sample_failing:
                self._sample_failing = True
                self.pool.supervisor.failed("sample", exc, netns=self.namespace.inode, container=self.namespace.owner.name)
            else:
                self.pool.supervisor.count("sample")
        else:
            self._sample_failing = False

    def sample_once(self) -> NamespaceSample | None:
        """Take one sample and hand it to the store; None if every sampler failed."""
        pool = self.pool
        started = time.perf_counter()
        taken_at = time.time()
        parts = {}
        failed: list[str] | None = None
        failing = self._failing
        profile = self._profile
        for sampler in self.samplers:
            if profile is not None:
                cpu = time.thread_time()
            try:
                parts[sampler.name] = sampler.sample()
            except SAMPLE_ERRORS as exc:
                failed = [*(failed or ()), sampler.name]
                self._sampler_failed(sampler.name, exc)
            else:
                if failing and sampler.name in failing:
                    del failing[sampler.name]
                    self.log.info("sampler_recovered", sampler=sampler.name)
            if profile is not None:
                profile[sampler.name] = time.thread_time() - cpu
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
        inode = self.namespace.inode
        # Built positionally through _make: a NamedTuple's keyword __new__ is a Python call per sample.
        sample = NamespaceSample._make((
            inode, taken_at, duration, parts.get("interfaces"), protocols, parts.get("sockets"),
            tuple(failed) if failed else (), self.every * pool.interval, parts.get("firewall"), pool.kernel_drops(inode), pool.dns(inode),
            pool.kernel_drops_at(),
        ))
        pool.store.put(sample)
        return sample

    def account(self, cost: float) -> None:
        """Sample this namespace less often while its own samples cost more than the budget.

        ``cost`` is the CPU time the event-loop thread spent on this namespace's sample (its reads
        and parsing; see Ticker._slice for how it is measured; its detectors run after the slice:
        see DetectionPipeline.on_samples):
        what the namespace itself costs, not the wall time, which also counts the time the thread
        waited for the GIL or a core while the daemon did its own work elsewhere (parsing NAT
        rules, reading a ring back). A namespace whose state is expensive to read (thousands of listeners or
        interfaces, link changes on every tick) would otherwise take the event loop from all the
        others: once its last SUSTAINED samples all cost more than the budget, it is sampled every
        ``cost / budget`` intervals (the cheapest of those samples; at most every
        MAX_SAMPLE_EVERY seconds), so its average stays within the budget. One sample within the
        budget restores it at once. A namespace whose sample read no more than an ordinary one
        does (ORDINARY_WORK) is never slowed: its cost is the machine's, not its own.
        """
        pool = self.pool
        budget = pool.context.sample_budget
        between = sum(take() for take in self._loop_cpu) if self._loop_cpu else 0.0
        cost += between
        costs = self.costs
        costs.append(cost)
        self.work = work = sum(take() for take in self._work) if self._work else ORDINARY_WORK + 1
        sustained = min(costs) if len(costs) == SUSTAINED else 0.0
        every = 1 if sustained <= budget or work <= ORDINARY_WORK else min(math.ceil(sustained / budget), pool.max_every)
        # Over the budget: time each sampler of the next samples, to say which part costs.
        profile = self._profile
        self._profile = {} if cost > budget and work > ORDINARY_WORK else None
        if (every > 1) != (self.every > 1):  # logged on entering and leaving, not on every change
            if every > 1:
                self.log.info(
                    "sampling_slowed", interval=every * pool.interval, cost_ms=round(sustained * 1000, 3),
                    budget_ms=round(budget * 1000, 3), work=work, cause=self._cause(profile, between),
                )
            else:
                self.log.info("sampling_restored", interval=pool.interval, cost_ms=round(cost * 1000, 3), budget_ms=round(budget * 1000, 3))
        self.every = every

    def _cause(self, profile: dict[str, float] | None, between: float = 0.0) -> str:
        """Which sampler costs most, with what it had to read ("sockets 3.1 ms: 2000 listeners"),
        or the link announcements the loop received between two samples, if they cost more."""
        if between > max((profile or {}).values(), default=0.0):
            return f"interfaces {between * 1000:.1f} ms: link announcements between samples"
        if not profile:
            return "the sample's bookkeeping"
        name, cpu = max(profile.items(), key=lambda item: item[1])
        sampler = next((s for s in self.samplers if s.name == name), None)
        load = getattr(sampler, "load", None)
        detail = load() if load is not None else ""
        return f"{name} {cpu * 1000:.1f} ms" + (f": {detail}" if detail else "")

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
                self.pool.walks.done(self._walk_charged, result[2])
                self.pool.instruments.walk_duration.observe(result[2])
            else:
                sockets.walk_failed()
                self.pool.walks.done(self._walk_charged, self._walk_charged)
                self._sampler_failed("socket_walk", exc)
        if "sockets" not in self._failing and sockets.walk_due():
            # Due by this namespace's own schedule; it starts when the host's walk budget allows
            # (nstap.walks), or is asked again at the next sample.
            charged = self.pool.walks.admit(sockets.walk_cost, sockets.urgent)
            if charged is None:
                self.pool.instruments.walks_deferred.inc()
                return
            self._walk_charged = charged
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
        if self.pool.owns_samples(self):
            self.pool.store.drop(self.namespace.inode)
        for sampler in self.samplers:
            close = getattr(sampler, "close", None)
            if close is not None:
                close()
        if self.handles is not None:
            self.pool.detached(self)
            self.handles.close()
            self.pool.instruments.detaches.inc()
            self.log.info("watcher_detached")


class Ticker:
    """One timer for every watcher: on multiples of the interval (loop clock), samples them all.

    The loop wakes once per interval and the samples run back to back, without an asyncio task
    switch, future or timer per namespace; this roughly halves the sampling overhead that is not
    reading the kernel (CPU caches stay warm from one namespace to the next). A round is cut into
    slices of at most SLICE seconds with the loop's other callbacks in between: at a thousand
    namespaces a round is a third of a second, which the API, the scrapes and the runtimes' events
    would otherwise wait for. From EARLY before each tick until its round is done the round's gate
    is closed (:mod:`nstap.gate`): Python loops in worker threads wait, so that each of the
    round's reads gets the GIL back at once instead of after a switch interval. When the early
    hooks' reads are done as they return and no worker thread has a job, the tick starts there and
    then, EARLY before its slot: one wake-up of the loop an interval instead of two.
    """

    SLICE = 0.005
    EARLY = 0.05  # seconds before a tick the gate closes and its early hooks run (at most a tenth of the interval)
    LEAD_FACTOR = 1.5  # early hooks run this many times their reads' recent longest wall time before the tick, if more than EARLY
    LEADS = 128  # early reads whose wall time is remembered (a minute's worth at a 1 s interval, two reads a round)

    def __init__(
        self,
        interval: float,
        on_round: Callable[[], None] | None = None,
        lag: LoopHistogram | None = None,
        budget: float = 0.002,
        gate: RoundGate = ROUND,
        idle: Callable[[], bool] = workers_idle,
    ) -> None:
        self.interval = interval
        self.idle = idle  # whether no worker thread has a job: then a round may start with its early hooks
        self.gate = gate  # closed from EARLY before each tick until its round is done (see nstap.gate)
        self.budget = budget  # CPU seconds of one namespace's sample before it counts as costly
        self.on_round = on_round  # called as each tick starts, before the samples
        self.hooks: list[Callable[[], None]] = []  # more of those
        # Called before each tick: work in other threads whose result the tick's samples use (the
        # eBPF map read: started at the tick, its counts were one interval old). A hook that
        # starts a read returns its future: it is timed (see lead()), and the tick starts with the
        # hooks only when every such read is done (_run_early).
        self.early_hooks: list[Callable[[], object]] = []
        self._early: asyncio.Handle | None = None
        self._gate_close: asyncio.Handle | None = None  # when the early hooks run before the gate closes
        self._early_took: deque[float] = deque(maxlen=self.LEADS)  # wall seconds of the latest early reads
        # Called when a round is done, after the next tick is armed: work that must not delay a
        # tick runs when the next one is furthest away (a full garbage collection, if room() allows).
        self.done_hooks: list[Callable[[], None]] = []
        self.lag = lag  # how late each tick started, in seconds (a blocked event loop shows here)
        self._watchers: dict[NamespaceWatcher, None] = {}
        self._timer: asyncio.Handle | None = None  # the next tick, or the next slice of this one
        self._due = 0.0  # the slot of the next (or current) tick
        self._starts = 0.0  # when that tick is to start: its slot, or its early hooks' time when it starts with them
        self.joined = 0  # ticks that started in their early hooks' wake-up

    def add(self, watcher: NamespaceWatcher) -> None:
        """Sample ``watcher`` on every tick from now on."""
        self._watchers[watcher] = None
        if self._timer is None:
            self._arm()

    def discard(self, watcher: NamespaceWatcher) -> None:
        """Stop sampling ``watcher``."""
        self._watchers.pop(watcher, None)

    @property
    def watching(self) -> int:
        """How many watchers each tick samples."""
        return len(self._watchers)

    def _arm(self) -> None:
        # The round's slot is the next multiple of the interval after the last one. A round that
        # ended after that slot (a host with more namespaces than one interval can sample) starts
        # the next at once, late for its slot (nstap_tick_lag_seconds says by how much), rather
        # than skipping it. A loop that was blocked (or a daemon that was stopped) for longer than
        # an interval takes one late round, then the next multiple after now: no burst of catch-ups.
        loop = asyncio.get_running_loop()
        now = loop.time()
        slot = ((self._due + self.interval / 2) // self.interval + 1) * self.interval  # (half: the last slot is a float)
        if slot + self.interval <= now:
            slot = (now // self.interval + 1) * self.interval
        self._due = self._starts = slot
        self._timer = loop.call_at(max(slot, now), self._tick)
        early = min(self.EARLY, self.interval / 10)
        lead = self.lead()
        if lead > early:  # the reads take longer than the gate's lead: they start first, the gate closes later
            self._early = loop.call_at(max(slot - lead, now), self._run_early, False)
            self._gate_close = loop.call_at(max(slot - early, now), self._close_gate)
        else:  # the common case: one wake-up for both
            self._early = loop.call_at(max(slot - early, now), self._run_early, True)

    def lead(self) -> float:
        """Seconds before a tick its early hooks run.

        EARLY (at most a tenth of the interval), or LEAD_FACTOR times the longest wall time of the
        latest early reads if that is more (at most a quarter of the interval): at 1,000
        containers on a loaded host the eBPF map read took 30-160 ms of wall time; started EARLY
        before the tick, it was still running when the tick came, and the tick waited for it (for
        a CPU and the GIL): 7 of 60 ticks were 25-100 ms late in one run, 16 in another. Reads that are quick
        again bring it back to EARLY once they are all that is remembered (LEADS reads). A slow
        read is remembered for about a minute: at 1,000 containers reads took 25 ms at the median
        and 50-150 ms one time in ten to a hundred, and with 16 reads (8 rounds) remembered the
        lead had fallen back to 45 ms when the next slow one came, and its tick was 21-42 ms late.
        """
        early = min(self.EARLY, self.interval / 10)
        took = max(self._early_took, default=0.0)
        return min(max(early, took * self.LEAD_FACTOR), max(early, self.interval / 4))

    def room(self) -> float:
        """Seconds until the next tick needs the loop's thread (its early reads, its gate, or the
        tick itself); infinite while none is armed."""
        handles = [h for h in (self._early, self._gate_close, self._timer) if h is not None]
        if not handles:
            return math.inf
        now = asyncio.get_running_loop().time()
        # (a handle that is not a timer is a tick or slice to run now: no room)
        return max(min(h.when() if isinstance(h, asyncio.TimerHandle) else now for h in handles) - now, 0.0)

    def _close_gate(self) -> None:
        self._gate_close = None
        self.gate.close()

    def _run_early(self, close_gate: bool) -> None:
        self._early = None
        loop = asyncio.get_running_loop()
        if close_gate:
            self.gate.close()  # worker threads' Python stops, so that the tick finds the GIL free
        started = loop.time()
        took = self._early_took
        waiting = False
        for hook in self.early_hooks:
            reading = hook()
            if isinstance(reading, asyncio.Future):
                # Timed from its start less what it waited for its thread's other jobs (at the
                # daemon's start, the program's load): the lead is for reads grown slow.
                reading.add_done_callback(lambda f: took.append(loop.time() - started - waited(f)))
                waiting = waiting or not reading.done()
        # Every read is done already (they ran on this thread: nstap.threads.QuickJob) and no worker
        # thread has a job that the round's gate would have to stop: the tick starts now, in this
        # wake-up, EARLY before its slot, instead of the loop sleeping EARLY and waking for it again
        # (a wake-up costs CPU of its own: docs/performance.md, "Wake-ups"). Its lag counts from
        # now. (call_soon: after the reads' done callbacks, which hand the tick their results, and
        # after what the hooks woke, which may give a worker a job: see _join.)
        if close_gate and not waiting and self._timer is not None and self.idle():
            self._timer.cancel()
            self._starts = self._due - min(self.EARLY, self.interval / 10)
            self._timer = loop.call_soon(self._join)

    def _join(self) -> None:
        """Start the tick in its early hooks' wake-up, unless what they woke gave a worker thread a
        job meanwhile (the NAT monitor's tick, kicked by its hook, starts a conntrack pass every
        30 s): then at its slot, that job having had EARLY to reach the round's gate."""
        if self.idle():
            self.joined += 1
            self._tick()
        else:
            self._starts = self._due
            self._timer = asyncio.get_running_loop().call_at(self._due, self._tick)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        if self.lag is not None:
            self.lag.observe(max(loop.time() - self._starts, 0.0))
        if self.on_round is not None:
            self.on_round()
        for hook in self.hooks:
            hook()
        self._slice(list(self._watchers), 0)

    def _slice(self, round_: list[NamespaceWatcher], at: int) -> None:
        """Sample the round's watchers from ``at`` on for SLICE seconds; the rest in the next slice."""
        self._timer = None
        # What each namespace's sample costs the loop's thread in CPU (see NamespaceWatcher.account),
        # without a CPU-clock read (a system call, 1-10 µs) per namespace: a sample's wall time is
        # an upper bound of its CPU, exact enough when it is within the budget. Only a sample whose
        # wall time is over the budget reads the CPU clock, and is charged the CPU used since the
        # last read less the wall time of the samples in between: at least its own CPU, whatever
        # time the thread spent waiting for the GIL while another thread of the daemon worked.
        budget = self.budget
        wall = time.perf_counter
        ends = wall() + self.SLICE
        cpu_mark = time.thread_time()
        since_mark = 0.0
        watchers = self._watchers
        n = len(round_)
        while at < n:
            watcher = round_[at]
            at += 1
            if watcher not in watchers:  # discarded since the round began
                continue
            if watcher.skip:
                watcher.skip -= 1
                continue
            started = wall()
            watcher.sample_guarded()
            done = wall()
            spent = done - started
            if spent > budget:
                cpu = time.thread_time()
                cost = max(cpu - cpu_mark - since_mark, 0.0)
                cpu_mark, since_mark = cpu, 0.0
            else:
                cost = spent
                since_mark += spent
            watcher.account(cost)
            watcher.skip = watcher.every - 1
            if done >= ends and at < n:
                self._timer = asyncio.get_running_loop().call_soon(self._slice, round_, at)
                return
        self.gate.open()
        if self._watchers:
            self._arm()  # first: a hook that fails must not stop the ticks
        for hook in self.done_hooks:
            hook()

    def close(self) -> None:
        """Stop ticking."""
        for handle in (self._timer, self._early, self._gate_close):
            if handle is not None:
                handle.cancel()
        self._timer = self._early = self._gate_close = None
        self._watchers.clear()
        self.gate.open()


@dataclass
class WatcherSlot:
    """The watcher of one namespace, and how often attaching it has failed in a row."""

    watcher: NamespaceWatcher
    task: asyncio.Task
    failures: int = 0
    retry_at: float = 0.0  # loop time before which a watcher that ended is not started again
    started_at: float = 0.0
    ended: bool = False  # its end was handled (failure counted, backoff set): it may be started again


class WatcherPool:
    """Runs one :class:`NamespaceWatcher` per namespace in the registry, no more, no less.

    A watcher that could not attach, or that failed, is started again with a backoff that doubles
    with each consecutive failure (RETRY_MIN to RETRY_MAX seconds) for as long as its namespace is
    in the registry. Others can follow which namespaces are attached (:meth:`subscribe`) and use
    the namespace descriptor an attached watcher holds (:meth:`netns_fd`): that is the only way
    the rest of the daemon enters a container's namespace.
    """

    def __init__(
        self,
        registry: ContainerRegistry,
        opener: NamespaceOpener,
        specs: list[SamplerSpec],
        context: SamplerContext,
        store: SampleStore,
        instruments: Instruments,
        supervisor: TaskSupervisor | None = None,
    ) -> None:
        self.registry = registry
        self.opener = opener
        self.specs = specs
        self.context = context
        self.interval = context.interval
        self.max_every = max(1, int(MAX_SAMPLE_EVERY / context.interval))
        self.store = store
        self.instruments = instruments
        # Every name the errors counter can take exists from the start, at 0: a rate() over it
        # (dashboards, alert rules) then has a series before the first error.
        for name in ("attach", "sample", "socket_walk", *(spec.name for spec in specs)):
            instruments.sampler_errors.labels(name)
        self.supervisor = supervisor or TaskSupervisor()
        self.walk_executor = worker_threads("nstap-walk")
        self.walks = WalkPacer(context.walk_budget)  # every namespace's walks within the budget, each round
        host = context.host_links
        self.ticker = Ticker(self.interval, host.new_round if host is not None else None, instruments.tick_lag, context.sample_budget)
        self.ticker.hooks.append(lambda: self.walks.new_round(self.ticker.watching))
        self.watchers: dict[int, WatcherSlot] = {}
        self._attached: dict[int, NamespaceWatcher] = {}
        self._listeners: list[Callable[[], None]] = []
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        # The kernel's drop counts of a namespace by reason (the eBPF collector), or None.
        self.kernel_drops: Callable[[int], Mapping[str, int] | None] = lambda inode: None
        self.kernel_drops_at: Callable[[], float | None] = lambda: None  # when those were read
        # The namespace's DNS lookups so far (the DNS collector), or None.
        self.dns: Callable[[int], Lookups | None] = lambda inode: None

    def attach_failed(self, inode: int) -> bool:
        """Whether attaching the namespace's watcher failed at least once (it is retried)."""
        slot = self.watchers.get(inode)
        return slot is not None and slot.failures > 0

    def set_interval(self, interval: float) -> None:
        """Sample every ``interval`` seconds from the next tick on (a configuration reload)."""
        self.interval = interval
        self.max_every = max(1, int(MAX_SAMPLE_EVERY / interval))
        self.ticker.interval = interval

    def start(self) -> None:
        """Follow the registry from now on."""
        self.registry.subscribe(self.reconcile)
        self.reconcile()

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` whenever a namespace was attached or detached (on the event loop)."""
        self._listeners.append(listener)

    def _notify(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception as exc:  # noqa: BLE001 - one listener's bug must not starve the others
                self.supervisor.failed("watcher-listener", exc)

    def attached(self, watcher: NamespaceWatcher) -> None:
        """Called by a watcher once its handles are open."""
        self._attached[watcher.namespace.inode] = watcher
        self._notify()

    def detached(self, watcher: NamespaceWatcher) -> None:
        """Called by a watcher before it closes its handles."""
        if self._attached.get(watcher.namespace.inode) is watcher:
            del self._attached[watcher.namespace.inode]
            self._notify()

    def reconcile(self) -> None:
        """Start watchers for new namespaces (and again for those whose watcher ended, once their
        backoff is over); cancel those whose namespace left the registry."""
        if self._closed:
            return
        wanted = self.registry.namespaces()
        for inode, slot in list(self.watchers.items()):
            if inode not in wanted:
                slot.task.cancel()
                del self.watchers[inode]
            else:
                slot.watcher.namespace = wanted[inode]  # owner or members may have changed
        loop = asyncio.get_running_loop()
        now = loop.time()
        for inode, namespace in wanted.items():
            slot = self.watchers.get(inode)
            if slot is None:
                self.watchers[inode] = self._start(namespace, 0)
            elif slot.ended and now >= slot.retry_at:
                self.watchers[inode] = self._start(namespace, slot.failures)

    def _start(self, namespace: WatchedNamespace, failures: int) -> WatcherSlot:
        loop = asyncio.get_running_loop()
        watcher = NamespaceWatcher(namespace, self)
        task = loop.create_task(watcher.run(), name=f"watch-netns-{namespace.inode}")
        slot = WatcherSlot(watcher, task, failures, started_at=loop.time())
        task.add_done_callback(lambda t: self._ended(slot, t))
        return slot

    def _ended(self, slot: WatcherSlot, task: asyncio.Task) -> None:
        if task.cancelled() or self._closed:
            return
        slot.ended = True
        inode = slot.watcher.namespace.inode
        exc = task.exception()
        if exc is not None:
            self.supervisor.failed("watcher", exc, netns=inode, container=slot.watcher.namespace.owner.name)
        if self.watchers.get(inode) is not slot:
            return  # its namespace left the registry meanwhile
        loop = asyncio.get_running_loop()
        if loop.time() - slot.started_at >= RETRY_HEALTHY:
            slot.failures = 0
        delay = min(RETRY_MIN * 2**slot.failures, RETRY_MAX)
        slot.failures += 1
        slot.retry_at = loop.time() + delay
        slot.watcher.log.info("watcher_retry_scheduled", retry_in=delay, failures=slot.failures)
        self._schedule_retry(delay)

    def _schedule_retry(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        if self._retry is not None and self._retry.when() <= when:
            return
        if self._retry is not None:
            self._retry.cancel()
        self._retry = loop.call_at(when, self._retry_due)

    def _retry_due(self) -> None:
        self._retry = None
        self.reconcile()
        pending = [slot.retry_at for slot in self.watchers.values() if slot.ended]
        if pending:
            self._schedule_retry(max(min(pending) - asyncio.get_running_loop().time(), 0.0))

    def owns_samples(self, watcher: NamespaceWatcher) -> bool:
        """False if another watcher of the same namespace has been started since (its samples are its own)."""
        slot = self.watchers.get(watcher.namespace.inode)
        return slot is None or slot.watcher is watcher

    def watched(self) -> dict[int, WatchedNamespace]:
        """The namespaces with an attached watcher."""
        return {inode: w.namespace for inode, w in self._attached.items()}

    def netns_fd(self, inode: int) -> int | None:
        """The descriptor of namespace ``inode`` held by its attached watcher (None if not attached).

        Valid until the watcher detaches, which happens on the event loop: a caller that needs it
        across an ``await`` must ``os.dup`` it first.
        """
        watcher = self._attached.get(inode)
        if watcher is None or watcher.handles is None or watcher.handles.closed:
            return None
        return watcher.handles.ns_fd

    async def stop(self) -> None:
        """Cancel every watcher and wait until their handles are closed."""
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        tasks = [slot.task for slot in self.watchers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.watchers.clear()
        self.ticker.close()
        self.walk_executor.shutdown(wait=True)
