"""Chaos and soak: the daemon under churn, a hostile container, faults of every component, and fuzz.

Real components throughout: dockerd and Podman, their containers and pods, tcpdump, the kernel.
Each test runs shortened in ``make test``; ``make soak`` (``NSTAP_SOAK=1``) runs the full sizes of
the issue (1,000 start/stop cycles, 100,000 sockets and 1,000 interfaces in one container, 10,000
fuzzed inputs). Every test reports its figures on one line (``chaos_figures``) and, when
``NSTAP_SOAK_REPORT`` names a file, appends them there as JSON (the README's soak table).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import PODMAN_ENV, ROOT, RUN_ID, Containers, Metrics, reap_docker_orphans, sh, wait_until
from test_anomalies import HTTPD, Traffic, container_ip, finished_capture, reset_burst
from test_docker import dockerd_pids

from nstap.runtime.source import POOL_LIMIT

pytestmark = [pytest.mark.docker, pytest.mark.soak]

SOAK = os.environ.get("NSTAP_SOAK") == "1"
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")


def scale(short: int, full: int) -> int:
    """The short size in ``make test``, the full one in ``make soak``."""
    return full if SOAK else short


def report(test: str, **figures) -> None:
    """Print a test's figures, and append them to $NSTAP_SOAK_REPORT if set."""
    line = json.dumps({"test": test, "soak": SOAK, **figures}, sort_keys=True)
    print(f"chaos_figures {line}")
    target = os.environ.get("NSTAP_SOAK_REPORT")
    if target:
        with open(target, "a") as f:
            f.write(line + "\n")


def lag_quantile(before: Metrics, after: Metrics, q: float) -> float:
    """The q-quantile of nstap_tick_lag_seconds between two scrapes (upper bound of its bucket)."""
    def buckets(m: Metrics) -> dict[float, float]:
        return {float(s.labels["le"]): s.value for s in m.find("nstap_tick_lag_seconds_bucket")}

    b0, b1 = buckets(before), buckets(after)
    bounds = sorted(b1)
    total = b1[float("inf")] - b0.get(float("inf"), 0)
    for bound in bounds:
        if total and (b1[bound] - b0.get(bound, 0)) / total >= q:
            return bound
    return float("inf")


# -- churn ----------------------------------------------------------------------------------------


