#!/usr/bin/env python3
"""Benchmark: how soon after a fault begins nstap detects it, how well it dates it, and whether the
pcap holds the seconds before it — with every detector at its defaults, next to healthy containers.

Starts N busybox httpd containers (20 by default) with steady HTTP traffic from the host (a new
connection every 0.1 s each, half of them with a flight recorder), runs ``nstap run`` (interval
1 s, ``capture.pre_seconds`` 5), then injects each fault kind R times (3 by default), each time in
a fresh flight-recorder container under steady traffic of its own:

* ``tcp_retransmits``: 20 % of the container's packets of a bulk download dropped at random on
  their way to the host (a host INPUT rule, removed after);
* ``tcp_listen_overflows``: the listener paused (``docker pause``), 20 connections to it;
* ``interface_drops``: the container's eth0 MTU lowered, large pings from the host (dropped on the
  host end of the veth);
* ``interface_down``: the host end of the veth set down;
* ``tcp_reset_spike``: 200 connections to a closed port;
* ``udp_receive_buffer_errors``: a UDP socket that never reads, flooded;
* ``tcp_syn_sent_stuck``: a client container whose SYN-ACKs are dropped (the fault bites at its
  next connection attempt: latency is measured from the onset);

and the faults that collapse traffic (clients give up, so no ratio rises and no per-sample
threshold is crossed; goal: detected within two samples):

* ``tcp_syn_recv_stuck``: the clients' ACKs dropped in the container's own firewall (four clients);
* ``tcp_accept_stalled``: the listener paused while two clients a second give up after a second;
* ``tcp_collapse``: nine in ten of the clients' packets dropped in the container's firewall;
* ``kernel_drops``: 3 UDP datagrams a second to a closed port (a new reason, moving steadily).

For each kind it prints the latency from the injection to the detection (``first_seen``), the
onset's error (``started_at`` − injection), the seconds of packets the pcap holds from before the
injection, and, over the whole run, the anomalies of the healthy containers (false positives).

    .venv/bin/python bench/bench_detect.py [--containers N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))
from bench_containers import LABEL, container_ips, ensure_image, sh, start_container  # noqa: E402
from bench_sampling import ROOT, metric, scrape  # noqa: E402

from nstap.capture.pcap import read_records  # noqa: E402

PRE = 5.0
RING = ("--label", "nstap.capture=ring")
BULK_WEB = ("sh", "-c", "dd if=/dev/urandom of=/www/bulk bs=1024 count=256 2>/dev/null; exec httpd -f -p 80 -h /www")


class Requests(threading.Thread):
    """A new HTTP connection to each address every ``period`` s (``path``), until stopped."""

    def __init__(self, ips: list[str], period: float = 0.1, path: str = "/") -> None:
        super().__init__(daemon=True)
        self.ips, self.period, self.path = ips, period, path
        self.stop = threading.Event()
        self.answered = 0

    def run(self) -> None:
        while not self.stop.is_set():
            for ip in self.ips:
                try:
                    with socket.create_connection((ip, 80), timeout=1) as c:
                        c.sendall(f"GET {self.path} HTTP/1.0\r\n\r\n".encode())
                        while c.recv(65536):
                            pass
                    self.answered += 1
                except OSError:
                    pass
            self.stop.wait(self.period)

    def close(self) -> None:
        self.stop.set()
        self.join(10)


class Api:
    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token

    def get(self, path: str) -> dict:
        return json.loads(self.raw(path))

    def raw(self, path: str) -> bytes:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.read()


def pid_of(cid: str) -> int:
    return int(sh("docker", "inspect", "-f", "{{.State.Pid}}", cid))


def in_ns(cid: str, *cmd: str) -> None:
    subprocess.run(["nsenter", "-t", str(pid_of(cid)), "-n", *cmd], check=True, capture_output=True)


def host_end(cid: str) -> str:
    """The host end of the container's eth0 (its veth peer), checked to be a veth."""
    link = json.loads(sh("nsenter", "-t", str(pid_of(cid)), "-n", "ip", "-j", "link", "show", "eth0"))[0]
    for dev in json.loads(sh("ip", "-d", "-j", "link", "show")):
        if dev["ifindex"] == link["link_index"] and dev.get("linkinfo", {}).get("info_kind") == "veth":
            return dev["ifname"]
    raise SystemExit(f"no host-side veth for {cid[:12]}")


# -- faults: each starts what it needs, injects at the returned time, and undoes itself ----------


