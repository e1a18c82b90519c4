"""Ending a child process from a task that is being cancelled (the daemon stopping).

The usual ``proc.kill(); await asyncio.shield(proc.wait())`` is not enough: a task cancelled a
second time meanwhile (the supervisor, aiohttp's shutdown and ``asyncio.run`` each cancel what is
left) stops waiting at once, the loop closes with the child not yet reaped, and asyncio reports its
transport, collected after the loop, as a traceback ("Event loop is closed"; seen in CI). So is a
reaped child whose output pipe has not reached its end (:func:`reap` closes it).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def reap(proc: asyncio.subprocess.Process) -> None:
    """Kill ``proc`` if it runs, close its pipes and wait until it is reaped, however often the
    caller is cancelled meanwhile; a cancel received is raised once it is (a SIGKILLed child exits
    at once). Its pipes are closed first because Python 3.11's ``wait()`` also waits for them to
    reach their end, which a grandchild holding one delays for as long as it lives; and a pipe left
    open is closed by the transport's collection, after the loop."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    transport = getattr(proc, "_transport", None)
    if transport is not None:
        transport.close()
    waiting = asyncio.ensure_future(proc.wait())
    cancelled = False
    while not waiting.done():
        try:
            await asyncio.shield(waiting)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


async def spawn(*argv: str, **kwargs: Any) -> asyncio.subprocess.Process:
    """``asyncio.create_subprocess_exec(*argv, **kwargs)`` that leaves no child behind when the
    caller is cancelled while it starts: the child starts all the same (the fork is under way), so
    it is waited for, killed and reaped before the cancel is raised. OSError as the original."""
    creating = asyncio.ensure_future(asyncio.create_subprocess_exec(*argv, **kwargs))
    cancelled = False
    while not creating.done():
        try:
            await asyncio.shield(creating)
        except asyncio.CancelledError:
            cancelled = True
        except OSError:
            break
    if not cancelled:
        return creating.result()
    if creating.exception() is None:
        await reap(creating.result())
    raise asyncio.CancelledError
