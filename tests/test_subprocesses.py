"""A child ended by a task that is cancelled again meanwhile (the daemon stopping: the supervisor,
aiohttp and asyncio.run each cancel what is left) is still reaped before the task ends. Seen in CI
as "Event loop is closed" from a subprocess transport collected after the loop."""

from __future__ import annotations

import asyncio

import pytest

from nstap.capture.tcpdump import TcpdumpProcess
from nstap.subprocesses import reap


async def _cancelled_twice_while_cleaning_up(cleanup) -> bool:
    """Whether the owner's wait for its killed child completed before the owner ended (the wait is
    made slow, as on a loaded machine, so that the second cancel lands in it)."""
    proc = await asyncio.create_subprocess_exec("sleep", "30", stdout=asyncio.subprocess.PIPE)
    waited = []
    plain_wait = proc.wait

    async def slow_wait() -> int:
        await asyncio.sleep(0.2)
        code = await plain_wait()
        waited.append(code)
        return code

    proc.wait = slow_wait  # type: ignore[method-assign]

    async def owner() -> None:
        try:
            await proc.communicate()
        except asyncio.CancelledError:
            await cleanup(proc)
            raise

    task = asyncio.ensure_future(owner())
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.sleep(0.05)  # the cleanup has started, and waits
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    done = bool(waited)
    await plain_wait()
    return done


async def test_reap_finishes_through_a_second_cancel() -> None:
    assert await _cancelled_twice_while_cleaning_up(reap)


async def test_the_usual_shielded_wait_does_not() -> None:
    """What reap is for (fails if asyncio ever makes the usual pattern wait through a second cancel)."""

    async def usual(proc) -> None:
        proc.kill()
        await asyncio.shield(proc.wait())

    assert not await _cancelled_twice_while_cleaning_up(usual)


async def test_tcpdump_process_stop_cancelled_still_reaps(tmp_path) -> None:
    ready = tmp_path / "trapped"
    proc = TcpdumpProcess(["sh", "-c", f"trap '' TERM; touch {ready}; exec sleep 30"])  # ignores SIGTERM: stop must get to SIGKILL
    await proc.start()
    for _ in range(200):  # until the trap is set (a loaded machine may take a while to get there)
        if ready.exists():
            break
        await asyncio.sleep(0.01)
    stopping = asyncio.ensure_future(proc.stop(grace=5))
    await asyncio.sleep(0.05)
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert proc.proc.returncode == -9
