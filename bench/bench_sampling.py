#!/usr/bin/env python3
"""Benchmark: what nstap costs per container-sample, where that time goes, its memory, scrape time
and start-to-first-sample, at one or several fleet sizes.

For each size N (``--containers 50,200,500,1000``; the fleet grows from one size to the next) it
starts N busybox httpd containers in dockerd, sends each one HTTP request per second from the host
(an asyncio client in its own process), runs the real daemon (``nstap run``, every default
feature on, 1 s interval) in a cgroup of its own for the measured window while scraping it every
15 s (gzip) at a steady cadence from its start, as Prometheus does, and reports:

* CPU per container-sample of the daemon WITH every child it forks (iptables-save, nft, tcpdump,
  ...: the cgroup's cpuacct.usage), and of the daemon's process alone (utime+stime), both divided
  by the samples the daemon actually took (``nstap_sample_duration_seconds_count``), with the
  samples expected (namespaces x seconds / interval) beside them, so a skipped sample can never
  flatter the figure;
* the lower bound of ``../shared/tools/nslimit.c`` (C, kept descriptors, no parsing) measured in
  the same run on up to 50 of the same containers, and the figures as multiples of it;
* the same reads at the daemon's cadence (``bench/nspaced.c``: one round over every container
  per interval, 10 rounds): nslimit measures them warm, back to back; read once a second they
  find the CPU's caches cold and cost more, and no sampler of that cadence can go below that;
* the floor of this design with every default feature on: the daemon's own reads (``dev``,
  listeners asked for by id; snmp and netstat only where the eBPF pass over every namespace's
  protocol counters did not load, sockstat and sockstat6 only where it does not read the sockets
  in use, the pass itself then measured at the same cadence) in C at its
  cadence (``nspaced --daemon-reads``), plus everything the
  daemon spent outside its event loop (its other threads, its children), as a multiple of nslimit:
  what it would cost if the event loop did nothing but those reads;
* where the time goes, per container-sample: per thread (the kernel's accounting), the children,
  and within the event-loop thread a split into samplers / detectors / tick bookkeeping /
  exporter / eBPF map reads / NAT bookkeeping / captures / other, from a 50 Hz non-blocking ``py-spy record``
  over the window scaled to the loop thread's kernel-measured CPU;
* RSS (daemon, children) against the goal of 100 MiB + 100 KiB per container;
* /metrics scrape time and size, tick lateness (``nstap_tick_lag_seconds``), time from ``docker
  run`` returning to the container's first sample in /metrics (5 probes), the HTTP requests per
  second actually achieved, and how long setting up the containers took.

Each size is printed as a Markdown row in the format of docs/performance.md, with an accounting table and the
breakdown, and appended as one JSON line to ``bench/results/sampling.jsonl``; a run over several
sizes also draws ``bench/sampling.png`` (bench/plot_sampling.py, matplotlib).

With ``--capture-load``, one more container has a flight recorder (``--ring-bytes``, 8 MiB) and is
downloaded from without pause, so its ring stays full, and every 3-7 s a capture with 60 s of
pre-trigger packets is taken from it: the whole ring is read back while the ticks go on.
``--scrape-every 1`` scrapes every second instead of every 15. The scraper keeps a steady cadence from
the daemon's start, as Prometheus does, so the daemon renders its bodies ahead (metrics.render_ahead);
``--scrape-jitter 0.5`` scrapes at intervals times a uniform [0.5, 1.5], as the runs before
2026-12-05 did.

    make bench                                        # 50 containers, 60 s
    make bench ARGS="--containers 50,200,500,1000"    # the cost claims, and bench/sampling.png
    make bench ARGS="--containers 200"                # or --large
    make bench ARGS="--child-ehash 1024"              # namespaces with their own TCP hash (see docs/performance.md)
    make bench ARGS="--large --scrape-every 1 --capture-load"   # tick lateness under load

Everything it starts (containers, networks, the cgroup, the daemon, the traffic, py-spy) is
removed at the end, on Ctrl-C and on failure too, and the sysctls it changed are restored.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gzip
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

INTERVAL = 1.0  # the daemon's sampling interval (s)
CLK_TCK = os.sysconf("SC_CLK_TCK")
EHASH = Path("/proc/sys/net/ipv4/tcp_child_ehash_entries")
NEIGH = Path("/proc/sys/net/ipv4/neigh/default")
RUN_ID = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
LABELS = ("--label", "nstap.bench=1", "--label", f"nstap.bench.run={RUN_ID}")
NAME = f"nstap-bench-{os.getpid()}"  # container, network and cgroup names of this run
STOP_TIMEOUT = 90  # systemd/nstap.service's TimeoutStopSec: beside 1,000 containers the kernel takes ~40 s to remove the DNS links
BRIDGE_PORTS = 900  # containers per bridge: docker0 (with whatever else is on it) and each bridge of the run's; a bridge holds 1,024 ports
PHASE = 0.75  # the window starts and ends at this phase of the ticks (monotonic clock), so both ends cut them alike
MEMORY_BASE_MIB, MEMORY_PER_CONTAINER_KIB = 100, 100  # the memory goal: 100 MiB + 100 KiB per container
NSLIMIT_CONTAINERS = 50

# Where the event-loop thread's time goes: the innermost frame of a stack that is in one of these
# (checked in this order) names its part; a stack in none of them is "other".
LOOP_PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("samplers", ("nstap/samplers/",)),
    ("detectors", ("nstap/detect/",)),
    ("tick bookkeeping", ("nstap/watcher.py",)),
    ("exporter render", ("nstap/exporter.py", "nstap/api/server.py")),
    ("eBPF map reads", ("nstap/ebpf/",)),
    ("NAT bookkeeping", ("nstap/nat/",)),
    ("captures", ("nstap/capture/",)),  # not in the list: flight recorders, captures and their evidence
)
LOOP_OTHER = "other"
# The samplers' part, split by sampler: the file of the innermost frame in nstap/samplers/ (its
# kernel reads are frames below it, in nstap/netns/).
SAMPLER_NAMES = ("interfaces", "protocols", "sockets", "firewall")


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(*args: str, timeout: float = 120, check: bool = True) -> str:
    """Run a command in a session of its own (a Ctrl-C reaches the benchmark only, which then
    cleans up in order); returns its stdout."""
    done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout, start_new_session=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} ...: exit {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout.strip()


# --- /proc ------------------------------------------------------------------------------------


def _stat_fields(path: Path) -> tuple[str, list[str]]:
    text = path.read_text()
    comm = text[text.index("(") + 1 : text.rindex(")")]
    return comm, text.rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread, the exited ones too; no children)."""
    _, fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """{tid: (comm, CPU seconds)} of the process's live threads, from the kernel's accounting: the
    run time in ns of /proc/PID/task/TID/schedstat (what utime+stime are scaled from, without their
    10 ms steps, which over a short window are as large as a quiet thread's whole share), or
    utime+stime of its stat where there is no schedstat."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm, fields = _stat_fields(task / "stat")
            try:
                cpu = int((task / "schedstat").read_text().split()[0]) / 1e9
            except (FileNotFoundError, IndexError, ValueError):
                cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
        out[int(task.name)] = (comm, cpu)
    return out


def rss_mib(pid: int) -> float:
    """Resident memory of a process, MiB."""
    return status_kib(pid, "VmRSS") / 1024


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM), 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


# --- host settings, cgroup --------------------------------------------------------------------


class HostSettings:
    """sysctls the run changes, each restored at the end."""

    def __init__(self) -> None:
        self.saved: dict[Path, str] = {}

    def set(self, path: Path, value: int) -> None:
        if not path.exists():
            return
        self.saved.setdefault(path, path.read_text().strip())
        path.write_text(str(value))

    def at_least(self, path: Path, value: int) -> None:
        if path.exists() and int(path.read_text().split()[0]) < value:
            self.set(path, value)

    def changed(self) -> dict[str, str]:
        return {p.name if p.parent.name != "default" else f"neigh.default.{p.name}": p.read_text().strip() for p in self.saved}

    def restore(self) -> None:
        for path, value in reversed(self.saved.items()):
            path.write_text(value)
        self.saved.clear()


class CpuCgroup:
    """A cgroup of the daemon's own, so its CPU is counted with every child it forks: cpuacct.usage
    (ns) on cgroup v1, cpu.stat usage_usec on v2."""

    def __init__(self, name: str) -> None:
        root, self.v2 = self._hierarchy()
        self.path = root / name
        self.path.mkdir()
        self.procs = self.path / "cgroup.procs"

    @staticmethod
    def _hierarchy() -> tuple[Path, bool]:
        mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
        for _, where, kind, options, *_ in mounts:
            if kind == "cgroup" and "cpuacct" in options.split(","):
                return Path(where), False
        for _, where, kind, *_ in mounts:
            if kind == "cgroup2":
                return Path(where), True
        raise SystemExit("no cgroup hierarchy with CPU accounting (cpuacct on v1, or cgroup v2) is mounted")

    def usage_s(self) -> float:
        """CPU seconds of every process that has been in the group."""
        if self.v2:
            for line in (self.path / "cpu.stat").read_text().splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
            raise KeyError("usage_usec")
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def pids(self) -> list[int]:
        return [int(p) for p in self.procs.read_text().split()]

    def remove(self) -> list[int]:
        """Remove the group; a process still in it (a child the daemon left behind) is killed first
        and returned, so the report can say so."""
        left = self.pids()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.path.rmdir()
                return left
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


# --- the daemon -------------------------------------------------------------------------------


def scrape(port: int, agent: str = "nstap-bench") -> tuple[float, str]:
    """GET /metrics as Prometheus does (gzip accepted); returns (seconds, uncompressed text)."""
    t0 = time.perf_counter()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept-Encoding": "gzip", "User-Agent": agent})
    with urllib.request.urlopen(request, timeout=60) as r:
        body = r.read()
        seconds = time.perf_counter() - t0  # the scraper's own decompression is not nstap's time
        if r.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
    return seconds, body.decode()


class Scraper(threading.Thread):
    """Scrapes /metrics as Prometheus does: every ``every`` seconds from a random phase, from the
    daemon's start on (so the daemon has learnt its cadence, metrics.render_ahead, as it has a
    real Prometheus's); ``jitter`` > 0 scrapes at ``every`` times a uniform [1 - jitter, 1 + jitter]
    instead (the bench's way before 2026-12-05, which a scraper at a steady cadence never is).
    Records (monotonic time, seconds, bytes of text, RSS of the daemon's cgroup in KiB)."""

    AGENT = "Prometheus/bench"

    def __init__(self, port: int, every: float, jitter: float, rss: Callable[[], int]) -> None:
        super().__init__(daemon=True)
        self.port, self.every, self.jitter, self.rss = port, every, jitter, rss
        self.halt = threading.Event()
        self.records: list[tuple[float, float, int, int]] = []

    def run(self) -> None:
        due = time.monotonic() + random.uniform(0.0, self.every)
        while not self.halt.wait(max(0.0, due - time.monotonic())):
            at = time.monotonic()
            try:
                taken, text = scrape(self.port, self.AGENT)
                self.records.append((at, taken, len(text.encode()), self.rss()))
            except OSError:
                pass
            due += self.every * (random.uniform(1 - self.jitter, 1 + self.jitter) if self.jitter else 1.0)

    def stop(self) -> None:
        self.halt.set()
        self.join(70)

    def within(self, t0: float, t1: float) -> list[tuple[float, float, int, int]]:
        """The scrapes that started in [t0, t1)."""
        return [r for r in list(self.records) if t0 <= r[0] < t1]


def metric(text: str, name: str, default: float | None = None) -> float:
    """The value of an unlabelled series."""
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{}")):
            return float(line.rsplit(" ", 1)[1])
    if default is not None:
        return default
    raise KeyError(name)


def metric_sum(text: str, name: str) -> float:
    """The sum of a family's series (``nstap_containers_watched`` over runtimes)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + "{", name + " ")))


def sampled_ids(text: str) -> dict[str, float]:
    """{short container id: its nstap_sample_interval_seconds} of every namespace with a sample."""
    out = {}
    for line in text.splitlines():
        if line.startswith("nstap_sample_interval_seconds{"):
            match = re.search(r'container_id="([^"]*)"', line)
            if match:
                out[match.group(1)] = float(line.rsplit(" ", 1)[1])
    return out


def sample_timestamp(text: str, short_id: str) -> float | None:
    """nstap_sample_timestamp_seconds of the container ``short_id``, if it has a sample."""
    for line in text.splitlines():
        if line.startswith("nstap_sample_timestamp_seconds{") and f'container_id="{short_id}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def docker_time(text: str) -> float:
    """Seconds since the epoch of one of docker's RFC 3339 times (nanoseconds, 'Z')."""
    whole, _, rest = text.strip().rstrip("Z").partition(".")
    fraction = rest
    seconds = datetime.datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc).timestamp()
    return seconds + (float("0." + fraction) if fraction else 0.0)


def lag_quantiles(before: str, after: str) -> dict:
    """p50, p99 and the largest bucket of nstap_tick_lag_seconds between two scrapes (bucket bounds, ms)."""

    def buckets(text: str) -> dict[float, float]:
        out = {}
        for line in text.splitlines():
            if line.startswith("nstap_tick_lag_seconds_bucket{"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                out[float(le)] = float(line.rsplit(" ", 1)[1])
        return out

    b0, b1 = buckets(before), buckets(after)
    if not b1:
        return {}
    bounds = sorted(b1)
    total = b1[float("inf")] - b0.get(float("inf"), 0.0)
    out: dict = {}
    for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
        for bound in bounds:
            if total and (b1[bound] - b0.get(bound, 0.0)) / total >= q:
                out[name] = bound * 1000
                break
    out["ticks"] = total
    previous = 0.0
    out["histogram"] = {}
    for bound in bounds:
        count = b1[bound] - b0.get(bound, 0.0)
        out["histogram"][f"<={bound * 1000:g}ms"] = count - previous
        previous = count
    return out


class Daemon:
    """``nstap run`` started through a shell that first moves itself into the cgroup, then execs
    the daemon: everything the daemon forks is born in the group."""

    def __init__(self, workdir: Path, port: int, cgroup: CpuCgroup, ring_bytes: int, dns: str = "auto") -> None:
        self.port = port
        self.workdir = workdir
        config = workdir / "nstap.yaml"
        config.write_text(
            f"interval: {INTERVAL}\nmetrics_listen: 127.0.0.1:{port}\napi_listen: 127.0.0.1:{port + 1}\n"
            f"data_dir: {workdir}/data\nlog_format: json\nlog_level: warning\n"
            f"capture: {{ring_bytes: {ring_bytes}, pre_seconds: 60, max_seconds: 120}}\n"
            f"dns: {{mode: '{dns}'}}\n"
        )
        self.log_path = workdir / "nstap.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                ["sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "sh", str(cgroup.procs),
                 str(ROOT / ".venv/bin/nstap"), "run", "--config", str(config)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.pid = self.proc.pid
        deadline = time.monotonic() + 5
        while self.pid not in cgroup.pids():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise SystemExit(f"the daemon did not enter its cgroup: {self.tail()}")
            time.sleep(0.01)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise SystemExit(f"the daemon exited ({self.proc.returncode}):\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log(f"the daemon did not stop within {STOP_TIMEOUT} s of SIGTERM: killed")
                self.proc.kill()
                self.proc.wait()


# --- where the time goes: py-spy ----------------------------------------------------------------


def pyspy_binary() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def pyspy_thread_names(pyspy: str, pid: int) -> dict[int, str]:
    """{tid: Python thread name} from one non-blocking ``py-spy dump``."""
    try:
        out = run(pyspy, "dump", "--nonblocking", "--pid", str(pid), timeout=30)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        log(f"py-spy dump failed: {exc}")
        return {}
    return {int(m.group(1)): m.group(2) for m in re.finditer(r'^Thread (\d+) \([^)]*\): "(.*)"$', out, re.MULTILINE)}


def loop_part(frames: list[str]) -> tuple[str, str]:
    """The part of the loop's time a stack belongs to, and where in it (file:function of its
    innermost nstap frame, or innermost frame) for the "other" list."""
    located = []
    for frame in reversed(frames):  # innermost first
        match = re.match(r"^(.*) \((.*):\d+\)$", frame)
        if match:
            located.append((match.group(2), match.group(1)))
    for path, _ in located:
        for part, needles in LOOP_PARTS:
            if any(n in "/" + path for n in needles):
                return part, ""
    if not located:
        return LOOP_OTHER, frames[-1] if frames else "?"
    innermost = f"{located[0][0]}:{located[0][1]}"
    ours = next((f"{p}:{f}" for p, f in located if "nstap/" in "/" + p), None)
    return LOOP_OTHER, innermost if ours in (None, innermost) else f"{innermost} (in {ours})"


def sampler_of(frames: list[str]) -> str:
    """Which sampler a stack of the samplers' part is in ("other": none of SAMPLER_NAMES)."""
    for frame in reversed(frames):  # innermost first
        match = re.search(r"nstap/samplers/(\w+)\.py:\d+\)$", frame)
        if match:
            return match.group(1) if match.group(1) in SAMPLER_NAMES else "other"
    return "other"


# py-spy's non-blocking mode counts the event loop's thread as active in a good share of the
# moments it sleeps in epoll_wait (beside 50 containers: 43-52 % of its samples of the loop had this
# frame on top), where the kernel's own sampling of the thread's CPU time (``perf record -e
# cpu-clock -t TID``) finds 1.4 % of it in epoll_wait: those samples are left out of the split,
# which is scaled to the thread's CPU as the kernel counted it (they are counted in
# ``loop_wait_samples``). Before 2026-12-07 they were in the "other" row.
WAIT_FRAME = "EpollSelector.select (selectors.py"


class LoopProfile:
    """A low-rate, non-blocking ``py-spy record --threads --format raw`` over the window: which part
    of the daemon's code the event-loop thread's active samples are in."""

    def __init__(self, pyspy: str, pid: int, seconds: float, workdir: Path, rate: int) -> None:
        self.pid = pid
        self.raw = workdir / "pyspy.raw"
        self.log = workdir / "pyspy.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [pyspy, "record", "--nonblocking", "--rate", str(rate), "--threads", "--format", "raw",
                 "--duration", str(max(1, round(seconds))), "--output", str(self.raw), "--pid", str(pid)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def result(self, timeout: float) -> dict:
        """Waits for py-spy to write its output (or stops it), then parses it."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.stop()
        if not self.raw.exists():
            return {"error": self.log.read_text(errors="replace").strip()[-300:]}
        return parse_profile(self.raw.read_text(errors="replace"), self.log.read_text(errors="replace"), self.pid)


def parse_profile(raw: str, log_text: str, pid: int) -> dict:
    """py-spy's raw stacks (``--threads``) split: the event loop's (thread ``pid``) by part of the
    daemon, every thread's sample counts."""
    parts: Counter[str] = Counter()
    samplers: Counter[str] = Counter()
    other: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    names: dict[int, str] = {}
    waits = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        head = re.match(r"^thread \((\d+|0x[0-9A-Fa-f]+)\): (.*)$", frames[0])
        if head is None:
            continue
        tid = int(head.group(1), 0)
        names[tid] = head.group(2)
        threads[head.group(2)] += count
        if tid != pid:
            continue
        if frames[-1].startswith(WAIT_FRAME):  # the loop asleep in epoll_wait: see WAIT_FRAME
            waits += count
            continue
        part, where = loop_part(frames[1:])
        parts[part] += count
        if part == "samplers":
            samplers[sampler_of(frames[1:])] += count
        if where:
            other[where] += count
    loop_samples = sum(parts.values())
    errors = re.search(r"Errors: (\d+)", log_text)
    return {
        "loop_samples": loop_samples,
        "loop_wait_samples": waits,
        "samples_by_thread": dict(threads.most_common()),
        "loop_share": {
            **{part: parts.get(part, 0) / loop_samples for part, _ in (*LOOP_PARTS, (LOOP_OTHER, ()))},
            **{f"samplers: {name}": samplers.get(name, 0) / loop_samples for name in (*SAMPLER_NAMES, "other")},
        } if loop_samples else {},
        "other_top": [{"where": w, "share_of_loop": round(c / loop_samples, 4)} for w, c in other.most_common(8)],
        "errors": int(errors.group(1)) if errors else None,
        "thread_names": names,
    }


# --- traffic ----------------------------------------------------------------------------------


async def _traffic(ips: list[str], concurrency: int, timeout: float) -> None:
    """One ``GET /index.html`` per container per second, each container at its own phase of the
    second, at most ``concurrency`` at once; prints ``ok failed missed`` (cumulative) on SIGUSR1."""
    loop = asyncio.get_running_loop()
    stats = {"ok": 0, "failed": 0, "missed": 0}
    stop = asyncio.Event()
    gate = asyncio.Semaphore(concurrency)

    def report() -> None:
        sys.stdout.write(f"{stats['ok']} {stats['failed']} {stats['missed']}\n")
        sys.stdout.flush()

    loop.add_signal_handler(signal.SIGUSR1, report)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    async def get(ip: str) -> bool:
        reader, writer = await asyncio.open_connection(ip, 80)
        try:
            writer.write(b"GET /index.html HTTP/1.0\r\n\r\n")
            body = await reader.read()  # HTTP/1.0: the server closes after the response
            return body[:9] in (b"HTTP/1.0 ", b"HTTP/1.1 ") and body[9:12] == b"200"
        finally:
            writer.close()

    async def container(index: int, ip: str) -> None:
        due = loop.time() + index / len(ips)  # spread over the second
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            async with gate:
                try:
                    ok = await asyncio.wait_for(get(ip), timeout)
                except (OSError, TimeoutError):
                    ok = False
            stats["ok" if ok else "failed"] += 1
            due += 1.0
            late = loop.time() - due
            if late > 0:  # this container's previous request took its next slots
                missed = math.ceil(late)
                stats["missed"] += missed
                due += missed

    tasks = [asyncio.create_task(container(i, ip)) for i, ip in enumerate(ips)]
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def traffic_worker(argv: list[str]) -> int:
    """``bench_sampling.py --traffic-worker IPS_FILE CONCURRENCY``: the traffic process."""
    ips = Path(argv[0]).read_text().split()
    asyncio.run(_traffic(ips, int(argv[1]), timeout=2.0))
    return 0


class Traffic:
    """The HTTP client, in a process of its own (it would otherwise share the benchmark's GIL with
    the scrapes it times)."""

    def __init__(self, ips: list[str], workdir: Path, concurrency: int) -> None:
        path = workdir / "ips"
        path.write_text("\n".join(ips))
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--traffic-worker", str(path), str(concurrency)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, start_new_session=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit("the traffic process did not start")

    def counts(self) -> dict[str, int]:
        """Requests so far: ok, failed, missed (a container's slot taken by its previous request)."""
        os.kill(self.proc.pid, signal.SIGUSR1)
        assert self.proc.stdout is not None
        ok, failed, missed = map(int, self.proc.stdout.readline().split())
        return {"ok": ok, "failed": failed, "missed": missed}

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- containers -------------------------------------------------------------------------------


BIG_WEB = ("sh", "-c", "dd if=/dev/urandom of=/www/big bs=1024 count=4096 2>/dev/null; exec httpd -f -p 80 -h /www")


class Fleet:
    """The run's containers (labelled with the run's id) and the extra bridges they need: docker0
    takes what it has room for, each further ``BRIDGE_PORTS`` go on a bridge network of the run's."""

    def __init__(self, image: str, parallel: int, bridge_ports: int) -> None:
        self.image = image
        self.parallel = parallel
        self.bridge_ports = bridge_ports
        self.ids: list[str] = []  # the measured containers, in start order
        self.networks: list[str] = []
        self.extra_ids: list[str] = []  # probes, the capture-load container
        self.serial = 0
        on_bridge = run("docker", "network", "inspect", "bridge", "-f", "{{len .Containers}}")
        self.bridge_room = max(0, bridge_ports - int(on_bridge or 0))

    def _network(self, slot: int) -> list[str]:
        if slot < self.bridge_room:
            return []
        index = (slot - self.bridge_room) // self.bridge_ports
        while len(self.networks) <= index:
            name = f"{NAME}-{len(self.networks) + 1}"
            run("docker", "network", "create", *LABELS, name)
            self.networks.append(name)
        return ["--network", self.networks[index]]

    def _start(self, name: str, network: list[str], *command: str, labels: tuple[str, ...] = ()) -> str:
        command = command or ("httpd", "-f", "-p", "80", "-h", "/www")
        return run("docker", "run", "-d", *LABELS, *labels, *network, "--name", name, self.image, *command)

    def grow(self, n: int) -> float:
        """Start containers until there are ``n``, ``parallel`` ``docker run`` at a time, with
        progress on stderr; returns the seconds it took."""
        start = time.monotonic()
        first = len(self.ids)
        if n <= first:
            return 0.0
        networks = [self._network(slot) for slot in range(first, n)]  # created here, not in the workers
        log(f"starting containers {first + 1}..{n} ({self.parallel} at a time)")
        pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="docker-run")
        futures: dict[Future, int] = {
            pool.submit(self._start, f"{NAME}-{i}", networks[i - first]): i for i in range(first, n)
        }
        ids: dict[int, str] = {}
        pending = set(futures)
        last = time.monotonic()
        try:
            while pending:
                done, pending = wait(pending, timeout=2, return_when=FIRST_COMPLETED)
                for future in done:
                    ids[futures[future]] = future.result()
                if time.monotonic() - last >= 5 or not pending:
                    last = time.monotonic()
                    elapsed = last - start
                    log(f"  {first + len(ids)}/{n} running ({len(ids) / elapsed:.1f}/s)")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.ids.extend(ids[i] for i in sorted(ids))  # what did start is removed at the end, in any case
        return time.monotonic() - start

    def start_extra(self, prefix: str, *command: str, labels: tuple[str, ...] = ()) -> str:
        """One more container (a probe) beside the measured ones."""
        self.serial += 1
        cid = self._start(f"{NAME}-{prefix}-{self.serial}", self._network(len(self.ids) + len(self.extra_ids)), *command, labels=labels)
        self.extra_ids.append(cid)
        return cid

    def remove_extra(self) -> None:
        if self.extra_ids:
            run("docker", "rm", "-f", *self.extra_ids, check=False)
            self.extra_ids.clear()

    @staticmethod
    def inspect(ids: list[str], template: str) -> list[str]:
        out: list[str] = []
        for i in range(0, len(ids), 200):
            out.extend(run("docker", "inspect", "-f", template, *ids[i : i + 200]).split("\n"))
        return out

    def ips(self, ids: list[str]) -> list[str]:
        return self.inspect(ids, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")

    def pids(self, ids: list[str]) -> list[int]:
        return [int(p) for p in self.inspect(ids, "{{.State.Pid}}")]

    def remove_all(self) -> None:
        """Every container and network labelled with this run's id, including any whose ``docker
        run`` was interrupted before it answered."""
        listed = run("docker", "ps", "-aq", "--filter", f"label=nstap.bench.run={RUN_ID}", check=False).split()
        ids = sorted(set(listed) | {i[:12] for i in self.ids + self.extra_ids})
        if ids:
            # Killed first, a batch at a time, then removed: several `docker rm -f` of running
            # containers at once left Docker 20.10 holding its container locks for good (seen with
            # 1,000 containers; only a restart of dockerd freed them).
            log(f"removing {len(ids)} containers")
            for i in range(0, len(ids), 50):
                chunk = ids[i : i + 50]
                try:
                    run("docker", "kill", *chunk, check=False, timeout=120)
                    run("docker", "rm", "-f", *chunk, check=False, timeout=120)
                except subprocess.TimeoutExpired:
                    # Seen once after a 1,000-container run: dockerd 20.10's ContainerKill stuck
                    # (kill.go:151) and every later call with it. Kill what is left from here,
                    # without dockerd, and stop asking it: each batch would wait out its timeout.
                    left = ids[i:]
                    killed = self._kill_directly(left)
                    log(
                        f"docker did not kill/remove {len(chunk)} containers within 120 s: killed the {killed} of the {len(left)} "
                        "left that still ran, by their pids, and gave up on dockerd. To recover: restart dockerd "
                        "(kill -TERM $(pidof dockerd); pkill -9 containerd-shim; make runtimes), then "
                        f"docker rm -f $(docker ps -aq --filter label=nstap.bench.run={RUN_ID}) and "
                        f"docker network rm $(docker network ls -q --filter label=nstap.bench.run={RUN_ID})"
                    )
                    return
        self.ids.clear()
        self.extra_ids.clear()
        networks = run("docker", "network", "ls", "-q", "--filter", f"label=nstap.bench.run={RUN_ID}", check=False).split()
        if networks:
            run("docker", "network", "rm", *networks, check=False)
        self.networks.clear()

    @staticmethod
    def _kill_directly(ids: list[str]) -> int:
        """SIGKILL the init process of each of ``ids`` that still runs, found without dockerd (the
        container's id in the cgroup path of a process): how many were killed."""
        wanted = set(ids)
        killed = 0
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cgroup = (proc / "cgroup").read_text()
                status = (proc / "status").read_text()
            except OSError:
                continue
            if "\nNSpid:" not in status or status.split("\nNSpid:")[1].split("\n")[0].split()[-1] != "1":
                continue  # not a container's init
            found = next((cid for cid in wanted if f"/docker/{cid}" in cgroup or f"docker-{cid}" in cgroup), None)
            if found is None:
                continue
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        return killed


class CaptureLoad(threading.Thread):
    """Downloads from a flight-recorded container without pause and takes a capture with 60 s of
    pre-trigger packets from it every 3-7 s (each reads its whole ring back)."""

    def __init__(self, ip: str, name: str, api_port: int, token: str) -> None:
        super().__init__(daemon=True)
        self.ip, self.name, self.api_port, self.token = ip, name, api_port, token
        self.halt = threading.Event()
        self.captures: list[str] = []
        self.downloader = threading.Thread(target=self._download, daemon=True)

    def _download(self) -> None:
        while not self.halt.is_set():
            wget = ["busybox", "wget", "-q", "-O", "/dev/null", f"http://{self.ip}/big"]
            subprocess.run(wget, check=False, capture_output=True, timeout=60)

    def run(self) -> None:
        self.downloader.start()
        while not self.halt.wait(random.uniform(3, 7)):  # jittered, like the scrapes
            body = json.dumps({"container": self.name, "duration": 3, "pre_seconds": 60}).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{self.api_port}/api/v1/captures", data=body, method="POST",
                headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as r:
                    self.captures.append(json.load(r)["mode"])
            except OSError:
                self.captures.append("refused")

    def stop(self) -> None:
        self.halt.set()
        self.join(15)
        self.downloader.join(65)


# --- the lower bound --------------------------------------------------------------------------


def nslimit(pids: list[int], rounds: int) -> dict | None:
    """The lower bound from the shared tool (µs per namespace-sample: 4 proc files + LISTEN
    sock_diag; the full TCP dump is reported too)."""
    source = ROOT.parent / "shared/tools/nslimit.c"
    if not source.exists() or not shutil.which("gcc"):
        log("no ../shared/tools/nslimit.c or no gcc: no lower bound")
        return None
    binary = Path(tempfile.gettempdir()) / f"nstap-nslimit-{os.getpid()}"
    try:
        run("gcc", "-O2", "-o", str(binary), str(source))
        out = run(str(binary), str(rounds), *map(str, pids), timeout=600)
    finally:
        binary.unlink(missing_ok=True)
    values = dict(re.findall(r"(\w+_us) ([\d.]+)", out))
    return {
        "bound_us": float(values["proc4_us"]) + float(values["listen_diag_us"]),
        "proc4_us": float(values["proc4_us"]),
        "listen_diag_us": float(values["listen_diag_us"]),
        "full_diag_us": float(values["full_diag_us"]),
        "containers": len(pids),
        "rounds": rounds,
    }


def nspaced(pids: list[int], rounds: int, daemon_reads: bool = False, protocol_files: bool = True, socket_files: bool = True) -> dict | None:
    """nslimit's reads at the daemon's cadence (``bench/nspaced.c``): one round over every
    container per interval, CPU µs per namespace-sample. nslimit reads the same files back to back
    and measures them warm; the daemon reads each namespace once an interval, when the CPU's
    caches hold other work, and no sampler of that cadence can go below this.

    With ``daemon_reads``, the reads the daemon itself makes per sample instead (each listener
    asked for by its id where nslimit dumps the listening hash; without ``protocol_files``, not
    snmp and netstat, and without ``socket_files``, not sockstat and sockstat6: the daemon reads
    those in the eBPF pass over every namespace, :func:`mib_pass`)."""
    if not shutil.which("gcc"):
        log("no gcc: no paced lower bound")
        return None
    binary = Path(tempfile.gettempdir()) / f"nstap-nspaced-{os.getpid()}"
    mode = (["--daemon-reads"] + (["--protocol-files"] if protocol_files else []) + (["--socket-files"] if socket_files else [])) if daemon_reads else []
    try:
        run("gcc", "-O2", "-o", str(binary), str(ROOT / "bench" / "nspaced.c"))
        out = run(str(binary), *mode, str(rounds), str(INTERVAL), *map(str, pids), timeout=rounds * INTERVAL + 120)
    finally:
        binary.unlink(missing_ok=True)
    return {"bound_us": float(re.search(r"paced_us ([\d.]+)", out).group(1)), "containers": len(pids), "rounds": rounds}


def mib_pass(rounds: int, containers: int) -> dict | None:
    """The daemon's pass over every namespace's protocol counters (nstap/ebpf/mibs.py), loaded by
    the daemon's own loader child and run here once per interval for ``rounds`` intervals: its CPU
    (this thread's) per container-sample. None where it does not load."""
    from nstap.ebpf.loader import load_in_child  # noqa: PLC0415 - the bench's venv has the daemon
    from nstap.ebpf.mibs import MibPass  # noqa: PLC0415

    try:
        handover = asyncio.run(load_in_child())
    except Exception as exc:  # noqa: BLE001 - EbpfUnavailable, or anything the loader says
        log(f"no eBPF pass to measure: {exc}")
        return None
    try:
        prog, records = handover.fds.pop("prog:mibs", None), handover.fds.pop("map:mib_records", None)
        if prog is None or records is None:
            log(f"no eBPF pass to measure: {handover.report.get('mibs_error')}")
            return None
        report = handover.report
        reader = MibPass(prog, records, tuple(report["mib_keys"]), int(report["mib_batch"]), tuple(report.get("mib_socket_keys") or ()))
        spent, read = 0.0, 0
        try:
            for _ in range(rounds):
                time.sleep(INTERVAL)
                started = time.thread_time()
                read = len(reader.read()[0])
                spent += time.thread_time() - started
        finally:
            reader.close()
    finally:
        handover.close()
    return {"us_per_container_sample": round(spent / rounds / containers * 1e6, 2), "namespaces": read, "rounds": rounds}


# --- one size ---------------------------------------------------------------------------------


def sleep_to_phase(phase: float) -> float:
    """Sleep until the monotonic clock (the daemon's loop clock) is at ``phase`` of an interval;
    returns that time."""
    now = time.monotonic()
    target = (now // INTERVAL) * INTERVAL + phase * INTERVAL
    if target <= now + 0.05:
        target += INTERVAL
    time.sleep(target - time.monotonic())
    return target


def group_of(thread_name: str) -> str:
    """``nstap-io_1`` -> ``nstap-io`` (a kernel comm cut at 15 characters, ``nstap-evidence_``, too)."""
    return re.sub(r"_\d*$", "", thread_name)


def measure(args: argparse.Namespace, n: int, fleet: Fleet, settings: HostSettings, setup_s: float, setup_total_s: float) -> dict:
    """Run the daemon over the first ``n`` containers of the fleet and measure it."""
    ids = fleet.ids[:n]
    ips, pids = fleet.ips(ids), fleet.pids(ids)
    short = {cid[:12] for cid in ids}
    workdir = Path(tempfile.mkdtemp(prefix=f"nstap-bench-{n}-"))
    port = 19880 + (os.getpid() + n) % 1000 * 2
    pyspy = pyspy_binary() if args.profile else None
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        stack.callback(fleet.remove_extra)
        ring = None
        if args.capture_load:
            ring = fleet.start_extra("ring", *BIG_WEB, labels=("--label", "nstap.capture=ring"))
        cgroup = CpuCgroup(f"{NAME}-{n}")
        leftovers: list[int] = []
        stack.callback(lambda: leftovers.extend(cgroup.remove()))
        daemon = Daemon(workdir, port, cgroup, args.ring_bytes, args.dns)
        stack.callback(daemon.stop)
        pid = daemon.pid

        log(f"{n} containers: daemon {pid} started, waiting for the first sample of each")
        started = time.monotonic()
        deadline = started + 60 + n * 0.1
        while True:
            daemon.alive()
            try:
                _, text = scrape(port)
                if short <= set(sampled_ids(text)):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"nstap did not sample every container within {deadline - started:.0f} s:\n{daemon.tail()}")
            time.sleep(0.2 if n <= 200 else 1.0)
        attach_s = time.monotonic() - started

        scraper = Scraper(port, args.scrape_every, args.scrape_jitter, lambda: sum(status_kib(p, "VmRSS") for p in cgroup.pids()))
        scraper.start()
        stack.callback(scraper.stop)
        traffic = Traffic(ips, workdir, args.http_concurrency)
        stack.callback(traffic.stop)
        load = None
        if ring is not None:
            token = (workdir / "data/api-token").read_text().strip()
            load = CaptureLoad(fleet.ips([ring])[0], run("docker", "inspect", "-f", "{{.Name}}", ring).lstrip("/"), port + 1, token)
            load.start()
            stack.callback(load.stop)
            time.sleep(20)  # the ring fills
        # The first walks and layouts are done, traffic is flowing, and (at a steady cadence) the
        # daemon has seen the scraper's first three scrapes, as it has seen a real Prometheus's.
        time.sleep(max(args.warmup, 0 if args.scrape_jitter else 3 * args.scrape_every + 1))

        # The window: both ends at the same phase of the ticks and a whole number of intervals apart.
        seconds = max(1, round(args.duration / INTERVAL)) * INTERVAL
        log(f"{n} containers: measuring {seconds:.0f} s")
        t0 = sleep_to_phase(PHASE)
        cg0, proc0, threads0 = cgroup.usage_s(), cpu_seconds(pid), thread_cpu(pid)
        http0, http_cpu0 = traffic.counts(), traffic.cpu_seconds()
        _, text0 = scrape(port)
        profile = LoopProfile(pyspy, pid, seconds, workdir, args.profile_rate) if pyspy else None
        if profile is not None:
            stack.callback(profile.stop)
        t1 = t0 + seconds
        time.sleep(max(0.0, t1 - time.monotonic()))
        cg1, proc1, threads1 = cgroup.usage_s(), cpu_seconds(pid), thread_cpu(pid)
        window = scraper.within(t0, t1)
        scraper.stop()
        scrapes = [(taken, size) for _, taken, size, _ in window]
        rss_peak_total = max((rss for *_, rss in window), default=0)
        http1, http_cpu1 = traffic.counts(), traffic.cpu_seconds()
        _, text1 = scrape(port)
        measured = time.monotonic() - t0
        daemon.alive()
        in_group = cgroup.pids()
        rss_kib = status_kib(pid, "VmRSS")
        rss_children_kib = sum(status_kib(p, "VmRSS") for p in in_group if p != pid)
        rss_peak_total = max(rss_peak_total, rss_kib + rss_children_kib)
        hwm_kib = status_kib(pid, "VmHWM")
        loop_profile = profile.result(timeout=10) if profile is not None else {}
        if profile is not None and args.keep_profile and profile.raw.exists():
            shutil.copy(profile.raw, f"{args.keep_profile}.{n}.raw")  # py-spy's raw stacks, for a closer look
        proc_comm = threads1.get(pid, ("", 0.0))[0]
        unnamed = [tid for tid, (comm, _) in threads1.items() if tid != pid and comm == proc_comm]
        names_from = "kernel (comm)"
        names: dict[int, str] = {}
        if unnamed:
            names = dict(loop_profile.get("thread_names", {}))
            if pyspy and any(tid not in names for tid in unnamed):
                names.update(pyspy_thread_names(pyspy, pid))
            every = len(unnamed) == len(threads1) - 1
            names_from = "py-spy (every thread's kernel comm is the process's)" if every else "kernel (comm) and py-spy"
        traffic.stop()
        if load is not None:
            load.stop()

        # start -> first sample of a new container: from the moment its process started (docker's
        # State.StartedAt) to the moment the daemon took its first sample (the sample's own
        # nstap_sample_timestamp_seconds, in the first scrape that shows it: a later sample's if
        # a tick came between, so never less than the truth). Timing it by when a scrape showed
        # it would add the scrape's own time (0.2-0.5 s at 1,000 containers) and `docker run`'s.
        first_sample, seen_in_scrape = [], []
        for _ in range(args.first_sample_probes):
            cid = fleet.start_extra("probe")
            returned = time.time()
            started = docker_time(run("docker", "inspect", "-f", "{{.State.StartedAt}}", cid))
            while True:
                _, text = scrape(port)
                taken = sample_timestamp(text, cid[:12])
                if taken is not None:
                    first_sample.append(taken - started)
                    seen_in_scrape.append(time.time() - returned)
                    break
                if time.time() - returned > 10:
                    first_sample.append(float("inf"))
                    seen_in_scrape.append(float("inf"))
                    break
                time.sleep(0.05)
        daemon.stop()
        lower = nslimit(pids[:NSLIMIT_CONTAINERS], args.nslimit_rounds)
        paced = nspaced(pids, args.paced_rounds) if args.paced_rounds else None
        # Where the daemon had the eBPF pass over the protocol counters it read no snmp or netstat.
        mibs_used = not any(f'"{e}"' in daemon.tail(10_000) for e in ("ebpf_unavailable", "ebpf_mibs_unavailable"))
        mib_sockets_used = mibs_used and '"ebpf_mib_sockets_unavailable"' not in daemon.tail(10_000)
        paced_daemon = (
            nspaced(pids, args.paced_rounds, daemon_reads=True, protocol_files=not mibs_used, socket_files=not mib_sockets_used)
            if args.paced_rounds else None
        )
        passes = mib_pass(args.paced_rounds, len(pids)) if args.paced_rounds and mibs_used else None
        # The stack's remaining callbacks remove the cgroup, the probes and the work directory.

    # --- the figures ---
    samples = metric(text1, "nstap_sample_duration_seconds_count") - metric(text0, "nstap_sample_duration_seconds_count")
    watched = (metric(text0, "nstap_namespaces_watched") + metric(text1, "nstap_namespaces_watched")) / 2
    containers_watched = metric_sum(text1, "nstap_containers_watched")
    expected = watched * seconds / INTERVAL
    slowed = {cid: every for cid, every in sampled_ids(text1).items() if every > INTERVAL}
    cpu_all, cpu_proc = cg1 - cg0, proc1 - proc0
    per_cs = (lambda s: s / samples * 1e6) if samples else (lambda s: float("nan"))  # µs per container-sample

    threads: Counter[str] = Counter()
    for tid, (comm, cpu) in threads1.items():
        if tid == pid:
            name = "MainThread"
        elif comm != proc_comm:
            name = comm
        else:
            name = names.get(tid, "unnamed")
        threads[group_of(name)] += cpu - threads0.get(tid, (comm, 0.0))[1]
    exited = cpu_proc - sum(threads.values())  # threads that ended during the window, and tick rounding
    loop_cpu = threads.get("MainThread", 0.0)
    share = loop_profile.get("loop_share") or {}
    loop_us = {part: round(per_cs(loop_cpu * fraction), 2) for part, fraction in share.items()}
    # One standard error of each part (binomial: a share of the loop's py-spy samples).
    loop_samples = loop_profile.get("loop_samples") or 0
    loop_err_us = {
        part: round(per_cs(loop_cpu * math.sqrt(fraction * (1 - fraction) / loop_samples)), 2) for part, fraction in share.items()
    } if loop_samples else {}
    def delta(name: str) -> float:
        """A counter's increase over the window (0 when the daemon does not export it)."""
        return metric(text1, name, 0.0) - metric(text0, name, 0.0)

    bound_ms = lower["bound_us"] / 1000 if lower else None
    paced_ms = paced["bound_us"] / 1000 if paced else None
    paced_daemon_ms = paced_daemon["bound_us"] / 1000 if paced_daemon else None
    # The floor of this design with every default feature on: the daemon's own reads, in C, at its
    # cadence, and everything it spends outside the event loop as measured (its other threads,
    # children): what it would cost if the loop did nothing but those reads.
    # With the eBPF pass: its cost per container-sample too (it runs on the loop's thread).
    pass_ms = passes["us_per_container_sample"] / 1000 if passes else 0.0
    floor_ms = paced_daemon_ms + pass_ms + per_cs(cpu_all - loop_cpu) / 1000 if paced_daemon_ms and samples else None
    memory_goal_mib = MEMORY_BASE_MIB + MEMORY_PER_CONTAINER_KIB * containers_watched / 1024
    requests = http1["ok"] - http0["ok"]
    variant = []
    if args.child_ehash:
        variant.append(f"child-ehash={args.child_ehash}")
    if args.capture_load:
        variant.append(f"capture-load ring={args.ring_bytes}")
    if args.scrape_every != 15.0:
        variant.append(f"scrape-every={args.scrape_every:g}")
    if args.scrape_jitter:
        variant.append(f"scrape-jitter={args.scrape_jitter:g}")
    if args.dns != "auto":
        variant.append(f"dns={args.dns}")

    def ms(s: float) -> float:
        return round(s * 1e3, 3)

    return {
        "run_id": RUN_ID,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "git": run("git", "-C", str(ROOT), "describe", "--always", "--dirty", check=False),
        "variant": ",".join(variant) or "default",
        "containers": n,
        "namespaces_watched": watched,
        "namespaces_watched_start_end": [metric(text0, "nstap_namespaces_watched"), metric(text1, "nstap_namespaces_watched")],
        "containers_watched": containers_watched,
        "other_containers_watched": containers_watched - n,
        "interval_s": INTERVAL,
        "measured_s": round(measured, 2),
        "samples": int(samples),
        "samples_expected": round(expected),
        "samples_ratio": round(samples / expected, 3) if expected else None,
        "slowed_namespaces": len(slowed),
        "cpu_ms_per_container_sample": round(per_cs(cpu_all) / 1000, 4),
        "cpu_ms_per_container_sample_process": round(per_cs(cpu_proc) / 1000, 4),
        "cpu_ms_per_container_sample_children": round(per_cs(cpu_all - cpu_proc) / 1000, 4),
        "daemon_cpu_percent": round(cpu_all / measured * 100, 2),
        "process_cpu_percent": round(cpu_proc / measured * 100, 2),
        "lower_bound_ms": round(bound_ms, 4) if bound_ms else None,
        "multiple_of_lower_bound": round(per_cs(cpu_all) / 1000 / bound_ms, 2) if bound_ms else None,
        "multiple_of_lower_bound_process": round(per_cs(cpu_proc) / 1000 / bound_ms, 2) if bound_ms else None,
        "nslimit": lower,
        "paced_bound_ms": round(paced_ms, 4) if paced_ms else None,
        "multiple_of_paced_bound": round(per_cs(cpu_all) / 1000 / paced_ms, 2) if paced_ms else None,
        "nspaced": paced,
        "paced_daemon_reads_ms": round(paced_daemon_ms, 4) if paced_daemon_ms else None,
        "nspaced_daemon_reads": paced_daemon,
        "mib_pass": passes,  # the eBPF pass over every namespace's protocol counters (None: the daemon read the files)
        "floor_ms": round(floor_ms, 4) if floor_ms else None,
        "floor_multiple_of_lower_bound": round(floor_ms / bound_ms, 2) if floor_ms and bound_ms else None,
        "breakdown_us_per_container_sample": {
            "all": round(per_cs(cpu_all), 2),
            "process": round(per_cs(cpu_proc), 2),
            "children": round(per_cs(cpu_all - cpu_proc), 2),
            "threads": {name: round(per_cs(cpu), 2) for name, cpu in threads.most_common()},
            "exited_threads": round(per_cs(exited), 2),
            "loop": loop_us,
            "loop_standard_error": loop_err_us,
        },
        "thread_names_from": names_from,
        "profile": {k: v for k, v in loop_profile.items() if k != "thread_names"} if loop_profile else None,
        "children_left_at_end": leftovers,
        "rss_mib": round(rss_kib / 1024, 1),
        "rss_children_mib": round(rss_children_kib / 1024, 1),
        "rss_total_mib": round((rss_kib + rss_children_kib) / 1024, 1),
        "rss_total_peak_mib": round(rss_peak_total / 1024, 1),
        "rss_hwm_mib": round(hwm_kib / 1024, 1),
        "memory_goal_mib": round(memory_goal_mib, 1),
        "memory_goal_met": (rss_peak_total / 1024) <= memory_goal_mib,
        "scrapes": len(scrapes),
        "scrape_ms_median": ms(statistics.median(s for s, _ in scrapes)) if scrapes else None,
        "scrape_ms_max": ms(max(s for s, _ in scrapes)) if scrapes else None,
        "scrape_kib": round(statistics.median(b for _, b in scrapes) / 1024, 1) if scrapes else None,
        "scrape_jitter": args.scrape_jitter,
        # Bodies rendered ahead of the scrapes in the window (metrics.render_ahead), served or not,
        # and the scrapes expected that found none made for them.
        "renders_ahead": {r: metric_sum(text1, f'nstap_metrics_renders_ahead_total{{result="{r}"}}') - metric_sum(text0, f'nstap_metrics_renders_ahead_total{{result="{r}"}}')
                          for r in ("served", "unused", "missed")},
        "socket_walks": int(delta("nstap_socket_walk_cpu_seconds_count")),
        "first_sample_s_median": round(statistics.median(first_sample), 2) if first_sample else None,
        "first_sample_s_max": round(max(first_sample), 2) if first_sample else None,
        "first_sample_from": "container start (State.StartedAt) to the first sample's own timestamp",
        "seen_in_scrape_s_median": round(statistics.median(seen_in_scrape), 2) if seen_in_scrape else None,
        "seen_in_scrape_s_max": round(max(seen_in_scrape), 2) if seen_in_scrape else None,
        "http_requests_per_s": round(requests / measured, 1),
        "http_target_per_s": n,
        "http_failed": http1["failed"] - http0["failed"],
        "http_missed": http1["missed"] - http0["missed"],
        "http_client_cpu_percent": round((http_cpu1 - http_cpu0) / measured * 100, 1),
        "tick_lag_ms": lag_quantiles(text0, text1),
        "attach_s": round(attach_s, 1),
        "setup_s": round(setup_s, 1),
        "setup_total_s": round(setup_total_s, 1),
        "networks": 1 + len(fleet.networks),
        "host_settings": settings.changed(),
        "child_ehash": args.child_ehash,
        "scrape_every_s": args.scrape_every,
        "captures": dict(Counter(load.captures)) if load is not None else None,
    }


# --- reports ----------------------------------------------------------------------------------


def _ms(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} ms"


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def readme_table(results: list[dict]) -> Iterator[str]:
    """docs/performance.md's table: CPU and RSS with the daemon's children."""
    yield (
        "| containers | CPU per container-sample | lower bound (nslimit), same run | the same reads once a second (nspaced) "
        "| daemon CPU | RSS | `/metrics` scrape (median / max) | scrape size | start → first sample (median / max) |"
    )
    yield "|---|---|---|---|---|---|---|---|---|"
    for r in results:
        lb = f"{_ms(r['lower_bound_ms'])} (×{r['multiple_of_lower_bound']})" if r["lower_bound_ms"] else "n/a"
        paced = f"{_ms(r['paced_bound_ms'])} (×{r['multiple_of_paced_bound']})" if r.get("paced_bound_ms") else "n/a"
        yield (
            f"| {r['containers']} | {_ms(r['cpu_ms_per_container_sample'])} | {lb} | {paced} | {r['daemon_cpu_percent']:.1f} % | "
            f"{r['rss_total_mib']:.0f} MiB | {_num(r['scrape_ms_median'])} / {_num(r['scrape_ms_max'])} ms | "
            f"{r['scrape_kib'] or 0:.0f} KiB | "
            f"{r['first_sample_s_median']} / {r['first_sample_s_max']} s |"
        )


def accounting_table(results: list[dict]) -> Iterator[str]:
    yield (
        "| containers | samples taken / expected | CPU per container-sample: daemon + children / process only / children | "
        "RSS daemon / children / peak total (goal) | HTTP requests/s (target) | tick lag p50 / p99 / max | set-up |"
    )
    yield "|---|---|---|---|---|---|---|"
    for r in results:
        lag = r["tick_lag_ms"] or {}
        mult = f" (×{r['multiple_of_lower_bound_process']})" if r["multiple_of_lower_bound_process"] else ""
        goal = "met" if r["memory_goal_met"] else "MISSED"
        samples = f"{r['samples']} / {r['samples_expected']} ({r['samples_ratio']})"
        if r["slowed_namespaces"]:
            samples += f", {r['slowed_namespaces']} slowed"
        if r["other_containers_watched"]:
            samples += f", {r['other_containers_watched']:.0f} other containers watched"
        start_end = r["namespaces_watched_start_end"]
        if start_end[0] != start_end[1]:
            samples += f", namespaces {start_end[0]:.0f} → {start_end[1]:.0f} in the window (expected: their mean)"
        yield (
            f"| {r['containers']} | {samples} | "
            f"{_ms(r['cpu_ms_per_container_sample'])} / {_ms(r['cpu_ms_per_container_sample_process'])}{mult} / "
            f"{_ms(r['cpu_ms_per_container_sample_children'])} | "
            f"{r['rss_mib']:.0f} / {r['rss_children_mib']:.0f} / {r['rss_total_peak_mib']:.0f} MiB "
            f"(≤ {r['memory_goal_mib']:.0f}: {goal}) | "
            f"{r['http_requests_per_s']:.0f} ({r['http_target_per_s']}; {r['http_failed']} failed) | "
            f"{lag.get('p50', 'n/a')} / {lag.get('p99', 'n/a')} / {lag.get('max', 'n/a')} ms | "
            f"{r['setup_s']:.0f} s ({r['setup_total_s']:.0f} s in all) |"
        )


def breakdown_table(results: list[dict]) -> Iterator[str]:
    """Where the time goes, µs per container-sample (and share of the total), one column per size."""
    errors: dict[str, Callable[[dict], float | None]] = {}
    rows: list[tuple[str, Callable[[dict], float | None]]] = [
        ("**all: daemon + children (cgroup)**", lambda b: b["all"]),
        ("daemon process (utime+stime)", lambda b: b["process"]),
        ("children (iptables-save, nft, tcpdump, …)", lambda b: b["children"]),
    ]
    thread_names: list[str] = []
    for r in results:
        for name in r["breakdown_us_per_container_sample"]["threads"]:
            if name not in thread_names and name != "MainThread":
                thread_names.append(name)
    rows.append(("thread: event loop (MainThread)", lambda b: b["threads"].get("MainThread")))
    for part in (*(p for p, _ in LOOP_PARTS), LOOP_OTHER):
        rows.append((f"  loop: {part}", lambda b, part=part: b["loop"].get(part)))
        errors[f"  loop: {part}"] = lambda b, part=part: b.get("loop_standard_error", {}).get(part)
        if part == "samplers":  # each sampler (runs before 2026-12-05: n/a)
            for name in (*SAMPLER_NAMES, "other"):
                key = f"samplers: {name}"
                rows.append((f"    sampler: {name}", lambda b, key=key: b["loop"].get(key)))
                errors[f"    sampler: {name}"] = lambda b, key=key: b.get("loop_standard_error", {}).get(key)
    for name in thread_names:
        rows.append((f"thread: {name}", lambda b, name=name: b["threads"].get(name, 0.0)))
    rows.append(("threads that exited in the window (and the process figure's 10 ms steps)", lambda b: b["exited_threads"]))
    yield "| µs per container-sample | " + " | ".join(f"{r['containers']} containers" for r in results) + " |"
    yield "|---|" + "---|" * len(results)
    for label, get in rows:
        cells = []
        for r in results:
            b = r["breakdown_us_per_container_sample"]
            value = get(b)
            if value is None:
                cells.append("n/a")
                continue
            if abs(value) < 0.05:
                value = 0.0  # not "-0.0"
            error = errors[label](b) if label in errors else None
            text = f"{value:.1f}" + (f" ± {error:.1f}" if error else "")
            cells.append(f"{text} ({round(value / b['all'] * 100)} %)" if b["all"] else text)
        yield f"| {label} | " + " | ".join(cells) + " |"
    yield "| py-spy samples of the loop (± is one standard error; asleep in epoll_wait, left out) | " + " | ".join(
        f"{(r.get('profile') or {}).get('loop_samples', 'n/a')} ({(r.get('profile') or {}).get('loop_wait_samples', 'n/a')})" for r in results
    ) + " |"
    yield "| lower bound (nslimit) | " + " | ".join(
        f"{r['lower_bound_ms'] * 1000:.1f}" if r["lower_bound_ms"] is not None else "n/a" for r in results
    ) + " |"
    yield "| the same reads once a second (nspaced) | " + " | ".join(
        f"{r['paced_bound_ms'] * 1000:.1f}" if r.get("paced_bound_ms") is not None else "n/a" for r in results
    ) + " |"
    yield "| the daemon's own reads once a second (nspaced --daemon-reads) | " + " | ".join(
        f"{r['paced_daemon_reads_ms'] * 1000:.1f}" if r.get("paced_daemon_reads_ms") is not None else "n/a" for r in results
    ) + " |"
    yield "| the eBPF pass over every namespace's protocol counters, once a second | " + " | ".join(
        f"{r['mib_pass']['us_per_container_sample']:.1f}" if r.get("mib_pass") else "n/a" for r in results
    ) + " |"
    yield "| floor: those reads, the pass + everything outside the event loop (×nslimit) | " + " | ".join(
        f"{r['floor_ms'] * 1000:.1f} (×{r['floor_multiple_of_lower_bound']})" if r.get("floor_ms") is not None else "n/a" for r in results
    ) + " |"


def report(results: list[dict]) -> None:
    print()
    print("\n".join(readme_table(results)))
    print()
    print("CPU and RSS count the daemon with every child it forked (its cgroup); divided by the samples it took.")
    print()
    print("\n".join(accounting_table(results)))
    print()
    print("\n".join(breakdown_table(results)))
    for r in results:
        lag = r["tick_lag_ms"]
        if lag:
            hist = ", ".join(f"{k} {v:.0f}" for k, v in lag["histogram"].items() if v)
            print(f"\n{r['containers']} containers: tick lag (ms, bucket bounds) p50 {lag.get('p50')}  p99 {lag.get('p99')}  "
                  f"max {lag.get('max')} over {int(lag['ticks'])} ticks ({hist})")
        if r.get("seen_in_scrape_s_median") is not None:
            print(f"{r['containers']} containers: start -> first sample (the sample's own time) {r['first_sample_s_median']} / "
                  f"{r['first_sample_s_max']} s; `docker run` returning -> a scrape showing it {r['seen_in_scrape_s_median']} / "
                  f"{r['seen_in_scrape_s_max']} s (median / max)")
        profile = r.get("profile") or {}
        if profile.get("other_top"):
            top = "; ".join(f"{o['where']} {o['share_of_loop'] * 100:.1f} %" for o in profile["other_top"][:5])
            print(f"{r['containers']} containers: loop 'other' (share of the loop's {profile['loop_samples']} py-spy samples): {top}")
        print(f"{r['containers']} containers: thread names from {r['thread_names_from']}; "
              f"HTTP: {r['http_missed']} slots missed, client {r['http_client_cpu_percent']} % CPU; "
              f"attach {r['attach_s']} s; {r['networks']} bridge(s)"
              + (f"; sysctls {r['host_settings']}" if r["host_settings"] else "")
              + (f"; KILLED children left in the cgroup: {r['children_left_at_end']}" if r["children_left_at_end"] else ""))


# --- main -------------------------------------------------------------------------------------


def _interrupted(signum: int, frame: object) -> None:
    # The first Ctrl-C (or SIGTERM) unwinds into the clean-up; later ones must not cut it short.
    signal.signal(signal.SIGINT, _cleaning_up)
    signal.signal(signal.SIGTERM, _cleaning_up)
    raise KeyboardInterrupt


def _cleaning_up(signum: int, frame: object) -> None:
    log("cleaning up, please wait")


def sizes(text: str) -> list[int]:
    values = sorted({int(v) for v in text.split(",") if v.strip()})
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of container counts")
    return values


def main() -> int:
    if sys.argv[1:2] == ["--traffic-worker"]:
        return traffic_worker(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--containers", type=sizes, default=[50], help="one size or a list: 50,200,500,1000 (the fleet grows from one to the next)"
    )
    parser.add_argument("--large", action="store_true", help="200 containers")
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds per size")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds between the first sample of every container and the window")
    parser.add_argument("--child-ehash", type=int, default=0, help="set tcp_child_ehash_entries before starting containers")
    parser.add_argument("--first-sample-probes", type=int, default=5)
    parser.add_argument("--scrape-every", type=float, default=15.0, help="seconds between scrapes (from the daemon's start)")
    parser.add_argument(
        "--scrape-jitter", type=float, default=0.0,
        help="0: scrape at a steady cadence, as Prometheus does; 0.5: each interval times a uniform [0.5, 1.5] (the bench before 2026-12-05)",
    )
    parser.add_argument("--capture-load", action="store_true", help="a flight-recorded container downloaded from, captured every 3-7 s")
    parser.add_argument("--ring-bytes", type=int, default=8 * 1024 * 1024, help="capture.ring_bytes (with --capture-load)")
    parser.add_argument("--parallel", type=int, default=5, help="docker run at a time")
    parser.add_argument(
        "--bridge-ports", type=int, default=BRIDGE_PORTS,
        help="containers per bridge (docker0 counts the others on it); more go on bridges of the run's",
    )
    parser.add_argument("--http-concurrency", type=int, default=100, help="HTTP requests in flight at most")
    parser.add_argument("--nslimit-rounds", type=int, default=2000)
    parser.add_argument("--paced-rounds", type=int, default=10, help="rounds of bench/nspaced.c, one per interval, over every container (0: none)")
    parser.add_argument("--profile-rate", type=int, default=50, help="py-spy samples per second (non-blocking: the daemon is never paused)")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="no py-spy (no split of the event loop's time)")
    parser.add_argument("--keep-profile", type=Path, help="keep py-spy's raw stacks as PATH.<containers>.raw")
    parser.add_argument(
        "--results", type=Path, default=ROOT / "bench/results/sampling.jsonl", help="append one JSON line per size here ('' for none)"
    )
    parser.add_argument("--dns", choices=("auto", "on", "off"), default="auto", help="dns.mode of the daemon (its cost: on against off)")
    parser.add_argument("--json", type=Path, help="also write this run's results here (a JSON list)")
    parser.add_argument("--plot", type=Path, default=ROOT / "bench/sampling.png", help="drawn when the run covers several sizes")
    parser.add_argument("--always-plot", action="store_true", help="draw the plot after a single size too")
    args = parser.parse_args()
    todo = [200] if args.large else args.containers
    if os.geteuid() != 0:
        raise SystemExit("run as root: the daemon, its cgroup and the sysctls need it")
    if args.profile and not pyspy_binary():
        raise SystemExit("py-spy not found (pip install '.[bench]', or --no-profile)")
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    from images import ensure_image  # tests/ is on the path above

    image = ensure_image("docker")
    results: list[dict] = []
    settings = HostSettings()
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(settings.restore)
            fleet = Fleet(image, args.parallel, args.bridge_ports)
            stack.callback(fleet.remove_all)
            foreign = len(run("docker", "ps", "-q").split())
            if foreign:
                log(f"note: {foreign} other containers are running; the daemon samples them too (counted in the samples, reported)")
            if args.child_ehash:
                settings.set(EHASH, args.child_ehash)
            # The host's neighbour table holds an entry per container it talks to; above gc_thresh3
            # (1,024 by default) new ones fail.
            need = max(todo) + foreign + 64
            settings.at_least(NEIGH / "gc_thresh2", 2 * need)
            settings.at_least(NEIGH / "gc_thresh3", 4 * need)
            setup_total = 0.0
            for n in todo:
                setup = fleet.grow(n)
                setup_total += setup
                result = measure(args, n, fleet, settings, setup, setup_total)
                results.append(result)
                if args.results and str(args.results) != ".":  # Path("") is "."
                    args.results.parent.mkdir(parents=True, exist_ok=True)
                    with open(args.results, "a") as out:
                        out.write(json.dumps(result) + "\n")
                log(
                    f"{n} containers: {result['cpu_ms_per_container_sample']} ms per container-sample "
                    f"(×{result['multiple_of_lower_bound']} the bound), {result['samples']}/{result['samples_expected']} samples"
                )
    finally:
        if results:
            report(results)
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
            if args.results and str(args.results):
                print(f"\nfigures: {args.results}" + (f", {args.json}" if args.json else ""))
    if len(results) > 1 or args.always_plot:
        from plot_sampling import plot  # bench/ is on the path above

        plot(results, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        log("interrupted; everything the benchmark started is removed")
        raise SystemExit(130) from None