def test_churn_of_docker_and_podman_containers_leaks_nothing(nstap, containers: Containers, docker_image: str, podman_image: str) -> None:
    """Start/stop cycles of mixed Docker and Podman containers, shared namespaces and pods, every
    namespace with a flight recorder: no descriptor, task, thread or tcpdump is left behind, and
    memory stays where it settled."""
    cycles = scale(48, 1000)
    d = nstap({"interval": 0.5, "capture": {"ring": "all", "ring_bytes": 262144, "ring_segments": 2}})
    pool = ThreadPoolExecutor(max_workers=4)
    started = 0
    rounds = 0

    def one_round(i: int) -> list[tuple[str, str]]:
        """A Docker container and one joining its namespace, a Podman container, and every other
        round a Podman pod with a member: (cli, id) of each, pod name last for pods."""
        made = []
        owner = containers.docker(docker_image, "sleep", "600")
        made.append(("docker", owner))
        made.append(("docker", containers.docker("--network", f"container:{owner}", docker_image, "sleep", "600")))
        made.append(("podman", containers.podman(*ULIMITS, podman_image, "sleep", "600")))
        if i % 2:
            pod = containers.pod(f"churn{i}")
            made.append(("podman", containers.podman("--pod", pod, *ULIMITS, podman_image, "sleep", "600")))
            made.append(("pod", pod))
        return made

    def batch(first: int, size: int) -> int:
        nonlocal started
        made = [c for group in pool.map(one_round, range(first, first + size)) for c in group]
        ids = [cid for cli, cid in made if cli != "pod"]
        d.wait_metric(lambda m: all(m.find("nstap_container_info", container_id=c[:12]) for c in ids), 30, "batch listed")
        # Every namespace watched and recording before it goes: 2 per round, 3 with a pod.
        namespaces = sum(2 + i % 2 for i in range(first, first + size))
        d.wait_metric(lambda m: m.value("nstap_flight_recorders_running") >= baseline_rings + namespaces, 30, "rings running")
        for cli, cid in made:
            if cli == "docker":
                sh("docker", "rm", "-f", cid)
        podman_ids = [cid for cli, cid in made if cli == "podman"]
        sh("podman", "rm", "-f", *podman_ids, env=PODMAN_ENV, timeout=180)
        for pod in [cid for cli, cid in made if cli == "pod"]:
            sh("podman", "pod", "rm", "-f", pod, env=PODMAN_ENV, timeout=180)
        containers.created.clear()
        containers.pods.clear()
        d.wait_metric(lambda m: not any(m.find("nstap_container_info", container_id=c[:12]) for c in ids), 30, "batch gone")
        started += len(ids)
        return len(ids)

    def settled() -> dict:
        m = d.wait_metric(
            lambda m: m.value("nstap_namespaces_watched") == baseline_ns and m.value("nstap_flight_recorders_running") == baseline_rings and m,
            30,
            "back to the baseline",
        )
        time.sleep(1.5)  # ring stops and reaped children
        kinds = d.fd_kinds()
        return {
            "fds": sum(kinds.values()),
            "kinds": kinds,
            "tasks": d.scrape().value("nstap_asyncio_tasks"),
            "threads": d.status("Threads"),
            "tcpdumps": len(d.children("tcpdump")),
            "rss_kib": d.status("VmRSS"),
            "metrics": m,
        }

    m0 = d.scrape()
    baseline_ns, baseline_rings = m0.value("nstap_namespaces_watched"), m0.value("nstap_flight_recorders_running")
    size = 4
    t0 = time.monotonic()
    while started < cycles * 0.15 or rounds < 2:  # warm-up: pools, caches and lazy imports settle
        batch(rounds, size)
        rounds += size
    before = settled()
    while started < cycles:
        batch(rounds, size)
        rounds += size
    after = settled()
    seconds = time.monotonic() - t0
    pool.shutdown()
    unix_before, unix_after = before["kinds"].pop("socket:unix", 0), after["kinds"].pop("socket:unix", 0)
    report(
        "churn", cycles=started, seconds=round(seconds), fds=[before["fds"], after["fds"]], unix_sockets=[unix_before, unix_after], tasks=[before["tasks"], after["tasks"]],
        threads=[before["threads"], after["threads"]], tcpdumps=after["tcpdumps"], rss_mib=[round(before["rss_kib"] / 1024, 1), round(after["rss_kib"] / 1024, 1)],
        attaches=len(d.events("watcher_attached")), rings_started=len(d.events("ring_started")),
    )
    assert started >= cycles and len(d.events("ring_started")) >= started * 0.5
    # Files, pipes, pidfds, netlink and every socket of the watched namespaces: exactly as before.
    assert after["kinds"] == before["kinds"], (before["kinds"], after["kinds"])
    # Connections to the runtime sockets idle in their pools: never more than the pools hold.
    assert unix_after <= unix_before + 2 * POOL_LIMIT, (unix_before, unix_after)
    assert after["tasks"] == before["tasks"]
    assert after["threads"] <= before["threads"] and after["tcpdumps"] == 0
    assert after["rss_kib"] <= before["rss_kib"] * 1.10, (before["rss_kib"], after["rss_kib"])
    assert after["metrics"].value("nstap_task_failures_total", task="watcher") == 0


# -- a hostile container ----------------------------------------------------------------------------

