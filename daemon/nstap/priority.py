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

A thread's nice weighs only against the threads of its own scheduling group, though. With the
kernel's autogroups on (``kernel.sched_autogroup_enabled``, Debian's and Ubuntu's default), every
session whose processes sit in the root CPU cgroup (no ``cpu`` controller of their own: cgroup v1
without one for the service, or v2 with the controller off, as systemd leaves it unless a unit
asks) is such a group, weighed as one against every other session: the daemon's threads at -5
then compete only with one another, and the host's other sessions (the containers' shims,
dockerd, an HTTP client) take the CPU as if it were at 0. Beside 1,000 containers the event
loop's thread then waited on the run queue for 0.14-0.23 s of each round (the median: its
``schedstat``) and ticks came up to 1 s late; with the group at -5 too, no tick of 180 was later
than 25 ms (docs/performance.md, "The daemon's autogroup").
So when the daemon leads its session (as a service, in a container, under ``setsid``), its
autogroup takes the same nice (``/proc/self/autogroup``, :func:`set_autogroup_nice`). A daemon
started from a shell shares the shell's session, whose priority is not the daemon's to change:
its autogroup is left alone and it says so once.
"""

from __future__ import annotations

import errno
import os

import structlog

log = structlog.get_logger("nstap.priority")

DEFAULT_NICE = -5
AUTOGROUP = "/proc/self/autogroup"
AUTOGROUP_ENABLED = "/proc/sys/kernel/sched_autogroup_enabled"


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


def set_autogroup_nice(nice: int, path: str = AUTOGROUP, enabled: str = AUTOGROUP_ENABLED) -> tuple[bool, str]:
    """The autogroup of this process's session at ``nice``, if the process leads its session.

    Returns (set, why not): (True, "") when set; (False, "") when there is nothing to set (a kernel
    without autogroups, or with them off); (False, reason) when the session is not the daemon's own
    or the kernel refused. Nothing is raised.
    """
    try:
        with open(enabled, encoding="ascii") as f:
            if f.read().strip() == "0":
                return False, ""
        with open(path, encoding="ascii") as f:
            group = f.read().split()  # "/autogroup-123 nice 0"
    except OSError:
        return False, ""  # no autogroups in this kernel: a nice weighs against every thread of the CPU cgroup
    if os.getsid(0) != os.getpid():
        return False, (f"the daemon shares its session (and {group[0] if group else 'its autogroup'}) with the process that started it: "
                       "its threads' nice weighs only against one another")
    if group[-1:] == [str(nice)]:
        return True, ""
    try:
        with open(path, "w", encoding="ascii") as f:
            f.write(str(nice))
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            return False, f"autogroup nice {nice} refused ({os.strerror(exc.errno)}): lowering it needs CAP_SYS_NICE"
        return False, f"autogroup nice {nice} refused: {exc.strerror or exc}"  # EAGAIN: changed less than 0.1 s ago
    return True, ""


def apply_nice(nice: int) -> bool:
    """:func:`set_nice` and :func:`set_autogroup_nice`, a refusal logged (``nice_not_set``: why,
    and the fix; ``autogroup_shared`` when the session is not the daemon's); True if the threads'
    nice was set."""
    refused = set_nice(nice)
    if refused:
        log.warning("nice_not_set", nice=nice, error=refused, fix="grant CAP_SYS_NICE, or set nice: 0")
        return False
    _, why = set_autogroup_nice(nice)
    if why.startswith("autogroup nice"):
        log.warning("nice_not_set", nice=nice, error=why, fix="grant CAP_SYS_NICE, or set nice: 0")
    elif why:
        log.info("autogroup_shared", nice=nice, detail=why, fix="run nstap as a service, in a container, or under setsid")
    return True


def autogroup_nice(path: str = AUTOGROUP) -> int | None:
    """The nice of this process's autogroup; None without autogroups."""
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def nice_now() -> int:
    """The calling thread's nice value."""
    return os.getpriority(os.PRIO_PROCESS, 0)


__all__ = ["DEFAULT_NICE", "apply_nice", "autogroup_nice", "nice_now", "set_autogroup_nice", "set_nice"]
