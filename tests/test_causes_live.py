"""The cause nstap names for real faults in real dockerd containers: in the API, the CLI, the
metrics' ``cause`` label, the log line, the capture's evidence and the bundle's summary.

Each test breaks one thing the way it breaks in production and checks the cause kind and that its
sentence names the concrete thing (the rule, the paused container and its queue, the closed port,
the peer and its anomaly). The tables of :mod:`nstap.detect.causes` are in tests/test_causes.py.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
import urllib.request

import pytest

from conftest import PODMAN_ENV, ROOT, Containers, Daemon, sh, wait_until
from test_anomalies import HTTPD, TICKER, Reader, anomaly, connecting, container_ip, finished_capture, in_netns, reset_burst
from test_docs import command_blocks, shape_matches

pytestmark = pytest.mark.docker


def caused(d: Daemon, cid: str, kind: str, cause: str, timeout: float = 25) -> dict:
    """The container's first event of ``kind`` once nstap names its cause ``cause``."""
    def find():
        status, body = d.api(f"/api/v1/anomalies?container={cid[:12]}&kind={kind}")
        assert status == 200, body
        found = [a for a in body["anomalies"] if a["cause"]["kind"] == cause]
        return found[0] if found else None

    try:
        return wait_until(find, timeout, 0.3, f"{kind} anomaly in {cid[:12]} caused by {cause}")
    except BaseException:
        print(json.dumps(d.api(f"/api/v1/anomalies?container={cid[:12]}")[1], indent=1))
        raise


