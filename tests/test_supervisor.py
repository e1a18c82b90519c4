"""Supervision: no task dies silently, no listener starves the others, and the tests' log check works."""

from __future__ import annotations

import asyncio
import json

import pytest
from structlog.testing import capture_logs

from conftest import log_problems
from nstap.registry import ContainerRegistry
from nstap.samples import NamespaceSample, SampleStore
from nstap.supervisor import TaskSupervisor


async def test_a_failing_service_is_logged_counted_and_restarted_with_backoff() -> None:
    counted: list[str] = []
    supervisor = TaskSupervisor(counted.append, min_backoff=0.05, max_backoff=0.2)
    runs: list[float] = []

    async def flaky() -> None:
        runs.append(asyncio.get_running_loop().time())
        if len(runs) < 4:
            raise KeyError("a bug")
        await asyncio.sleep(3600)

    with capture_logs() as logs:
        supervisor.service("flaky", flaky)
        for _ in range(100):
            if len(runs) >= 4:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)
    await supervisor.stop()
    assert len(runs) == 4 and counted == ["flaky"] * 3 and supervisor.failures["flaky"] == 3
    gaps = [b - a for a, b in zip(runs, runs[1:])]
    assert 0.04 <= gaps[0] < gaps[1] < gaps[2] and gaps[2] <= 0.3, gaps  # 0.05, 0.1, 0.2: doubling, capped
    failed = [e for e in logs if e["event"] == "task_failed"]
    assert len(failed) == 3 and failed[0]["task"] == "flaky" and "KeyError" in failed[0]["error"] and failed[0]["exc_info"]


async def test_a_service_that_returns_is_restarted_too() -> None:
    supervisor = TaskSupervisor(min_backoff=0.01)
    runs = []

    async def returns() -> None:
        runs.append(1)
        if len(runs) > 2:
            await asyncio.sleep(3600)

    with capture_logs() as logs:
        supervisor.service("returns", returns)
        await asyncio.sleep(0.2)
    await supervisor.stop()
    assert len(runs) == 3 and supervisor.failures["returns"] == 2
    assert "should run until the daemon stops" in [e for e in logs if e["event"] == "task_failed"][0]["error"]


async def test_a_service_cancelled_by_anyone_but_the_supervisor_is_restarted() -> None:
    supervisor = TaskSupervisor(min_backoff=0.01)
    runs: list[asyncio.Task] = []

    async def victim() -> None:
        runs.append(asyncio.current_task())
        await asyncio.sleep(3600)

    with capture_logs() as logs:
        supervisor.service("victim", victim)
        await asyncio.sleep(0.05)
        runs[0].cancel()  # a stray cancel, not the daemon stopping
        await asyncio.sleep(0.1)
    await supervisor.stop()
    assert len(runs) == 2 and supervisor.failures["victim"] == 1
    assert "only the supervisor stops it" in [e for e in logs if e["event"] == "task_failed"][0]["error"]


async def test_a_spawned_task_that_fails_is_reported_not_lost() -> None:
    supervisor = TaskSupervisor()

    async def boom() -> None:
        raise ValueError("lost without supervision")

    with capture_logs() as logs:
        task = supervisor.spawn("capture", boom())
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)
    assert supervisor.failures["capture"] == 1
    assert [e["task"] for e in logs if e["event"] == "task_failed"] == ["capture"]
    await supervisor.stop()


def test_one_registry_listener_that_raises_does_not_starve_the_others() -> None:
    reported: list[tuple[str, BaseException]] = []
    registry = ContainerRegistry(lambda task, exc: reported.append((task, exc)))
    calls: list[str] = []

    def broken() -> None:
        calls.append("broken")
        raise RuntimeError("listener bug")

    registry.subscribe(broken)
    registry.subscribe(lambda: calls.append("second"))
    from test_registry import rec

    registry.upsert(rec("a", 5))
    assert calls == ["broken", "second"]
    assert reported and reported[0][0] == "registry-listener" and isinstance(reported[0][1], RuntimeError)


def test_one_sample_listener_that_raises_does_not_starve_the_others() -> None:
    reported: list[str] = []
    store = SampleStore(lambda task, exc: reported.append(task))
    got: list[int] = []
    store.subscribe(lambda s: 1 / 0)
    store.subscribe(lambda s: got.append(s.netns))
    store.put(NamespaceSample(7, 0.0, 0.0))
    assert got == [7] and reported == ["sample-listener"]


@pytest.mark.parametrize(
    "line, bad",
    [
        (json.dumps({"event": "watcher_attached", "level": "info"}), False),
        (json.dumps({"event": "task_failed", "level": "error", "error": "KeyError"}), True),
        (json.dumps({"event": "x", "level": "info", "exception": "Traceback (most recent call last):\n ..."}), True),
        (json.dumps({"event": "Task exception was never retrieved", "level": "error"}), True),
        ("Traceback (most recent call last):", True),
        (json.dumps({"event": "runtime_lost", "level": "warning"}), False),
    ],
)
def test_the_log_check_finds_what_it_must(line: str, bad: bool) -> None:
    assert bool(log_problems([line])) == bad


def test_the_log_check_lets_through_only_what_a_test_allows() -> None:
    lines = [json.dumps({"event": "task_failed", "level": "error", "task": "runtime-x"}), json.dumps({"event": "api_error", "level": "error"})]
    assert len(log_problems(lines)) == 2
    assert [p.split(": ")[1] for p in log_problems(lines, allowed={"task_failed"})] == ["api_error"]


async def test_a_loop_waiting_for_a_kick_stops_when_cancelled_whenever_the_kick_comes() -> None:
    """Defect: the NAT monitor waited for its once-a-second kick with asyncio.wait_for, which on
    Python 3.11 loses a cancellation that lands in the iterations between the kick and the wait's
    return (CPython gh-86296): the loop went on, and the daemon hung at SIGTERM until killed (seen
    once in CI). Cancelled at every one of those iterations, a loop on event_or_timeout stops."""
    import asyncio

    from nstap.supervisor import event_or_timeout

    async def service(kick: asyncio.Event) -> None:
        while True:
            await event_or_timeout(kick, 10.0)
            kick.clear()

    for delay in range(8):  # cancel 0..7 loop iterations after the kick
        kick = asyncio.Event()
        task = asyncio.create_task(service(kick))
        for _ in range(3):
            await asyncio.sleep(0)  # waiting now
        kick.set()
        for _ in range(delay):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.5)
        assert task in done and task.cancelled(), f"a cancellation {delay} iterations after the kick was lost"
    assert await event_or_timeout(asyncio.Event(), 0.05) is False
    already = asyncio.Event()
    already.set()
    assert await event_or_timeout(already, 10.0) is True
