"""Shared fixtures: real runtimes, a locally built busybox image, and nstap daemons run as processes.

Nothing here is faked: dockerd and the Podman service are started when absent (by the same
script ``make run`` uses), the test image is a busybox-static rootfs imported into both runtimes,
and every daemon under test is a real ``nstap run`` process scraped over HTTP.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import configuration as hypothesis_configuration
from prometheus_client.parser import text_string_to_metric_families

from images import ensure_image

ROOT = Path(__file__).resolve().parents[1]
RUN_ID = uuid.uuid4().hex[:8]
# Hypothesis keeps caches in the working directory unless told otherwise: not in the clone.
hypothesis_configuration.set_hypothesis_home_dir(Path("/var/cache/nstap-test/hypothesis"))
TEST_LABEL = "nstap.test"
# Podman 4.3 on this kind of host cannot start containers without explicit ulimits; this file
# gives every container (pod infra containers included) the ones the tests need.
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "tests/podman-containers.conf")}


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1, message: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s: {message or predicate}")
        time.sleep(interval)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port nobody listens on right now, and not handed out before in this run (the kernel
    may give the same free port to two calls in a row: a daemon's two listeners then collide)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def free_port_range(count: int) -> int:
    """The first of ``count`` consecutive TCP ports, all free on every address right now, below the
    kernel's ephemeral range (a range inside it collides with the outgoing connections of the run)
    and not handed out before. Returns the first port."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    start = 20000 + int(time.time() * 1000) % 5000
    for base in [*range(start, low - count, count), *range(20000, start, count)]:
        ports = range(base, base + count)
        if _HANDED_OUT.intersection(ports) or not all(_bindable(p) for p in ports):
            continue
        _HANDED_OUT.update(ports)
        return base
    raise AssertionError(f"no {count} consecutive free ports between 20000 and {low}")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def held_at_a_closed_gate(work: Callable[[], Any]) -> Any:
    """Run ``work`` in a worker thread while the sampling round's gate is closed: it must still be
    running half of MAX_WAIT later (it waits at the gate), and end once the gate opens. Its result."""
    import threading

    from nstap.gate import MAX_WAIT, ROUND

    done: list[Any] = []
    ROUND.close()
    try:
        worker = threading.Thread(target=lambda: done.append(work()))
        worker.start()
        worker.join(MAX_WAIT / 2)
        assert not done  # held at the gate while the round runs
    finally:
        ROUND.open()
    worker.join(5)
    assert done, "the work did not end once the gate opened"
    return done[0]