HOSTILE = r"""
import ctypes, os, resource, signal, socket, sys, time
listeners, pairs, storm = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
# A process holds at most `hard` descriptors: spread the sockets over enough worker processes.
per_worker = hard - 500
workers = max(1, -(-(listeners + 2 * pairs) // per_worker))


def work(index, out):
    first = index * listeners // workers
    mine = list(range(first, (index + 1) * listeners // workers))
    npairs = (index + 1) * pairs // workers - index * pairs // workers
    ls = []
    for port in mine:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 20000 + port))
        s.listen(4096)
        s.setblocking(False)
        ls.append(s)
    targets = ls[:8]
    held = []
    for n in range(npairs):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", 20000 + first + n % len(targets)))
        held.append(c)
        if n % 2000 == 1999 or n == npairs - 1:
            time.sleep(0.01)
            for l in targets:
                while True:
                    try:
                        held.append(l.accept()[0])
                    except BlockingIOError:
                        break
    os.write(out, f"{len(ls)} {len(held) + len(ls)}\n".encode())
    while True:
        time.sleep(3600)


children, pipes = [], []
for i in range(workers):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: gone with the parent
        work(i, w)
        os._exit(0)
    os.close(w)
    children.append(pid)
    pipes.append(r)
made = [os.read(r, 100).decode().split() for r in pipes]
print("ready", sum(int(m[0]) for m in made), sum(int(m[1]) for m in made), workers, flush=True)
try:
    end = time.time() + 900
    while time.time() < end:
        if storm:  # bursts of resets it sends itself, 1.5 s on, 2.5 s off: a new anomaly each time
            stop = time.time() + 1.5
            while time.time() < stop:
                for _ in range(20):
                    r = socket.socket()
                    r.setblocking(False)
                    r.connect_ex(("127.0.0.1", 9))
                    r.close()
                time.sleep(0.02)
            os.system("ip link set d0 down; sleep 0.3; ip link set d0 up")  # and a link that flaps
            time.sleep(2.2)
        else:
            time.sleep(1)
finally:
    for pid in children:
        os.kill(pid, 9)
"""

GARBAGE_LABELS = [
    "nstap.detect.tcp_listen_overflows=0",  # would trip on every sample: refused
    "nstap.detect.tcp_retransmits=threshold=nan",
    "nstap.detect.interface_drops=-inf",
    "nstap.detect.udp_receive_buffer_errors=lots",
    "nstap.detect.tcp_reset_spike=min_rate=1,factor=1",  # valid: the storm trips it
    "nstap.enable=perhaps",
    "nstap.capture=ring",
    "nstap.x=" + "y" * 10000,
    *[f"nstap.a{i:04d}=v" for i in range(scale(100, 1000))],  # sorted before nstap.capture and nstap.detect
]


