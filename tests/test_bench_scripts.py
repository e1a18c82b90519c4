"""Every benchmark docs/performance.md quotes still starts: its imports resolve and it prints its usage.
(A bench's figures come from running it for real: ``make bench*``; this only keeps them runnable.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, wait_until

BENCHES = sorted(p.name for p in (ROOT / "bench").glob("bench_*.py"))


def test_the_benches_are_listed() -> None:
    assert {"bench_sampling.py", "bench_detect.py", "bench_cause.py", "bench_capture.py", "bench_nat.py"} <= set(BENCHES)


@pytest.mark.parametrize("name", BENCHES)
def test_a_bench_starts(name: str) -> None:
    if name == "bench_containers.py":  # the benches' shared module, not a bench
        proc = subprocess.run([sys.executable, "-c", "import bench_containers"], cwd=ROOT / "bench", capture_output=True, text=True, timeout=60)
    else:
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / name), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert name == "bench_containers.py" or "usage" in proc.stdout.lower()


@pytest.mark.parametrize("name", [b for b in BENCHES if b != "bench_containers.py"])
def test_the_performance_page_says_what_each_bench_measured(name: str) -> None:
    """Every benchmark is on docs/performance.md, which quotes its figures with its command."""
    assert name in (ROOT / "docs" / "performance.md").read_text(), f"{name} is not on docs/performance.md"


def test_the_loop_split_names_each_sampler() -> None:
    """bench_sampling's split of the event loop's py-spy stacks: a kernel read below a sampler is that
    sampler's, a detector's frame below the store's is the detectors'."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_sampling as bench
    finally:
        sys.path.remove(str(ROOT / "bench"))
    tick = ["Ticker._slice (nstap/watcher.py:460)", "NamespaceWatcher.sample_once (nstap/watcher.py:178)"]
    read = "ProcFile.read (nstap/netns/handles.py:62)"
    protocols = [*tick, "ProtocolSampler.sample (nstap/samplers/protocols.py:111)", read]
    sockets = [*tick, "SocketSampler.sample (nstap/samplers/sockets.py:194)", "lookup_inet (nstap/netns/netlink.py:470)"]
    detectors = [*tick, "SampleStore.put (nstap/samples.py:118)", "CollapseDetector.observe (nstap/detect/collapse.py:77)"]
    assert bench.loop_part(protocols) == ("samplers", "") and bench.sampler_of(protocols) == "protocols"
    assert bench.loop_part(sockets) == ("samplers", "") and bench.sampler_of(sockets) == "sockets"
    assert bench.loop_part(detectors) == ("detectors", "")
    assert bench.loop_part(tick) == ("tick bookkeeping", "")
    assert bench.sampler_of([*tick, "enabled_samplers (nstap/samplers/__init__.py:80)"]) == "other"


def test_the_loop_split_leaves_out_the_loop_asleep_in_epoll_wait() -> None:
    """py-spy's non-blocking samples put the event loop in EpollSelector.select for about half of
    its samples beside 50 containers, where the kernel's sampling of the thread's CPU found 1.4 %
    of it there: those are the loop asleep, not CPU, and are counted apart instead of making up the
    "other" row (stacks as py-spy wrote them, 2026-12-07)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_sampling as bench
    finally:
        sys.path.remove(str(ROOT / "bench"))
    loop = ("thread (23738): MainThread;<module> (nstap:6);main (nstap/cli.py:124);_run (nstap/cli.py:180);"
            "BaseEventLoop.run_forever (asyncio/base_events.py:607);")
    raw = "\n".join((
        loop + "BaseEventLoop._run_once (asyncio/base_events.py:1884);EpollSelector.select (selectors.py:468) 50",
        loop + "BaseEventLoop._run_once (asyncio/base_events.py:1922);Handle._run (asyncio/events.py:80);"
        "DetectionPipeline._flush (nstap/detect/pipeline.py:77);DetectionPipeline.on_samples (nstap/detect/pipeline.py:119);"
        "InterfaceDownDetector.observe (nstap/detect/interface_down.py:23) 3",
        loop + "BaseEventLoop._run_once (asyncio/base_events.py:1922);Handle._run (asyncio/events.py:80);"
        "Ticker._slice (nstap/watcher.py:460);NamespaceWatcher.sample_once (nstap/watcher.py:178);"
        "ProtocolSampler.sample (nstap/samplers/protocols.py:111) 1",
        "thread (23747): nstap-nat_0;Thread.run (threading.py:975);_worker (concurrent/futures/thread.py:83) 9",
    ))
    profile = bench.parse_profile(raw, "Samples: 63 Errors: 2", 23738)
    assert profile["loop_samples"] == 4 and profile["loop_wait_samples"] == 50
    assert profile["loop_share"]["detectors"] == 0.75 and profile["loop_share"]["samplers"] == 0.25
    assert profile["samples_by_thread"] == {"MainThread": 54, "nstap-nat_0": 9} and profile["errors"] == 2


def _listeners(pid: int, table: str) -> int:
    """The LISTEN sockets of the container's namespace in /proc/net/tcp or tcp6 (state 0A)."""
    lines = (Path(f"/proc/{pid}/net") / table).read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[3] == "0A")


