"""A runtime source for containerd's gRPC API (Kubernetes nodes, nerdctl, ``ctr``), several namespaces.

One channel to the socket; the event stream (``/tasks/*``, ``/containers/*`` of every namespace,
only the configured ones applied) and, per namespace, the container and task lists. A container is
running when its task is RUNNING or PAUSED; its network namespace is that of the task's pid.
Ids are only unique within a containerd namespace, so a record's id is ``<id>@<namespace>``.

Kubernetes (the CRI plugin) runs one sandbox container per pod that holds the pod's network
namespace (label ``io.cri-containerd.kind=sandbox``); the pod's containers join it. The sandbox
is the namespace's owner, so a pod is watched once, its series carrying ``pod`` and
``k8s_namespace``. Names: nerdctl's ``nerdctl/name``; for Kubernetes ``<pod>_<container>``
(the sandbox: ``<pod>``); else the containerd id.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError

from .. import labels as nstap_labels
from .containerd_api.events import container_pb2 as container_events
from .containerd_api.events import task_pb2 as task_events
from .containerd_api.services.containers.v1 import containers_pb2, containers_pb2_grpc
from .containerd_api.services.events.v1 import events_pb2, events_pb2_grpc
from .containerd_api.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from .containerd_api.services.version.v1 import version_pb2_grpc
from .containerd_api.types.task import task_pb2
from .follow import EndpointFollower
from .records import ContainerRecord, netns_inode

CALL_TIMEOUT = 15.0
MAX_MESSAGE = 64 << 20  # a List of a busy node's containers carries every OCI spec
MAX_SPEC = 1 << 20  # an OCI spec larger than this is not read (the namespaces only)
EVENT_FILTERS = ['topic~="^/tasks/"', 'topic~="^/containers/"']
POD_NAME = "io.kubernetes.pod.name"
POD_NAMESPACE = "io.kubernetes.pod.namespace"
K8S_CONTAINER = "io.kubernetes.container.name"
CRI_KIND = "io.cri-containerd.kind"
NERDCTL_NAME = "nerdctl/name"
RUNNING = {task_pb2.RUNNING: "running", task_pb2.PAUSED: "paused", task_pb2.PAUSING: "paused"}
# Events whose payload names the container in container_id (tasks) or id (containers).
TASK_EVENTS = {
    "containerd.events.TaskCreate": task_events.TaskCreate,
    "containerd.events.TaskStart": task_events.TaskStart,
    "containerd.events.TaskExit": task_events.TaskExit,
    "containerd.events.TaskDelete": task_events.TaskDelete,
    "containerd.events.TaskPaused": task_events.TaskPaused,
    "containerd.events.TaskResumed": task_events.TaskResumed,
    "containerd.events.TaskOOM": task_events.TaskOOM,
}
CONTAINER_EVENTS = {
    "containerd.events.ContainerCreate": container_events.ContainerCreate,
    "containerd.events.ContainerUpdate": container_events.ContainerUpdate,
    "containerd.events.ContainerDelete": container_events.ContainerDelete,
}
GONE_EVENTS = frozenset({"containerd.events.TaskDelete", "containerd.events.ContainerDelete"})


def record_key(container_id: str, namespace: str) -> str:
    """The registry id of a containerd container."""
    return f"{container_id}@{namespace}"


def _network_mode(labels: Mapping[str, str], spec: Any) -> str:
    """"host", "container:<what it joined>" or "" (a namespace of its own), from the CRI kind and the OCI spec."""
    linux = spec.get("linux") if isinstance(spec, dict) else None
    namespaces = linux.get("namespaces") if isinstance(linux, dict) else None
    network = None
    if isinstance(namespaces, list):
        network = next((n for n in namespaces if isinstance(n, dict) and n.get("type") == "network"), None)
        if network is None:
            return "host"  # no network namespace of its own: the host's
    kind = labels.get(CRI_KIND, "")
    if kind == "sandbox":
        return ""  # the pod's namespace holder, even though CRI gives it a pinned path
    path = network.get("path") if isinstance(network, dict) else None
    if kind == "container":
        return f"container:{labels.get(POD_NAME, '') or path or 'sandbox'}"[:256]
    return f"container:{path}"[:256] if isinstance(path, str) and path else ""


def _spec(container: containers_pb2.Container) -> Any:
    value = container.spec.value
    if not value or len(value) > MAX_SPEC:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return None


def record_from_containerd(container: containers_pb2.Container, task: task_pb2.Process, namespace: str, runtime: str) -> ContainerRecord | None:
    """A record from containerd's container and its task; None if the task is not running."""
    status = RUNNING.get(task.status)
    if status is None or task.pid <= 0 or not container.id:
        return None
    all_labels = dict(container.labels)
    labels = nstap_labels.kept(all_labels)
    pod = all_labels.get(POD_NAME, "")[: nstap_labels.MAX_VALUE]
    k8s_container = all_labels.get(K8S_CONTAINER, "")[: nstap_labels.MAX_VALUE]
    if all_labels.get(NERDCTL_NAME):
        name = all_labels[NERDCTL_NAME][: nstap_labels.MAX_VALUE]
    elif pod and all_labels.get(CRI_KIND) == "sandbox":
        name = pod
    elif pod and k8s_container:
        name = f"{pod}_{k8s_container}"
    else:
        name = container.id[: nstap_labels.MAX_VALUE]
    created = container.created_at.ToJsonString() if container.HasField("created_at") else ""
    return ContainerRecord(
        id=record_key(container.id, namespace),
        name=name,
        runtime=runtime,
        pid=task.pid,
        status=status,
        image=container.image[: nstap_labels.MAX_VALUE],
        labels=labels,
        pod=pod,
        k8s_namespace=all_labels.get(POD_NAMESPACE, "")[: nstap_labels.MAX_VALUE],
        network_mode=_network_mode(all_labels, _spec(container)),
        started_at=created,
    )


