#!/usr/bin/env python3
"""Benchmark: does nstap name the right cause? Each fault class injected R times (3 by default)
under steady traffic, every anomaly it raises scored right, wrong or unknown by its final cause.

Starts ``nstap run`` (interval 1 s, every default: NAT monitor, eBPF collector when this host can
load it) and, for each fault, a fresh busybox httpd container with a published port and steady HTTP
requests from the host (a new connection every 0.1 s), then:

* ``drop``: a DROP rule in the container's own firewall for 30 % of its clients' packets
  (``iptables -m statistic``): the clients' ACKs and requests are lost -> ``firewall_drop``;
* ``reject``: a REJECT rule for half of them -> ``firewall_drop``;
* ``paused``: the container paused (``docker pause``) with 20 connections waiting -> ``process_not_accepting``;
* ``dnat_deleted``: Docker's DNAT rule of its published port deleted -> ``nat_missing``;
* ``dnat_shadowed``: a DNAT rule inserted ahead of Docker's, to another address -> ``nat_shadowed``;
* ``veth_down``: the host end of its veth set down -> ``link_down``;
* ``mtu``: its eth0 MTU lowered to 1000, pings of 1400 bytes -> ``mtu``;
* ``conntrack_full``: ``nf_conntrack_max`` set just above the table's entries, new connections -> ``conntrack_full``;
* ``closed_port``: 200 connections to a port nothing listens on -> ``no_listener``;
* ``udp_not_read``: a UDP socket that never reads, flooded -> ``socket_not_reading``.

An anomaly counts when it starts in the fault's container (or, for conntrack, on the host) after
the injection; its cause is read once it ended or 12 s after it started. Prints one JSON line and a
table per class: anomalies, right, wrong, unknown, and the wrong and unknown ones' kinds.

    .venv/bin/python bench/bench_cause.py [--rounds R] [--classes drop,paused,...]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))
from bench_detect import Api, Requests, host_end, in_ns, pid_of  # noqa: E402
from bench_containers import LABEL, container_ips, ensure_image, sh  # noqa: E402
from bench_sampling import ROOT, scrape  # noqa: E402

SETTLE = 12.0  # seconds after an anomaly starts before its cause is read (if it has not ended)
CONNTRACK_MAX = Path("/proc/sys/net/netfilter/nf_conntrack_max")


class Fault:
    name = ""
    expect = ""

    def __init__(self, image: str, serial: int) -> None:
        self.image, self.serial = image, serial
        self.cid = ""
        self.port = 0
        self.traffic: Requests | None = None

    def start(self) -> None:
        self.port = 20000 + (os.getpid() * 10 + self.serial) % 20000
        self.cid = sh("docker", "run", "-d", "--label", LABEL, "-p", f"{self.port}:80", "--name", f"nstap-cause-{self.name}-{self.serial}-{os.getpid()}",
                      self.image, "httpd", "-f", "-p", "80", "-h", "/")
        self.ip = container_ips([self.cid])[0]
        self.traffic = Requests([self.ip])
        self.traffic.start()

    def inject(self) -> None:
        raise NotImplementedError

    def undo(self) -> None:
        pass

    def cleanup(self) -> None:
        if self.traffic is not None:
            self.traffic.close()
        subprocess.run(["docker", "rm", "-f", self.cid], capture_output=True)


class Drop(Fault):
    name, expect = "drop", "firewall_drop"

    def inject(self) -> None:
        in_ns(self.cid, "iptables", "-I", "INPUT", "-p", "tcp", "--dport", "80", "-m", "statistic", "--mode", "random", "--probability", "0.3", "-j", "DROP")


class Reject(Fault):
    name, expect = "reject", "firewall_drop"

    def inject(self) -> None:
        in_ns(self.cid, "iptables", "-I", "INPUT", "-p", "tcp", "--dport", "80", "-m", "statistic", "--mode", "random", "--probability", "0.5", "-j", "REJECT")


class Paused(Fault):
    name, expect = "paused", "process_not_accepting"

    def inject(self) -> None:
        sh("docker", "pause", self.cid)
        self.socks = []
        for _ in range(20):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex((self.ip, 80))
            self.socks.append(c)

    def undo(self) -> None:
        for c in self.socks:
            c.close()
        sh("docker", "unpause", self.cid)


def docker_dnat(port: int) -> list[str]:
    """Docker's DNAT rule of host port ``port`` (the -A line of iptables -S)."""
    for line in sh("iptables", "-t", "nat", "-S", "DOCKER").splitlines():
        if f"--dport {port} " in line and "DNAT" in line:
            return line.split()
    raise SystemExit(f"no DNAT rule for port {port}")