def test_a_hostile_container_cannot_starve_the_others(nstap, containers: Containers, docker_image: str) -> None:
    """Hundreds of thousands of sockets, a thousand interfaces, garbage labels and a capture storm it
    causes itself, in one container: the daemon stays within its budget, /metrics stays bounded,
    another container's anomaly still gets its capture, and nothing crashes."""
    listeners, pairs, interfaces = scale(300, 2000), scale(4000, 49000), scale(200, 1000)
    d = nstap({"interval": 0.5, "detect": {"resolve_after": 1, "cooldown": 0}, "capture": {"post_seconds": 2, "max_concurrent": 4}})
    victim = containers.docker("--label", "nstap.capture=ring", docker_image, *HTTPD, name="victim")
    label_args = [a for label in GARBAGE_LABELS for a in ("--label", label)]
    hostile = containers.docker("--cap-add", "NET_ADMIN", *label_args, docker_image, "sleep", "3600", name="hostile")
    pid = containers.pid("docker", hostile)
    # veth pairs with both ends inside the namespace (this kernel has no dummy interfaces).
    batch = "".join(f"link add d{i} type veth peer name e{i}\nlink set d{i} up\nlink set e{i} up\n" for i in range(interfaces // 2))
    subprocess.run(["nsenter", "-t", str(pid), "-n", "ip", "-batch", "-"], input=batch, text=True, check=True, capture_output=True, timeout=300)
    d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=hostile[:12]) and m.find("nstap_interface_up", container_id=victim[:12]), 20)
    sockets = subprocess.Popen(
        ["nsenter", "-t", str(pid), "-n", sys.executable, "-c", HOSTILE, str(listeners), str(pairs), "1"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        ready = sockets.stdout.readline().split()
        assert ready[:2] == ["ready", str(listeners)] and int(ready[2]) >= listeners + 2 * pairs * 0.95, ready
        total_sockets = int(ready[2])
        m0 = d.wait_metric(lambda m: (m.value("nstap_sockets", container_id=hostile[:12], protocol="tcp", state="listen") or 0) >= listeners and m, 60)
        cpu0, t0 = d.cpu_seconds(), time.monotonic()
        time.sleep(scale(20, 60))  # the storm goes on, anomalies start and end, captures are asked for
        cpu1, t1 = d.cpu_seconds(), time.monotonic()
        m1 = d.scrape()
        # Another container's anomaly, in the middle of it: its capture happens.
        reset_burst(container_ip(victim))
        event = wait_until(lambda: [a for a in d.api(f"/api/v1/anomalies?container={victim[:12]}&kind=tcp_reset_spike")[1]["anomalies"] if a["capture_id"]], 20, 0.2)[0]
        capture = finished_capture(d, event["capture_id"])
        assert capture["state"] == "complete" and capture["pre_packets"] > 0, capture
    finally:
        os.killpg(sockets.pid, signal.SIGKILL)  # it and its workers
        sockets.wait()
    mine = [s for s in m1.samples if s.labels.get("container_id") == hostile[:12]]
    ports = {s.labels["port"] for s in m1.find("nstap_tcp_listen_queue_length", container_id=hostile[:12])}
    ifaces = {s.labels["interface"] for s in m1.find("nstap_interface_up", container_id=hostile[:12])}
    refused = m1.value("nstap_captures_refused_total", reason="per_container_limit")
    hostile_captures = m1.value("nstap_captures_total", container_id=hostile[:12], reason="anomaly") or 0
    cpu_percent = (cpu1 - cpu0) / (t1 - t0) * 100
    lag_p99 = lag_quantile(m0, m1, 0.99)
    every = m1.value("nstap_sample_interval_seconds", container_id=hostile[:12])
    report(
        "hostile", sockets=total_sockets, listeners=listeners, interfaces=interfaces, labels=len(GARBAGE_LABELS),
        series_of_hostile=len(mine), daemon_cpu_percent=round(cpu_percent, 1), tick_lag_p99_s=lag_p99, hostile_sample_interval_s=every,
        hostile_anomaly_captures=hostile_captures, refused_per_container=refused, rss_mib=round(d.status("VmRSS") / 1024, 1),
    )
    # /metrics stays bounded: 64 ports and 64 interfaces, the rest under "other".
    assert "other" in ports and len(ports) <= 65 and "other" in ifaces and len(ifaces) <= 65
    assert len(mine) <= 65 * 10 + 65 * 2 + 60, len(mine)
    # Its garbage labels were ignored, not obeyed: no anomaly on its idle listeners from "=0".
    assert not d.api(f"/api/v1/anomalies?container={hostile[:12]}&kind=tcp_listen_overflows")[1]["anomalies"]
    assert d.events("detector_label_ignored", container=f"hostile-{RUN_ID}")
    # Its capture storm was capped (and once at the cap, refused); the victim still got its capture
    # (checked above). Its expensive samples were spaced out (sampling_slowed) when they cost
    # more than the budget.
    # (Reaching exactly 6 needs no refusal: only a 7th event would be refused.)
    events = sum(s.value for s in m1.find("nstap_anomalies_total", container_id=hostile[:12]))
    assert hostile_captures <= 6 and (events <= 6 or refused >= 1), (hostile_captures, events, refused)
    assert every == 0.5 or d.events("sampling_slowed", container=f"hostile-{RUN_ID}")
    # The daemon stayed within its budget: the loop was never held up, and the hostile namespace
    # cost what a few ordinary ones do.
    assert lag_p99 <= 0.1, lag_p99
    assert cpu_percent < 60, cpu_percent


# -- faults ---------------------------------------------------------------------------------------


def podman_service_pids() -> list[int]:
    out = sh("pgrep", "-f", "podman system service", check=False).stdout.split()
    return [int(p) for p in out]


def test_runtimes_killed_mid_event_stream(nstap, containers: Containers, docker_image: str, podman_image: str) -> None:
    """dockerd and the Podman service SIGKILLed while containers start and stop: both are reconnected,
    and what the daemon lists afterwards is what the runtimes run."""
    d = nstap({"reconnect_max_backoff": 1.0, "reconcile_interval": 5})
    stop = threading.Event()

    def churn(cli: str, image: str, env: dict | None) -> None:
        while not stop.is_set():
            extra = ULIMITS if cli == "podman" else ()
            proc = subprocess.run([cli, "run", "-d", "--label", containers.label, *extra, image, "sleep", "600"], capture_output=True, text=True, env=env)
            if proc.returncode == 0:
                cid = proc.stdout.strip().splitlines()[-1]
                time.sleep(0.2)
                subprocess.run([cli, "rm", "-f", cid], capture_output=True, env=env)
            else:
                time.sleep(0.2)

    threads = [threading.Thread(target=churn, args=("docker", docker_image, None)), threading.Thread(target=churn, args=("podman", podman_image, PODMAN_ENV))]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        docker, podman = dockerd_pids(), podman_service_pids()
        assert docker and podman
        for p in docker + podman:
            os.kill(p, signal.SIGKILL)
        d.wait_metric(lambda m: m.value("nstap_runtime_up", runtime="docker") == 0 and m.value("nstap_runtime_up", runtime="podman") == 0, 10)
        wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in docker + podman), 10)
        time.sleep(1)
        sh(str(ROOT / "deploy/start-runtimes.sh"), timeout=180)  # leaves both running, as found
        orphans = reap_docker_orphans()  # containers a killed dockerd was starting, unknown to the new one
        d.wait_metric(lambda m: m.value("nstap_runtime_up", runtime="docker") == 1 and m.value("nstap_runtime_up", runtime="podman") == 1, 30)
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    keep_docker = containers.docker(docker_image, "sleep", "600", name="afterkill")
    keep_podman = containers.podman(*ULIMITS, podman_image, "sleep", "600", name="pafterkill")

    def labelled(flag: str) -> set[str]:
        ids = set(sh("docker", "ps", flag, "--no-trunc", "--filter", f"label={containers.label}").stdout.split())
        return ids | set(sh("podman", "ps", flag, "--no-trunc", "--filter", f"label={containers.label}", env=PODMAN_ENV).stdout.split())

    def agrees() -> bool:
        running, ever = labelled("-q"), labelled("-aq")
        listed = {c["id"] for c in d.api("/api/v1/containers")[1]["containers"]}
        return listed & ever == running and {keep_docker, keep_podman} <= running

    wait_until(agrees, 20, 0.5, "the daemon lists exactly what the runtimes run")
    m = d.scrape()
    assert m.value("nstap_runtime_reconnects_total", runtime="docker") >= 1 and m.value("nstap_runtime_reconnects_total", runtime="podman") >= 1
    # Leftovers of the churn (created while a runtime was down) are removed by the fixture.
    leftovers = sh("docker", "ps", "-aq", "--no-trunc", "--filter", f"label={containers.label}").stdout.split()
    containers.created += [("docker", c) for c in leftovers]
    leftovers = sh("podman", "ps", "-aq", "--no-trunc", "--filter", f"label={containers.label}", env=PODMAN_ENV).stdout.split()
    containers.created += [("podman", c) for c in leftovers]
    report(
        "runtimes_killed", orphans_reaped=len(orphans),
        events=m.value("nstap_runtime_events_total", runtime="docker") + m.value("nstap_runtime_events_total", runtime="podman"),
    )


def netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def test_tcpdump_killed_mid_capture_and_mid_ring(nstap, containers: Containers, docker_image: str) -> None:
    d = nstap({"capture": {"post_seconds": 4}})
    ringed = containers.docker("--label", "nstap.capture=ring", docker_image, *HTTPD, name="killring")
    plain = containers.docker(docker_image, *HTTPD, name="killlive")
    d.wait_metric(lambda m: m.value("nstap_flight_recorders_running") == 1 and m.find("nstap_interface_up", container_id=plain[:12]), 15)
    plain_ns, ring_ns = netns_inode(containers.pid("docker", plain)), netns_inode(containers.pid("docker", ringed))
    # A live capture whose tcpdump is killed from outside: it ends, with what it got and why.
    status, row = d.api("/api/v1/captures", method="POST", body=json.dumps({"container": plain[:12], "duration": 20}).encode())
    assert status == 202 and row["mode"] == "live"
    live = wait_until(lambda: [p for p in d.children("tcpdump") if netns_inode(p) == plain_ns], 5)
    time.sleep(0.5)  # listening
    sh("ping", "-c", "3", "-i", "0.2", "-q", container_ip(plain))
    time.sleep(0.2)
    os.kill(live[0], signal.SIGKILL)
    done = finished_capture(d, row["id"], timeout=10)
    assert done["state"] in ("complete", "failed") and "tcpdump" in done["error"], done
    assert done["state"] == "failed" or done["packets"] >= 6
    # The flight recorder's tcpdump killed: logged, captures fall back to live ones, restarted.
    ring = [p for p in d.children("tcpdump") if netns_inode(p) == ring_ns]
    assert len(ring) == 1
    os.kill(ring[0], signal.SIGKILL)
    d.wait_metric(lambda m: m.value("nstap_flight_recorders_running") == 0, 5, "ring stopped")
    assert d.events("ring_stopped")
    status, fallback = d.api("/api/v1/captures", method="POST", body=json.dumps({"container": ringed[:12], "duration": 1}).encode())
    assert status == 202 and fallback["mode"] == "live"
    assert finished_capture(d, fallback["id"])["state"] == "complete"
    d.wait_metric(lambda m: m.value("nstap_flight_recorders_running") == 1 and m.value("nstap_flight_recorder_restarts_total") == 1, 20, "ring restarted")
    status, again = d.api("/api/v1/captures", method="POST", body=json.dumps({"container": ringed[:12], "duration": 1, "pre_seconds": 2}).encode())
    assert status == 202 and again["mode"] == "ring"
    done = finished_capture(d, again["id"])
    assert done["state"] == "complete", done  # asked at once after the restart: stats must not kill it
    assert not d.children("nsenter")  # nothing half-started left behind
    report("tcpdump_killed", live_capture_state=done["state"], ring_restarts=1)


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 6 MiB tmpfs for the daemon's data dir, unmounted at the end (after the daemon stopped)."""
    mount = tmp_path / "smalldata"
    mount.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "nstap-test", str(mount))
    try:
        yield mount
    finally:
        sh("umount", "-l", str(mount), check=False)


