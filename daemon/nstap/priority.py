"""The daemon's CPU scheduling priority: the nice value of every thread it runs and child it starts.

A host where nstap matters most is a busy one. Beside 1,000 containers on a 2-core host (the
benchmark's: 1,000 busybox httpd, their shims, dockerd, an HTTP client), the event loop's thread
waited on the CPU's run queue for 10-140 ms at a time (its ``schedstat``), and in each of three
runs at nice 0 some sampling ticks came 25-411 ms late: the samples of an incident's first second
are the ones that come late. At nice -5 (``nice`` in the configuration, the default) two runs of
the same benchmark had no tick later than 10 ms. What the daemon uses does not grow: it asks for
the CPU it needs sooner, and no more of it (its work per namespace has its own budgets).

Linux keeps a nice value per thread, and a new thread or child takes its creator's: :func:`set_nice`
sets every thread there is (at start, before any worker thread, and again on a reload), and what
starts later inherits it. Lowering the value below the one the process has needs CAP_SYS_NICE (or
an RLIMIT_NICE that allows it); without it the daemon runs on at the priority it has and says so.
"""

from __future__ import annotations

import errno
import os

import structlog

log = structlog.get_logger("nstap.priority")

DEFAULT_NICE = -5


def set_nice(nice: int, tasks: str = "/proc/self/task") -> str:
    """Every thread of this process at ``nice``; "" when done, else why not (nothing is raised:
    the daemon runs at the priority it has)."""
    try:
        tids = [int(name) for name in os.listdir(tasks)]
    except OSError as exc:
        return f"cannot list the threads in {tasks}: {exc.strerror or exc}"
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except ProcessLookupError:
            continue  # the thread ended meanwhile
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                return f"nice {nice} refused ({os.strerror(exc.errno)}): lowering it needs CAP_SYS_NICE; the daemon runs at nice {nice_now()}"
            return f"nice {nice} refused: {exc.strerror or exc}"
    return ""


def apply_nice(nice: int) -> bool:
    """:func:`set_nice`, a refusal logged (``nice_not_set``: why, and the fix); True if set."""
    refused = set_nice(nice)
    if refused:
        log.warning("nice_not_set", nice=nice, error=refused, fix="grant CAP_SYS_NICE, or set nice: 0")
    return not refused


def nice_now() -> int:
    """The calling thread's nice value."""
    return os.getpriority(os.PRIO_PROCESS, 0)


__all__ = ["DEFAULT_NICE", "apply_nice", "nice_now", "set_nice"]