class ContainerdSource(EndpointFollower):
    """Keeps the registry in step with one containerd socket, over the given containerd namespaces."""

    SESSION_ERRORS = (grpc.RpcError, OSError, asyncio.TimeoutError)
    CALL_ERRORS = SESSION_ERRORS

    def __init__(self, *args: Any, namespaces: Iterable[str] = ("k8s.io", "default"), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.namespaces = tuple(namespaces)
        self._listed: dict[str, tuple[containers_pb2.Container, task_pb2.Process, str]] = {}

    # -- connection --------------------------------------------------------------------------

    def _connect(self) -> Any:
        return grpc.aio.insecure_channel(
            f"unix://{self.socket_path}",
            options=[("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.enable_retries", 0)],
        )

    async def _close(self, channel: Any) -> None:
        await channel.close()

    async def _hello(self, channel: Any) -> None:
        answer = await version_pb2_grpc.VersionStub(channel).Version(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
        self.kind = "containerd"
        self.version = answer.version[:64]

    async def _events(self, channel: Any) -> AsyncIterator[Any]:
        call = events_pb2_grpc.EventsStub(channel).Subscribe(events_pb2.SubscribeRequest(filters=EVENT_FILTERS))
        try:
            async for envelope in call:
                yield envelope
        except grpc.RpcError as exc:  # containerd went away: the stream ends, the session is lost
            self._log.warning("event_stream_failed", error=str(exc.details() if hasattr(exc, "details") else exc)[:500])
        finally:
            call.cancel()

    def _event_fields(self, event: Any) -> dict[str, str]:
        return {"event_topic": str(getattr(event, "topic", ""))[:64]}

    # -- listing and inspecting --------------------------------------------------------------

    @staticmethod
    def _metadata(namespace: str) -> tuple[tuple[str, str], ...]:
        return (("containerd-namespace", namespace),)

    async def _list_namespace(self, channel: Any, namespace: str) -> list[tuple[containers_pb2.Container, task_pb2.Process]]:
        md = self._metadata(namespace)
        tasks = await tasks_pb2_grpc.TasksStub(channel).List(tasks_pb2.ListTasksRequest(), metadata=md, timeout=CALL_TIMEOUT)
        # A listed init process names its container in id (container_id is left empty).
        running = {t.container_id or t.id: t for t in tasks.tasks if t.status in RUNNING and t.pid > 0}
        if not running:
            return []
        listing = await containers_pb2_grpc.ContainersStub(channel).List(containers_pb2.ListContainersRequest(), metadata=md, timeout=CALL_TIMEOUT)
        return [(c, running[c.id]) for c in listing.containers if c.id in running]

    async def _list(self, channel: Any) -> dict[str, str]:
        per_namespace = await asyncio.gather(*(self._list_namespace(channel, ns) for ns in self.namespaces))
        self._listed = {}
        fingerprints = {}
        for namespace, pairs in zip(self.namespaces, per_namespace):
            for container, task in pairs:
                key = record_key(container.id, namespace)
                self._listed[key] = (container, task, namespace)
                updated = container.updated_at.ToJsonString() if container.HasField("updated_at") else ""
                fingerprints[key] = f"{task.pid}/{task.status}/{updated}"
        return fingerprints

    async def _inspect_many(self, channel: Any, container_ids: Iterable[str]) -> list[ContainerRecord | None]:
        """Records from the list just made (it carries everything: no call per container)."""
        out = []
        for key in container_ids:
            container, task, namespace = self._listed[key]
            out.append(self._finish(record_from_containerd(container, task, namespace, self.name)))
        return out

    async def _inspect_one(self, channel: Any, key: str) -> ContainerRecord | None:
        container_id, _, namespace = key.rpartition("@")
        if not container_id or namespace not in self.namespaces:
            return None
        md = self._metadata(namespace)
        async with self._inspect_slots:
            try:
                task = await tasks_pb2_grpc.TasksStub(channel).Get(tasks_pb2.GetRequest(container_id=container_id), metadata=md, timeout=CALL_TIMEOUT)
                container = await containers_pb2_grpc.ContainersStub(channel).Get(
                    containers_pb2.GetContainerRequest(id=container_id), metadata=md, timeout=CALL_TIMEOUT
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                raise
        return self._finish(record_from_containerd(container.container, task.process, namespace, self.name))

    def _finish(self, record: ContainerRecord | None) -> ContainerRecord | None:
        if record is None:
            return None
        inode = netns_inode(self.proc_root, record.pid)
        if not inode:  # exited between the answer and now
            return None
        return record.with_netns(inode, self.host_netns)

    # -- events ------------------------------------------------------------------------------

    def handle_event(self, event: Any) -> None:
        """Apply one event envelope: a container of a followed namespace is re-read, or dropped when deleted."""
        if not isinstance(event, events_pb2.Envelope) or event.namespace not in self.namespaces:
            return
        type_name = event.event.type_url.rpartition("/")[2]
        message = TASK_EVENTS.get(type_name) or CONTAINER_EVENTS.get(type_name)
        if message is None:
            return
        payload = message()
        try:  # not Any.Unpack: containerd's type URLs have no "host/" part, which Unpack requires
            payload.ParseFromString(event.event.value)
        except DecodeError:
            return
        container_id = payload.container_id if type_name in TASK_EVENTS else payload.id
        if not container_id:
            return
        key = record_key(container_id, event.namespace)
        if type_name in GONE_EVENTS or (type_name == "containerd.events.TaskExit" and payload.id == container_id):
            self._gone(key)  # the init process exited or the task/container is gone
        else:
            self.refresh(key)
