"""Ending a child process from a task that is being cancelled (the daemon stopping).

The usual ``proc.kill(); await asyncio.shield(proc.wait())`` is not enough: a task cancelled a
second time meanwhile (the supervisor, aiohttp's shutdown and ``asyncio.run`` each cancel what is
left) stops waiting at once, the loop closes with the child not yet reaped, and asyncio reports its
transport, collected after the loop, as a traceback ("Event loop is closed"; seen in CI).
"""

from __future__ import annotations

import asyncio
import contextlib


async def reap(proc: asyncio.subprocess.Process) -> None:
    """Kill ``proc`` if it runs and wait until it is reaped, however often the caller is cancelled
    meanwhile; a cancel received is raised once it is (a SIGKILLed child exits at once)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    waiting = asyncio.ensure_future(proc.wait())
    cancelled = False
    while not waiting.done():
        try:
            await asyncio.shield(waiting)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
