"""The daemon against a real dockerd: discovery, counters on both sides, accept queues, lifecycle."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT, Containers, Metrics, reap_docker_orphans, sh, tool, wait_until
from nstap.netns.links import parse_net_dev

pytestmark = pytest.mark.docker

HTTPD = ("httpd", "-f", "-p", "80", "-h", "/www")


def container_ip(cid: str) -> str:
    data = Containers.inspect("docker", cid)
    return next(n["IPAddress"] for n in data["NetworkSettings"]["Networks"].values() if n["IPAddress"])


def iface(m: Metrics, metric: str, cid: str, side: str, name: str | None = None) -> float | None:
    labels = {"container_id": cid[:12], "side": side}
    if name:
        labels["interface"] = name
    else:
        labels["peer" if side == "host" else "interface"] = "eth0"
    return m.value(metric, **labels)


def series_of(m: Metrics, cid: str) -> list:
    return [s for s in m.samples if s.labels.get("container_id") == cid[:12]]


def test_container_appears_within_2s_and_its_series_go_within_2s(nstap, containers: Containers, docker_image: str) -> None:
    d = nstap()
    cid = containers.docker(docker_image, *HTTPD, name="appear")
    started = time.monotonic()
    d.wait_metric(lambda m: iface(m, "nstap_interface_receive_packets_total", cid, "container") is not None, 2, "container series")
    m = d.scrape()
    assert time.monotonic() - started < 2.5
    assert m.value("nstap_container_info", container_id=cid[:12])  # labelled by runtime below
    info = m.find("nstap_container_info", container_id=cid[:12])[0].labels
    assert info["runtime"] == "docker" and info["container"] == f"appear-{containers.label.split('=')[1]}"
    assert info["image"] == docker_image and info["netns"] == str(os.stat(f"/proc/{containers.pid('docker', cid)}/ns/net").st_ino)
    assert all(s.labels["runtime"] == "docker" for s in series_of(m, cid))
    containers.remove("docker", cid)
    gone_from = time.monotonic()
    d.wait_metric(lambda m: not series_of(m, cid), 2, "series of the removed container")
    assert time.monotonic() - gone_from < 2.5
    assert d.events("watcher_detached", container_id=cid[:12])


def test_http_traffic_moves_packet_counters_on_both_sides(nstap, containers: Containers, docker_image: str) -> None:
    d = nstap()
    cid = containers.docker(docker_image, *HTTPD, name="web")
    pid = containers.pid("docker", cid)
    ip = container_ip(cid)
    d.wait_metric(lambda m: iface(m, "nstap_interface_receive_packets_total", cid, "host") is not None, 3, "host-side series")

    def quiet_pair() -> tuple[Metrics, tuple] | None:
        """nstap's latest sample agrees with /proc read now: nothing is moving."""
        m = d.scrape()
        proc = parse_net_dev(open(f"/proc/{pid}/net/dev", "rb").read())["eth0"]
        if iface(m, "nstap_interface_receive_packets_total", cid, "container") == proc[1]:
            return m, proc
        time.sleep(0.3)
        return None

    m0, proc0 = wait_until(quiet_pair, 10, message="nstap agrees with /proc before traffic")
    requests = 25
    for _ in range(requests):
        with urllib.request.urlopen(f"http://{ip}/index.html", timeout=5) as r:
            assert r.read() == b"nstap test page\n"
    m1, proc1 = wait_until(quiet_pair, 10, message="nstap agrees with /proc after traffic")

    rx = iface(m1, "nstap_interface_receive_packets_total", cid, "container") - iface(m0, "nstap_interface_receive_packets_total", cid, "container")
    tx = iface(m1, "nstap_interface_transmit_packets_total", cid, "container") - iface(m0, "nstap_interface_transmit_packets_total", cid, "container")
    assert rx == proc1[1] - proc0[1] and tx == proc1[5] - proc0[5]  # exactly what the kernel counted
    assert rx >= 3 * requests and tx >= 3 * requests  # SYN, request, ACK/FIN in; SYN-ACK, reply, FIN out
    host_tx = iface(m1, "nstap_interface_transmit_packets_total", cid, "host") - iface(m0, "nstap_interface_transmit_packets_total", cid, "host")
    host_rx = iface(m1, "nstap_interface_receive_packets_total", cid, "host") - iface(m0, "nstap_interface_receive_packets_total", cid, "host")
    assert host_tx >= rx and host_rx >= tx, (rx, tx, host_tx, host_rx)  # the host end sent what the container received
    host_if = m1.find("nstap_interface_up", container_id=cid[:12], side="host")[0].labels["interface"]
    assert host_if.startswith("veth") and m1.value("nstap_interface_up", container_id=cid[:12], side="host") == 1
    assert m1.value("nstap_tcp_passive_opens_total", container_id=cid[:12]) >= requests


