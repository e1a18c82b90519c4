"""A runtime source in-process against the real dockerd, with raw events injected at the source."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from conftest import Containers
from nstap.registry import ContainerRegistry
from nstap.runtime.exits import ProcessExits
from nstap.runtime.source import RuntimeSource

pytestmark = pytest.mark.docker


async def until(predicate, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout}s")
        await asyncio.sleep(0.05)


@pytest.fixture
async def docker_source(runtimes, request):
    registry = ContainerRegistry()
    exits = ProcessExits(asyncio.get_running_loop())
    source = RuntimeSource(
        "docker",
        Path("/var/run/docker.sock"),
        registry,
        exits,
        proc_root=Path("/proc"),
        host_netns=os.stat("/proc/self/ns/net").st_ino,
        reconcile_interval=getattr(request, "param", 1.0),
        max_backoff=0.5,
    )
    task = asyncio.create_task(source.run())
    await until(lambda: source.up, 10)
    yield source, registry, exits
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    exits.forget_all()


MALFORMED = [
    None,
    42,
    "start",
    [],
    {},
    {"Type": "container"},
    {"Type": "container", "Action": "start"},
    {"Type": "container", "Action": "start", "Actor": "not-a-dict"},
    {"Type": "container", "Action": "exec_start: sh -c true", "Actor": {"ID": "a" * 64}},
    {"Type": "network", "Action": "connect", "Actor": {"Attributes": {"container": "short"}}},
    {"Type": "network", "Action": "connect", "Actor": {"Attributes": "nope"}},
    {"Type": "image", "Action": "pull", "Actor": {"ID": "x"}},
]


async def test_injected_events(docker_source, containers: Containers, docker_image: str) -> None:
    source, registry, exits = docker_source
    cid = await asyncio.to_thread(containers.docker, docker_image, "sleep", "600", name="inject")
    await until(lambda: registry.get(cid) is not None, 3)
    record = registry.get(cid)
    assert record.runtime == "docker" and record.netns == os.stat(f"/proc/{record.pid}/ns/net").st_ino

    for event in MALFORMED:
        source.handle_event(event)
    source.handle_event({"Type": "container", "Action": "start", "Actor": {"ID": "f" * 64}})  # no such container
    await asyncio.sleep(0.3)
    assert registry.get(cid) == record and registry.get("f" * 64) is None

    # A "die" that did not happen removes the container at once; the next reconcile repairs it.
    source.handle_event({"Type": "container", "Action": "die", "Actor": {"ID": cid}})
    assert registry.get(cid) is None
    await until(lambda: registry.get(cid) is not None, 3)

    # A duplicated start changes nothing.
    source.handle_event({"Type": "container", "Action": "start", "Actor": {"ID": cid}})
    source.handle_event({"Type": "container", "Action": "start", "Actor": {"ID": cid}})
    await asyncio.sleep(0.3)
    assert registry.get(cid) == record


@pytest.mark.parametrize("docker_source", [3600.0], indirect=True)  # no periodic reconcile during the test
async def test_process_exit_seen_without_events(docker_source, containers: Containers, docker_image: str) -> None:
    source, registry, exits = docker_source
    # Stop following events before the container starts: it is found by the list at connect
    # only if it exists then, so reconcile once by hand; from then on only the kernel can tell.
    source.handle_event = lambda event: None  # type: ignore[method-assign]
    cid = await asyncio.to_thread(containers.docker, docker_image, "sleep", "600", name="exit")
    await source.reconcile()
    assert registry.get(cid) is not None and len(exits) >= 1
    reconciles = 0
    real_reconcile = source.reconcile

    async def counted() -> None:
        nonlocal reconciles
        reconciles += 1
        await real_reconcile()

    source.reconcile = counted  # type: ignore[method-assign]
    os.kill(registry.get(cid).pid, 9)
    await until(lambda: registry.get(cid) is None, 1)
    assert reconciles == 0  # it was the pidfd, not a list


async def test_process_exits_fires_once() -> None:
    exits = ProcessExits(asyncio.get_running_loop())
    proc = subprocess.Popen(["sleep", "60"])
    fired: list[str] = []
    assert exits.watch("k", proc.pid, fired.append)
    assert exits.watch("k", proc.pid, fired.append)  # same pid again: no second watch
    assert len(exits) == 1
    proc.kill()
    proc.wait()
    await until(lambda: fired, 2)
    await asyncio.sleep(0.1)
    assert fired == ["k"] and len(exits) == 0
    assert not exits.watch("gone", proc.pid, fired.append)  # already reaped
