"""Anomalies induced for real in dockerd containers, detected by the daemon, and their captures.

Each test breaks something in a container's namespace the way it breaks in production (a DROP
rule, a listener that stops accepting, the host end of the veth going down, a flood of
connections to a closed port), then checks the anomaly event, its capture, and that the pcap
opens with tcpdump and holds the packets of the induced traffic — from before the trigger too
when the container has a flight recorder.

Each test notes when it injected the fault and checks the event's onset against it
(``started_at`` within 1.5 s of the injection), that the fault was detected within two samples
(plus what the kernel itself needs: TCP's minimum retransmission timeout, the SYN_SENT detector's
``seconds``), and, for a flight-recorder container under steady traffic, that the pcap starts at
least ``pre_seconds`` before the fault.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import Containers, Daemon, sh, tool, wait_until
from nstap.capture.pcap import read_file

pytestmark = pytest.mark.docker

HTTPD = ("httpd", "-f", "-p", "80", "-h", "/www")
TICKER = ("nc", "-ll", "-p", "9000", "-e", "sh", "-c", "while true; do echo tick; sleep 0.1; done")
RING = ("--label", "nstap.capture=ring")
INTERVAL = 0.5  # the test daemon's sampling interval (conftest)
PRE = 2.0  # capture.pre_seconds of the daemons here: the pcap must reach this far before the fault
ONSET_CONFIG = {"capture": {"pre_seconds": PRE}}
JITTER = 0.4  # a sample may come this much after its slot on a loaded 2-core machine


def check_onset(event: dict, injected: float, kernel_delay: float = 0.0, takes_effect_later: bool = False) -> None:
    """The event's onset is the injected fault (within 1.5 s), detected within two samples of it
    (after ``kernel_delay``, the time the kernel itself takes to show it). A fault that takes effect
    at some later moment (the next connection attempt) is checked from its onset instead."""
    started, detected = event["started_at"], event["first_seen"]
    assert started is not None and started <= detected, event
    assert event["detected_after"] == pytest.approx(detected - started, abs=0.002)
    if takes_effect_later:
        assert started >= injected - 1.5, (started - injected, event)
        injected = started
    assert abs(started - injected) <= 1.5, (started - injected, event)
    assert detected - injected <= kernel_delay + 2 * INTERVAL + JITTER, (detected - injected, event)


def check_pre_fault(path: Path, capture: dict, event: dict, injected: float) -> None:
    """A flight-recorder capture reaches back from the onset: its first packet is at least
    ``pre_seconds`` before the injected fault, and it says it was not cut short."""
    _, records = read_file(path)
    assert records and records[0].ts <= injected - PRE, (injected - records[0].ts if records else None, capture)
    assert capture["onset_at"] == event["started_at"] and capture["window_start"] <= event["started_at"] - PRE
    assert capture["pre_truncated"] is False


class Traffic(threading.Thread):
    """Steady HTTP requests to a container (one every ``period`` s), until closed or ``limit`` s passed."""

    def __init__(self, ip: str, port: int = 80, period: float = 0.05, limit: float = 120) -> None:
        super().__init__(daemon=True)
        self.ip, self.port, self.period, self.limit = ip, port, period, limit
        self.stop = threading.Event()
        self.answered = 0

    def run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                with socket.create_connection((self.ip, self.port), timeout=1) as c:
                    c.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    if c.recv(4096):
                        self.answered += 1
            except OSError:
                pass
            self.stop.wait(self.period)

    def close(self) -> None:
        self.stop.set()
        self.join(5)


def container_ip(cid: str) -> str:
    data = Containers.inspect("docker", cid)
    return next(n["IPAddress"] for n in data["NetworkSettings"]["Networks"].values() if n["IPAddress"])


def connecting(ip: str, port: int, n: int) -> list[socket.socket]:
    """``n`` non-blocking connections begun to ``ip``:``port`` (their handshakes left to the kernel)."""
    clients = []
    for _ in range(n):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex((ip, port))
        clients.append(c)
    return clients


def anomaly(d: Daemon, cid: str, kind: str, timeout: float = 20) -> dict:
    """The container's first event of ``kind``, once its capture has been started (its id is set)."""
    def find():
        status, body = d.api(f"/api/v1/anomalies?container={cid[:12]}&kind={kind}")
        assert status == 200, body
        return body["anomalies"][0] if body["anomalies"] and body["anomalies"][0]["capture_id"] else None

    return wait_until(find, timeout, 0.2, f"{kind} anomaly in {cid[:12]}")