def test_listener_that_never_accepts_fills_its_queue(nstap, containers: Containers, docker_image: str) -> None:
    d = nstap()
    cid = containers.docker(docker_image, *HTTPD, name="stuck")
    ip = container_ip(cid)
    short = cid[:12]
    limit = d.wait_metric(lambda m: m.value("nstap_tcp_listen_queue_limit", container_id=short, port="80"), 3, "listen queue limit")
    assert d.scrape().value("nstap_tcp_listen_queue_length", container_id=short, port="80") == 0
    overflows = d.scrape().value("nstap_tcp_listen_overflows_total", container_id=short)
    sh("docker", "pause", cid)  # httpd frozen: the kernel keeps completing handshakes into its queue
    clients = []
    try:
        for _ in range(int(limit) + 6):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex((ip, 80))
            clients.append(c)
        m = d.wait_metric(
            lambda m: m.value("nstap_tcp_listen_queue_length", container_id=short, port="80") == limit + 1
            and m.value("nstap_tcp_listen_overflows_total", container_id=short) > overflows
            and m,
            5,
            "accept queue full and overflows counted",
        )
        assert m.value("nstap_tcp_listen_drops_total", container_id=short) > 0
    finally:
        for c in clients:
            c.close()
        sh("docker", "unpause", cid)
    # Still watched while paused and after.
    assert d.scrape().value("nstap_container_info", container_id=short) == 1


def test_shared_namespace_is_watched_once(nstap, containers: Containers, docker_image: str) -> None:
    d = nstap()
    owner = containers.docker(docker_image, *HTTPD, name="owner")
    m0 = d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=owner[:12]) and m, 3, "owner watched")
    joiner = containers.docker("--network", f"container:{owner}", docker_image, "sleep", "600", name="joiner")
    m = d.wait_metric(lambda m: len(m.find("nstap_container_info", container_id=joiner[:12])) and m, 3, "joiner listed")
    netns = {m.find("nstap_container_info", container_id=c[:12])[0].labels["netns"] for c in (owner, joiner)}
    assert len(netns) == 1
    assert series_of(m, owner) and not [s for s in series_of(m, joiner) if s.name != "nstap_container_info"]
    inode = int(netns.pop())
    attached = [e for e in d.events("watcher_attached") if e["netns"] == inode]
    assert len(attached) == 1 and attached[0]["container_id"] == owner[:12]
    assert m.value("nstap_namespaces_watched") == m0.value("nstap_namespaces_watched")
    assert m.value("nstap_containers_watched", runtime="docker") == m0.value("nstap_containers_watched", runtime="docker") + 1


def test_host_network_listed_opted_out_hidden(nstap, containers: Containers, docker_image: str) -> None:
    d = nstap()
    host = containers.docker("--network", "host", docker_image, "sleep", "600", name="hostnet")
    opted = containers.docker("--label", "nstap.enable=false", docker_image, *HTTPD, name="optout")
    normal = containers.docker(docker_image, "sleep", "600", name="normal")
    m = d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=normal[:12]) and m, 3, "normal container watched")
    assert m.find("nstap_container_info", container_id=host[:12])[0].labels["netns"] == "host"
    assert [s.name for s in series_of(m, host)] == ["nstap_container_info"]
    assert series_of(m, opted) == []
    status, body = d.api("/api/v1/containers")
    assert status == 200
    by_id = {c["id"]: c for c in body["containers"]}
    assert by_id[host]["netns"] == "host" and not by_id[host]["watched"]
    assert not by_id[opted]["enabled"] and not by_id[opted]["watched"]
    assert by_id[normal]["watched"] and by_id[normal]["networks"][0]["ipv4"]