def fill(path: Path, leave: int) -> Path:
    """Fill the filesystem of ``path`` but ``leave`` bytes."""
    filler = path / "filler"
    st = os.statvfs(path)
    size = max(st.f_bavail * st.f_frsize - leave, 0)
    with open(filler, "wb") as f:
        f.write(b"\0" * size)
    return filler


def test_data_dir_that_fills_up(small_tmpfs: Path, nstap, containers: Containers, docker_image: str) -> None:
    """The data dir's filesystem is full: the flight recorder keeps running and says why it loses
    packets, captures fail or are refused with the reason, nothing is left 'running', no traceback;
    once there is room again everything works."""
    d = nstap({"data_dir": str(small_tmpfs / "data"), "capture": {"post_seconds": 2, "ring_bytes": 1 << 20}})
    cid = containers.docker("--label", "nstap.capture=ring", docker_image, *HTTPD, name="fulldisk")
    ip = container_ip(cid)
    d.wait_metric(lambda m: m.value("nstap_flight_recorders_running") == 1, 15)
    filler = fill(small_tmpfs, 16 * 1024)
    try:
        flood = subprocess.Popen(["ping", "-f", "-s", "1000", "-w", "6", "-q", ip], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: d.events("ring_write_failed"), 15, 0.2, "the ring reports it cannot write")
        status, body = d.api("/api/v1/captures", method="POST", body=json.dumps({"container": cid[:12], "duration": 1}).encode())
        if status == 202:
            done = finished_capture(d, body["id"])
            assert done["state"] == "failed" and "space" in done["error"], done
        else:
            assert status == 507 and ("full" in body["error"] or "space" in body["error"]), (status, body)
        reset_burst(ip)  # an anomaly while the disk is full: detected, its capture refused, said why
        wait_until(lambda: d.events("anomaly_detected", container_id=cid[:12]), 15, 0.2)
        flood.wait(20)
        m = d.scrape()
        assert m.value("nstap_flight_recorders_running") == 1  # still recording (what fits)
        assert m.value("nstap_flight_recorder_lost_packets_total") > 0  # and says what it lost
    finally:
        filler.unlink()
    # Room again: the ring writes again, and a capture reaching back over the whole time the disk
    # was full completes, with the packets the ring did keep from before its trigger.
    sh("ping", "-c", "5", "-i", "0.2", "-q", ip)
    wait_until(lambda: d.events("ring_write_recovered"), 15, 0.2, "the ring writes again")
    status, body = d.api("/api/v1/captures", method="POST", body=json.dumps({"container": cid[:12], "duration": 1, "pre_seconds": 60}).encode())
    assert status == 202, body
    sh("ping", "-c", "3", "-i", "0.2", "-q", ip)
    after = finished_capture(d, body["id"])
    assert after["state"] == "complete" and after["error"] == "" and after["pre_packets"] > 0, after
    wait_until(lambda: all(c["state"] != "running" for c in d.api("/api/v1/captures")[1]["captures"]), 20, 0.5, "no capture left running")
    assert not [e for e in d.logs() if "unreadable tcpdump output" in json.dumps(e)]
    report("disk_full", ring_write_failures=len(d.events("ring_write_failed")), refused=d.scrape().value("nstap_captures_refused_total", reason="store"))


