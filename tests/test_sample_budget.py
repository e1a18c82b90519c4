"""Every container, every interval, while the daemon itself is busy.

The per-namespace sample budget exists so that one hostile container cannot take the event loop
from the others (``test_chaos.py``); it must never slow down an ordinary container because the
daemon is busy elsewhere. Here the daemon starts next to 20 running containers and compiles its
eBPF program, one container rewrites its own 20,000-rule firewall every second (the NAT monitor
reads and parses it each time), and a flight recorder is read back for a capture with 20 s of
pre-trigger packets, while the test scrapes /metrics four times a second and follows every
container's sample timestamps: none may miss a sample, and none may be logged as slowed.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections import defaultdict

import pytest

from conftest import Containers, wait_until
from test_anomalies import HTTPD, RING, Traffic, container_ip, finished_capture, in_netns

pytestmark = pytest.mark.docker

ORDINARY = 20
INTERVAL = 1.0
WATCH = 30.0  # seconds followed after the daemon answers
FIREWALL_RULES = 20000


class Scraper(threading.Thread):
    """Scrapes the daemon every 0.25 s and keeps each container's distinct sample timestamps."""

    def __init__(self, daemon) -> None:
        super().__init__(daemon=True)
        self.d = daemon
        self.stop = threading.Event()
        self.samples: dict[str, list[float]] = defaultdict(list)  # container_id -> sample times
        self.scrapes = 0
        self.last = None

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                metrics = self.d.scrape()
            except OSError:
                continue
            self.scrapes += 1
            self.last = metrics
            for s in metrics.find("nstap_sample_timestamp_seconds"):
                seen = self.samples[s.labels["container_id"]]
                if not seen or seen[-1] != s.value:
                    seen.append(s.value)
            self.stop.wait(0.25)


def firewall_churn(pid: int, stop: threading.Event, rounds: list[int]) -> None:
    """Add and delete one rule of a large firewall every second (bounded: 60 rounds)."""
    for i in range(60):
        if stop.wait(1.0):
            return
        verb = "-A" if i % 2 == 0 else "-D"
        in_netns(pid, "iptables", "-t", "filter", verb, "INPUT", "-p", "tcp", "--dport", "9999", "-j", "DROP", check=False)
        rounds.append(i)


def test_no_ordinary_container_misses_a_sample_while_the_daemon_is_busy(nstap, containers: Containers, docker_image: str) -> None:
    ids = [containers.docker(docker_image, *HTTPD, name=f"ordinary{i}") for i in range(ORDINARY)]
    # A container with a large firewall of its own, changing every second.
    noisy = containers.docker("--cap-add", "NET_ADMIN", docker_image, *HTTPD, name="noisy-firewall")
    noisy_pid = containers.pid("docker", noisy)
    rules = "*filter\n" + "".join(f"-A INPUT -s 10.{i >> 8 & 255}.{i & 255}.0/24 -p tcp --dport {1000 + i % 5000} -j DROP\n" for i in range(FIREWALL_RULES)) + "COMMIT\n"
    subprocess.run(["nsenter", "-t", str(noisy_pid), "-n", "iptables-restore"], input=rules, text=True, check=True, timeout=120)
    recorded = containers.docker(*RING, docker_image, *HTTPD, name="recorded")
    traffic = Traffic(container_ip(recorded), period=0.02, limit=120)
    traffic.start()

    d = nstap({"interval": INTERVAL, "ebpf": "auto"})  # compiling the eBPF program: about a second of LLVM
    scraper = Scraper(d)
    scraper.start()
    stop = threading.Event()
    churned: list[int] = []
    churn = threading.Thread(target=firewall_churn, args=(noisy_pid, stop, churned), daemon=True)
    churn.start()
    try:
        # A container started just after the daemon: its traffic shows within two samples.
        late = containers.docker(docker_image, *HTTPD, name="late")
        late_ip = container_ip(late)
        m0 = d.wait_metric(lambda m: m.find("nstap_interface_receive_packets_total", container_id=late[:12], interface="eth0") and m, 10)
        before = m0.value("nstap_interface_receive_packets_total", container_id=late[:12], interface="eth0", side="container")
        asked = time.monotonic()
        for _ in range(40):
            with socket.create_connection((late_ip, 80), timeout=2) as c:
                c.sendall(b"GET / HTTP/1.0\r\n\r\n")
                c.recv(4096)
        d.wait_metric(
            lambda m: (m.value("nstap_interface_receive_packets_total", container_id=late[:12], interface="eth0", side="container") or 0) >= before + 40,
            2 * INTERVAL + 0.5,
            "the late container's 40 requests in its counters within two samples",
        )
        shown = time.monotonic() - asked

        # A capture read back from the flight recorder: 20 s before the request.
        time.sleep(8)
        status, body = d.api("/api/v1/captures", method="POST", body=json.dumps({"container": recorded[:12], "duration": 2, "pre_seconds": 20}).encode())
        assert status in (200, 201, 202), body
        finished_capture(d, body["id"])
        wait_until(lambda: len(churned) >= 10, 40)
        time.sleep(max(0.0, WATCH - (time.monotonic() - asked)))
    finally:
        stop.set()
        scraper.stop.set()
        scraper.join(5)
        churn.join(5)
        traffic.close()

    gaps = {}
    where = {}
    for cid in ids:
        times = scraper.samples[cid[:12]]
        assert len(times) >= WATCH - 5, (cid[:12], len(times))
        gaps[cid[:12]], where[cid[:12]] = max((b - a, a) for a, b in zip(times, times[1:]))
    # Sampled on every tick: a missed sample is a gap of two intervals (less the few milliseconds a
    # round of 22 lasts); a late round, not a missed one, is shorter (one of 0.56 s was seen once in
    # CI, every container at once: the tick lag below says how late the rounds were).
    worst = sorted(gaps, key=lambda c: -gaps[c])[:5]
    lags = {s.labels["le"]: s.value for s in scraper.last.find("nstap_tick_lag_seconds_bucket")}
    assert max(gaps.values()) <= 1.8 * INTERVAL, ([(c, round(gaps[c], 2), time.strftime("%H:%M:%S", time.gmtime(where[c]))) for c in worst], lags)
    ordinary_names = {f"ordinary{i}" for i in range(ORDINARY)}
    slowed = [e for e in d.events("sampling_slowed") if e.get("container", "").rsplit("-", 1)[0] in ordinary_names | {"late", "recorded"}]
    assert not slowed, slowed
    # The daemon did the work the test asked of it meanwhile.
    assert d.events("ebpf_loaded") or d.events("ebpf_unavailable")
    assert len(scraper.last.find("nstap_firewall_rule_packets_total", container_id=noisy[:12])) == 32  # its 20,000 rules were read
    print(f"sample_budget_figures late_container_shown_s={shown:.2f} max_gap_s={max(gaps.values()):.2f} scrapes={scraper.scrapes}")
