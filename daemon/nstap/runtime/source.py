"""A runtime source: one Docker-API endpoint (dockerd, or Podman's compatible service), followed for good.

Connect, subscribe to events, list what runs, then apply events as they come. Events are hints:
each one makes the source re-inspect that container and put the answer in the registry, so a
duplicated, reordered or lost event cannot leave the registry wrong for long — and a full list
after every reconnect and every ``reconcile_interval`` repairs anything a lost event broke.
An endpoint that is absent or down is a state (``up`` False, one log line), never an error.
Anything else that goes wrong is a bug or a hostile answer: one event or one reconcile that fails
that way is reported to the task supervisor (logged with its traceback, counted) and the source
carries on; a session that fails that way ends, and the supervisor starts the source again.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import structlog

from ..registry import ContainerRegistry
from ..supervisor import TaskSupervisor
from .exits import ProcessExits
from .records import ContainerRecord, RecordError, netns_inode, record_from_inspect

log = structlog.get_logger("nstap.runtime")

# Container actions after which the container's state is re-read. die/destroy remove it at once.
REFRESH_ACTIONS = frozenset({"start", "restart", "pause", "unpause", "kill", "stop", "rename", "update", "create"})
GONE_ACTIONS = frozenset({"die", "destroy", "remove", "died"})
NETWORK_ACTIONS = frozenset({"connect", "disconnect"})
INSPECT_CONCURRENCY = 8
# Connections to one runtime socket, at most: the event stream, a list, the inspects. aiohttp's
# default (100) kept idle keep-alive connections open after bursts of container churn: the
# daemon's descriptors grew with every burst (make soak, 1,000 start/stop cycles).
POOL_LIMIT = INSPECT_CONCURRENCY + 4
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=15, connect=5)
LIBPOD_VERSION = re.compile(r"^\d{1,3}\.\d{1,3}(\.\d{1,3})?$")


FINGERPRINT_KEYS = ("State", "Names", "Image", "Labels", "Ports", "NetworkSettings", "HostConfig")  # not "Status": "Up 5 minutes"


def _fingerprint(summary: dict[str, Any]) -> str:
    """The parts of a ``/containers/json`` entry that matter to a record, as one comparable string."""
    return json.dumps(summary, sort_keys=True, default=str)


class RuntimeClient(aiodocker.Docker):
    """An API client for one runtime socket with a bounded connection pool, which it closes too
    (aiodocker leaves a connector it was given open)."""

    def __init__(self, socket_path: str) -> None:
        self._pool = aiohttp.UnixConnector(path=socket_path, limit=POOL_LIMIT)
        super().__init__(url="http://localhost", connector=self._pool, timeout=REQUEST_TIMEOUT)  # the host part of every request

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            await self._pool.close()


def runtime_client(url: str) -> aiodocker.Docker:
    """The client for ``unix://PATH``."""
    return RuntimeClient(url.removeprefix("unix://"))


