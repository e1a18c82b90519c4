"""Chaos and soak: the daemon under churn, a hostile container, faults of every component, and fuzz.

Real components throughout: dockerd and Podman, their containers and pods, tcpdump, the kernel.
Each test runs shortened in ``make test``; ``make soak`` (``NSTAP_SOAK=1``) runs the full sizes of
the issues (1,000 mixed start/stop cycles and 5,000 Docker ones with eBPF on — fewer with
``NSTAP_SOAK_CHURN_CYCLES`` —, 100,000 sockets, 1,000 interfaces and 50,000 firewall rules in one
container beside 50 others, 50 filtered captures under kill -9 — ``NSTAP_SOAK_SEED`` repeats a
run's kills —, 10,000 fuzzed inputs; ``NSTAP_SOAK_HOSTILE_WINDOW`` shortens the hostile
container's window, in seconds, and ``NSTAP_SOAK_HOSTILE_FIREWALL_BUDGET`` sets its
``nat.firewall_budget``, so that its firewall is parsed more often in the window). Every test
reports its figures on one line (``chaos_figures``) and, when ``NSTAP_SOAK_REPORT`` names a file,
appends them there as JSON (the soak tables of docs/performance.md).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
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
from test_ebpf import _map_ids

from nstap.ebpf.service import SWEEP_EVERY
from nstap.heap import MALLOC_ARENAS
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
        # (60 s: four rounds of docker, podman and pod starts at once on 2 cores take their time)
        d.wait_metric(lambda m: all(m.find("nstap_container_info", container_id=c[:12]) for c in ids), 60, "batch listed")
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
            "tasks": d.steady_tasks(),
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
    assert after["tasks"] <= before["tasks"], (before["tasks"], after["tasks"])  # (fewer: a one-shot of the start, dns-load, ended meanwhile)
    assert after["threads"] <= before["threads"] and after["tcpdumps"] == 0
    assert after["rss_kib"] <= before["rss_kib"] * 1.10, (before["rss_kib"], after["rss_kib"])
    assert after["metrics"].value("nstap_task_failures_total", task="watcher") == 0


def _bpf_maps(pid: int) -> dict[str, int]:
    """The daemon's BPF maps by what they hold: ``drops`` (8-byte keys: netns, reason; 8-byte
    counts) and ``flows`` (28-byte keys: netns, ports, family, address; count and time), each with
    its map id (from fdinfo)."""
    by_size = {"8/8": "drops", "28/16": "flows"}
    return {by_size[size]: map_id for map_id, size in _map_ids(pid).items() if size in by_size}


def bpf_map_netns(pid: int) -> dict[str, set[int]]:
    """The namespace inodes holding entries in each of the daemon's BPF maps, read by bpftool."""
    out = {}
    for name, map_id in _bpf_maps(pid).items():
        dump = json.loads(sh("bpftool", "map", "dump", "id", str(map_id), "-j").stdout)
        out[name] = {int.from_bytes(bytes(int(b, 16) for b in entry["key"][:4]), "little") for entry in dump}
    return out


def live_netns(daemon_pid: int) -> set[int]:
    """Inodes of every network namespace that exists now: one a process or any of its threads is in,
    one a process other than the daemon holds open (an nsfs descriptor: a runtime's, a test's
    NamespaceOpener; the daemon's own are what the test checks), or one bind-mounted. (A namespace
    kept only by a socket created in it is not seen.)"""
    inodes = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            inodes.add(os.stat(f"/proc/{entry}/ns/net").st_ino)
        except OSError:
            pass
        try:
            tasks = os.listdir(f"/proc/{entry}/task")
            fds = os.listdir(f"/proc/{entry}/fd") if int(entry) != daemon_pid else []
        except OSError:
            continue
        for task in tasks:
            if task != entry:
                try:
                    inodes.add(os.stat(f"/proc/{entry}/task/{task}/ns/net").st_ino)
                except OSError:
                    pass
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("net:["):
                inodes.add(int(link[5:-1]))
    for directory in ("/run/netns", "/run/docker/netns"):
        for name in os.listdir(directory) if os.path.isdir(directory) else ():
            try:
                inodes.add(os.stat(f"{directory}/{name}").st_ino)
            except OSError:
                pass
    return inodes


def index_rows(data_dir: Path) -> dict[str, int]:
    """Rows of each table of the daemon's index, read from its file (read-only, as it is on disk)."""
    import sqlite3

    db = sqlite3.connect(f"file:{data_dir / 'nstap.db'}?mode=ro", uri=True, timeout=10)
    try:
        return {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("captures", "anomalies", "alerts")}
    finally:
        db.close()


def resolved_alerts(d, count: int, tag: str) -> None:
    """Post ``count`` resolved alerts through the Alertmanager webhook (each one an index row)."""
    for first in range(0, count, 500):
        alerts = [
            {"status": "resolved", "labels": {"alertname": f"Churn{tag}"}, "fingerprint": f"{tag}{i:08x}", "startsAt": "2024-01-01T00:00:00Z"}
            for i in range(first, min(first + 500, count))
        ]
        status, body = d.api("/api/v1/alertmanager", method="POST", body=json.dumps({"version": "4", "alerts": alerts}).encode())
        assert status == 200, body


