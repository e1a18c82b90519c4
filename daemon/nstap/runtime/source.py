"""A runtime source: one Docker-API endpoint (dockerd, or Podman's compatible service), followed for good.

The connection loop, reconciles, re-inspects and exit watches are :class:`.follow.EndpointFollower`'s;
this module speaks the Docker API: ``/version``, ``/events``, ``/containers/json`` and inspect.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp

from ..registry import ContainerRegistry
from ..supervisor import TaskSupervisor
from .exits import ProcessExits
from .follow import INSPECT_CONCURRENCY, EndpointFollower
from .records import ContainerRecord, RecordError, netns_inode, record_from_inspect

# Container actions after which the container's state is re-read. die/destroy remove it at once.
REFRESH_ACTIONS = frozenset({"start", "restart", "pause", "unpause", "kill", "stop", "rename", "update", "create"})
GONE_ACTIONS = frozenset({"die", "destroy", "remove", "died"})
NETWORK_ACTIONS = frozenset({"connect", "disconnect"})
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


class RuntimeSource(EndpointFollower):
    """Keeps the registry in step with one Docker-API endpoint (dockerd or Podman)."""

    SESSION_ERRORS = (aiodocker.DockerError, aiohttp.ClientError, OSError, asyncio.TimeoutError)
    CALL_ERRORS = SESSION_ERRORS

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
        super().__init__(
            name, socket_path, registry, exits, proc_root=proc_root, host_netns=host_netns,
            reconcile_interval=reconcile_interval, max_backoff=max_backoff, supervisor=supervisor,
        )
        self._docker_factory = docker_factory or runtime_client
        self._libpod_api = "4.0.0"

    # -- connection --------------------------------------------------------------------------

    def _connect(self) -> Any:
        return self._docker_factory(f"unix://{self.socket_path}")

    async def _close(self, client: Any) -> None:
        await client.close()

    async def _hello(self, docker: Any) -> None:
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

    async def _events(self, docker: Any) -> AsyncIterator[Any]:
        subscriber = docker.events.subscribe(create_task=False)
        stream = asyncio.create_task(docker.events.run(filters={"type": ["container", "network"]}))
        try:
            while (event := await subscriber.get()) is not None:
                yield event
            if stream.done() and not stream.cancelled() and stream.exception() is not None:
                self._log.warning("event_stream_failed", error=str(stream.exception()))
        finally:
            stream.cancel()
            await asyncio.gather(stream, return_exceptions=True)
            await docker.events.stop()

    def _event_fields(self, event: Any) -> dict[str, str]:
        return {"event_type": str(event.get("Type"))[:32] if isinstance(event, dict) else ""}

    # -- listing and inspecting --------------------------------------------------------------

    async def _list(self, docker: Any) -> dict[str, str]:
        summaries = await docker.containers.list(filters={"status": ["running", "paused"]})
        return {c.id: _fingerprint({k: c[k] for k in FINGERPRINT_KEYS if k in c}) for c in summaries}

    async def _inspect_many(self, docker: Any, container_ids: Iterable[str]) -> list[ContainerRecord | None]:
        pods = await self._pod_names(docker, None)
        return list(await asyncio.gather(*(self._inspect(docker, cid, pods) for cid in container_ids)))

    async def _inspect_one(self, docker: Any, container_id: str) -> ContainerRecord | None:
        pods = await self._pod_names(docker, container_id)
        return await self._inspect(docker, container_id, pods)

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
                self._gone(cid)
            elif action in REFRESH_ACTIONS:
                self.refresh(cid)
        elif etype == "network" and action in NETWORK_ACTIONS:
            attributes = actor.get("Attributes") if isinstance(actor.get("Attributes"), dict) else {}
            cid = str(attributes.get("container") or "")
            if cid and len(cid) >= 12:
                self.refresh(cid)
