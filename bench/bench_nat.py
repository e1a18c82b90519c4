#!/usr/bin/env python3
"""Benchmark: what the NAT/conntrack/firewall path costs, and how fast it sees a broken forward.

Starts N busybox containers in dockerd, each publishing one port; adds R extra DNAT rules to the
host's nat table (``iptables-restore --noflush``: a chain of their own, jumped to first from
PREROUTING, so every walk passes it) and E conntrack entries (bench/conntrack_fill.py, UDP between
documentation addresses, 10 minutes' timeout); measures what listing one container's entries
costs a capture's evidence (against the dump alone); then runs ``nstap run`` (1 s interval) twice for the same window,
with ``nat.enabled`` off and on, and reports:

* the daemon's CPU (user+system, threads and waited-for children such as iptables-save) in both
  runs: their difference is the NAT path's cost, in % of one core; and the same per thread kind
  (the kernel's accounting: the event loop, the NAT thread, the port prober, ...) and children;
* the NAT read's own figures from /metrics (rules read, read wall time, conntrack flow pass time);
* how late the sampling ticks started in both runs (``nstap_tick_lag_seconds``);
* the latency from a rule change (a DNAT inserted first in PREROUTING that shadows one container's
  port) to ``state="shadowed"`` in /metrics, and back to ``ok`` after it is removed.

    make bench-nat                                 # 200 containers, 10,000 rules, 50,000 entries
    make bench-nat ARGS="--containers 20 --seconds 30"

Everything it adds is removed at the end (containers, rules, conntrack entries).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from bench_sampling import CLK_TCK, group_of, lag_quantiles, rss_mib, thread_cpu  # noqa: E402
from conftest import free_port  # noqa: E402
from conntrack_fill import add_entries, remove_entries  # noqa: E402
from images import ensure_image  # noqa: E402

LABEL = "nstap.bench=nat"
CHAIN = "NSTAP-BENCH"
PORT_BASE = 31000


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout.strip()


def cpu_seconds(pid: int) -> float:
    """user+system of the process, its threads and the children it waited for (iptables-save, nft)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / CLK_TCK


