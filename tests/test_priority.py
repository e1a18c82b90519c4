"""The daemon's CPU priority (nstap.priority): every thread at the configured nice, and what starts
later inherits it; without CAP_SYS_NICE a clear reason, not a crash. Each case runs in a process of
its own: the test process's priority is not touched. (The daemon itself at its default and after a
reload: tests/test_systemd.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DAEMON = Path(__file__).resolve().parent.parent / "daemon"

SCRIPT = r"""
import json, os, subprocess, sys, threading
from nstap.priority import set_nice, nice_now
before = threading.Event(); stop = threading.Event()
early = threading.Thread(target=lambda: (before.set(), stop.wait()))  # a thread from before the call
early.start(); before.wait()
refused = set_nice(int(sys.argv[1]))
late = threading.Thread(target=stop.wait)  # one started after it
late.start()
tids = [int(t) for t in os.listdir("/proc/self/task")]
child = subprocess.run([sys.executable, "-c", "import os; print(os.getpriority(os.PRIO_PROCESS, 0))"], capture_output=True, text=True).stdout
print(json.dumps({"refused": refused, "threads": {t: os.getpriority(os.PRIO_PROCESS, t) for t in tids}, "child": int(child), "now": nice_now()}))
stop.set(); early.join(); late.join()
"""


def run(nice: int, *prefix: str) -> dict:
    proc = subprocess.run([*prefix, sys.executable, "-c", SCRIPT, str(nice)], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(DAEMON), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_every_thread_and_what_starts_later_take_the_nice() -> None:
    for nice in (-5, 3):  # raising the priority (root: allowed), and lowering it
        out = run(nice)
        assert out["refused"] == "", out
        assert len(out["threads"]) == 3 and set(out["threads"].values()) == {nice}, out  # main, the thread from before, the one after
        assert out["child"] == nice and out["now"] == nice, out


def test_without_cap_sys_nice_the_daemon_is_told_why_and_keeps_its_priority() -> None:
    out = run(-5, "setpriv", "--bounding-set", "-sys_nice")  # root without CAP_SYS_NICE, as in a container not granted it
    assert "CAP_SYS_NICE" in out["refused"] and "runs at nice 0" in out["refused"], out
    assert set(out["threads"].values()) == {0} and out["child"] == 0, out
    out = run(4, "setpriv", "--bounding-set", "-sys_nice")  # a lower priority needs no capability
    assert out["refused"] == "" and set(out["threads"].values()) == {4}, out


def test_a_refusal_is_logged_with_its_fix() -> None:
    """What the daemon does with a refusal at start and on a reload (nstap.priority.apply_nice):
    one ``nice_not_set`` line saying why and what to do, and it goes on."""
    script = "from nstap.priority import apply_nice; print('set' if apply_nice(-5) else 'not set')"
    proc = subprocess.run(["setpriv", "--bounding-set", "-sys_nice", sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(DAEMON), "PATH": "/usr/bin:/bin"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "not set" in out, out
    assert "nice_not_set" in out and "CAP_SYS_NICE" in out and "set nice: 0" in out, out


AUTOGROUP_SCRIPT = r"""
import json, os, sys
from nstap.priority import apply_nice, autogroup_nice, set_autogroup_nice
before = autogroup_nice()
done, why = set_autogroup_nice(int(sys.argv[1]))
print(json.dumps({"leader": os.getsid(0) == os.getpid(), "before": before, "set": done, "why": why, "after": autogroup_nice(),
                  "applied": apply_nice(int(sys.argv[1]))}))
"""


def autogroup_run(nice: int, *prefix: str, session: bool = True) -> tuple[dict, str]:
    proc = subprocess.run([*prefix, sys.executable, "-c", AUTOGROUP_SCRIPT, str(nice)], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(DAEMON), "PATH": "/usr/bin:/bin"}, start_new_session=session)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]), proc.stdout + proc.stderr


def needs_autogroups() -> None:
    if not Path("/proc/self/autogroup").exists() or Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() != "1":
        pytest.skip("this kernel has no autogroups, or they are off: a thread's nice weighs against every thread of its CPU cgroup")


def test_a_daemon_leading_its_session_gives_its_autogroup_the_nice() -> None:
    """With autogroups on, the threads' nice weighs only inside the session's group: the daemon
    leading its own session (a service, a container, setsid) sets the group's nice as well."""
    needs_autogroups()
    out, _ = autogroup_run(-5)
    assert out["leader"] and out["before"] == 0, out  # a new session starts a new autogroup, at 0
    assert out["set"] and out["why"] == "" and out["after"] == -5 and out["applied"], out
    out, _ = autogroup_run(3)
    assert out["set"] and out["after"] == 3, out


def test_a_daemon_sharing_its_session_leaves_the_autogroup_alone() -> None:
    """Started from a shell, the daemon shares the shell's session: that group's priority is not
    its to change. It says so (``autogroup_shared``) and sets its threads' nice as before."""
    needs_autogroups()
    mine = Path("/proc/self/autogroup").read_text()
    out, text = autogroup_run(-5, session=False)
    assert not out["leader"] and not out["set"] and "shares its session" in out["why"], out
    assert out["after"] == out["before"] and out["applied"], out
    assert "autogroup_shared" in text, text
    assert Path("/proc/self/autogroup").read_text() == mine  # this test's own session untouched


def test_without_cap_sys_nice_the_autogroup_keeps_its_nice() -> None:
    needs_autogroups()
    out, text = autogroup_run(-5, "setpriv", "--bounding-set", "-sys_nice")
    assert not out["set"] and out["after"] == 0 and "CAP_SYS_NICE" in out["why"], out
    assert "nice_not_set" in text, text  # the threads' refusal, logged with its fix