def test_docker_churn_with_ebpf_on_reused_namespace_inodes(nstap, containers: Containers, docker_image: str) -> None:
    """Docker start/stop cycles (several containers at a time, each one made to drop packets before
    it stops) with the eBPF collector on, while the kernel hands the freed namespace inodes to the
    next containers: the maps end with entries of live namespaces only, a container on a reused
    inode starts from zero drops, the host's drop counter never goes back, descriptors, tasks,
    threads and children are as they were, RSS stays where it was after the first tenth of the
    cycles, and the index stays within its retention."""
    cycles = scale(60, 5000)
    cycles = int(os.environ.get("NSTAP_SOAK_CHURN_CYCLES", cycles))  # what fits in a soak budget
    keep_rows = 1000  # the smallest index_max_rows there is
    d = nstap({
        "ebpf": "on", "interval": 0.5,
        "detect": {"capture": False, "resolve_after": 1, "cooldown": 0},
        "capture": {"ring": "off", "index_max_rows": keep_rows},
    })
    wait_until(lambda: d.events("ebpf_loaded"), 30, message="eBPF program loaded")
    # A namespace nstap never watches (an `ip netns` one, as a build step's would be) drops packets
    # (UDP to a closed port on its loopback), then is deleted: its entries must not stay for good.
    unwatched = f"nstap-soak-{RUN_ID}"
    sh("ip", "netns", "add", unwatched)
    try:
        lone = os.stat(f"/run/netns/{unwatched}").st_ino
        sh("ip", "netns", "exec", unwatched, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", unwatched, sys.executable, "-c",
           "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor _ in range(5): s.sendto(b'x', ('127.0.0.1', 9))")
        wait_until(lambda: lone in bpf_map_netns(d.pid)["drops"], 10, 0.25, "the unwatched namespace's drops in the map")
    finally:
        sh("ip", "netns", "del", unwatched, check=False)
    width = 6  # containers at a time
    starter = ThreadPoolExecutor(max_workers=width)
    pool_ids = [containers.docker(docker_image, "sleep", "3600", name=f"ebchurn{i}") for i in range(width)]
    sh("docker", "kill", *pool_ids)
    d.wait_metric(lambda m: not any(m.find("nstap_container_info", container_id=c[:12]) for c in pool_ids), 30, "pool stopped")
    # More index entries than the index keeps, through the webhook; the cycles' anomalies add theirs.
    resolved_alerts(d, keep_rows + 300, "a")

    done = 0
    seen_inodes: dict[int, str] = {}  # every namespace inode a cycle's container had, and whose it was
    reused = inherited = 0
    host_totals: list[dict[str, float]] = []
    first_seen_drops: list[float] = []
    first_reasons: Counter = Counter()
    stale: set[int] = set()  # gone namespaces of the cycles whose entries stayed in a map
    stale_where: set[str] = set()  # and in which map

    def host_drops(m: Metrics) -> dict[str, float]:
        return {s.labels["reason"]: s.value for s in m.find("nstap_host_kernel_drops_total")}

    def start_one(cid: str) -> None:
        # Another suite's conftest on this shared host may reap a container's shim while it starts
        # (reap_docker_orphans: "ttrpc: closed"): that start is tried again, at most twice.
        for attempt in range(3):
            if sh("docker", "start", cid, check=attempt == 2, timeout=120).returncode == 0:
                return
            time.sleep(0.5)

    def cycle() -> None:
        nonlocal done, reused, inherited
        pending = pool_ids
        for attempt in range(3):
            list(starter.map(start_one, pending))
            info = sh("docker", "inspect", "-f", "{{.Id}} {{.State.Pid}} {{.NetworkSettings.IPAddress}}", *pool_ids).stdout.split("\n")
            started = {f[0]: (int(f[1]), f[2]) for f in (line.split() for line in info) if len(f) == 3 and f[1] != "0"}
            inodes = {}
            for cid, (pid, _ip) in list(started.items()):
                try:
                    inodes[cid] = os.stat(f"/proc/{pid}/ns/net").st_ino
                except FileNotFoundError:
                    del started[cid]
            # (One reaped by another suite's conftest as it started is stopped again: started again.)
            pending = [cid for cid in pool_ids if cid not in started]
            if not pending:
                break
        assert not pending, pending
        # Sampled (with its eBPF counts) before anything is sent to it: what it reports now is what
        # it inherited, if anything.
        m = d.wait_metric(lambda m: all(m.find("nstap_sample_timestamp_seconds", container_id=c[:12]) for c in started) and m, 30, "cycle sampled")
        m = d.wait_metric(lambda m2: all(
            (m2.value("nstap_sample_timestamp_seconds", container_id=c[:12]) or 0) > (m.value("nstap_sample_timestamp_seconds", container_id=c[:12]) or 0)
            for c in started) and m2, 70, "a second sample")  # (a loaded host may slow a sample down to once a minute)
        for cid, inode in inodes.items():
            # Its own start drops a packet or two (QUEUE_PURGE, IPV6DISABLED: measured on a fresh
            # inode too); what its predecessors dropped on this inode is NO_SOCKET, 12 at least.
            reasons = {s.labels["reason"]: s.value for s in m.find("nstap_kernel_drops_total", container_id=cid[:12])}
            first_reasons.update(reasons)
            first_seen_drops.append(reasons.get("NO_SOCKET", 0))
            if inode in seen_inodes:
                reused += 1
                inherited += reasons.get("NO_SOCKET", 0) > 0
        # Now it drops: connections to a port nothing listens on (NO_SOCKET), each answered by a
        # reset; on a loaded host a first SYN may wait for ARP past its timeout: more are sent to a
        # container until it has dropped 12 (at most 60 each).
        def no_socket(m: Metrics, cid: str) -> float:
            return sum(s.value for s in m.find("nstap_kernel_drops_total", container_id=cid[:12], reason="NO_SOCKET"))

        short = dict(started)
        for _ in range(5):
            for cid, (_pid, ip) in short.items():
                for _ in range(12):
                    with socket.socket() as s:
                        s.settimeout(1)
                        s.connect_ex((ip, 81))
            try:
                d.wait_metric(lambda m: all(no_socket(m, c) >= 12 for c in short), 5, "drops counted")
                break
            except pytest.fail.Exception:
                m = d.scrape()
                short = {c: v for c, v in short.items() if no_socket(m, c) < 12}
        else:
            pytest.fail(f"no 12 drops counted in {sorted(short)}")
        for cid, inode in inodes.items():
            seen_inodes[inode] = cid
        sh("docker", "kill", *pool_ids, timeout=120)
        m = d.wait_metric(lambda m: not any(m.find("nstap_container_info", container_id=c[:12]) for c in started) and m, 30, "cycle gone")
        host_totals.append(host_drops(m))
        done += len(started)
        # Their namespaces' entries leave both maps (deleted in the eBPF thread once their watchers
        # went; a drop counted after that, as the kernel tears the namespace down later, by the
        # sweep of gone namespaces: 2 cycles in 5,000 had one) and do not come back. An inode the
        # kernel already gave to a live namespace may hold that namespace's own entries.
        gone = set(inodes.values())
        try:
            wait_until(lambda: not (gone & set().union(*bpf_map_netns(d.pid).values())) - live_netns(d.pid), SWEEP_EVERY + 5, 0.25)
        except pytest.fail.Exception:
            maps_now = bpf_map_netns(d.pid)
            left = (gone & set().union(*maps_now.values())) - live_netns(d.pid)
            stale.update(left)
            stale_where.update(name for name, inodes in maps_now.items() if inodes & left)

    def listed(m: Metrics) -> set[str]:
        return {s.labels["container_id"] for s in m.find("nstap_container_info")}

    def settled() -> dict:
        # None of the cycles' containers left, and what else runs on the host (nothing, in `make
        # test`; another suite's containers on a shared host) as it was at the first settle: what
        # the daemon holds for each watched namespace (netlink sockets, /proc/<pid>/net files,
        # its namespace descriptor) is then the same.
        d.wait_metric(lambda m: listed(m) == (others if others is not None else listed(m) - {c[:12] for c in pool_ids}), 180,
                      "back to the containers of the first settle")
        time.sleep(2)  # watchers' handles closed, the loader child reaped
        kinds = d.fd_kinds()
        return {
            "kinds": kinds, "fds": sum(kinds.values()), "tasks": d.steady_tasks(),
            "threads": d.status("Threads"), "thread_names": d.thread_names(), "children": len(d.children()), "rss_kib": d.status("VmRSS"),
        }

    t0 = time.monotonic()
    while done < max(cycles // 10, 2 * width):  # the first tenth: pools, caches and lazy imports settle
        cycle()
    others = None
    before = settled()
    others = listed(d.scrape())
    tenth = done
    while done < cycles:
        cycle()
    after = settled()
    seconds = time.monotonic() - t0
    starter.shutdown()
    # The index: entries past index_max_rows are pruned at its next pass (every 60 s).
    m = d.wait_metric(lambda m: m.value("nstap_index_pruned_total") > 0 and m, 75, "index pruned")
    rows = wait_until(lambda: (lambda r: r if all(n <= keep_rows for n in r.values()) else None)(index_rows(d.data_dir)), 75, 1, "index within retention")
    index_bytes = m.value("nstap_index_bytes")
    # The maps hold live namespaces only (and 0: drops of packets of no namespace): the sweep of
    # the namespaces that are gone runs every 10 s.
    try:
        wait_until(lambda: not (set().union(*bpf_map_netns(d.pid).values()) - live_netns(d.pid) - {0}), 75, 1)
    except pytest.fail.Exception:
        pass  # reported and asserted below
    maps = bpf_map_netns(d.pid)
    live = live_netns(d.pid)
    dead = set(seen_inodes) - live
    backwards = [(a, b) for a, b in zip(host_totals, host_totals[1:]) if any(b.get(k, 0) < v for k, v in a.items())]
    unix_before, unix_after = before["kinds"].pop("socket:unix", 0), after["kinds"].pop("socket:unix", 0)
    report(
        "churn_ebpf", cycles=done, seconds=round(seconds), cycles_per_second=round(done / seconds, 2), distinct_inodes=len(seen_inodes), reused_inodes=reused,
        inherited_drops=inherited, first_seen_reasons=dict(first_reasons), fds=[before["fds"], after["fds"]], unix_sockets=[unix_before, unix_after], tasks=[before["tasks"], after["tasks"]],
        threads=[before["threads"], after["threads"]], children=[before["children"], after["children"]],
        rss_mib=[round(before["rss_kib"] / 1024, 1), round(after["rss_kib"] / 1024, 1)], rss_after_cycles=tenth,
        map_entries={k: len(v) for k, v in maps.items()}, map_netns_not_live=sorted((maps.get("drops", set()) | maps.get("flows", set())) - live),
        stale_after_cycle=sorted(stale), stale_in=sorted(stale_where), map_netns_of_dead_containers=sorted((maps.get("drops", set()) | maps.get("flows", set())) & dead),
        host_drop_scrapes=len(host_totals), host_drops_backwards=len(backwards), index_rows=rows, index_pruned=m.value("nstap_index_pruned_total"), index_bytes=index_bytes,
    )
    # The kernel did give freed inodes to the next containers (how often depends on what else
    # makes namespaces on the host: on this shared VM from one in 3 to one in 12).
    assert done >= cycles and reused >= max(1, done // 50), (done, reused)
    assert inherited == 0 and max(first_seen_drops) == 0, (inherited, max(first_seen_drops))
    # No entry of a namespace a cycle's container had once it was gone (checked after each cycle:
    # on this shared host, other namespaces take and drop the freed inodes later on).
    assert maps.keys() == {"drops", "flows"} and not stale, sorted(stale)
    # Nor of any other namespace that is gone, the unwatched one deleted at the start among them.
    not_live = (maps["drops"] | maps["flows"]) - live - {0}
    assert lone not in maps["drops"] and not not_live, (lone, sorted(not_live))
    assert not backwards, backwards[:3]
    assert after["kinds"] == before["kinds"], (before["kinds"], after["kinds"])
    assert unix_after <= unix_before + 2 * POOL_LIMIT, (unix_before, unix_after)  # idle pooled runtime connections
    assert after["tasks"] <= before["tasks"] and after["children"] == before["children"], (before, after)  # (tasks: see the churn test)
    # Threads exactly as they were, by name (the pools start their workers when they are made: the
    # 5,000-cycle run before that ended with one more thread than after its first tenth).
    assert after["threads"] == before["threads"] and after["thread_names"] == before["thread_names"], (before["thread_names"], after["thread_names"])
    # 10 % at full size; the short run settles over 15 cycles only, so it gets 25 % (still far
    # below what keeping each namespace's history would cost).
    assert after["rss_kib"] <= before["rss_kib"] * (1.10 if SOAK else 1.25), (before["rss_kib"], after["rss_kib"])
    assert m.value("nstap_index_pruned_total") >= 300 and 0 < index_bytes < 8 << 20, (m.value("nstap_index_pruned_total"), index_bytes)
    assert m.value("nstap_kernel_drops_uncounted_total") == 0
    assert m.value("nstap_task_failures_total", task="watcher") == 0


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


HEAP_MAX_SIZE = 64 << 20  # glibc's, on 64-bit


def malloc_arenas(pid: int) -> int:
    """glibc malloc arenas in a process: the main one, and a heap for each other one. A heap is
    HEAP_MAX_SIZE reserved at a boundary of that size: its used part read-write, the rest (if any)
    right after it with no access, both anonymous (any other mapping that happens to start at such
    a boundary does not add up to exactly that size)."""
    regions = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) == 5:  # anonymous
                start, end = (int(x, 16) for x in fields[0].split("-"))
                regions.append((start, end, fields[1]))
    heaps = 0
    for i, (start, end, perms) in enumerate(regions):
        if perms != "rw-p" or start % HEAP_MAX_SIZE:
            continue
        if i + 1 < len(regions) and regions[i + 1][0] == end and regions[i + 1][2] == "---p":
            end = regions[i + 1][1]
        heaps += end - start == HEAP_MAX_SIZE
    return 1 + heaps


def firewall_rules(count: int) -> str:
    """An nft ruleset of ``count`` rules in one input chain (addresses nobody uses, ports of none)."""
    lines = ["table inet hostile {", "  chain input {", "    type filter hook input priority 0; policy accept;"]
    lines += [f"    ip saddr 10.{200 + i // 65536 % 50}.{i // 256 % 256}.{i % 256} tcp dport {1024 + i % 60000} counter drop" for i in range(count)]
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


class Churner(threading.Thread):
    """Runs ``step(n)`` every ``period`` seconds until closed or ``limit`` seconds passed."""

    def __init__(self, step, period: float, limit: float) -> None:
        super().__init__(daemon=True)
        self.step, self.period, self.limit = step, period, limit
        self.stopped = threading.Event()
        self.done = 0
        self.errors: list[str] = []

    def run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self.stopped.is_set() and time.monotonic() < deadline:
            try:
                self.step(self.done)
                self.done += 1
            except (subprocess.SubprocessError, AssertionError) as exc:
                self.errors.append(str(exc)[:300])
            self.stopped.wait(self.period)

    def close(self) -> None:
        self.stopped.set()
        self.join(30)


def test_a_hostile_container_cannot_starve_the_others(nstap, containers: Containers, docker_image: str) -> None:
    """Hundreds of thousands of sockets, a thousand interfaces and more made and deleted all along,
    tens of thousands of firewall rules of which one changes every second, garbage labels and a
    capture storm it causes itself (and kernel drops, the eBPF collector on), in one container,
    beside many ordinary ones: the daemon stays within its budget (tick lateness p99 at most 10 ms,
    no ordinary container's sample skipped, memory bounded), /metrics stays bounded, another
    container's anomaly still gets its capture, and nothing crashes."""
    listeners, pairs, interfaces = scale(300, 2000), scale(4000, 49000), scale(200, 1000)
    rules, normal_count, window = scale(5000, 50000), scale(8, 50), scale(30, 300)
    window = int(os.environ.get("NSTAP_SOAK_HOSTILE_WINDOW", window))  # a full-size run in less time (profiling)
    interval = 0.5
    config = {"interval": interval, "ebpf": "on", "detect": {"resolve_after": 1, "cooldown": 0}, "capture": {"post_seconds": 2, "max_concurrent": 4}}
    if os.environ.get("NSTAP_SOAK_HOSTILE_FIREWALL_BUDGET"):  # its firewall read more often than once or twice in the window
        config["nat"] = {"firewall_budget": float(os.environ["NSTAP_SOAK_HOSTILE_FIREWALL_BUDGET"])}
    d = nstap(config)
    victim = containers.docker("--label", "nstap.capture=ring", docker_image, *HTTPD, name="victim")
    with ThreadPoolExecutor(max_workers=4) as pool:
        normals = list(pool.map(lambda i: containers.docker(docker_image, *HTTPD, name=f"normal{i}"), range(normal_count)))
    label_args = [a for label in GARBAGE_LABELS for a in ("--label", label)]
    hostile = containers.docker("--cap-add", "NET_ADMIN", *label_args, docker_image, "sleep", "3600", name="hostile")
    pid = containers.pid("docker", hostile)
    in_ns = ("nsenter", "-t", str(pid), "-n")
    # veth pairs with both ends inside the namespace (this kernel has no dummy interfaces).
    batch = "".join(f"link add d{i} type veth peer name e{i}\nlink set d{i} up\nlink set e{i} up\n" for i in range(interfaces // 2))
    subprocess.run([*in_ns, "ip", "-batch", "-"], input=batch, text=True, check=True, capture_output=True, timeout=300)
    # Its own firewall (the host's nft, in its namespace): tens of thousands of native rules, and an
    # iptables(-nft) rule changed every second (`nft replace` itself takes 2-5 s among 50,000
    # rules: it reads them all; iptables reads only its own tables, 20 ms).
    subprocess.run([*in_ns, "nft", "-f", "-"], input=firewall_rules(rules), text=True, check=True, capture_output=True, timeout=600)
    sh(*in_ns, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "DROP")
    d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=hostile[:12]) and m.find("nstap_interface_up", container_id=victim[:12])
                  and all(m.find("nstap_interface_up", container_id=c[:12]) for c in normals), 30)
    sockets = subprocess.Popen(
        [*in_ns, sys.executable, "-c", HOSTILE, str(listeners), str(pairs), "1"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )

    def change_rule(n: int) -> None:
        sh(*in_ns, "iptables", "-R", "INPUT", "1", "-p", "tcp", "--dport", str(10 + n % 1000), "-j", "DROP")

    def churn_interfaces(n: int) -> None:  # 10 pairs made, the 10 of the step before deleted
        made = "".join(f"link add c{n}x{i} type veth peer name f{n}x{i}\nlink set c{n}x{i} up\n" for i in range(10))
        gone = "".join(f"link del c{n - 1}x{i}\n" for i in range(10)) if n else ""
        subprocess.run([*in_ns, "ip", "-force", "-batch", "-"], input=made + gone, text=True, check=True, capture_output=True, timeout=30)

    firewall = Churner(change_rule, 1.0, window + 30)
    links = Churner(churn_interfaces, 0.5, window + 30)
    polls = slowed = stale = 0
    rss_peak = 0
    rss_series: list[float] = []
    try:
        ready = sockets.stdout.readline().split()
        assert ready[:2] == ["ready", str(listeners)] and int(ready[2]) >= listeners + 2 * pairs * 0.95, ready
        total_sockets = int(ready[2])
        d.wait_metric(lambda m: (m.value("nstap_sockets", container_id=hostile[:12], protocol="tcp", state="listen") or 0) >= listeners
                      and m.find("nstap_firewall_changes_total", container_id=hostile[:12]), 120, "its sockets and its firewall read")
        time.sleep(3)  # the first reads' garbage collected
        rss0 = d.status("VmRSS")
        m0 = d.scrape()
        firewall.start()
        links.start()
        cpu0, t0 = d.cpu_seconds(), time.monotonic()
        while time.monotonic() - t0 < window:  # the storm goes on, anomalies start and end, captures are asked for
            time.sleep(5)  # (a scrape is work on the event loop too: no more often than a busy Prometheus)
            m = d.scrape()
            polls += 1
            rss_series.append(round(d.status("VmRSS") / 1024, 1))
            rss_peak = max(rss_peak, d.status("VmRSS"))
            now = time.time()
            for c in normals:  # every ordinary container sampled at every tick, and lately
                slowed += m.value("nstap_sample_interval_seconds", container_id=c[:12]) != interval
                stale += now - (m.value("nstap_sample_timestamp_seconds", container_id=c[:12]) or 0) > 3 * interval
        cpu1, t1 = d.cpu_seconds(), time.monotonic()
        m1 = d.scrape()
        arenas = malloc_arenas(d.pid)
        firewall.close()
        links.close()
        # Another container's anomaly, in the middle of it: its capture happens.
        reset_burst(container_ip(victim))
        event = wait_until(lambda: [a for a in d.api(f"/api/v1/anomalies?container={victim[:12]}&kind=tcp_reset_spike")[1]["anomalies"] if a["capture_id"]], 20, 0.2)[0]
        capture = finished_capture(d, event["capture_id"])
        assert capture["state"] == "complete" and capture["pre_packets"] > 0, capture
    finally:
        firewall.close()
        links.close()
        os.killpg(sockets.pid, signal.SIGKILL)  # it and its workers
        sockets.wait()
    ticks = m1.value("nstap_tick_lag_seconds_count") - m0.value("nstap_tick_lag_seconds_count")
    samples = m1.value("nstap_sample_duration_seconds_count") - m0.value("nstap_sample_duration_seconds_count")
    expected_ticks = (t1 - t0) / interval
    # Samples of the ordinary containers and the victim: one per tick each; the hostile one adds
    # one every `every` ticks at most. What is missing of that is what was skipped.
    hostile_every = m1.value("nstap_sample_interval_seconds", container_id=hostile[:12]) / interval
    skipped = max(0.0, ticks * (normal_count + 1) + ticks / hostile_every - samples)
    fw_changes = m1.value("nstap_firewall_changes_total", container_id=hostile[:12]) - m0.value("nstap_firewall_changes_total", container_id=hostile[:12])
    hostile_drops = sum(s.value for s in m1.find("nstap_kernel_drops_total", container_id=hostile[:12]))
    mine = [s for s in m1.samples if s.labels.get("container_id") == hostile[:12]]
    ports = {s.labels["port"] for s in m1.find("nstap_tcp_listen_queue_length", container_id=hostile[:12])}
    ifaces = {s.labels["interface"] for s in m1.find("nstap_interface_up", container_id=hostile[:12])}
    refused = m1.value("nstap_captures_refused_total", reason="per_container_limit")
    hostile_captures = m1.value("nstap_captures_total", container_id=hostile[:12], reason="anomaly") or 0
    cpu_percent = (cpu1 - cpu0) / (t1 - t0) * 100
    lag_p99 = lag_quantile(m0, m1, 0.99)
    every = m1.value("nstap_sample_interval_seconds", container_id=hostile[:12])
    lag_buckets = {s.labels["le"]: s.value - (m0.value("nstap_tick_lag_seconds_bucket", le=s.labels["le"]) or 0) for s in m1.find("nstap_tick_lag_seconds_bucket")}
    report(
        "hostile", malloc_arenas=arenas, lag_buckets=lag_buckets, pumps_cut=m1.value("nstap_flight_recorder_pumps_cut_total") - m0.value("nstap_flight_recorder_pumps_cut_total"), rss_series_mib=rss_series, sockets=total_sockets, listeners=listeners, interfaces=interfaces, labels=len(GARBAGE_LABELS), firewall_rules=rules + 1,
        firewall_changes_made=firewall.done, firewall_changes_seen=fw_changes, interface_churn_steps=links.done, churn_errors=(firewall.errors + links.errors)[:3],
        normal_containers=normal_count, window_s=round(t1 - t0), ticks=ticks, expected_ticks=round(expected_ticks, 1), samples=samples, samples_skipped=round(skipped, 1),
        polls=polls, normal_slowed=slowed, normal_stale=stale, hostile_kernel_drops=hostile_drops,
        series_of_hostile=len(mine), daemon_cpu_percent=round(cpu_percent, 1), tick_lag_p99_s=lag_p99, hostile_sample_interval_s=every,
        hostile_anomaly_captures=hostile_captures, refused_per_container=refused, rss_mib=[round(rss0 / 1024, 1), round(rss_peak / 1024, 1), round(d.status("VmRSS") / 1024, 1)],
    )
    # /metrics stays bounded: 64 ports and 64 interfaces, the rest under "other".
    assert "other" in ports and len(ports) <= 65 and "other" in ifaces and len(ifaces) <= 65
    # (and its firewall's DROP rules, at most nat.max_firewall_rules, and its kernel drop reasons)
    reasons = len(m1.find("nstap_kernel_drops_total", container_id=hostile[:12]))
    anomaly_series = len([s for s in mine if s.name.startswith("nstap_anomal")])  # a kind's series per cause named
    assert len(mine) <= 65 * 10 + 65 * 2 + 60 + 32 + 1 + reasons + anomaly_series, (len(mine), reasons, anomaly_series)
    # Its garbage labels were ignored, not obeyed: no anomaly on its idle listeners from "=0".
    assert not d.api(f"/api/v1/anomalies?container={hostile[:12]}&kind=tcp_listen_overflows")[1]["anomalies"]
    assert d.events("detector_label_ignored", container=f"hostile-{RUN_ID}")
    # Its capture storm was capped (and once at the cap, refused); the victim still got its capture
    # (checked above). Its expensive samples were spaced out (sampling_slowed) when they cost
    # more than the budget.
    # Every one of its anomalies either has a capture (its own, or one running capture shared by
    # the anomalies one fault trips at once: anomaly_capture_shared) or was refused and counted,
    # for any reason (max_concurrent too). The check was "more than 6 events, so a per-container
    # refusal", and a CI run had 10 events, 6 captures and none: the other 4 shared a capture or
    # met the concurrency limit. A capture still being started has no id yet: waited for.
    assert hostile_captures <= 6, hostile_captures

    def unaccounted() -> tuple[list[dict], float]:
        rows = d.api(f"/api/v1/anomalies?container={hostile[:12]}&limit=1000")[1]["anomalies"]
        refusals = sum(s.value for s in d.scrape().find("nstap_captures_refused_total"))
        return [a for a in rows if not a["capture_id"]], refusals

    uncaptured, refusals = unaccounted()
    if len(uncaptured) > refusals:
        time.sleep(5)
        uncaptured, refusals = unaccounted()
    assert len(uncaptured) <= refusals, (uncaptured, refusals)
    assert every == 0.5 or d.events("sampling_slowed", container=f"hostile-{RUN_ID}")
    # The daemon stayed within its budget: the loop was never held up, and the hostile namespace
    # cost what a few ordinary ones do.
    # It did what it says: its firewall changed every second and nstap saw changes (read at a
    # bounded rate), its interfaces came and went, the eBPF collector counted its drops.
    assert firewall.done >= window * 0.8 and links.done >= window and not firewall.errors and not links.errors, (firewall.done, links.done, firewall.errors, links.errors)
    assert fw_changes >= 1 and m1.value("nstap_collector_up", collector="firewall") == 1, fw_changes
    assert hostile_drops > 0 and m1.value("nstap_collector_up", collector="ebpf_drops") == 1
    # No ordinary container starved: no tick missed, every one sampled at every tick, none late.
    assert ticks >= expected_ticks - 2 and slowed == 0 and stale == 0 and skipped <= normal_count, (ticks, expected_ticks, slowed, stale, skipped)
    assert not [e for e in d.events("sampling_slowed") if e.get("container") != f"hostile-{RUN_ID}"]
    # Memory bounded: the window's churn (a new firewall text every second, interfaces by the
    # thousand) takes what it takes in its first half (the firewall's texts and parses, measured
    # +10-20 MiB), then no more: at the end within a tenth of the first half's peak. The worker
    # threads that take turns at those reads share the daemon's two malloc arenas: with one arena
    # each, RSS was the sum of their peaks and climbed as a read landed on a new thread.
    assert arenas <= MALLOC_ARENAS, arenas
    first_half = max(rss_series[: max(1, len(rss_series) // 2)])
    assert rss_series[-1] <= first_half * 1.10 and rss_peak <= rss0 * 2, (rss0, first_half, rss_series[-1])
    # The loop was not held up. Issue 19's goal, p99 of tick lateness at most 10 ms (a bucket
    # boundary of the histogram: read off it exactly), is checked at full size (make soak; met
    # since the sampling round's gate, see nstap.gate, and link changes applied from their
    # announcements). Here, at make test size (about 60 ticks, so p99 is nearly the worst tick),
    # a regression guard: no tick held up by more than 100 ms.
    assert lag_p99 <= (0.01 if SOAK else 0.1), (lag_p99, lag_buckets)
    assert cpu_percent < 60, cpu_percent


# -- crashes during captures ------------------------------------------------------------------------


def test_kill_9_during_filtered_ring_captures_and_evidence_writes(nstap, containers: Containers, docker_image: str, tmp_path: Path) -> None:
    """The daemon SIGKILLed at random (seeded) moments of filtered flight-recorder captures, their
    read-back, their filtering and their evidence, restarted on the same data dir each time: every
    indexed capture's pcap reads in tcpdump and holds the packets its row counts (filtered), no file
    is left that no row owns, and the store's accounting equals the bytes on disk."""
    count = scale(8, 50)
    seed = int(os.environ.get("NSTAP_SOAK_SEED") or time.time_ns() % 1_000_000)
    print(f"kill -9 seed {seed} (NSTAP_SOAK_SEED={seed} repeats it)")
    rng = random.Random(seed)
    # (No anomaly captures: on a shared host other containers' anomalies would take the slots.)
    d = nstap({"detect": {"capture": False}, "capture": {"ring": "labeled", "ring_bytes": 1 << 20, "ring_segments": 4, "post_seconds": 1, "pre_seconds": 2, "evidence": True}})
    web = containers.docker("--label", "nstap.capture=ring", docker_image, *HTTPD, name="k9web")
    ip = container_ip(web)
    requests = 20 * 60 * scale(3, 15)  # 20 a second: at most 3 minutes here, 15 in make soak
    containers.docker(docker_image, "sh", "-c", f"i=0; while [ $i -lt {requests} ]; do wget -q -O /dev/null http://{ip}/; i=$((i+1)); sleep 0.05; done", name="k9client")
    asked: list[str] = []
    kills = 0
    t0 = time.monotonic()
    for i in range(count):
        d.wait_metric(lambda m: m.find("nstap_flight_recorder_reach_seconds", container_id=web[:12]), 20, "its ring recording")
        time.sleep(2.5 if kills and i and asked and rng.random() < 0.5 else 0.5)  # reach before the trigger (sometimes)
        # One at a time: those a kill interrupted are finished by the restart (indexed incomplete,
        # or filtered from what they had set aside) before the next one starts.
        wait_until(lambda: not [c for c in d.api("/api/v1/captures?limit=100")[1]["captures"] if c["state"] == "running"], 30, 0.3, "earlier captures ended")
        duration = rng.choice([1, 2])
        status, row = d.api("/api/v1/captures", method="POST", body=json.dumps({"container": web[:12], "duration": duration, "filter": "tcp port 80", "pre_seconds": 2}).encode())
        assert status == 202 and row["mode"] == "ring", (status, row)
        asked.append(row["id"])
        if rng.random() < 0.7:
            # Anywhere in its window, read-back, filter, outcome and evidence (all done ~1.5 s after it ends).
            time.sleep(rng.uniform(0, duration + 2.0))
            d.kill()
            kills += 1
            d.start()
        else:
            finished_capture(d, row["id"])
    d.kill()  # and once more at the end, whatever was going on
    kills += 1
    d.start()
    seconds = time.monotonic() - t0
    wait_until(lambda: all(c["state"] != "running" for c in d.api("/api/v1/captures?limit=1000")[1]["captures"]), 30, 0.5, "no capture left running")
    rows = {c["id"]: c for c in d.api("/api/v1/captures?limit=1000")[1]["captures"]}
    assert set(asked) <= set(rows), sorted(set(asked) - set(rows))  # every capture asked for is indexed
    captures_dir = d.data_dir / "captures"
    states: Counter = Counter()
    empty = unreadable = 0
    for capture_id, row in rows.items():
        states[row["state"]] += 1
        assert row["state"] in ("complete", "incomplete", "failed"), row  # none evicted: the store is far from full
        pcap = captures_dir / f"{capture_id}.pcap"
        if not row["downloadable"]:  # killed before its pcap had a header: no file, and the row says why
            assert row["packets"] == 0 and "no packet was written" in row["error"] and not pcap.exists(), row
            empty += 1
            continue
        read = sh("tcpdump", "-nr", str(pcap), check=False)
        if row["packets"] == 0 and row["error"] and row["state"] != "complete":  # empty, and the row says why
            empty += 1
            unreadable += read.returncode != 0
            continue
        assert read.returncode == 0, (row, read.stderr)
        packets = len(read.stdout.splitlines())
        assert packets == row["packets"] and packets > 0, (row, packets)
        if row.get("filter"):
            assert not sh("tcpdump", "-nr", str(pcap), "not (tcp port 80)", check=False).stdout.strip(), row  # filtered, also when recovered
    owned = {f"{i}.pcap" for i, r in rows.items() if r["downloadable"]} | {f"{i}.evidence.json" for i, r in rows.items() if r["has_evidence"]}
    on_disk = {p.name for p in captures_dir.iterdir()}
    orphans = sorted(on_disk - owned)
    missing = sorted(owned - on_disk)
    disk_bytes = sum(p.stat().st_size for p in captures_dir.iterdir())
    # The store's own count is refreshed after each capture and evidence write, and at each
    # retention pass (every 60 s): equal to the disk by then at the latest.
    accounted = wait_until(lambda: (lambda v: v if v == disk_bytes else None)(d.scrape().value("nstap_capture_store_bytes")), 70, 1, f"store bytes = {disk_bytes} on disk")
    index_files = sum(p.stat().st_size for p in (d.data_dir / "nstap.db", d.data_dir / "nstap.db-wal") if p.exists())
    report(
        "kill9_captures", seed=seed, captures=len(asked), kills=kills, seconds=round(seconds), states=dict(states), empty_with_reason=empty, empty_unreadable=unreadable,
        recovered=len(d.events("capture_store_recovered")), orphans=orphans, missing=missing, store_bytes=accounted, disk_bytes=disk_bytes,
        index_bytes=d.scrape().value("nstap_index_bytes"), index_files_bytes=index_files,
    )
    assert not orphans and not missing, (orphans, missing)
    assert not unreadable  # every pcap kept reads in tcpdump
    assert kills >= count // 2 and states["complete"] + states["incomplete"] >= count // 2, (kills, states)


# -- a storm of anomalies -----------------------------------------------------------------------------------


def test_an_anomaly_storm_holds_at_most_its_share_of_capture_slots(nstap, containers: Containers, docker_image: str) -> None:
    """One container trips anomalies on its own side (reset spikes) and on the host end of its veth
    (packets too big for its MTU, dropped there: a capture on each side), round after round, while
    another container's anomalies need captures too: sampled all along, the storm's container never
    holds more than its share (half of max_concurrent) of the running captures, host side
    included, and the other container gets its captures."""
    rounds = scale(3, 12)
    max_concurrent = 4
    share = max_concurrent // 2
    d = nstap({
        "interval": 0.5, "detect": {"resolve_after": 1, "cooldown": 0},
        "capture": {"ring": "off", "max_concurrent": max_concurrent, "post_seconds": 5, "max_per_container_per_hour": 3600},
    })
    touchy = ("--label", "nstap.detect.tcp_reset_spike=min_rate=1,factor=1")
    storm = containers.docker(*touchy, docker_image, *HTTPD, name="storm")
    other = containers.docker(*touchy, docker_image, *HTTPD, name="other")
    storm_ip, other_ip = container_ip(storm), container_ip(other)
    # Its eth0 takes 600-byte frames; the host end takes 1500: a bigger packet sent to it is dropped
    # on the host end of the veth (tx_dropped there), so interface_drops trips on the host side.
    sh("nsenter", "-t", str(containers.pid("docker", storm)), "-n", "ip", "link", "set", "eth0", "mtu", "600")
    d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=storm[:12], side="host") and m.find("nstap_interface_up", container_id=other[:12]), 15)
    time.sleep(2)  # a few samples: the detectors' baselines
    held: Counter = Counter()  # most captures of each container running at once, as sampled
    samples = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal samples
        while not stop.is_set():
            status, body = d.api("/api/v1/captures?limit=100")
            if status == 200:
                running = Counter(c["container_id"] for c in body["captures"] if c["state"] == "running")
                for cid, n in running.items():
                    held[cid] = max(held[cid], n)
                samples += 1
            stop.wait(0.1)

    sampler = threading.Thread(target=watch, daemon=True)
    sampler.start()
    try:
        def drops() -> None:  # the host side: an interface_drops anomaly, captured on both sides
            sh("ping", "-c", "30", "-s", "1000", "-i", "0.01", "-W", "0.2", "-q", storm_ip, check=False)

        def resets() -> None:  # its own side: a reset spike
            reset_burst(storm_ip, 60)

        for i in range(rounds):
            # One round the host-side anomaly comes first (its two captures fill the share, the
            # reset spike's is refused), the next it comes second (its container-side capture takes
            # the last slot of the share, the host-side one must be refused), and so on.
            first, second = (drops, resets) if i % 2 == 0 else (resets, drops)
            first()
            reset_burst(other_ip, 60)  # the other container's
            time.sleep(1.5)
            second()
            time.sleep(1.5)
            resets()  # once more, while they all still run
            time.sleep(6)  # the captures end; the anomalies resolve (resolve_after 1 s, no cooldown)
    finally:
        stop.set()
        sampler.join(5)
    m = d.scrape()
    refused = m.value("nstap_captures_refused_total", reason="per_container_limit")
    rows = d.api("/api/v1/captures?limit=1000")[1]["captures"]
    mine = [r for r in rows if r["container_id"] == storm[:12]]
    theirs = [r for r in rows if r["container_id"] == other[:12]]
    host_side = [r for r in mine if r["side"] == "host"]
    report(
        "anomaly_storm", rounds=rounds, share=share, max_concurrent=max_concurrent, samples=samples, max_held={"storm": held[storm[:12]], "other": held[other[:12]]},
        storm_captures=len(mine), storm_host_side=len(host_side), other_captures=len(theirs), refused_per_container=refused,
        refused_host_side=len(d.events("anomaly_capture_refused", container_id=storm[:12], side="host")),
        anomalies=len(d.api(f"/api/v1/anomalies?container={storm[:12]}&limit=1000")[1]["anomalies"]),
    )
    assert samples >= rounds * 50, samples
    assert held[storm[:12]] <= share, dict(held)
    # The storm asked for more captures than its share, on both sides: host-side captures ran, and
    # what went over the share was refused or, for anomalies of one fault, shared the running
    # capture (the quota itself, refusals included, is tested with real tcpdumps in test_capture).
    over = [e for e in d.events("anomaly_capture_refused", container_id=storm[:12]) if "at a time" in e.get("error", "")]
    shared = d.events("anomaly_capture_shared", container=f"storm-{RUN_ID}")
    assert host_side and (over or shared), (len(host_side), over, len(shared))
    assert theirs and held[other[:12]] >= 1, (len(theirs), dict(held))


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