def test_sigstop_for_10s_then_resume(nstap, containers: Containers, docker_image: str) -> None:
    """A daemon stopped for 10 s (a debugger, a frozen cgroup) resumes with one late sample, not a burst
    of catch-up ones, and finds no anomaly in healthy traffic that went on meanwhile."""
    d = nstap({"interval": 0.5})
    web = containers.docker(docker_image, *HTTPD, name="stopweb")
    ip = container_ip(web)
    client = containers.docker(docker_image, "sh", "-c", f"while true; do wget -q -O /dev/null http://{ip}/; sleep 0.2; done", name="stopclient")
    d.wait_metric(lambda m: m.find("nstap_sample_timestamp_seconds", container_id=client[:12]) and m.find("nstap_sample_timestamp_seconds", container_id=web[:12]), 10)
    time.sleep(3)
    m0 = d.scrape()
    os.kill(d.pid, signal.SIGSTOP)
    try:
        time.sleep(10)
    finally:
        os.kill(d.pid, signal.SIGCONT)
    m1 = d.scrape()
    time.sleep(2)
    m2 = d.scrape()
    namespaces = m2.value("nstap_namespaces_watched")
    late = m1.value("nstap_sample_duration_seconds_count") - m0.value("nstap_sample_duration_seconds_count")
    after = m2.value("nstap_sample_duration_seconds_count") - m1.value("nstap_sample_duration_seconds_count")
    lag_buckets = {float(s.labels["le"]): s.value for s in m2.find("nstap_tick_lag_seconds_bucket")}
    slow_ticks = lag_buckets[float("inf")] - lag_buckets[1.0]
    time.sleep(3)  # anything the pause could have tripped would show by now
    anomalies = d.api("/api/v1/anomalies")[1]["anomalies"]
    report("sigstop", samples_during_and_at_resume=late, samples_2s_after=after, namespaces=namespaces, slow_ticks=slow_ticks, anomalies=len(anomalies))
    assert late <= 2 * namespaces  # at most one or two ticks' worth: no catch-up burst
    assert after <= 5 * namespaces  # 2 s at 0.5 s: four or five ticks, as usual
    assert slow_ticks == 1  # one late tick, once
    assert anomalies == [], anomalies


# -- fuzz -----------------------------------------------------------------------------------------