class DnatDeleted(Fault):
    name, expect = "dnat_deleted", "nat_missing"

    def inject(self) -> None:
        self.rule = docker_dnat(self.port)
        sh("iptables", "-t", "nat", "-D", *self.rule[1:])

    def undo(self) -> None:
        subprocess.run(["iptables", "-t", "nat", "-A", *self.rule[1:]], capture_output=True)


class DnatShadowed(Fault):
    """A DNAT rule ahead of Docker's sends the published port to another container (a leftover
    rule of an old deployment): the port answers, from the wrong container."""

    name, expect = "dnat_shadowed", "nat_shadowed"

    def inject(self) -> None:
        self.decoy = sh("docker", "run", "-d", "--label", LABEL, "--name", f"nstap-cause-decoy-{self.serial}-{os.getpid()}", self.image, "httpd", "-f", "-p", "80", "-h", "/")
        decoy_ip = container_ips([self.decoy])[0]
        self.rule = ["PREROUTING", "-p", "tcp", "--dport", str(self.port), "-m", "comment", "--comment", "nstap-bench", "-j", "DNAT", "--to-destination", f"{decoy_ip}:80"]
        sh("iptables", "-t", "nat", "-I", *self.rule)

    def undo(self) -> None:
        subprocess.run(["iptables", "-t", "nat", "-D", *self.rule], capture_output=True)
        subprocess.run(["docker", "rm", "-f", self.decoy], capture_output=True)


class VethDown(Fault):
    name, expect = "veth_down", "link_down"

    def inject(self) -> None:
        self.host_if = host_end(self.cid)
        sh("ip", "link", "set", self.host_if, "down")

    def undo(self) -> None:
        sh("ip", "link", "set", self.host_if, "up")


