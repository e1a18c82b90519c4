"""Evidence, bundles and host-side captures, against a real daemon, dockerd, tcpdump and the kernel.

The container's listener is made to stop accepting (``docker pause``) while the test holds
connections to it: the evidence of a capture must show that listener's full accept queue, the
test's own connections with their peer, both ends of the veth, the default route and the
gateway's neighbour entry, the namespace's firewall and the counters that moved. The bundle must
unpack and its pcap read with ``tcpdump -r``. A host-side capture must hold the traffic to the
container, seen on the host end of its veth.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, Containers, Daemon, sh, tool, wait_until
from nstap.capture.bundle import bundle_name, summary_text
from nstap.capture.pcap import read_records
from nstap.index import AnomalyRow, CaptureRow
from nstap.netns.evidence import counter_deltas, parse_counter_file, parse_udp_table

HTTPD = ("httpd", "-f", "-p", "80", "-h", "/www")


# -- parsers, as tables ----------------------------------------------------------------------


def test_udp_table_and_counters() -> None:
    udp = (
        "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n"
        "  123: 0100007F:0035 00000000:0000 07 00000000:00000A00 00:00000000 00000000     0        0 4242 2 0000000000000000 17\n"
        "  124: 00000000:1388 00000000:0000 07 00000010:00000000 00:00000000 00000000     0        0 4243 2 0000000000000000 0\n"
    )
    sockets, total = parse_udp_table(udp, socket.AF_INET, 1)
    assert total == 2 and sockets == [{"local": "127.0.0.1:53", "peer": "0.0.0.0:0", "recv_q": 2560, "send_q": 0, "inode": 4242, "drops": 17}]
    udp6 = (
        "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n"
        "   1: 00000000000000000000000001000000:1388 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 99 2 0 3\n"
    )
    assert parse_udp_table(udp6, socket.AF_INET6, 10)[0][0]["local"] == "[::1]:5000"
    snmp = "Tcp: RtoMin RetransSegs CurrEstab\nTcp: 200 7 3\nUdp: InDatagrams RcvbufErrors\nUdp: 10 0\n"
    before = parse_counter_file(snmp)
    assert before == {"Tcp.RtoMin": 200, "Tcp.RetransSegs": 7, "Tcp.CurrEstab": 3, "Udp.InDatagrams": 10, "Udp.RcvbufErrors": 0}
    after = {**before, "Tcp.RetransSegs": 19, "Udp.RcvbufErrors": 4}
    assert counter_deltas(before, after) == {"Tcp.RetransSegs": 12, "Udp.RcvbufErrors": 4}
    assert parse_counter_file("garbage\nTcp: 1 2\n") == {}


def test_summary_says_what_tripped_and_when() -> None:
    row = CaptureRow(id="20261124T000000Z-abcd", state="complete", created_at=1000.0, container="web", container_id="abc", runtime="docker",
                     netns=1, reason="anomaly", kind="tcp_retransmits", mode="ring", trigger_at=1002.0, window_start=989.0, window_end=1012.0,
                     packets=40, pre_packets=30, pre_truncated=True)
    anomaly = AnomalyRow(id="a1", kind="tcp_retransmits", container="web", container_id="abc", runtime="docker", netns=1,
                         first_seen=1002.0, last_seen=1010.0, started_at=1000.8, summary="12.0% of TCP segments retransmitted", numbers={"rate": 0.12})
    text = summary_text(row, anomaly)
    assert "12.0% of TCP segments retransmitted" in text and "1.2 s after it started" in text and "pre_truncated" in text
    assert "rate: 0.12" in text
    hostile = CaptureRow(id="x1", state="complete", created_at=1.0, container="../../etc/pass wd\n")
    assert bundle_name(hostile) == "nstap-_.._etc_pass_wd_-x1.tar.gz"


# -- against the real thing ----------------------------------------------------------------------


def container_ip(cid: str) -> tuple[str, str]:
    data = Containers.inspect("docker", cid)
    net = next(n for n in data["NetworkSettings"]["Networks"].values() if n["IPAddress"])
    return net["IPAddress"], net["Gateway"]


def get(d: Daemon, path: str) -> tuple[int, bytes, dict]:
    token = (d.data_dir / "api-token").read_text().strip()
    request = urllib.request.Request(f"http://127.0.0.1:{d.api_port}{path}", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def start(d: Daemon, **body) -> dict:
    status, row = d.api("/api/v1/captures", method="POST", body=json.dumps(body).encode())
    assert status == 202, row
    return row


def finished(d: Daemon, capture_id: str, timeout: float = 30) -> dict:
    def done():
        status, body = d.api(f"/api/v1/captures/{capture_id}")
        assert status == 200, body
        return body if body["state"] != "running" and body["has_evidence"] else None

    return wait_until(done, timeout, 0.2, f"capture {capture_id} finished with its evidence")


def evidence_of(d: Daemon, capture_id: str) -> dict:
    def complete():
        status, data, headers = get(d, f"/api/v1/captures/{capture_id}/evidence")
        assert status == 200, data
        assert headers["Content-Type"].startswith("application/json")
        doc = json.loads(data)
        return doc if "end" in doc else None

    return wait_until(complete, 20, 0.2, "the end snapshot")


@pytest.mark.docker
def test_evidence_and_bundle_of_a_real_capture(nstap, containers: Containers, docker_image: str, tmp_path: Path) -> None:
    d = nstap()
    cid = containers.docker(docker_image, *HTTPD, name="evidence")
    ip, gateway = container_ip(cid)
    m = d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=cid[:12], side="host") and m, 10)
    host_if = m.find("nstap_interface_up", container_id=cid[:12], side="host")[0].labels["interface"]
    sh("docker", "pause", cid)  # the listener stops accepting: connections wait in its queue
    held = []
    try:
        for _ in range(3):
            held.append(socket.create_connection((ip, 80), timeout=5))
        ports = {c.getsockname()[1] for c in held}
        row = start(d, container=cid[:12], duration=2)
        capture = finished(d, row["id"])
        doc = evidence_of(d, row["id"])
    finally:
        sh("docker", "unpause", cid)
        for c in held:
            c.close()
    assert capture["state"] == "complete" and doc["capture"]["id"] == row["id"] and doc["anomaly"] is None
    snap = doc["start"]
    assert "error" not in snap, snap.get("error")
    tcp = snap["tcp"]
    listener = [s for s in tcp["sockets"] if s["state"] == "LISTEN" and s["local"].endswith(":80")]
    assert listener and listener[0]["recv_q"] >= 3, listener  # the full accept queue shows
    mine = [s for s in tcp["sockets"] if s["state"] == "ESTABLISHED" and s["peer"].rsplit(":", 1)[1] in {str(p) for p in ports}]
    # As ss prints them: a dual-stack listener's connections have IPv4-mapped addresses.
    assert len(mine) == 3 and all(s["peer"].lstrip("[").removeprefix("::ffff:").startswith(f"{gateway}") for s in mine), mine
    assert all(s["local"] in (f"{ip}:80", f"[::ffff:{ip}]:80") for s in mine), mine
    assert all("rtt_ms" in s and "cwnd" in s for s in mine)  # tcp_info came with them
    assert tcp["total"] == len(tcp["sockets"]) + tcp["not_listed"] and tcp["states"]["ESTABLISHED"] >= 3
    names = {i["ifname"] for i in snap["interfaces"]}
    assert {"lo", "eth0"} <= names
    eth0 = next(i for i in snap["interfaces"] if i["ifname"] == "eth0")
    assert any(a.get("local") == ip for a in eth0["addr_info"]) and eth0["stats64"]["rx"]["packets"] > 0
    assert [h["ifname"] for h in snap["host_interfaces"]] == [host_if] and snap["host_interfaces"][0]["stats64"]["tx"]["packets"] > 0
    assert any(r.get("dst") == "default" and r.get("gateway") == gateway for r in snap["routes"])
    assert any(n.get("dst") == gateway for n in snap["neighbours"])  # the gateway's entry, from the replies
    assert set(snap["firewall"]) == {"iptables", "ip6tables", "nftables"}
    assert snap["counters"]["Tcp.PassiveOpens"] >= 3 and snap["cpu_seconds"] >= 0
    assert doc["end"]["taken_at"] > snap["taken_at"] and isinstance(doc["counter_deltas"], dict)
    # The bundle: one .tar.gz with the summary, the pcap tcpdump reads, the evidence.
    status, data, headers = get(d, f"/api/v1/captures/{row['id']}/bundle")
    assert status == 200 and headers["Content-Type"] == "application/gzip", data[:200]
    assert headers["Content-Disposition"] == f'attachment; filename="nstap-{capture["container"]}-{row["id"]}.tar.gz"'
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = sorted(m.name.split("/", 1)[1] for m in tar.getmembers())
        assert names == ["SUMMARY.txt", "capture.pcap", "evidence.json"]
        tar.extractall(tmp_path / "bundle")  # our own bundle, checked member by member above
    root = tmp_path / "bundle" / f"nstap-{row['id']}"
    assert json.loads((root / "evidence.json").read_text())["capture"]["id"] == row["id"]
    assert f"capture {row['id']}" in (root / "SUMMARY.txt").read_text()
    proc = subprocess.run([tool("tcpdump"), "-nn", "-r", str(root / "capture.pcap")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # Evidence is in the store's budget and mode.
    files = sorted(p.name for p in (d.data_dir / "captures").iterdir())
    assert f"{row['id']}.evidence.json" in files
    assert ((d.data_dir / "captures" / f"{row['id']}.evidence.json").stat().st_mode & 0o777) == 0o600
    # Through the CLI too.
    out = subprocess.run(
        [sys.executable, "-m", "nstap", "captures", "get", row["id"], "--bundle", "-o", str(tmp_path / "cli.tar.gz"), "--config", str(d.config_path)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "cli.tar.gz").read_bytes() == data


@pytest.mark.docker
def test_host_side_capture_holds_the_traffic_to_the_container(nstap, containers: Containers, docker_image: str, tmp_path: Path) -> None:
    d = nstap()
    cid = containers.docker(docker_image, *HTTPD, name="hostside")
    ip, _ = container_ip(cid)
    m = d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=cid[:12], side="host") and m, 10)
    host_if = m.find("nstap_interface_up", container_id=cid[:12], side="host")[0].labels["interface"]
    status, body = d.api("/api/v1/captures", method="POST", body=json.dumps({"container": cid[:12], "side": "host", "interface": "eth0"}).encode())
    assert status == 400 and "not a host-side interface" in body["error"], body
    status, body = d.api("/api/v1/captures", method="POST", body=json.dumps({"container": cid[:12], "side": "sideways"}).encode())
    assert status == 400, body
    row = start(d, container=cid[:12], side="host", duration=3)
    assert row["side"] == "host" and row["interface"] == host_if and row["mode"] == "live"
    time.sleep(0.5)  # tcpdump is up
    ports = []
    for _ in range(5):
        with socket.create_connection((ip, 80), timeout=5) as c:
            ports.append(c.getsockname()[1])
            c.sendall(b"GET / HTTP/1.0\r\n\r\n")
            c.recv(4096)
    capture = finished(d, row["id"])
    assert capture["state"] == "complete" and capture["packets"] > 0, capture
    status, data, _ = get(d, f"/api/v1/captures/{row['id']}/pcap")
    assert status == 200
    (tmp_path / "host.pcap").write_bytes(data)
    proc = subprocess.run([tool("tcpdump"), "-nn", "-r", str(tmp_path / "host.pcap"), "tcp port 80"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    seen = {p for p in ports if f".{p} > {ip}.80:" in proc.stdout}
    assert seen == set(ports), proc.stdout[:2000]
    # Taken on that one Ethernet interface in the host's namespace, not on "any" inside the
    # container's (whose pcap would be Linux cooked capture, link type 113 or 276).
    header, _ = read_records(data)
    assert header.linktype == 1  # DLT_EN10MB


async def test_a_tool_that_prints_without_end_is_killed_at_the_cap() -> None:
    """Defect: a tool's whole output was read into memory before the cap was looked at (a
    container's firewall decides how much iptables-save prints); now it is read as it comes and the
    tool killed at the cap."""
    from nstap.netns.evidence import run_tool

    started = time.monotonic()
    text, error = await run_tool(["yes", "a rule that goes on"], None, timeout=30, cap=1 << 20)
    assert error == "yes printed more than 1048576 bytes" and len(text) == 1 << 20
    assert time.monotonic() - started < 5  # not the 30 s timeout: stopped at the cap
    text, error = await run_tool(["sh", "-c", "echo out; echo why >&2; exit 3"], None)
    assert text == "out\n" and error == "why"


async def test_a_bundle_is_streamed_with_a_bounded_window_and_stops_when_its_client_goes(tmp_path: Path) -> None:
    """Defect: bundles were built whole in memory (a 20 MB pcap, then its gzip) on the executor
    that reads rings back. Now it is written as it is sent, at most 4 chunks ahead of the client,
    from a thread of its own, and a client that goes stops it."""
    import asyncio
    import io as _io
    from concurrent.futures import ThreadPoolExecutor

    from nstap.capture.bundle import ChunkSink, build_bundle, write_bundle
    from nstap.index import CaptureRow

    pcap = tmp_path / "big.pcap"
    pcap.write_bytes(os.urandom(8 << 20))  # incompressible: 8 MiB of gzip output
    row = CaptureRow(id="20260101T000000Z-abcdef01", state="complete", created_at=1.0, container="web", finished_at=2.0)
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(1)
    try:
        queue: asyncio.Queue = asyncio.Queue()
        sink = ChunkSink(loop, queue)
        making = loop.run_in_executor(pool, lambda: (write_bundle(_io.BufferedWriter(sink, 256 * 1024), row, None, pcap, None), sink.end()))
        received, most = [], 0
        while (chunk := await queue.get()) is not None:
            most = max(most, queue.qsize())
            received.append(chunk)
            await asyncio.sleep(0.001)  # a slow client
            sink.taken()
        await making
        assert most <= 4 and b"".join(received) == build_bundle(row, None, pcap, None)  # the same bytes as made whole
        # A client that goes after two chunks: the writer stops at its next write.
        queue = asyncio.Queue()
        sink = ChunkSink(loop, queue)
        making = loop.run_in_executor(pool, lambda: write_bundle(_io.BufferedWriter(sink, 256 * 1024), row, None, pcap, None))
        for _ in range(2):
            await queue.get()
            sink.taken()
        sink.abandon()
        with pytest.raises(BrokenPipeError):
            await asyncio.wait_for(making, 5)
    finally:
        pool.shutdown(wait=True)