class Fault:
    kind = ""
    takes_effect_later = False
    settle = PRE + 3  # seconds of steady traffic before the fault (the flight recorder keeps them)

    def __init__(self, image: str, api: Api) -> None:
        self.image, self.api = image, api
        self.cids: list[str] = []
        self.threads: list[Requests] = []

    def start(self) -> str:
        """The victim, serving steady traffic; returns its id."""
        cid = start_container(self.image, f"nstap-bench-{self.kind}-{len(self.cids)}-{os.getpid()}", *RING)
        self.cids.append(cid)
        self.threads.append(Requests(container_ips([cid])))
        self.threads[-1].start()
        return cid

    def inject(self, cid: str) -> float:
        raise NotImplementedError

    def undo(self, cid: str) -> None:
        pass

    def cleanup(self) -> None:
        for t in self.threads:
            t.close()
        if self.cids:
            subprocess.run(["docker", "rm", "-f", *self.cids], capture_output=True)


class LossyAcks(Fault):
    kind = "tcp_retransmits"

    def start(self) -> str:
        cid = sh("docker", "run", "-d", "--label", LABEL, *RING, "--name", f"nstap-bench-{self.kind}-{len(self.cids)}-{os.getpid()}", self.image, *BULK_WEB)
        self.cids.append(cid)
        ip = container_ips([cid])[0]
        for _ in range(50):  # /big is written at start
            try:
                urllib.request.urlopen(f"http://{ip}/bulk", timeout=2).read(1)
                break
            except OSError:
                time.sleep(0.1)
        self.threads.append(Requests([ip], period=0.1, path="/bulk"))  # 2.5 MB/s: the ring reaches back ~15 s
        self.threads[-1].start()
        return cid

    def inject(self, cid: str) -> float:
        ip = container_ips([cid])[0]
        self.rule = ("INPUT", "-s", ip, "-p", "tcp", "--sport", "80", "-m", "statistic", "--mode", "random", "--probability", "0.2",
                     "-m", "comment", "--comment", "nstap-bench", "-j", "DROP")
        at = time.time()
        sh("iptables", "-I", *self.rule)
        return at

    def undo(self, cid: str) -> None:
        subprocess.run(["iptables", "-D", *self.rule], capture_output=True)


class StuckListener(Fault):
    kind = "tcp_listen_overflows"

    def inject(self, cid: str) -> float:
        sh("docker", "pause", cid)
        ip = container_ips([cid])[0]
        at = time.time()
        self.socks = []
        for _ in range(20):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex((ip, 80))
            self.socks.append(c)
        return at

    def undo(self, cid: str) -> None:
        for c in self.socks:
            c.close()
        sh("docker", "unpause", cid)