def _newlines(pid: int, name: str) -> int:
    return (Path(f"/proc/{pid}/net") / name).read_bytes().count(b"\n")


def test_nspaced_makes_the_daemons_reads_with_daemon_reads(containers, docker_image: str, tmp_path: Path) -> None:
    """bench/nspaced.c, on a real container: by default nslimit's reads (four files and the IPv6
    LISTEN dump) once per round; with --daemon-reads the daemon's (dev, and each listener of either
    family asked for by its id; snmp and netstat too with --protocol-files, sockstat and sockstat6
    with --socket-files: the daemon without its eBPF pass, or without its sockets part). It counts
    the lines and answers it read: compared with what the namespace holds, that shows it made
    those reads and no others."""
    binary = tmp_path / "nspaced"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(binary), str(ROOT / "bench" / "nspaced.c")], check=True, timeout=120)
    pid = containers.pid("docker", containers.docker(docker_image, "httpd", "-f", "-p", "80"))
    # (docker run returns before httpd listens: 1 run in 5 here counted no listener)
    wait_until(lambda: _listeners(pid, "tcp") + _listeners(pid, "tcp6") == 1, 10, message="httpd listening")
    files = sum(_newlines(pid, name) for name in ("dev", "snmp", "netstat", "sockstat"))
    v4, v6 = _listeners(pid, "tcp"), _listeners(pid, "tcp6")
    assert v4 + v6 == 1  # httpd's
    rounds = 3
    protocols = _newlines(pid, "snmp") + _newlines(pid, "netstat")
    sockets = _newlines(pid, "sockstat") + _newlines(pid, "sockstat6")
    daemon = _newlines(pid, "dev") + v4 + v6
    for mode, per_round in (
        ([], files + v6), (["--daemon-reads"], daemon), (["--daemon-reads", "--protocol-files"], daemon + protocols),
        (["--daemon-reads", "--socket-files"], daemon + sockets), (["--daemon-reads", "--socket-files", "--protocol-files"], daemon + sockets + protocols),
    ):
        out = subprocess.run([str(binary), *mode, str(rounds), "0.05", str(pid)], capture_output=True, text=True, timeout=60, check=True).stdout
        m = re.match(r"paced_us ([\d.]+) \(n=1 rounds=3 interval=0.05 lines=(\d+)\)", out)
        assert m, out
        assert float(m.group(1)) > 0
        assert int(m.group(2)) == rounds * per_round, (mode, out)


def test_the_nat_benchs_conntrack_entries_are_real_and_removed() -> None:
    """bench_nat fills the host's conntrack table with hand-built requests (pyroute2, which it used
    to import, is no longer installed, and `make bench-nat` failed at that step unnoticed): the
    entries it says it added are in the kernel's table, and it removes them all."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from conntrack_fill import SOURCES, TARGET, add_entries, remove_entries
    finally:
        sys.path.remove(str(ROOT / "bench"))
    import socket

    from nstap.nat.conntrack import ConntrackReader

    def ours() -> list[tuple]:
        reader = ConntrackReader()
        try:
            return [s for s in reader.summaries() if s[2] == socket.inet_aton(TARGET)]
        finally:
            reader.close()

    remove_entries()
    try:
        assert add_entries(3 * SOURCES) == 3 * SOURCES
        assert add_entries(SOURCES) == 0  # the same entries again: each answered EEXIST
        found = ours()
        assert len(found) == 3 * SOURCES
        assert {s[1] for s in found} == {socket.inet_aton(f"198.51.100.{i + 1}") for i in range(SOURCES)}
        assert all(s[0] == socket.IPPROTO_UDP for s in found)
    finally:
        remove_entries()
    assert ours() == []