def sh(*args: str, check: bool = True, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a command, capturing output; raise with its stderr if it fails and ``check``."""
    proc = subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


# -- runtimes and the test image ---------------------------------------------------------------


@pytest.fixture(scope="session")
def runtimes() -> None:
    """dockerd and the Podman API service are running (started like `make run` does when absent)."""
    sh(str(ROOT / "deploy/start-runtimes.sh"), timeout=180)


@pytest.fixture(scope="session")
def docker_image(runtimes: None) -> str:
    """The busybox test image in dockerd (imported if absent)."""
    return ensure_image("docker")


@pytest.fixture(scope="session")
def podman_image(runtimes: None) -> str:
    """The busybox test image in Podman (imported if absent)."""
    return ensure_image("podman", env=PODMAN_ENV)


class Containers:
    """Starts labelled test containers and removes every one of them at the end."""

    def __init__(self) -> None:
        self.label = f"{TEST_LABEL}={RUN_ID}"
        self.created: list[tuple[str, str]] = []  # (cli, id)
        self.pods: list[str] = []

    def docker(self, *args: str, name: str | None = None) -> str:
        """``docker run -d`` with the test label; returns the full id."""
        return self._run("docker", args, name, None)

    def podman(self, *args: str, name: str | None = None) -> str:
        """``podman run -d`` with the test label; returns the full id."""
        return self._run("podman", args, name, PODMAN_ENV)

    def _run(self, cli: str, args: tuple[str, ...], name: str | None, env: dict | None) -> str:
        cmd = [cli, "run", "-d", "--label", self.label]
        if name:
            cmd += ["--name", f"{name}-{RUN_ID}"]
        cid = sh(*cmd, *args, env=env).stdout.strip().splitlines()[-1]
        self.created.append((cli, cid))
        return cid

    def pod(self, name: str, *args: str) -> str:
        """``podman pod create``; returns the pod name."""
        full = f"{name}-{RUN_ID}"
        sh("podman", "pod", "create", "--name", full, "--label", self.label, *args, env=PODMAN_ENV)
        self.pods.append(full)
        return full

    @staticmethod
    def inspect(cli: str, cid: str) -> dict:
        """The runtime's inspect answer for one container."""
        out = sh(cli, "inspect", cid, env=PODMAN_ENV if cli == "podman" else None).stdout
        return json.loads(out)[0]

    def pid(self, cli: str, cid: str) -> int:
        """Host pid of the container's init process."""
        return int(self.inspect(cli, cid)["State"]["Pid"])

    def remove(self, cli: str, cid: str) -> None:
        """Force-remove one container now."""
        sh(cli, "rm", "-f", cid, check=False, env=PODMAN_ENV if cli == "podman" else None)

    def cleanup(self) -> None:
        for cli, cid in reversed(self.created):
            self.remove(cli, cid)
        for pod in self.pods:
            sh("podman", "pod", "rm", "-f", pod, check=False, env=PODMAN_ENV)


@pytest.fixture
def containers(runtimes: None) -> Iterator[Containers]:
    """Test containers, removed after the test whatever happens. Before it starts, what a dockerd
    killed by an earlier test left running is removed: a namespace that still holds an address on
    docker0 would answer for this test's container of the same address."""
    reap_docker_orphans()
    c = Containers()
    try:
        yield c
    finally:
        c.cleanup()


# -- the daemon under test ----------------------------------------------------------------------


class Metrics:
    """One scrape of /metrics, parsed."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def find(self, name: str, **labels: str) -> list[Any]:
        """Samples named ``name`` whose labels include ``labels``."""
        return [s for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the single matching sample (None if none; error if several)."""
        found = self.find(name, **labels)
        if not found:
            return None
        assert len(found) == 1, f"{len(found)} samples of {name} match {labels}"
        return found[0].value


# What no daemon under test may log, unless the test says it expects it (see daemon_log_allows).
LOG_MARKERS = ("Traceback (most recent call last)", "Task exception was never retrieved", "Exception in callback", "Exception ignored in")
LOG_ERROR_LEVELS = ("error", "critical", "exception")


def children_of(parent: int, names: tuple[str, ...] | None = None) -> list[int]:
    """Pids of the live (not zombie) children of ``parent`` (named one of ``names``, if given)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if int(ppid) == parent and state != "Z" and (names is None or name in names):
            out.append(int(entry))
    return out


def reap_docker_orphans() -> list[str]:
    """Remove what a dockerd killed in the middle of ``docker run`` leaves behind, which the dockerd
    started after it does not know: containers whose containerd shim outlived it (still holding an
    address on docker0, which the next container gets too), also when the new dockerd lists the
    container as exited (its address is then free in dockerd's books while the shim's namespace
    still answers on it), and veth pairs never moved into a container. Returns what it removed."""
    known = set(sh("docker", "ps", "-q", "--no-trunc").stdout.split())  # running, as dockerd sees it
    removed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv[0].endswith(b"containerd-shim-runc-v2") or b"moby" not in argv or b"-id" not in argv:
            continue
        cid = argv[argv.index(b"-id") + 1].decode()
        if cid in known:
            continue
        sh("runc", "--root", "/var/run/docker/runtime-runc/moby", "delete", "-f", cid, check=False)
        try:
            os.kill(int(entry), signal.SIGKILL)
        except ProcessLookupError:
            pass
        removed.append(f"container {cid[:12]}")
    for line in sh("ip", "-o", "link", "show", "master", "docker0", check=False).stdout.splitlines():
        name = line.split(":")[1].strip()
        if "@veth" in name:  # its peer is in this namespace too: never reached a container
            sh("ip", "link", "del", name.split("@")[0], check=False)
            removed.append(f"veth {name}")
    return removed


def log_problems(lines: list[str], allowed: set[str] = frozenset()) -> list[str]:
    """What is wrong in a daemon's log: tracebacks, unretrieved task exceptions, error-level events
    (a supervised task's failure among them), lines that are not JSON; events in ``allowed`` pass."""
    problems = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if line.strip():
                problems.append(f"line {number} is not a JSON log record: {line[:300]}")
            continue
        event = str(record.get("event", ""))
        if event in allowed:
            continue
        text = line if len(line) < 20000 else line[:20000]
        if record.get("level") in LOG_ERROR_LEVELS or "exception" in record or any(marker in text for marker in LOG_MARKERS):
            problems.append(f"line {number}: {event}: {str(record.get('error') or record.get('exception') or '')[:600]}")
    return problems


class Daemon:
    """An ``nstap run`` process with its own ports and data dir."""

    def __init__(self, workdir: Path, config: dict[str, Any], args: list[str]) -> None:
        self.workdir = workdir
        self.metrics_port = free_port()
        self.api_port = free_port()
        self.data_dir = Path(config["data_dir"]) if "data_dir" in config else workdir / "data"
        self.config = {
            "interval": 0.5,
            # Off unless a test turns it on (tests/test_ebpf.py, the healthy-traffic chaos test):
            # compiling the program costs every daemon start a second of CPU.
            "ebpf": "off",
            "metrics_listen": f"127.0.0.1:{self.metrics_port}",
            "api_listen": f"127.0.0.1:{self.api_port}",
            "log_format": "json",
            **config,
            "data_dir": str(self.data_dir),
        }
        self.config_path = workdir / "nstap.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = workdir / "nstap.log"
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.killed = False  # the last run ended with kill(): its exit code is not checked
        self.session = False  # True: in a session of its own, as systemd or a container runtime starts it

    def start(self) -> Daemon:
        """Start the process and wait until /metrics answers."""
        self.killed = False
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nstap", "run", "--config", str(self.config_path), *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=self.session,
        )
        wait_until(self._answers, 20, message=f"nstap /metrics on port {self.metrics_port} (log: {self.log_path})")
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"nstap exited with {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}")
        try:
            self.scrape()
            return True
        except OSError:
            return False

    # Set by a test whose daemon serves TLS (the CA file to trust) and basic auth on /metrics.
    tls_cafile: str | None = None
    basic_auth: tuple[str, str] | None = None

    def _tls(self):
        import ssl

        if self.tls_cafile is None:
            return None
        context = ssl.create_default_context(cafile=self.tls_cafile)
        context.check_hostname = False
        return context

    def scrape(self) -> Metrics:
        """GET /metrics now."""
        import base64
        import urllib.request

        scheme = "https" if self.tls_cafile else "http"
        headers = {}
        if self.basic_auth:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(self.basic_auth).encode()).decode()
        request = urllib.request.Request(f"{scheme}://127.0.0.1:{self.metrics_port}/metrics", headers=headers)
        with urllib.request.urlopen(request, timeout=10, context=self._tls()) as r:
            return Metrics(r.read().decode())

    def api(self, path: str, token: str | None = "", method: str = "GET", body: bytes | None = None) -> tuple[int, Any]:
        """Call the local API (with the daemon's token unless ``token`` is given or None); JSON decoded."""
        import urllib.error
        import urllib.request

        if token == "":
            token = (self.data_dir / "api-token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        scheme = "https" if self.tls_cafile else "http"
        request = urllib.request.Request(f"{scheme}://127.0.0.1:{self.api_port}{path}", data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10, context=self._tls()) as r:
                data = r.read()
                if r.headers.get("Content-Type", "").startswith("application/json"):
                    return r.status, json.loads(data or b"null")
                return r.status, data
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def logs(self) -> list[dict[str, Any]]:
        """The daemon's JSON log lines so far."""
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "unparsed", "line": line})
        return out

    def events(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        """Log events called ``name`` whose fields include ``fields``."""
        return [e for e in self.logs() if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())]

    def wait_metric(self, predicate: Callable[[Metrics], Any], timeout: float, message: str = "") -> Any:
        """Scrape until ``predicate(metrics)`` is truthy."""
        return wait_until(lambda: predicate(self.scrape()), timeout, interval=0.1, message=message)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def children(self, comm: str | None = None) -> list[int]:
        """Pids of the daemon's child processes (named ``comm``, if given)."""
        return children_of(self.pid, (comm,) if comm else None)

    def status(self, key: str) -> int:
        """A number from /proc/<pid>/status (``Threads``, ``VmRSS`` in KiB, ...)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def steady_tasks(self, scrapes: int = 10, spacing: float = 0.3) -> int:
        """The daemon's asyncio tasks (``nstap_asyncio_tasks``), the most of ``scrapes`` scrapes
        ``spacing`` seconds apart. A service that waits for a kick or a timeout between rounds of
        work (the NAT monitor, the port probe: ``event_or_timeout``) has no waiter task while it
        works, so one scrape counts one less than the daemon's steady set now and then (CI: 15
        before a churn, 16 after, with nothing leaked). The most of several is that set, plus
        whatever leaked: a leaked task is in every scrape."""
        counts = []
        for i in range(scrapes):
            if i:
                time.sleep(spacing)
            counts.append(self.scrape().value("nstap_asyncio_tasks"))
        return int(max(counts))

    def thread_names(self) -> Counter:
        """The daemon's threads by their kernel name (``nstap-nat_0``, ...), counted."""
        names: Counter = Counter()
        for comm in Path(f"/proc/{self.pid}/task").glob("*/comm"):
            try:
                names[comm.read_text().strip()] += 1
            except OSError:
                continue  # ended meanwhile
        return names

    def cpu_seconds(self) -> float:
        """User + system CPU of the daemon (all its threads) so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def open_fds(self) -> int:
        """Descriptors the daemon process holds now."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fd_kinds(self) -> Counter:
        """What the daemon's descriptors point at, counted: pipes, anon inodes by kind, files, and
        sockets by protocol as the daemon's own namespace lists them (``socket:unix``,
        ``socket:netlink``, ``socket:tcp`` ...); a socket that none of those tables lists lives in
        another namespace (a watcher's netlink sockets): ``socket:elsewhere``."""
        protocols: dict[str, str] = {}
        for proto in ("unix", "netlink", "tcp", "tcp6", "udp", "udp6", "raw", "packet"):
            try:
                lines = Path(f"/proc/{self.pid}/net/{proto}").read_text().splitlines()[1:]
            except OSError:
                continue
            column = {"unix": 6, "packet": 8}.get(proto, 9)  # the Inode column
            for line in lines:
                fields = line.split()
                if len(fields) > column:
                    protocols[fields[column]] = proto.rstrip("6")
        kinds: Counter = Counter()
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except OSError:
                continue
            kind, _, rest = target.partition(":[")
            if kind == "socket":
                kind = "socket:" + protocols.get(rest.rstrip("]"), "elsewhere")
            kinds[kind] += 1
        return kinds

    def kill(self) -> None:
        """SIGKILL: the daemon dies without cleaning up, as in a crash."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.killed = True
        self._log.close()

    def stop(self) -> int:
        """SIGTERM, wait; returns the exit code."""
        if self.proc is None or self._log.closed:
            return self.proc.returncode if self.proc is not None else 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def nstap(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Daemon]]:
    """Start nstap daemons: ``nstap(config_overrides, *extra_args)``; all are stopped at the end.

    At the end every daemon must have exited 0 on SIGTERM (unless the test killed it last) and its
    log must hold no traceback, unretrieved task exception or error-level event, except the events
    the test names with ``@pytest.mark.daemon_log_allows("event", ...)``.
    """
    started: list[Daemon] = []
    marker = request.node.get_closest_marker("daemon_log_allows")
    allowed = set(marker.args) if marker else set()

    def start(config: dict[str, Any] | None = None, *args: str, tls_cafile: str | None = None, basic_auth: tuple[str, str] | None = None,
              session: bool = False) -> Daemon:
        workdir = tmp_path / f"nstap{len(started)}"
        workdir.mkdir()
        daemon = Daemon(workdir, config or {}, list(args))
        daemon.tls_cafile, daemon.basic_auth, daemon.session = tls_cafile, basic_auth, session
        started.append(daemon)
        return daemon.start()

    yield start
    problems = []
    for daemon in started:
        killed = daemon.killed
        code = daemon.stop()
        if code != 0 and not killed:
            problems.append(f"{daemon.workdir.name} exited with {code} on SIGTERM")
        problems += [f"{daemon.workdir.name} {p}" for p in log_problems(daemon.log_path.read_text().splitlines(), allowed)]
    if problems:
        pytest.fail("the daemon's log or exit is not clean:\n" + "\n".join(problems[:20]), pytrace=False)


def tool(name: str) -> str:
    """Absolute path of a required host tool (the suite's set-up installs them all)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    assert path, f"{name} is not installed: run the suite through `make test`"
    return path


# -- namespaces made by the tests ------------------------------------------------------------------


@dataclass
class NsUnderTest:
    name: str
    host_if: str
    host_ip: str
    ns_ip: str
    pid: int  # a process living in the namespace


@pytest.fixture
def netns() -> Iterator[NsUnderTest]:
    """A namespace with eth0 veth'd to the host (10.213.x.2 <-> 10.213.x.1) and a process in it."""
    ip = tool("ip")
    tag = uuid.uuid4().hex[:6]
    name, host_if = f"nstap-t-{tag}", f"nst{tag}"
    octet = int(tag[:2], 16) % 250 + 1
    host_ip, ns_ip = f"10.213.{octet}.1", f"10.213.{octet}.2"
    sh(ip, "netns", "add", name)
    proc = None
    try:
        sh(ip, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", name)
        sh(ip, "addr", "add", f"{host_ip}/30", "dev", host_if)
        sh(ip, "link", "set", host_if, "up")
        sh(ip, "-n", name, "addr", "add", f"{ns_ip}/30", "dev", "eth0")
        sh(ip, "-n", name, "link", "set", "eth0", "up")
        sh(ip, "-n", name, "link", "set", "lo", "up")
        proc = subprocess.Popen([ip, "netns", "exec", name, "sleep", "600"])
        wait_until(lambda: os.stat(f"/proc/{proc.pid}/ns/net").st_ino == os.stat(f"/run/netns/{name}").st_ino, 5)
        yield NsUnderTest(name, host_if, host_ip, ns_ip, proc.pid)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        sh(ip, "link", "del", host_if, check=False)
        sh(ip, "netns", "del", name, check=False)


def ping(target: str, count: int) -> None:
    sh(tool("ping"), "-c", str(count), "-i", "0.01", "-W", "1", "-q", target)


