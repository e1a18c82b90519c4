"""Following one runtime endpoint for good: the part every runtime source shares.

Connect, subscribe to events, list what runs, then apply events as they come. Events are hints:
each one makes the source re-inspect that container and put the answer in the registry, so a
duplicated, reordered or lost event cannot leave the registry wrong for long — and a full list
after every reconnect and every ``reconcile_interval`` repairs anything a lost event broke.
A pidfd per container process (:mod:`.exits`) removes a container the moment its process exits,
even while the endpoint is down.
An endpoint that is absent or down is a state (``up`` False, one log line), never an error.
Anything else that goes wrong is a bug or a hostile answer: one event or one reconcile that fails
that way is reported to the task supervisor (logged with its traceback, counted) and the source
carries on; a session that fails that way ends, and the supervisor starts the source again.

A runtime's client, listing, inspecting and event vocabulary live in its subclass
(:class:`.source.RuntimeSource` for the Docker API, :class:`.containerd.ContainerdSource`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import structlog

from ..registry import ContainerRegistry
from ..supervisor import TaskSupervisor
from .exits import ProcessExits
from .records import ContainerRecord

log = structlog.get_logger("nstap.runtime")

INSPECT_CONCURRENCY = 8


class EndpointFollower:
    """Keeps the registry in step with one runtime endpoint (subclasses speak its API)."""

    # Failures of the endpoint (down, refusing, timing out): a state, not a bug. Subclasses add their client's.
    SESSION_ERRORS: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError)
    CALL_ERRORS: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError)

    def __init__(
        self,
        name: str,
        socket_path: Path,
        registry: ContainerRegistry,
        exits: ProcessExits,
        *,
        proc_root: Path,
        host_netns: int,
        reconcile_interval: float,
        max_backoff: float,
        supervisor: TaskSupervisor | None = None,
    ) -> None:
        self.name = name
        self.supervisor = supervisor or TaskSupervisor()
        self.socket_path = socket_path
        self.registry = registry
        self.exits = exits
        self.proc_root = proc_root
        self.host_netns = host_netns
        self.reconcile_interval = reconcile_interval
        self.max_backoff = max_backoff
        self.up = False
        self.tried = False  # the first connection attempt ended (either way): readiness waits for it
        self.kind = ""  # "docker", "podman", "containerd": from the endpoint itself
        self.version = ""
        self.events_total = 0
        self.reconnects_total = 0
        self._client: Any = None  # set while a session is connected
        self._refreshing: dict[str, asyncio.Task] = {}
        self._dirty: set[str] = set()
        self._inspect_slots = asyncio.Semaphore(INSPECT_CONCURRENCY)
        self._fingerprints: dict[str, str] = {}  # container id -> its list entry when last inspected
        self._log = log.bind(runtime=name, socket=str(socket_path))
        self._state = "starting"

    # -- what a runtime's subclass provides --------------------------------------------------

    def _connect(self) -> Any:
        """A new client for the endpoint (not yet talked to)."""
        raise NotImplementedError

    async def _close(self, client: Any) -> None:
        raise NotImplementedError

    async def _hello(self, client: Any) -> None:
        """Ask the endpoint who it is (sets ``kind`` and ``version``); raises if it is not one."""
        raise NotImplementedError

    def _events(self, client: Any) -> AsyncIterator[Any]:
        """The event stream, subscribed before the first list; it ends when the endpoint is lost."""
        raise NotImplementedError

    async def _list(self, client: Any) -> dict[str, str]:
        """Running (and paused) containers: id -> a fingerprint of what the list says about it."""
        raise NotImplementedError

    async def _inspect_many(self, client: Any, container_ids: Iterable[str]) -> list[ContainerRecord | None]:
        """Records of listed containers (None for those not running any more)."""
        return list(await asyncio.gather(*(self._inspect_one(client, cid) for cid in container_ids)))

    async def _inspect_one(self, client: Any, container_id: str) -> ContainerRecord | None:
        """The record of one container, None if it is not running (or vanished, or makes no sense)."""
        raise NotImplementedError

    def handle_event(self, event: Any) -> None:
        """Apply one raw event from the runtime's stream (anything malformed is ignored)."""
        raise NotImplementedError

    def _event_fields(self, event: Any) -> dict[str, str]:
        """What to log about an event whose handling failed."""
        return {}

    # -- connection loop ---------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the endpoint forever: connect, follow, and reconnect with capped backoff."""
        delay = 0.0
        while True:
            if delay:
                await asyncio.sleep(delay * random.uniform(0.8, 1.0))
            if not self.socket_path.exists():
                self._set_down("absent", "runtime_absent", level="info")
                delay = self.max_backoff
                continue
            client = self._connect()
            connected = False
            try:
                connected = await self._session(client)
            except asyncio.CancelledError:
                raise
            except (*self.SESSION_ERRORS, ValueError) as exc:
                self._set_down("unreachable", "runtime_unreachable", error=str(exc)[:500] or type(exc).__name__)
            finally:
                self._client = None
                await self._stop_refreshes()
                await self._close(client)
            if connected:
                self.reconnects_total += 1
                delay = min(0.25, self.max_backoff)
                self._set_down("lost", "runtime_lost", level="warning")
            else:
                delay = min(max(delay * 2, 0.25), self.max_backoff)

    def _set_down(self, state: str, event: str, level: str = "warning", **fields: Any) -> None:
        self.up = False
        self.tried = True
        if self._state != state:  # one line per change of state, not one per retry
            self._state = state
            getattr(self._log, level)(event, **fields)

    async def _session(self, client: Any) -> bool:
        """One connection: subscribe, reconcile, apply events until the stream ends. True if it connected."""
        await self._hello(client)
        self._client = client
        self._fingerprints = {}  # a new connection: inspect everything once
        events = self._events(client)
        try:
            await self.reconcile()
            self.up = True
            self.tried = True
            self._state = "up"
            self._log.info("runtime_connected", kind=self.kind, version=self.version, containers=len(self.registry.runtime_ids(self.name)))
            reconciler = asyncio.create_task(self._reconcile_forever())
            try:
                async for event in events:
                    self.events_total += 1
                    try:
                        self.handle_event(event)
                    except Exception as exc:  # noqa: BLE001 - one event that breaks the code must not end the stream
                        self.supervisor.failed(f"runtime-{self.name}", exc, **self._event_fields(event))
            finally:
                reconciler.cancel()
                await asyncio.gather(reconciler, return_exceptions=True)
        finally:
            await events.aclose()
        return True

    async def _reconcile_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reconcile_interval)
            try:
                await self.reconcile()
            except self.CALL_ERRORS as exc:
                # The event stream decides whether the endpoint is gone; a failed list is retried.
                self._log.warning("reconcile_failed", error=str(exc)[:500])
            except Exception as exc:  # noqa: BLE001 - one broken reconcile must not end the periodic ones
                self.supervisor.failed(f"runtime-{self.name}", exc)

    # -- listing and inspecting --------------------------------------------------------------

    async def reconcile(self) -> None:
        """List the running containers and make them the runtime's set in the registry.

        A container is inspected again only when it is new or its list entry changed (state,
        name, labels, networks, ports): a periodic reconcile of a quiet host is one list call.
        """
        client = self._client
        fingerprints = await self._list(client)
        stale = [cid for cid, fp in fingerprints.items() if self._fingerprints.get(cid) != fp or self.registry.get(cid) is None]
        results = await self._inspect_many(client, stale) if stale else []
        fresh = {r.id: r for r in results if r is not None}
        records = [fresh.get(cid) or self.registry.get(cid) for cid in fingerprints]
        records = [r for r in records if r is not None]
        kept = {r.id for r in records}
        self._fingerprints = {cid: fp for cid, fp in fingerprints.items() if cid in kept}
        before = self.registry.runtime_ids(self.name)
        self.registry.replace_runtime(self.name, records)
        for record in records:
            self._watch_exit(record)
        for cid in before - {r.id for r in records}:
            self.exits.forget(cid)

    def _watch_exit(self, record: ContainerRecord) -> None:
        if not self.exits.watch(record.id, record.pid, self._process_exited):
            self._process_exited(record.id)

    def _process_exited(self, container_id: str) -> None:
        """The container's process exited (seen by the kernel): drop it now, then ask the runtime."""
        record = self.registry.remove(container_id)
        if record is not None:
            self._log.debug("container_process_exited", container=record.name, container_id=record.short_id)
        if self._client is not None:
            self.refresh(container_id)

    def _gone(self, container_id: str) -> None:
        """The runtime says the container stopped or was removed: drop it at once."""
        self.exits.forget(container_id)
        self.registry.remove(container_id)

    # -- events ------------------------------------------------------------------------------

    def refresh(self, container_id: str) -> None:
        """Re-inspect one container soon; requests for a container already being inspected coalesce."""
        if container_id in self._refreshing:
            self._dirty.add(container_id)
            return
        self._refreshing[container_id] = self.supervisor.spawn("runtime-refresh", self._refresh(container_id))

    async def _refresh(self, container_id: str) -> None:
        try:
            while True:
                self._dirty.discard(container_id)
                await self._apply_inspect(container_id)
                if container_id not in self._dirty:
                    return
        finally:
            self._refreshing.pop(container_id, None)

    async def _apply_inspect(self, container_id: str) -> None:
        client = self._client
        if client is None:
            return
        try:
            record = await self._inspect_one(client, container_id)
        except self.CALL_ERRORS as exc:
            # One failed inspect: the next event or reconcile retries. Not worth a reconnect.
            self._log.warning("inspect_failed", container_id=container_id[:12], error=str(exc)[:500])
            return
        if record is None:
            self._gone(container_id)
            return
        self.registry.upsert(record)
        self._watch_exit(record)

    async def _stop_refreshes(self) -> None:
        tasks = list(self._refreshing.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._refreshing.clear()
        self._dirty.clear()