class RuntimeSource:
    """Keeps the registry in step with one runtime endpoint."""

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
        docker_factory: Callable[[str], Any] | None = None,
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
        self.kind = ""  # "docker" or "podman", from the endpoint's /version
        self.version = ""
        self.events_total = 0
        self.reconnects_total = 0
        self._docker_factory = docker_factory or runtime_client
        self._docker: Any = None
        self._refreshing: dict[str, asyncio.Task] = {}
        self._dirty: set[str] = set()
        self._inspect_slots = asyncio.Semaphore(INSPECT_CONCURRENCY)
        self._fingerprints: dict[str, str] = {}  # container id -> its list entry when last inspected
        self._log = log.bind(runtime=name, socket=str(socket_path))
        self._state = "starting"
        self._libpod_api = "4.0.0"

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
            docker = self._docker_factory(f"unix://{self.socket_path}")
            connected = False
            try:
                connected = await self._session(docker)
            except asyncio.CancelledError:
                raise
            except (aiodocker.DockerError, aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
                self._set_down("unreachable", "runtime_unreachable", error=str(exc) or type(exc).__name__)
            finally:
                self._docker = None
                await self._stop_refreshes()
                await docker.close()
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

    async def _session(self, docker: Any) -> bool:
        """One connection: subscribe, reconcile, apply events until the stream ends. True if it connected."""
        version = await docker.version()
        if not isinstance(version, dict):
            raise ValueError("the endpoint's /version answer is not an object: not a Docker API")
        components = [c for c in version.get("Components") or () if isinstance(c, dict)] if isinstance(version.get("Components"), list) else []
        podman = [c for c in components if "Podman" in str(c.get("Name", ""))]
        self.kind = "podman" if podman else "docker"
        self.version = str(version.get("Version", ""))[:64]
        if podman:  # libpod's endpoints want their own API version in the path
            details = podman[0].get("Details")
            api = str(details.get("APIVersion", "")) if isinstance(details, dict) else ""
            self._libpod_api = api if LIBPOD_VERSION.match(api) else "4.0.0"
        self._docker = docker
        self._fingerprints = {}  # a new connection: inspect everything once
        subscriber = docker.events.subscribe(create_task=False)
        stream = asyncio.create_task(docker.events.run(filters={"type": ["container", "network"]}))
        try:
            await self.reconcile()
            self.up = True
            self.tried = True
            self._state = "up"
            self._log.info("runtime_connected", kind=self.kind, version=self.version, containers=len(self.registry.runtime_ids(self.name)))
            reconciler = asyncio.create_task(self._reconcile_forever())
            try:
                while (event := await subscriber.get()) is not None:
                    self.events_total += 1
                    try:
                        self.handle_event(event)
                    except Exception as exc:  # noqa: BLE001 - one event that breaks the code must not end the stream
                        self.supervisor.failed(f"runtime-{self.name}", exc, event_type=str(event.get("Type"))[:32] if isinstance(event, dict) else "")
                if stream.done() and not stream.cancelled() and stream.exception() is not None:
                    self._log.warning("event_stream_failed", error=str(stream.exception()))
            finally:
                reconciler.cancel()
                await asyncio.gather(reconciler, return_exceptions=True)
        finally:
            stream.cancel()
            await asyncio.gather(stream, return_exceptions=True)
            await docker.events.stop()
        return True

    async def _reconcile_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reconcile_interval)
            try:
                await self.reconcile()
            except (aiodocker.DockerError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                # The event stream decides whether the endpoint is gone; a failed list is retried.
                self._log.warning("reconcile_failed", error=str(exc))
            except Exception as exc:  # noqa: BLE001 - one broken reconcile must not end the periodic ones
                self.supervisor.failed(f"runtime-{self.name}", exc)

    # -- listing and inspecting --------------------------------------------------------------

    async def reconcile(self) -> None:
        """List the running containers and make them the runtime's set in the registry.

        A container is inspected again only when it is new or its list entry changed (state,
        name, labels, networks, ports): a periodic reconcile of a quiet host is one list call.
        """
        docker = self._docker
        summaries = await docker.containers.list(filters={"status": ["running", "paused"]})
        fingerprints = {c.id: _fingerprint({k: c[k] for k in FINGERPRINT_KEYS if k in c}) for c in summaries}
        stale = [cid for cid, fp in fingerprints.items() if self._fingerprints.get(cid) != fp or self.registry.get(cid) is None]
        pods = await self._pod_names(docker, None) if stale else {}
        results = await asyncio.gather(*(self._inspect(docker, cid, pods) for cid in stale))
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

    async def _pod_names(self, docker: Any, container_id: str | None) -> dict[str, str]:
        """Podman only: container id -> pod name, from libpod's list (the compat API has no pod name)."""
        if self.kind != "podman":
            return {}
        params: dict[str, str] = {"all": "true"}
        if container_id:
            params["filters"] = json.dumps({"id": [container_id]})
        # libpod's own endpoint, through aiodocker's public session and host.
        url = f"{docker.docker_host}/v{self._libpod_api}/libpod/containers/json"
        try:
            async with docker.session.get(url, params=params, timeout=REQUEST_TIMEOUT) as response:
                if response.status != 200:
                    raise aiodocker.DockerError(response.status, {"message": f"libpod list answered {response.status}"})
                listing = await response.json()
        except (aiodocker.DockerError, aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            self._log.warning("pod_names_unavailable", error=str(exc))
            return {}
        if not isinstance(listing, list):
            return {}
        return {str(c["Id"]): str(c.get("PodName") or "") for c in listing if isinstance(c, dict) and "Id" in c}

    async def _inspect(self, docker: Any, container_id: str, pods: dict[str, str]) -> ContainerRecord | None:
        """Inspect one container; None if it is not running (or vanished, or makes no sense)."""
        async with self._inspect_slots:
            try:
                data = await docker.containers.container(container_id).show()
            except aiodocker.DockerError as exc:
                if exc.status == 404:
                    return None
                raise
        state = data.get("State") if isinstance(data, dict) else None
        if not isinstance(state, dict) or not (state.get("Running") or state.get("Paused")):
            return None
        try:
            record = record_from_inspect(data, self.name, pods.get(data.get("Id", ""), ""))
        except RecordError as exc:
            self._log.warning("container_skipped", container_id=str(container_id)[:12], reason=str(exc))
            return None
        inode = netns_inode(self.proc_root, record.pid)
        if not inode:  # exited between inspect and now
            return None
        return record.with_netns(inode, self.host_netns)

    def _watch_exit(self, record: ContainerRecord) -> None:
        if not self.exits.watch(record.id, record.pid, self._process_exited):
            self._process_exited(record.id)

    def _process_exited(self, container_id: str) -> None:
        """The container's process exited (seen by the kernel): drop it now, then ask the runtime."""
        record = self.registry.remove(container_id)
        if record is not None:
            self._log.debug("container_process_exited", container=record.name, container_id=record.short_id)
        if self._docker is not None:
            self.refresh(container_id)

    # -- events ------------------------------------------------------------------------------

    def handle_event(self, event: Any) -> None:
        """Apply one raw event from the runtime's stream (anything malformed is ignored)."""
        if not isinstance(event, dict):
            return
        etype = event.get("Type")
        action = str(event.get("Action") or event.get("status") or "").split(":", 1)[0]
        actor = event.get("Actor") if isinstance(event.get("Actor"), dict) else {}
        if etype == "container":
            cid = str(actor.get("ID") or event.get("id") or "")
            if not cid:
                return
            if action in GONE_ACTIONS:
                self.exits.forget(cid)
                self.registry.remove(cid)
            elif action in REFRESH_ACTIONS:
                self.refresh(cid)
        elif etype == "network" and action in NETWORK_ACTIONS:
            attributes = actor.get("Attributes") if isinstance(actor.get("Attributes"), dict) else {}
            cid = str(attributes.get("container") or "")
            if cid and len(cid) >= 12:
                self.refresh(cid)

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
        docker = self._docker
        if docker is None:
            return
        try:
            pods = await self._pod_names(docker, container_id)
            record = await self._inspect(docker, container_id, pods)
        except (aiodocker.DockerError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            # One failed inspect: the next event or reconcile retries. Not worth a reconnect.
            self._log.warning("inspect_failed", container_id=container_id[:12], error=str(exc))
            return
        if record is None:
            self.exits.forget(container_id)
            self.registry.remove(container_id)
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