def test_containers_cli_and_api_token(nstap, containers: Containers, docker_image: str) -> None:
    d = nstap()
    cid = containers.docker("-p", "127.0.0.1::80", docker_image, *HTTPD, name="cli")
    d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=cid[:12]), 3)
    out = sh(sys.executable, "-m", "nstap", "containers", "--config", str(d.config_path)).stdout
    line = next(line for line in out.splitlines() if line.startswith("cli-"))
    pid = containers.pid("docker", cid)
    for expected in ("docker", str(pid), str(os.stat(f"/proc/{pid}/ns/net").st_ino), "yes", container_ip(cid), "->80/tcp"):
        assert expected in line, (expected, line)
    assert d.api("/api/v1/containers", token=None)[0] == 401
    assert d.api("/api/v1/containers", token="wrong-token-wrong-token")[0] == 401
    assert d.api("/healthz", token=None) == (200, {"status": "ok"})
    assert d.api("/api/v1/nothing-here")[0] == 404
    assert oct(os.stat(d.data_dir / "api-token").st_mode & 0o777) == "0o600"


def test_promtool_accepts_the_metrics(nstap, containers: Containers, docker_image: str) -> None:
    d = nstap()
    cid = containers.docker(docker_image, *HTTPD, name="lint")
    d.wait_metric(lambda m: m.find("nstap_tcp_listen_queue_limit", container_id=cid[:12]), 3)
    text = d.scrape().text
    proc = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr


def test_missing_runtime_socket_is_reported_not_fatal(nstap, containers: Containers, docker_image: str, tmp_path) -> None:
    d = nstap({"runtimes": [{"name": "docker", "socket": "/var/run/docker.sock"}, {"name": "ghost", "socket": str(tmp_path / "no.sock")}]})
    cid = containers.docker(docker_image, "sleep", "600", name="alive")
    m = d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=cid[:12]) and m, 3)
    assert m.value("nstap_runtime_up", runtime="ghost") == 0 and m.value("nstap_runtime_up", runtime="docker") == 1
    time.sleep(1.5)
    assert len(d.events("runtime_absent", runtime="ghost")) == 1  # one line, not one per retry


def dockerd_pids() -> list[int]:
    out = sh("pgrep", "-x", "dockerd", check=False).stdout.split()
    return [int(p) for p in out]


def test_dockerd_killed_and_restarted(nstap, containers: Containers, docker_image: str) -> None:
    d = nstap({"reconnect_max_backoff": 1.0})
    before = containers.docker(docker_image, "sleep", "600", name="before")
    d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=before[:12]), 3)
    pids = dockerd_pids()
    assert pids, "dockerd is not running"
    try:
        for pid in pids:
            os.kill(pid, 9)
        d.wait_metric(lambda m: m.value("nstap_runtime_up", runtime="docker") == 0, 5, "runtime down")
        assert d.events("runtime_lost", runtime="docker")
    finally:
        wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), 10)
        sh(str(ROOT / "deploy/start-runtimes.sh"), timeout=120)  # leaves dockerd running, as found
        reap_docker_orphans()
    d.wait_metric(lambda m: m.value("nstap_runtime_up", runtime="docker") == 1, 15, "runtime back")
    assert len(d.events("runtime_connected", runtime="docker")) == 2
    after = containers.docker(docker_image, "sleep", "600", name="after")
    d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=after[:12]), 3, "container started after the restart")
    assert d.scrape().value("nstap_runtime_reconnects_total", runtime="docker") >= 1


def test_child_ehash_gives_new_namespaces_their_own_tcp_hash(nstap, containers: Containers, docker_image: str) -> None:
    knob = "/proc/sys/net/ipv4/tcp_child_ehash_entries"
    old = open(knob).read().strip()
    try:
        d = nstap({"tcp_child_ehash_entries": 512})
        assert open(knob).read().strip() == "512"
        assert d.events("tcp_child_ehash_set", entries=512)
        cid = containers.docker(docker_image, *HTTPD, name="ehash")
        pid = containers.pid("docker", cid)
        own = sh("nsenter", "-t", str(pid), "-n", "cat", "/proc/sys/net/ipv4/tcp_ehash_entries").stdout.strip()
        assert own == "512"  # a namespace sharing the host's hash shows a negative number here
        d.wait_metric(lambda m: m.find("nstap_socket_walk_interval_seconds", container_id=cid[:12]), 3)
    finally:
        with open(knob, "w") as f:
            f.write(old)
