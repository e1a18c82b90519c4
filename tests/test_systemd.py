"""The daemon's side of systemd: the notify protocol (READY=1, STATUS=, WATCHDOG=1, RELOADING=1),
SIGHUP reloads and the journal's native protocol, against real unix sockets playing systemd's
ends (the same datagrams systemd reads; a real systemd as PID 1 is in tests/test_service.py).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
import yaml

from conftest import Containers, Daemon, wait_until
from nstap import priority
from nstap.systemd import JournalHandler, Notifier, journal_message

HTTPD = ("httpd", "-f", "-p", "80", "-h", "/")


class NotifyListener:
    """A datagram socket where the daemon's notifications land."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def drain(self) -> list[tuple[float, dict[str, str]]]:
        while True:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, socket.timeout):
                return self.messages
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def with_key(self, key: str) -> list[tuple[float, dict[str, str]]]:
        return [m for m in self.drain() if key in m[1]]


def test_notifier_addresses(tmp_path: Path) -> None:
    assert not Notifier({}).enabled and not Notifier({}).send(ready=1)
    abstract = Notifier({"NOTIFY_SOCKET": "@nstap-test", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})
    assert abstract.address == "\0nstap-test" and abstract.watchdog_seconds == 3.0
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}).watchdog_seconds == 0.0  # not ours
    listener = NotifyListener(tmp_path / "notify")
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    assert n.send(ready=1, status="hello world")
    assert listener.drain()[0][1] == {"READY": "1", "STATUS": "hello world"}


def test_journal_native_protocol(tmp_path: Path) -> None:
    assert journal_message({"MESSAGE": "a b", "container": "web", "numbers": {"x": 1}}) == b'MESSAGE=a b\nCONTAINER=web\nNUMBERS={"x":1}\n'
    multi = journal_message({"DIFF": "+a\n-b"})
    assert multi == b"DIFF\n" + struct.pack("<Q", 5) + b"+a\n-b\n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "journal"))
    handler = JournalHandler(tmp_path / "journal")
    import logging

    import structlog

    # The daemon's pipeline (nstap.log): structlog -> stdlib -> ProcessorFormatter(JSON) -> handler.
    pf = structlog.stdlib.ProcessorFormatter
    handler.setFormatter(pf(processors=[pf.remove_processors_meta, structlog.processors.JSONRenderer()]))
    stdlib_logger = logging.getLogger("nstap-journal-test")
    stdlib_logger.handlers[:] = [handler]
    stdlib_logger.propagate = False
    stdlib_logger.setLevel(logging.INFO)
    slog = structlog.wrap_logger(stdlib_logger, processors=[structlog.stdlib.add_log_level, pf.wrap_for_formatter], wrapper_class=structlog.stdlib.BoundLogger)
    slog.warning("runtime_lost", runtime="docker")
    data = sock.recv(65536).decode()
    assert "MESSAGE=runtime_lost runtime=docker\n" in data and "PRIORITY=4\n" in data and "RUNTIME=docker\n" in data and "SYSLOG_IDENTIFIER=nstap\n" in data
    handler.close()
    sock.close()


def autogroup_nice(pid: int) -> int | None:
    """The nice of ``pid``'s session autogroup; None on a kernel without autogroups (or with them off)."""
    if Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() != "1":
        return None
    return priority.autogroup_nice(f"/proc/{pid}/autogroup")


def thread_nices(pid: int) -> list[int]:
    """The nice value of each thread of ``pid``."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out.append(os.getpriority(os.PRIO_PROCESS, int(tid)))
        except ProcessLookupError:
            pass  # ended meanwhile
    return out


@pytest.mark.docker
def test_ready_watchdog_status_and_reload(nstap, containers: Containers, docker_image: str, tmp_path: Path, monkeypatch) -> None:
    cid = containers.docker(docker_image, *HTTPD, name="sdready")
    listener = NotifyListener(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    d: Daemon = nstap({"interval": 1.0}, session=True)  # a session of its own, as systemd starts a service
    ready = wait_until(lambda: listener.with_key("READY"), 20, message="READY=1")[0]
    # READY=1 came after the running container's watcher attached and with what it watches.
    attached = [e for e in d.events("watcher_attached") if e["container_id"] == cid[:12]]
    assert attached and ready[1]["READY"] == "1" and ready[1]["STATUS"].startswith("watching ") and "docker up" in ready[1]["STATUS"]
    assert int(ready[1]["MAINPID"]) == d.pid
    assert set(thread_nices(d.pid)) == {-5}  # the default priority (nstap.priority), every thread of the daemon
    assert autogroup_nice(d.pid) in (None, -5)  # and its session's autogroup, where the kernel has them
    # Pings from the loop, several per WatchdogSec.
    time.sleep(3.5)
    pings = [at for at, m in listener.drain() if m.get("WATCHDOG") == "1"]
    assert len(pings) >= 3
    # A stopped process stops pinging (systemd would kill it after WatchdogSec).
    os.kill(d.pid, signal.SIGSTOP)
    try:
        before = len([1 for _, m in listener.drain() if m.get("WATCHDOG")])
        time.sleep(2.0)
        assert len([1 for _, m in listener.drain() if m.get("WATCHDOG")]) == before
    finally:
        os.kill(d.pid, signal.SIGCONT)
    wait_until(lambda: len([1 for _, m in listener.drain() if m.get("WATCHDOG")]) > before, 5, message="pings again")
    # SIGHUP: a new interval is applied; a new listener address needs a restart (logged).
    config = yaml.safe_load(d.config_path.read_text())
    config["interval"] = 0.25
    config["api_listen"] = "127.0.0.1:1"
    config["nice"] = 2
    d.config_path.write_text(yaml.safe_dump(config))
    os.kill(d.pid, signal.SIGHUP)
    event = wait_until(lambda: d.events("config_reloaded"), 5, message="config_reloaded")[0]
    assert event["applied"] == ["interval", "nice"] and event["needs_restart"] == ["api_listen"]
    nices = thread_nices(d.pid)
    assert set(nices) == {2} and len(nices) > 5, nices  # every thread, the workers started before the reload too
    assert autogroup_nice(d.pid) in (None, 2)
    assert wait_until(lambda: listener.with_key("RELOADING"), 5)
    stamps = []
    for _ in range(10):
        stamps.append(d.scrape().value("nstap_sample_timestamp_seconds", container_id=cid[:12]))
        time.sleep(0.3)
    gaps = [b - a for a, b in zip(stamps, stamps[1:]) if b != a]
    assert gaps and min(gaps) < 0.5, stamps  # samples now come every 0.25 s
    # A configuration that does not validate is refused; the daemon goes on.
    d.config_path.write_text("interval: -1\n")
    os.kill(d.pid, signal.SIGHUP)
    assert wait_until(lambda: d.events("config_reload_failed"), 5)[0]["error"].startswith("invalid value for 'interval'")


pytestmark = pytest.mark.daemon_log_allows("config_reload_failed")