class Mtu(Fault):
    name, expect = "mtu", "mtu"

    def inject(self) -> None:
        in_ns(self.cid, "ip", "link", "set", "eth0", "mtu", "1000")
        self.ping = subprocess.Popen(["ping", "-q", "-s", "1400", "-i", "0.05", "-c", "100", self.ip], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def undo(self) -> None:
        self.ping.kill()
        self.ping.wait()


class ConntrackFull(Fault):
    name, expect = "conntrack_full", "conntrack_full"

    # Loopback is left out of conntrack meanwhile: the bench's (and anyone's) own API calls on it
    # must not be refused by the full table. Kept short: the table is the whole host's.
    NOTRACK = (("raw", "OUTPUT", "-o", "lo"), ("raw", "PREROUTING", "-i", "lo"))

    def inject(self) -> None:
        for table, chain, *match in self.NOTRACK:
            sh("iptables", "-t", table, "-I", chain, *match, "-m", "comment", "--comment", "nstap-bench", "-j", "NOTRACK")
        self.max = CONNTRACK_MAX.read_text().strip()
        entries = int(Path("/proc/sys/net/netfilter/nf_conntrack_count").read_text())
        CONNTRACK_MAX.write_text(f"{entries + 20}\n")
        for _ in range(100):  # new flows the full table refuses
            with socket.socket() as c:
                c.settimeout(0.2)
                c.connect_ex((self.ip, 80))
        time.sleep(8)  # the NAT monitor's conntrack read, the container's detectors
        CONNTRACK_MAX.write_text(self.max + "\n")

    def undo(self) -> None:
        CONNTRACK_MAX.write_text(self.max + "\n")
        for table, chain, *match in self.NOTRACK:
            subprocess.run(["iptables", "-t", table, "-D", chain, *match, "-m", "comment", "--comment", "nstap-bench", "-j", "NOTRACK"], capture_output=True)


class ClosedPort(Fault):
    name, expect = "closed_port", "no_listener"

    def inject(self) -> None:
        for _ in range(200):
            with socket.socket() as c:
                c.settimeout(1)
                c.connect_ex((self.ip, 81))


class UdpNotRead(Fault):
    name, expect = "udp_not_read", "socket_not_reading"

    def inject(self) -> None:
        self.sink = subprocess.Popen(
            ["nsenter", "-t", str(pid_of(self.cid)), "-n", sys.executable, "-c",
             "import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
             "s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)\ns.bind(('0.0.0.0', 5000))\nprint('ready', flush=True)\ntime.sleep(60)\n"],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.sink.stdout is not None and self.sink.stdout.readline().strip() == "ready"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for _ in range(200):
                tx.sendto(b"x" * 512, (self.ip, 5000))

    def undo(self) -> None:
        self.sink.kill()
        self.sink.wait()


CLASSES = [Drop, Reject, Paused, DnatDeleted, DnatShadowed, VethDown, Mtu, ConntrackFull, ClosedPort, UdpNotRead]


def anomalies_after(api: Api, container: str, since: float) -> list[dict]:
    return [a for a in api.get(f"/api/v1/anomalies?container={container}&limit=200")["anomalies"] if a["first_seen"] >= since - 0.5]


def settled(api: Api, container: str, since: float, timeout: float = 40) -> list[dict]:
    """The anomalies that started after ``since`` once each has ended or lasted SETTLE seconds
    (waits up to ``timeout`` for the first one)."""
    deadline = time.time() + timeout
    found: list[dict] = []
    while time.time() < deadline:
        found = anomalies_after(api, container, since)
        if found and all(a["resolved_at"] is not None or time.time() - a["first_seen"] >= SETTLE for a in found):
            time.sleep(1)  # one more look: a cause named in the last second
            return anomalies_after(api, container, since)
        time.sleep(0.5)
    return found


def run(args: argparse.Namespace) -> dict:
    image = ensure_image("docker")
    workdir = Path(tempfile.mkdtemp(prefix="nstap-cause-"))
    port = 18880 + os.getpid() % 1000
    (workdir / "nstap.yaml").write_text(
        f"interval: 1\nmetrics_listen: 127.0.0.1:{port}\napi_listen: 127.0.0.1:{port + 1}\ndata_dir: {workdir}/data\nlog_format: json\n"
        "capture: {max_concurrent: 8, max_per_container_per_hour: 60}\n"
    )
    log = open(workdir / "nstap.log", "wb")
    daemon = subprocess.Popen([str(ROOT / ".venv/bin/nstap"), "run", "--config", str(workdir / "nstap.yaml")], stdout=log, stderr=subprocess.STDOUT)
    results: dict[str, dict] = {}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                scrape(port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("nstap did not answer within 30 s")
                time.sleep(0.3)
        api = Api(port + 1, (workdir / "data/api-token").read_text().strip())
        ebpf = False
        deadline = time.monotonic() + 60  # the eBPF collector compiles and loads (seconds on a busy host)
        while not ebpf and time.monotonic() < deadline:
            ebpf = any(line.startswith('nstap_collector_up{collector="ebpf_drops"} 1') for line in scrape(port)[1].splitlines())
            time.sleep(1)
        serial = 0
        for cls in [c for c in CLASSES if c.name in args.classes.split(",")]:
            score: Counter[str] = Counter()
            misses: Counter[str] = Counter()
            for _ in range(args.rounds):
                serial += 1
                fault = cls(image, serial)
                try:
                    fault.start()
                    time.sleep(4)  # steady traffic, the detectors' baselines
                    injected = time.time()
                    fault.inject()
                    containers = [fault.cid[:12]] + (["host"] if cls is ConntrackFull else [])
                    found = [a for c in containers for a in settled(api, c, injected)]
                finally:
                    fault.undo()
                    fault.cleanup()
                if not found:
                    score["no anomaly"] += 1
                for a in found:
                    kind = a["cause"]["kind"]
                    verdict = "right" if kind == cls.expect else "unknown" if kind == "unknown" else "wrong"
                    score[verdict] += 1
                    if verdict != "right":
                        misses[f"{a['kind']}: {kind}: {a['cause']['text'][:120]}"] += 1
                time.sleep(2)
            results[cls.name] = {"expect": cls.expect, **score, "misses": dict(misses)}
            print(json.dumps({cls.name: results[cls.name]}), flush=True)
        results["_ebpf_up"] = {"value": ebpf}
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        subprocess.run(["rm", "-rf", str(workdir)])
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--classes", default=",".join(c.name for c in CLASSES))
    args = parser.parse_args()
    started = time.time()
    results = run(args)
    ebpf = results.pop("_ebpf_up")["value"]
    totals = Counter()
    for r in results.values():
        totals.update({k: r.get(k, 0) for k in ("right", "wrong", "unknown")})
    scored = sum(totals.values())
    print(json.dumps({"rounds": args.rounds, "seconds": round(time.time() - started), "ebpf": bool(ebpf), "classes": results,
                      "right": totals["right"], "wrong": totals["wrong"], "unknown": totals["unknown"]}))
    print()
    print(f"{args.rounds} injections per class, interval 1 s, eBPF collector {'on' if ebpf else 'off'}, {time.time() - started:.0f} s")
    print()
    print("| fault | expected cause | anomalies | right | wrong | unknown |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        n = sum(r.get(k, 0) for k in ("right", "wrong", "unknown"))
        print(f"| {name} | `{r['expect']}` | {n} | {r.get('right', 0)} | {r.get('wrong', 0)} | {r.get('unknown', 0)} |"
              + (f" ({r['no anomaly']} injections raised none)" if r.get("no anomaly") else ""))
    print(f"| **all** | | {scored} | {totals['right']} ({totals['right'] / max(scored, 1):.0%}) | {totals['wrong']} | {totals['unknown']} |")
    for name, r in results.items():
        for what, n in r["misses"].items():
            print(f"  {name}: {n} x {what}")
    return 0 if totals["wrong"] == 0 and totals["right"] >= 0.9 * scored else 1


if __name__ == "__main__":
    raise SystemExit(main())