def test_fuzz_api_webhook_and_config(nstap, containers: Containers, docker_image: str, tmp_path: Path) -> None:
    """Generated API requests, Alertmanager payloads and configs that reach validation: no 5xx, no
    traceback, nothing read or written outside the data dir."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    import test_api_fuzz as fz
    from nstap.config import ConfigError, load_config

    d = nstap({"capture": {"max_concurrent": 2, "post_seconds": 1}})
    cid = containers.docker(docker_image, *HTTPD, name="fuzz")
    d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=cid[:12]), 10)
    tmp_before = set(os.listdir("/tmp"))
    outside = [Path("/etc"), ROOT]
    mtimes = {p: p.stat().st_mtime for p in outside}
    n_api, n_alert, n_read, n_config = scale(300, 3500), scale(200, 2500), scale(100, 1000), scale(400, 3000)
    seen = fz.fuzz_captures(d, n_api) + fz.fuzz_alerts(d, n_alert) + fz.fuzz_reads(d, n_read)

    # Configs: YAML documents that load_config parses, then refuses or accepts; nothing else may happen.
    config_outcomes: Counter = Counter()
    keys = st.sampled_from(["interval", "metrics_listen", "data_dir", "runtimes", "detect", "capture", "samplers", "max_interfaces", "sample_budget_ms", "socket_walk", "intervall"])
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
    tree = st.recursive(leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10) | keys, inner, max_size=3), max_leaves=10)
    documents = st.one_of(
        st.dictionaries(keys, tree, max_size=4),
        st.fixed_dictionaries({"detect": st.fixed_dictionaries({"detectors": st.dictionaries(st.sampled_from(["tcp_retransmits", "tcp_listen_overflows", "nope"]), st.dictionaries(st.sampled_from(["threshold", "min_increase", "window", "x"]), leaf, max_size=2), max_size=2)})}),
        st.fixed_dictionaries({"capture": st.dictionaries(st.sampled_from(["snaplen", "ring", "ring_bytes", "max_per_container_per_hour", "post_seconds", "max_seconds"]), leaf, max_size=3)}),
    )
    config_file = tmp_path / "fuzz.yaml"

    @settings(max_examples=n_config, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(doc=documents)
    def one_config(doc) -> None:
        import yaml

        try:
            text = yaml.safe_dump(doc)
        except yaml.YAMLError:
            return
        config_file.write_text(text)
        try:
            load_config(config_file, {})
            config_outcomes["accepted"] += 1
        except ConfigError as exc:
            assert str(exc).count("\n") == 0
            config_outcomes["refused"] += 1

    one_config()
    inputs = sum(seen.values()) + sum(config_outcomes.values())
    report("fuzz", inputs=inputs, api=n_api, alertmanager=n_alert, reads=n_read * 4, configs=sum(config_outcomes.values()),
           refusals=dict(seen.most_common(12)), config_outcomes=dict(config_outcomes))
    assert seen["duration"] and seen["filter"] and seen["pre_seconds"] and config_outcomes["refused"] and config_outcomes["accepted"]
    assert not [k for k in seen if k.startswith(("status5", "other5"))]
    assert set(os.listdir("/tmp")) - tmp_before == set()
    assert {p: p.stat().st_mtime for p in outside} == mtimes
    assert inputs >= (10_000 if SOAK else 1_000)


def test_healthy_traffic_makes_no_anomaly(nstap, containers: Containers, docker_image: str) -> None:
    """20 busybox containers serving steady HTTP traffic (a new connection every 0.1 s each, half of
    them with a flight recorder) for 40 s here, 10 minutes in ``make soak``: not one anomaly, with
    every detector at its defaults (the short retransmission window and the kernel's drop reasons
    included: the eBPF collector is on)."""
    seconds = scale(40, 600)
    d = nstap({"ebpf": "on"})
    cids = [containers.docker(*(("--label", "nstap.capture=ring") if i % 2 else ()), docker_image, *HTTPD) for i in range(20)]
    d.wait_metric(lambda m: m.value("nstap_containers_watched", runtime="docker") >= 20, 30, "20 containers watched")
    traffic = [Traffic(container_ip(cid), period=0.1, limit=seconds + 30) for cid in cids]
    for t in traffic:
        t.start()
    started = time.time()
    try:
        while time.time() - started < seconds:
            time.sleep(5)
            status, body = d.api("/api/v1/anomalies")
            assert status == 200 and body["anomalies"] == [], body["anomalies"][:3]
    finally:
        for t in traffic:
            t.close()
    answered = sum(t.answered for t in traffic)
    m = d.scrape()
    samples = sum(x.value for x in m.find("nstap_sample_duration_seconds_count"))
    report("healthy", containers=len(cids), seconds=round(time.time() - started), requests=answered, anomalies=0, samples=samples)
    assert answered >= 20 * seconds * 5  # at least half the requests were answered: traffic, not an idle host
    assert not m.find("nstap_anomalies_total")
    assert m.value("nstap_collector_up", collector="ebpf_drops") == 1