class MtuMismatch(Fault):
    kind = "interface_drops"

    def inject(self, cid: str) -> float:
        ip = container_ips([cid])[0]
        at = time.time()
        in_ns(cid, "ip", "link", "set", "eth0", "mtu", "1000")
        self.ping = subprocess.Popen(["ping", "-q", "-s", "1400", "-i", "0.05", "-c", "60", ip], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return at

    def undo(self, cid: str) -> None:
        self.ping.kill()
        self.ping.wait()


class LinkDown(Fault):
    kind = "interface_down"

    def inject(self, cid: str) -> float:
        self.host_if = host_end(cid)
        at = time.time()
        sh("ip", "link", "set", self.host_if, "down")
        return at

    def undo(self, cid: str) -> None:
        sh("ip", "link", "set", self.host_if, "up")


class ResetStorm(Fault):
    kind = "tcp_reset_spike"

    def inject(self, cid: str) -> float:
        ip = container_ips([cid])[0]
        at = time.time()
        for _ in range(200):
            with socket.socket() as c:
                c.settimeout(1)
                c.connect_ex((ip, 81))
        return at


class StuckUdpReader(Fault):
    kind = "udp_receive_buffer_errors"

    def inject(self, cid: str) -> float:
        self.sink = subprocess.Popen(
            ["nsenter", "-t", str(pid_of(cid)), "-n", sys.executable, "-c",
             "import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
             "s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)\ns.bind(('0.0.0.0', 5000))\nprint('ready', flush=True)\ntime.sleep(60)\n"],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.sink.stdout is not None and self.sink.stdout.readline().strip() == "ready"
        ip = container_ips([cid])[0]
        at = time.time()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for _ in range(200):
                tx.sendto(b"x" * 512, (ip, 5000))
        return at

    def undo(self, cid: str) -> None:
        self.sink.kill()
        self.sink.wait()


class UnansweredSyns(Fault):
    kind = "tcp_syn_sent_stuck"
    takes_effect_later = True

    def start(self) -> str:
        server = super().start()
        ip = container_ips([server])[0]
        client = sh(
            "docker", "run", "-d", "--label", LABEL, *RING, "--name", f"nstap-bench-synclient-{len(self.cids)}-{os.getpid()}", self.image,
            "sh", "-c", f"while true; do nc -w 20 {ip} 80 </dev/null >/dev/null 2>&1; sleep 0.2; done",  # busybox-static's wget crashes
        )
        self.cids.append(client)
        return client

    def inject(self, cid: str) -> float:
        at = time.time()
        in_ns(cid, "iptables", "-I", "INPUT", "-p", "tcp", "--tcp-flags", "SYN,ACK", "SYN,ACK", "-j", "DROP")
        return at


class HalfOpenHandshakes(Fault):
    """The clients' ACKs dropped in the container's own firewall (their FINs too, which carry an
    ACK that would complete the handshake): no handshake completes, the listener retransmits its
    SYN-ACKs, the clients give up after a second. Four clients (one sequential client gives up
    once a second and makes one half-open connection a second)."""

    kind = "tcp_syn_recv_stuck"

    def start(self) -> str:
        cid = super().start()
        for _ in range(3):
            self.threads.append(Requests(container_ips([cid])))
            self.threads[-1].start()
        return cid

    def inject(self, cid: str) -> float:
        at = time.time()
        in_ns(cid, "iptables", "-I", "INPUT", "-p", "tcp", "--dport", "80", "--tcp-flags", "SYN,ACK,RST", "ACK", "-j", "DROP")
        return at


class GivingUpClients(Fault):
    """The listener paused while two clients a second connect and give up after a second: one
    listen overflow a second at most, below any per-sample threshold."""

    kind = "tcp_accept_stalled"

    def start(self) -> str:
        cid = start_container(self.image, f"nstap-bench-{self.kind}-{len(self.cids)}-{os.getpid()}", *RING)
        self.cids.append(cid)
        self.threads.append(Requests(container_ips([cid]), period=0.5))
        self.threads[-1].start()
        return cid

    def inject(self, cid: str) -> float:
        # The fault is the frozen listener: runc freezes the cgroup, then ``docker pause`` returns.
        # Before that, 0.1-1 s of the CLI, dockerd and containerd (more on a busy host) in which
        # the listener still accepts: timed from the start, that was counted as detection latency.
        sh("docker", "pause", cid)
        return time.time()

    def undo(self, cid: str) -> None:
        sh("docker", "unpause", cid)


class CollapsedTraffic(Fault):
    """Nine in ten of the clients' packets dropped in the container's own firewall: completed
    connections fall to almost nothing while the listener still retransmits."""

    kind = "tcp_collapse"

    def inject(self, cid: str) -> float:
        at = time.time()
        in_ns(cid, "iptables", "-I", "INPUT", "-p", "tcp", "--dport", "80", "-m", "statistic", "--mode", "random", "--probability", "0.9", "-j", "DROP")
        return at


class NewDropReason(Fault):
    """Three UDP datagrams a second to a port nothing listens on: a kernel drop reason
    (NO_SOCKET) the namespace never had, moving steadily, never 10 in one sample (eBPF on)."""

    kind = "kernel_drops"
    settle = 35  # kernel_drops.baseline (30 s) of watching before a reason that starts is news

    def inject(self, cid: str) -> float:
        ip = container_ips([cid])[0]
        self.stop = threading.Event()

        def send() -> None:
            start = time.monotonic()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for i in range(300):  # at most 100 s, paced on the clock: 3/s, not 3/s less the loop's own time
                    s.sendto(b"x", (ip, 9))
                    if self.stop.wait(max(0.0, start + (i + 1) / 3 - time.monotonic())):
                        return

        self.sender = threading.Thread(target=send, daemon=True)
        at = time.time()
        self.sender.start()
        return at

    def undo(self, cid: str) -> None:
        self.stop.set()
        self.sender.join(5)


FAULTS = [LossyAcks, StuckListener, MtuMismatch, LinkDown, ResetStorm, StuckUdpReader, UnansweredSyns,
          HalfOpenHandshakes, GivingUpClients, CollapsedTraffic, NewDropReason]


def wait_event(api: Api, cid: str, kind: str, timeout: float) -> dict | None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = api.get(f"/api/v1/anomalies?container={cid[:12]}&kind={kind}")["anomalies"]
        if found and found[-1]["capture_id"]:
            return found[-1]
        time.sleep(0.1)
    return None


def pcap_reach(api: Api, capture_id: str, injected: float) -> float | None:
    """Seconds of packets the finished capture holds from before ``injected``."""
    deadline = time.time() + 60
    while time.time() < deadline:
        capture = api.get(f"/api/v1/captures/{capture_id}")
        if capture["state"] != "running":
            break
        time.sleep(0.2)
    else:
        return None
    try:
        _, records = read_records(api.raw(f"/api/v1/captures/{capture_id}/pcap"))
    except OSError:
        return None
    return round(injected - records[0].ts, 2) if records else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--containers", type=int, default=20, help="healthy containers")
    parser.add_argument("--rounds", type=int, default=3, help="injections of each fault kind")
    parser.add_argument("--kinds", default=",".join(f.kind for f in FAULTS), help="the fault kinds to inject (comma-separated)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the injections' phases against the samples")
    args = parser.parse_args()
    image = ensure_image("docker")
    workdir = Path(tempfile.mkdtemp(prefix="nstap-bench-"))
    healthy: list[str] = []
    daemon = None
    traffic = None
    started = time.time()
    try:
        for i in range(args.containers):
            healthy.append(start_container(image, f"nstap-bench-healthy-{i}-{os.getpid()}", *(RING if i % 2 else ())))
        port = 19880 + os.getpid() % 1000
        (workdir / "nstap.yaml").write_text(
            f"interval: 1\nmetrics_listen: 127.0.0.1:{port}\napi_listen: 127.0.0.1:{port + 1}\n"
            f"data_dir: {workdir}/data\nlog_format: json\nlog_level: info\n"
            f"capture: {{pre_seconds: {PRE}, post_seconds: 3, max_concurrent: 8, max_per_container_per_hour: 60}}\n"
        )
        log = open(workdir / "nstap.log", "wb")
        daemon = subprocess.Popen([str(ROOT / ".venv/bin/nstap"), "run", "--config", str(workdir / "nstap.yaml")], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                if metric(scrape(port)[1], "nstap_namespaces_watched") >= args.containers:
                    break
            except (OSError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the healthy containers were not all watched within 60 s")
            time.sleep(0.5)
        api = Api(port + 1, (workdir / "data/api-token").read_text().strip())
        traffic = Requests(container_ips(healthy))
        traffic.start()
        time.sleep(3)
        rows = []
        phase = random.Random(args.seed)
        for cls in [f for f in FAULTS if f.kind in args.kinds.split(",")]:
            latency, onset_error, reach, missed, numbers = [], [], [], 0, []
            for _ in range(args.rounds):
                fault = cls(image, api)
                try:
                    cid = fault.start()
                    # A random phase against the 1 s samples: rounds of whole seconds would inject
                    # at the same point of the interval every time and never find the worst one.
                    time.sleep(fault.settle + phase.random())
                    injected = fault.inject(cid)
                    event = wait_event(api, cid, fault.kind, 30)
                    fault.undo(cid)
                    if event is None:
                        missed += 1
                        continue
                    base = event["started_at"] if fault.takes_effect_later else injected
                    latency.append(event["first_seen"] - base)
                    numbers.append(event.get("numbers", {}))
                    if not fault.takes_effect_later:  # otherwise the onset is the only time the fault has
                        onset_error.append(event["started_at"] - injected)
                    r = pcap_reach(api, event["capture_id"], base)
                    if r is not None:
                        reach.append(r)
                finally:
                    fault.cleanup()
            rows.append((cls.kind, cls.takes_effect_later, latency, onset_error, reach, missed, numbers))
        seconds = time.time() - started
        false_positives = []
        for cid in healthy:
            false_positives += api.get(f"/api/v1/anomalies?container={cid[:12]}")["anomalies"]
    finally:
        if traffic is not None:
            traffic.close()
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
        if healthy:
            subprocess.run(["docker", "rm", "-f", *healthy], capture_output=True)
        subprocess.run(["rm", "-rf", str(workdir)])

    def fmt(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} / {max(values):.1f} s" if values else "-"

    print(json.dumps({"healthy_containers": args.containers, "rounds": args.rounds, "seconds": round(seconds), "false_positives": len(false_positives),
                      "kinds": {k: {"latency": [round(x, 2) for x in lat], "onset_error": [round(x, 2) for x in err], "pre_fault_seconds": pre, "missed": m,
                                              "numbers": nums}
                                for k, _, lat, err, pre, m, nums in rows}}))
    print()
    print(f"{args.containers} healthy containers, {args.rounds} injections per kind, interval 1 s, pre_seconds {PRE:g}, {seconds:.0f} s in all; "
          f"anomalies in the healthy containers: {len(false_positives)}")
    print()
    print("| fault (kind) | detected | fault → detection (median / max) | onset − fault (min / max) | pcap before the fault (min) |")
    print("|---|---|---|---|---|")
    for kind, later, lat, err, pre, missed, _ in rows:
        detected = f"{len(lat)}/{len(lat) + missed}"
        errors = f"{min(err):+.2f} / {max(err):+.2f} s" if err else "-"
        note = " (from its onset)" if later else ""
        print(f"| `{kind}` | {detected} | {fmt(lat)}{note} | {errors} | {min(pre):.1f} s |" if pre else f"| `{kind}` | {detected} | {fmt(lat)}{note} | {errors} | - |")
    return 0 if not false_positives and all(not r[5] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