def get(d: Daemon, path: str) -> bytes:
    token = (d.data_dir / "api-token").read_text().strip()
    request = urllib.request.Request(f"http://127.0.0.1:{d.api_port}{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.read()


def test_a_drop_rule_in_the_containers_firewall_is_named(nstap, containers: Containers, docker_image: str) -> None:
    """The clients' ACKs dropped by the container's own firewall: the retransmissions' cause is
    the rule, with its text and the packets it dropped; everywhere the anomaly is shown."""
    d = nstap({"capture": {"max_concurrent": 8}})
    cid = containers.docker("--label", "nstap.detect.tcp_retransmits=threshold=0.02,min_segments=10", docker_image, *TICKER, name="fwdrop")
    pid = containers.pid("docker", cid)
    d.wait_metric(lambda m: m.value("nstap_sample_timestamp_seconds", container_id=cid[:12]), 10)
    reader = Reader(container_ip(cid), 9000)
    reader.start()
    rule = ("iptables", "-I", "INPUT", "-p", "tcp", "--dport", "9000", "-j", "DROP")
    try:
        time.sleep(1)
        in_netns(pid, *rule)
        event = caused(d, cid, "tcp_retransmits", "firewall_drop")
    finally:
        in_netns(pid, "iptables", "-D", *rule[2:], check=False)
        reader.close()
    text = event["cause"]["text"]
    assert "filter INPUT rule 1" in text and "--dport 9000" in text and "-j DROP" in text and "dropped" in text, text
    m = d.scrape()
    assert m.value("nstap_anomaly_active", container_id=cid[:12], kind="tcp_retransmits", cause="firewall_drop") is not None
    assert sum(s.value for s in m.find("nstap_anomalies_total", container_id=cid[:12], kind="tcp_retransmits")) == 1
    # The log line says it: at detection, or when it was named later in the anomaly.
    logged = d.events("anomaly_detected", anomaly_id=event["id"]) + d.events("anomaly_cause", anomaly_id=event["id"])
    assert any(e["cause"] == "firewall_drop" and e["cause_text"] == text for e in logged), logged
    # The capture's evidence (its end snapshot) and the bundle's summary.
    capture = finished_capture(d, anomaly(d, cid, "tcp_retransmits")["capture_id"])
    doc = wait_until(lambda: (lambda e: e if "end" in e else None)(json.loads(get(d, f"/api/v1/captures/{capture['id']}/evidence"))), 30, 0.5)
    # The evidence holds the anomaly as it was at the capture's end (its cause may be named later).
    assert doc["anomaly"]["id"] == event["id"] and doc["anomaly"]["cause"]["kind"] in ("firewall_drop", "unknown"), doc["anomaly"]
    with tarfile.open(fileobj=io.BytesIO(get(d, f"/api/v1/captures/{capture['id']}/bundle"))) as tar:
        summary = next(tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith("SUMMARY.txt"))
    assert "why:           firewall_drop: its own firewall dropped" in summary, summary


def test_a_paused_listener_is_named_with_its_queue(nstap, containers: Containers, docker_image: str) -> None:
    d = nstap()
    cid = containers.docker(docker_image, *HTTPD, name="pausedweb")
    ip = container_ip(cid)
    d.wait_metric(lambda m: m.value("nstap_tcp_listen_queue_limit", container_id=cid[:12], port="80"), 10)
    sh("docker", "pause", cid)
    name = Containers.inspect("docker", cid)["Name"].lstrip("/")
    clients = []
    try:
        clients += connecting(ip, 80, 20)
        event = caused(d, cid, "tcp_listen_overflows", "process_not_accepting")
        # docs/anomalies-and-causes.md's example, run while the listener is still paused
        (where, [(command, expected)]), = command_blocks("doctest-causes")
        out = sh("bash", "-c", command.replace("nstap ", f"{ROOT}/.venv/bin/nstap ", 1).replace("pausedweb", name)
                 + f" --data-dir {d.data_dir} --api http://127.0.0.1:{d.api_port}").stdout
    finally:
        for c in clients:
            c.close()
        sh("docker", "unpause", cid)
    assert f"{name} is paused (docker pause)" in event["cause"]["text"], event["cause"]
    assert "port 80 holds" in event["cause"]["text"]
    shown = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d( \(\+[\d.]+s\))?", "...", expected.replace("pausedweb-e5bd5218", name))
    shown = re.sub(r"\b\d{8}T\d{6}Z-[0-9a-f]{8}\b", "...", shown)
    shown = re.sub(r"(?<![\w-])\d+(/\d+)?(?![\w-])", "...", shown).replace("port ...", "port 80")
    assert shape_matches(shown, out), f"{where}: {command}\n--- shown:\n{shown}\n--- printed:\n{out}"


@pytest.mark.podman
def test_a_paused_podman_listener_is_named(nstap, containers: Containers, podman_image: str) -> None:
    """``podman pause`` (the cgroup freezer): the same cause, from Podman's status or the freezer."""
    d = nstap()
    cid = containers.podman(podman_image, *HTTPD, name="pausedpod")
    data = Containers.inspect("podman", cid)
    ip = next(n["IPAddress"] for n in data["NetworkSettings"]["Networks"].values() if n["IPAddress"])
    d.wait_metric(lambda m: m.value("nstap_tcp_listen_queue_limit", container_id=cid[:12], port="80"), 15)
    sh("podman", "pause", cid, env=PODMAN_ENV)
    clients = []
    try:
        clients += connecting(ip, 80, 20)
        event = wait_until(lambda: next((a for kind in ("tcp_listen_overflows", "tcp_accept_stalled")
                                         for a in d.api(f"/api/v1/anomalies?container={cid[:12]}&kind={kind}")[1]["anomalies"]
                                         if a["cause"]["kind"] == "process_not_accepting"), None), 25, 0.3, "process_not_accepting in the podman container")
    finally:
        for c in clients:
            c.close()
        sh("podman", "unpause", cid, env=PODMAN_ENV, check=False)
    name = data["Name"].lstrip("/")
    assert name in event["cause"]["text"] and ("is paused (podman pause)" in event["cause"]["text"] or "is frozen" in event["cause"]["text"]), event["cause"]


def test_connections_to_a_closed_port_are_named(nstap, containers: Containers, docker_image: str) -> None:
    d = nstap()
    cid = containers.docker(docker_image, *HTTPD, name="closedport")
    ip = container_ip(cid)
    d.wait_metric(lambda m: m.value("nstap_tcp_listen_queue_limit", container_id=cid[:12], port="80"), 10)
    time.sleep(2)  # the reset detector's baseline
    reset_burst(ip)
    event = caused(d, cid, "tcp_reset_spike", "no_listener")
    assert "RSTs" in event["cause"]["text"] and "listening: 80" in event["cause"]["text"], event["cause"]


def test_a_client_blames_the_paused_server_and_the_server_says_so(nstap, containers: Containers, docker_image: str) -> None:
    """A client container whose connections go unanswered because its server is paused: the
    client's anomaly is caused by the server's (peer_anomaly, from the eBPF collector's
    retransmitted flows), and the server's cause names the client."""
    d = nstap({"ebpf": "on", "detect": {"detectors": {"tcp_syn_sent_stuck": {"seconds": 2}}}})
    server = containers.docker(docker_image, *HTTPD, name="peerserver")
    ip = container_ip(server)
    d.wait_metric(lambda m: m.value("nstap_tcp_listen_queue_limit", container_id=server[:12], port="80"), 10)
    sh("docker", "pause", server)
    try:
        # Connections fill the paused server's queue, then the client's SYNs go unanswered.
        client = containers.docker(
            docker_image, "sh", "-c", f"while true; do nc -w 30 {ip} 80 </dev/null >/dev/null 2>&1 & sleep 0.2; done", name="peerclient"
        )
        blamed = caused(d, client, "tcp_syn_sent_stuck", "peer_anomaly", timeout=40)
        server_event = caused(d, server, "tcp_listen_overflows", "process_not_accepting", timeout=20)
        server_name, client_name = (Containers.inspect("docker", c)["Name"].lstrip("/") for c in (server, client))
        server_ids = [a["id"] for a in d.api(f"/api/v1/anomalies?container={server[:12]}")[1]["anomalies"]]
        assert f"{server_name} ({ip}:80)" in blamed["cause"]["text"] and any(i in blamed["cause"]["text"] for i in server_ids), blamed["cause"]
        assert server_event["cause"]["kind"] == "process_not_accepting"
        assert f"{server_name} is paused" in blamed["cause"]["text"] and "more peers" not in blamed["cause"]["text"]  # the peer's own cause, carried over
        wait_until(lambda: client_name in d.api(f"/api/v1/anomalies?container={server[:12]}&kind=tcp_listen_overflows")[1]["anomalies"][0]["cause"]["text"],
                   15, 0.5, "the server's cause names its client")
    finally:
        sh("docker", "unpause", server, check=False)