def children_seconds(pid: int) -> float:
    """user+system of the children the process waited for (iptables-save, nft)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[13:15]) / CLK_TCK


def by_thread(pid: int, before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], seconds: float) -> dict[str, float]:
    """% of one core per thread kind (``nstap-nat``, the event loop's ``MainThread``, ...) between
    two :func:`bench_sampling.thread_cpu` readings (a thread that exited between them is left out)."""
    spent: dict[str, float] = {}
    for tid, (comm, cpu) in after.items():
        name = "MainThread" if tid == pid else group_of(comm)
        spent[name] = spent.get(name, 0.0) + cpu - before.get(tid, (comm, 0.0))[1]
    return {name: round(100 * cpu / seconds, 2) for name, cpu in sorted(spent.items(), key=lambda kv: -kv[1]) if cpu > 0}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def value(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def start_containers(image: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        ids.append(sh("docker", "run", "-d", "--label", LABEL, "-p", f"{PORT_BASE + i}:80", image, "sleep", "3600"))
    return ids


def add_rules(count: int) -> None:
    lines = ["*nat", f":{CHAIN} - [0:0]"]
    for i in range(count):
        lines.append(f"-A {CHAIN} -p tcp -m tcp --dport {40000 + i % 20000} -j DNAT --to-destination 10.99.{i // 250 % 250}.{i % 250 + 1}:80")
    lines += [f"-I PREROUTING 1 -j {CHAIN}", "COMMIT", ""]
    subprocess.run(["iptables-restore", "--noflush"], input="\n".join(lines), text=True, check=True)


def remove_rules() -> None:
    sh("iptables", "-t", "nat", "-D", "PREROUTING", "-j", CHAIN, check=False)
    sh("iptables", "-t", "nat", "-F", CHAIN, check=False)
    sh("iptables", "-t", "nat", "-X", CHAIN, check=False)


def evidence_reads(rounds: int = 5) -> dict:
    """What listing one container's conntrack entries costs a capture's evidence, in CPU (median
    of ``rounds``) against the dump alone (its lower bound: the kernel's walk and the copies),
    the way it is done (the dump reduced in C, only the matching entries parsed) and the way it
    was (a Flow parsed for every entry)."""
    import socket
    import struct

    from nstap.nat.conntrack import ConntrackReader, flows_of
    from nstap.netns import netlink

    mine = {socket.inet_aton("198.51.100.7")}  # one of conntrack_fill.SOURCES: 1/50 of the added entries
    reader = ConntrackReader()
    sock = netlink.open_socket(netlink.NETLINK_NETFILTER)

    def dump_alone() -> int:
        """The dump received and nothing looked at but each batch's last message (NLMSG_DONE, 20
        bytes, ends the last batch)."""
        netlink.send(sock, (1 << 8) | 1, struct.pack("=BBH", socket.AF_UNSPEC, 0, 0))  # IPCTNL_MSG_CT_GET
        batches = 0
        while True:
            data = netlink.receive(sock)
            batches += 1
            if len(data) >= 20 and struct.unpack_from("=LH", data, len(data) - 20) == (20, netlink.NLMSG_DONE):
                return batches

    ways = {
        "dump_alone": dump_alone,
        "matching_in_c": lambda: flows_of(reader.matching(mine), mine)[1],
        "flow_per_entry": lambda: flows_of(reader.dump(), mine)[1],
    }
    out: dict = {}
    try:
        for name, way in ways.items():
            took = []
            for _ in range(rounds):
                started = time.thread_time()
                found = way()
                took.append(time.thread_time() - started)
            out[f"{name}_ms"] = round(1000 * statistics.median(took), 1)
            if name != "dump_alone":
                out[f"{name}_found"] = found
    finally:
        reader.close()
        sock.close()
    for name in ("matching_in_c", "flow_per_entry"):
        out[f"{name}_x_dump"] = round(out[f"{name}_ms"] / out["dump_alone_ms"], 2)
    return out


class Daemon:
    def __init__(self, workdir: Path, nat: bool) -> None:
        self.metrics_port = free_port()
        config = {
            "interval": 1.0,
            "metrics_listen": f"127.0.0.1:{self.metrics_port}",
            "api_listen": f"127.0.0.1:{free_port()}",
            "data_dir": str(workdir / "data"),
            "log_format": "json",
            "runtimes": [{"name": "docker", "socket": "/var/run/docker.sock"}],
            "nat": {"enabled": nat},
            "capture": {"ring": "off"},
            "detect": {"capture": False},
        }
        path = workdir / "nstap.yaml"
        path.write_text(json.dumps(config))
        self.log = open(workdir / "nstap.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "nstap", "run", "--config", str(path)], stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait(self, predicate, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                text = scrape(self.metrics_port)
                if predicate(text):
                    return text
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("timed out waiting for the daemon")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()


def forward_state(text: str, port: int) -> str | None:
    m = re.search(rf'^nstap_nat_port_forward_info{{[^}}]*host_port="{port}"[^}}]*state="(\w+)"}}', text, re.M)
    return m.group(1) if m else None


def measure(nat: bool, containers: int, seconds: float, workdir: Path) -> dict:
    d = Daemon(workdir, nat)
    try:
        d.wait(lambda t: (value(t, "nstap_namespaces_watched") or 0) >= containers, 120)
        if nat:
            d.wait(lambda t: t.count("nstap_nat_port_forward_info{") >= containers, 120)
        time.sleep(5)  # first reads, attach costs
        pid = d.proc.pid
        before_text, before_cpu, before_threads, before_children = scrape(d.metrics_port), cpu_seconds(pid), thread_cpu(pid), children_seconds(pid)
        time.sleep(seconds)
        after_cpu, after_threads, after_children, after_text = cpu_seconds(pid), thread_cpu(pid), children_seconds(pid), scrape(d.metrics_port)
        out = {
            "nat": nat,
            "cpu_percent": round(100 * (after_cpu - before_cpu) / seconds, 2),
            "threads_percent": by_thread(pid, before_threads, after_threads, seconds),
            "children_percent": round(100 * (after_children - before_children) / seconds, 2),
            "rss_mib": round(rss_mib(d.proc.pid), 1),
            "tick_lag": lag_quantiles(before_text, after_text),
        }
        if nat:
            out["nat_rules"] = {m.group(1): float(m.group(2)) for m in re.finditer(r'^nstap_nat_rules{source="([^"]+)"} (\S+)$', after_text, re.M)}
            out["nat_read_seconds"] = value(after_text, "nstap_nat_read_seconds")
            out["nat_reads"] = (value(after_text, "nstap_nat_reads_total") or 0) - (value(before_text, "nstap_nat_reads_total") or 0)
            out["conntrack_entries"] = value(after_text, "nstap_conntrack_entries")
            out["conntrack_flow_pass_seconds"] = value(after_text, "nstap_conntrack_flows_pass_seconds")
            out["forward_states"] = sorted(set(re.findall(r'^nstap_nat_port_forward_info{[^}]*state="(\w+)"}', after_text, re.M)))
            out["change_latency"] = change_latency(d, PORT_BASE + containers // 2)
        return out
    finally:
        d.stop()


def change_latency(d: Daemon, port: int, rounds: int = 5) -> dict:
    shadow = ["PREROUTING", "-p", "tcp", "-m", "tcp", "--dport", str(port), "-j", "DNAT", "--to-destination", "10.98.0.1:80"]
    broken, repaired = [], []
    for _ in range(rounds):
        started = time.monotonic()
        sh("iptables", "-t", "nat", "-I", shadow[0], "1", *shadow[1:])
        try:
            d.wait(lambda t: forward_state(t, port) == "stale", 30)
            broken.append(time.monotonic() - started)
        finally:
            started = time.monotonic()
            sh("iptables", "-t", "nat", "-D", *shadow)
        d.wait(lambda t: forward_state(t, port) == "ok", 30)
        repaired.append(time.monotonic() - started)
        time.sleep(1.3)
    return {
        "to_broken_median_s": round(statistics.median(broken), 3), "to_broken_max_s": round(max(broken), 3),
        "to_ok_median_s": round(statistics.median(repaired), 3), "to_ok_max_s": round(max(repaired), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--containers", type=int, default=200)
    parser.add_argument("--rules", type=int, default=10_000)
    parser.add_argument("--entries", type=int, default=50_000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "nat.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (it changes the host's nat table and conntrack)")
    image = ensure_image("docker")
    results: dict = {"containers": args.containers, "extra_rules": args.rules, "extra_conntrack_entries": args.entries, "seconds": args.seconds}
    try:
        started = time.monotonic()
        start_containers(image, args.containers)
        results["start_containers_s"] = round(time.monotonic() - started, 1)
        add_rules(args.rules)
        results["conntrack_added"] = add_entries(args.entries)
        results["evidence_conntrack"] = evidence_reads()
        print("evidence's conntrack read:", json.dumps(results["evidence_conntrack"]), flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            for nat in (False, True):
                workdir = Path(tmp) / ("on" if nat else "off")
                workdir.mkdir()
                results["nat_on" if nat else "nat_off"] = measure(nat, args.containers, args.seconds, workdir)
        results["nat_cost_percent_of_a_core"] = round(results["nat_on"]["cpu_percent"] - results["nat_off"]["cpu_percent"], 2)
    finally:
        ids = sh("docker", "ps", "-aq", "--filter", f"label={LABEL}").split()
        if ids:
            sh("docker", "rm", "-f", *ids, check=False)
        remove_rules()
        remove_entries()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