def finished_capture(d: Daemon, capture_id: str, timeout: float = 40) -> dict:
    def done():
        status, body = d.api(f"/api/v1/captures/{capture_id}")
        assert status == 200, body
        return body if body["state"] != "running" else None

    return wait_until(done, timeout, 0.3, f"capture {capture_id} finished")


def download(d: Daemon, capture_id: str, dest: Path) -> Path:
    import urllib.request

    token = (d.data_dir / "api-token").read_text().strip()
    request = urllib.request.Request(f"http://127.0.0.1:{d.api_port}/api/v1/captures/{capture_id}/pcap", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        assert r.headers["Content-Type"] == "application/vnd.tcpdump.pcap"
        assert r.headers["Content-Disposition"].startswith('attachment; filename="nstap-')
        dest.write_bytes(r.read())
    return dest


def tcpdump_lines(path: Path, *expr: str) -> list[str]:
    proc = subprocess.run([tool("tcpdump"), "-nn", "-r", str(path), *expr], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def in_netns(pid: int, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("nsenter", "-t", str(pid), "-n", *cmd, check=check)


class Reader(threading.Thread):
    """A client reading from a container's ticker, as long as the test needs."""

    def __init__(self, ip: str, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection((ip, port), timeout=5)
        self.sock.settimeout(0.5)
        self.local_port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.received = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                data = self.sock.recv(4096)
                if not data:
                    return
                self.received += len(data)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.join(2)
        self.sock.close()


def test_dropped_acks_make_retransmissions_and_a_capture_from_before(nstap, containers: Containers, docker_image: str, tmp_path: Path) -> None:
    d = nstap(ONSET_CONFIG)
    cid = containers.docker(*RING, "--label", "nstap.detect.tcp_retransmits=threshold=0.02,min_segments=10", docker_image, *TICKER, name="retrans")
    pid = containers.pid("docker", cid)
    d.wait_metric(lambda m: m.value("nstap_flight_recorders_running") == 1, 10, "flight recorder running")
    reader = Reader(container_ip(cid), 9000)
    reader.start()
    # The client's ACKs never arrive: the container retransmits what it sent (an OUTPUT drop would
    # not count: the kernel does not count a retransmission that its own netfilter refused).
    rule = ("iptables", "-I", "INPUT", "-p", "tcp", "--dport", "9000", "-j", "DROP")
    try:
        time.sleep(PRE + 3)  # healthy traffic the flight recorder keeps
        assert reader.received > 0
        injected = time.time()
        in_netns(pid, *rule)
        event = anomaly(d, cid, "tcp_retransmits")
    finally:
        in_netns(pid, "iptables", "-D", *rule[2:], check=False)
        reader.close()
    assert event["container_id"] == cid[:12] and event["numbers"]["retransmitted"] > 0 and event["capture_id"]
    check_onset(event, injected, kernel_delay=0.2)  # a lost segment is resent 200 ms later at the earliest
    capture = finished_capture(d, event["capture_id"])
    assert capture["mode"] == "ring" and capture["state"] == "complete" and capture["reason"] == "anomaly"
    assert capture["kind"] == "tcp_retransmits" and capture["pre_packets"] > 0
    assert capture["window_start"] < capture["trigger_at"] - PRE  # from the onset, not the detection
    path = download(d, capture["id"], tmp_path / "retrans.pcap")
    check_pre_fault(path, capture, event, injected)
    _, records = read_file(path)
    assert len(records) == capture["packets"]
    before = [r for r in records if r.ts < capture["trigger_at"]]
    assert before, "no packet from before the trigger"
    lines = tcpdump_lines(path, "tcp port 9000")
    assert any(f".{reader.local_port}:" in line for line in lines)  # the reader's flow is in there
    m = d.scrape()
    assert m.value("nstap_anomalies_total", container_id=cid[:12], kind="tcp_retransmits") == 1
    assert m.value("nstap_flight_recorder_reach_seconds", container_id=cid[:12]) > PRE + 3  # since it started: its ring never rotated
    assert m.value("nstap_captures_total", container_id=cid[:12], reason="anomaly") >= 1


def test_listener_that_stops_accepting(nstap, containers: Containers, docker_image: str, tmp_path: Path) -> None:
    d = nstap()
    cid = containers.docker(docker_image, *HTTPD, name="stuck")
    ip = container_ip(cid)
    d.wait_metric(lambda m: m.value("nstap_tcp_listen_queue_limit", container_id=cid[:12], port="80"), 5)
    sh("docker", "pause", cid)
    clients = []
    injected = time.time()
    try:
        clients += connecting(ip, 80, 20)
        event = anomaly(d, cid, "tcp_listen_overflows")
        assert event["numbers"]["overflows"] > 0 and "80 (" in event["numbers"]["full_queues"]
        check_onset(event, injected)
        for _ in range(5):  # more SYNs the live capture sees
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex((ip, 80))
            clients.append(c)
            time.sleep(0.3)
    finally:
        for c in clients:
            c.close()
        sh("docker", "unpause", cid)
    capture = finished_capture(d, event["capture_id"])
    assert capture["mode"] == "live" and capture["state"] == "complete" and capture["packets"] > 0
    lines = tcpdump_lines(download(d, capture["id"], tmp_path / "stuck.pcap"), "tcp port 80")
    assert any("Flags [S]" in line for line in lines)


def test_host_side_veth_down(nstap, containers: Containers, docker_image: str, tmp_path: Path) -> None:
    d = nstap(ONSET_CONFIG)
    cid = containers.docker(*RING, docker_image, *HTTPD, name="linkdown")
    m = d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=cid[:12], side="host") and m, 5)
    host_if = m.find("nstap_interface_up", container_id=cid[:12], side="host")[0].labels["interface"]
    d.wait_metric(lambda m: m.value("nstap_flight_recorders_running") == 1, 10)
    ip = container_ip(cid)
    traffic = Traffic(ip)
    traffic.start()
    try:
        time.sleep(PRE + 2)  # traffic before the link goes down
        assert traffic.answered > 0
        injected = time.time()
        sh("ip", "link", "set", host_if, "down")
        event = anomaly(d, cid, "interface_down")
        assert host_if in event["numbers"]["interfaces"]
        check_onset(event, injected)
        d.wait_metric(lambda m: m.value("nstap_anomaly_active", container_id=cid[:12], kind="interface_down") == 1, 5)
    finally:
        traffic.close()
        sh("ip", "link", "set", host_if, "up")
    d.wait_metric(lambda m: m.value("nstap_anomaly_active", container_id=cid[:12], kind="interface_down") == 0, 20, "resolved")
    capture = finished_capture(d, event["capture_id"])
    path = download(d, capture["id"], tmp_path / "down.pcap")
    check_pre_fault(path, capture, event, injected)
    assert capture["pre_packets"] > 0 and any("HTTP" in line or ".80:" in line for line in tcpdump_lines(path, "tcp port 80"))
    assert d.events("anomaly_resolved", kind="interface_down", container_id=cid[:12])


def reset_burst(ip: str, count: int = 150) -> None:
    for _ in range(count):  # nothing listens on 81: every SYN gets a RST
        with socket.socket() as c:
            c.settimeout(1)
            assert c.connect_ex((ip, 81)) != 0


def test_reset_storm_from_a_closed_port(nstap, containers: Containers, docker_image: str, tmp_path: Path) -> None:
    d = nstap({"detect": {"resolve_after": 2, "cooldown": 60}, **ONSET_CONFIG})
    cid = containers.docker(*RING, docker_image, *HTTPD, name="resets")
    ip = container_ip(cid)
    d.wait_metric(lambda m: m.value("nstap_flight_recorders_running") == 1, 10)
    traffic = Traffic(ip)
    traffic.start()
    try:
        time.sleep(PRE + 2)
        injected = time.time()
        reset_burst(ip)
        event = anomaly(d, cid, "tcp_reset_spike")
    finally:
        traffic.close()
    assert event["numbers"]["rate"] >= 10
    check_onset(event, injected)
    capture = finished_capture(d, event["capture_id"])
    path = download(d, capture["id"], tmp_path / "rst.pcap")
    check_pre_fault(path, capture, event, injected)
    lines = tcpdump_lines(path, f"src host {ip} and tcp[tcpflags] & tcp-rst != 0")  # the container's RSTs
    assert len([line for line in lines if f"{ip}.81 >" in line]) >= 20
    # The storm stops: the event ends. It starts again within the cooldown: the same event is
    # reopened (one event, not two), and says so.
    wait_until(lambda: d.events("anomaly_resolved", anomaly_id=event["id"]), 15, 0.2, "the reset storm's event resolved")
    assert not d.events("anomaly_reopened", anomaly_id=event["id"])
    reset_burst(ip)
    reopened = wait_until(lambda: d.events("anomaly_reopened", anomaly_id=event["id"]), 10, 0.2, "the same event reopened")
    assert reopened[0]["kind"] == "tcp_reset_spike"
    status, body = d.api(f"/api/v1/anomalies?container={cid[:12]}&kind=tcp_reset_spike")
    assert [a["id"] for a in body["anomalies"]] == [event["id"]]
    again = body["anomalies"][0]
    assert again["active"] and again["resolved_at"] is None and again["findings"] > event["findings"]
    assert d.scrape().value("nstap_anomalies_total", container_id=cid[:12], kind="tcp_reset_spike") == 1
    assert len(d.events("anomaly_detected", kind="tcp_reset_spike", container_id=cid[:12])) == 1


def test_connections_stuck_in_syn_sent(nstap, containers: Containers, docker_image: str, tmp_path: Path) -> None:
    d = nstap()
    server = containers.docker(docker_image, *HTTPD, name="synserver")
    ip = container_ip(server)
    # The client keeps trying to connect; once its namespace drops the SYN-ACKs, its SYNs get no answer.
    client = containers.docker(
        docker_image, "sh", "-c", f"while true; do nc -w 20 {ip} 80 </dev/null >/dev/null 2>&1; sleep 0.5; done", name="synclient"
    )
    pid = containers.pid("docker", client)
    d.wait_metric(lambda m: m.value("nstap_sample_timestamp_seconds", container_id=client[:12]), 5)
    rule = ("iptables", "-I", "INPUT", "-p", "tcp", "--tcp-flags", "SYN,ACK", "SYN,ACK", "-j", "DROP")
    injected = time.time()
    in_netns(pid, *rule)
    try:
        event = anomaly(d, client, "tcp_syn_sent_stuck")
        assert event["numbers"]["syn_sent"] >= 1 and event["numbers"]["syn_retransmits"] >= 2
        # The fault bites at the client's next try (the onset: its SYN); the detector waits its 3 s.
        check_onset(event, injected, kernel_delay=3, takes_effect_later=True)
        capture = finished_capture(d, event["capture_id"])
    finally:
        in_netns(pid, "iptables", "-D", *rule[2:], check=False)
    lines = tcpdump_lines(download(d, capture["id"], tmp_path / "syn.pcap"), "tcp[tcpflags] == tcp-syn")
    assert any(f"> {ip}.80: Flags [S]" in line for line in lines)  # the SYNs that got no answer


def test_udp_receiver_that_stops_reading(nstap, containers: Containers, docker_image: str, tmp_path: Path) -> None:
    d = nstap(ONSET_CONFIG)
    cid = containers.docker(*RING, docker_image, *HTTPD, name="udpsink")
    pid = containers.pid("docker", cid)
    ip = container_ip(cid)
    d.wait_metric(lambda m: m.value("nstap_flight_recorders_running") == 1, 10, "flight recorder running")
    # An application in the container's namespace that binds a UDP port with a small buffer and
    # never reads it (busybox has no UDP server; the socket and its overflow are the kernel's).
    sink = subprocess.Popen(
        ["nsenter", "-t", str(pid), "-n", sys.executable, "-c",
         "import socket, sys, time\n"
         "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
         "s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)\n"
         "s.bind(('0.0.0.0', 5000))\n"
         "print('ready', flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True,
    )
    traffic = Traffic(ip)
    traffic.start()
    try:
        assert sink.stdout.readline().strip() == "ready"
        time.sleep(PRE + 2)
        injected = time.time()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for _ in range(200):
                tx.sendto(b"x" * 512, (ip, 5000))
        event = anomaly(d, cid, "udp_receive_buffer_errors")
    finally:
        traffic.close()
        sink.kill()
        sink.wait()
    assert event["numbers"]["errors"] > 0
    check_onset(event, injected)
    m = d.scrape()
    assert m.value("nstap_udp_receive_buffer_errors_total", container_id=cid[:12]) > 0
    capture = finished_capture(d, event["capture_id"])
    assert capture["state"] == "complete" and capture["pre_packets"] > 0
    path = download(d, capture["id"], tmp_path / "udp.pcap")
    check_pre_fault(path, capture, event, injected)
    lines = tcpdump_lines(path, "udp port 5000")
    assert len(lines) >= 10 and all(f"> {ip}.5000: UDP" in line for line in lines)  # the flood, from the ring


# -- faults that collapse traffic (issue 20 §2) --------------------------------------------------


class GivingUp(threading.Thread):
    """Clients that connect every ``period`` s and give up after a second."""

    def __init__(self, ip: str, period: float = 0.25, limit: float = 60) -> None:
        super().__init__(daemon=True)
        self.ip, self.period, self.limit = ip, period, limit
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                with socket.create_connection((self.ip, 80), timeout=1) as c:
                    c.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    c.recv(4096)
            except OSError:
                pass
            self.stop.wait(self.period)

    def close(self) -> None:
        self.stop.set()
        self.join(5)


def detected(d: Daemon, cid: str, kind: str, timeout: float = 20) -> dict:
    """The container's first event of ``kind`` (its capture may be refused: one fault trips several kinds)."""
    def find():
        status, body = d.api(f"/api/v1/anomalies?container={cid[:12]}&kind={kind}")
        assert status == 200, body
        return body["anomalies"][0] if body["anomalies"] else None

    return wait_until(find, timeout, 0.2, f"{kind} anomaly in {cid[:12]}")


def cause_of(event: dict) -> str:
    """The cause kind of an event, as the API names it."""
    return event["cause"]["kind"]


def test_paused_listener_whose_clients_give_up(nstap, containers: Containers, docker_image: str) -> None:
    """Clients that give up after a second never fill the accept queue in time for an overflow
    threshold: the stalled queue is seen within two samples, with the paused container behind it."""
    d = nstap(ONSET_CONFIG)
    # (seconds 0.5: the detector's least, so that it fits two of this daemon's 0.5 s samples; at the
    # default 1 s interval its default of 1 s does)
    cid = containers.docker("--label", "nstap.detect.tcp_accept_stalled=0.5", docker_image, *HTTPD, name="paused")
    ip = container_ip(cid)
    d.wait_metric(lambda m: m.value("nstap_tcp_listen_queue_limit", container_id=cid[:12], port="80"), 5)
    clients = [GivingUp(ip) for _ in range(3)]
    for c in clients:
        c.start()
    try:
        time.sleep(2)
        sh("docker", "pause", cid)
        injected = time.time()  # when the pause is in effect (docker takes a few hundred ms to freeze the cgroup)
        event = detected(d, cid, "tcp_accept_stalled")
    finally:
        for c in clients:
            c.close()
        sh("docker", "unpause", cid, check=False)
    assert event["numbers"]["waiting"] >= 1 and "80 (" in event["numbers"]["queues"]
    check_onset(event, injected)
    assert cause_of(event) == "process_not_accepting", event
    text = event["cause"]["text"]
    assert "(docker pause)" in text or "freezer" in text, text


CONNECT_EVERY = 4  # seconds between the client's connections: more than the detector's window (2 s) plus a sample or two


def test_syn_acks_dropped_on_the_client_side(nstap, containers: Containers, docker_image: str) -> None:
    """The client's namespace drops the SYN-ACKs: the server retransmits them, its handshakes
    never complete, and its own half-open detector trips (the client's is tcp_syn_sent_stuck)."""
    d = nstap(ONSET_CONFIG)
    server = containers.docker(docker_image, *HTTPD, name="halfopen")
    ip = container_ip(server)
    client = containers.docker(
        docker_image, "sh", "-c", f"while true; do nc -w 20 {ip} 80 </dev/null >/dev/null 2>&1; sleep {CONNECT_EVERY}; done",
        name="halfclient",
    )
    pid = containers.pid("docker", client)
    d.wait_metric(lambda m: m.value("nstap_sample_timestamp_seconds", container_id=server[:12]), 5)
    time.sleep(1)
    rule = ("iptables", "-I", "INPUT", "-p", "tcp", "--tcp-flags", "SYN,ACK", "SYN,ACK", "-j", "DROP")
    injected = time.time()
    in_netns(pid, *rule)
    try:
        event = detected(d, server, "tcp_syn_recv_stuck")
    finally:
        in_netns(pid, "iptables", "-D", *rule[2:], check=False)
    # The window reaches back before the fault's onset (the client's next SYN): the client's last
    # connection before it may be counted, never two (they are CONNECT_EVERY apart); none completes
    # under the fault.
    assert event["numbers"]["syn_ack_retransmits"] >= 3 and event["numbers"]["handshakes_completed"] <= 1, event
    # The fault bites at the client's next SYN (its onset); the first SYN-ACK retransmission comes a second later.
    check_onset(event, injected, kernel_delay=1.0, takes_effect_later=True)
