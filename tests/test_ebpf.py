"""Kernel drop reasons and retransmitted flows (eBPF, bcc), and ``nstap doctor``.

Real kernel, real dockerd containers: drops are induced in one container (a DROP rule in its
namespace, connections to a closed port) while a second container gets no such traffic (a
listener that does not accept is not among them: on this kernel the SYNs and ACKs refused at a
full accept queue are consumed, not freed with TCP_LISTEN_OVERFLOW — measured, ListenOverflows
950 and no such reason; the tcp_listen_overflows detector reads that counter); retransmissions go to a peer (the test itself) whose ACKs the
container's namespace drops. The degrade path runs the daemon with a ``bcc`` that cannot be
imported (a package of that name on PYTHONPATH that raises ImportError).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, Containers, Daemon, free_port, sh, wait_until
from nstap.detect.kernel_drops import KernelDropDetector, check_reasons
from nstap.ebpf.btf import Btf
from nstap.samples import NamespaceSample

pytestmark = pytest.mark.docker

HTTPD = ("httpd", "-f", "-p", "80", "-h", "/")
EBPF = {"ebpf": "on", "detect": {"detectors": {"kernel_drops": {"min_increase": 5}}}, "capture": {"post_seconds": 2}}


def drops_of(m, cid: str) -> dict[str, float]:
    return {s.labels["reason"]: s.value for s in m.find("nstap_kernel_drops_total", container_id=cid[:12])}


def gateway() -> str:
    out = sh("ip", "-4", "-o", "addr", "show", "docker0").stdout
    return out.split("inet ", 1)[1].split("/", 1)[0]


# -- pure parts ---------------------------------------------------------------------------------


def test_btf_offsets_through_anonymous_members() -> None:
    raw = """[1] INT 'long' size=8 bits_offset=0 nr_bits=64 encoding=SIGNED
[2] STRUCT 'net_device' size=64 vlen=1
\t'nd_net' type_id=3 bits_offset=256
[3] STRUCT '(anon)' size=8 vlen=1
\t'net' type_id=4 bits_offset=0
[4] PTR '(anon)' type_id=5
[5] STRUCT 'net' size=64 vlen=1
\t'ns' type_id=6 bits_offset=128
[6] TYPEDEF 'ns_t' type_id=7
[7] STRUCT 'ns_common' size=16 vlen=2
\t'(anon)' type_id=8 bits_offset=0
\t'other' type_id=1 bits_offset=64
[8] UNION '(anon)' size=8 vlen=1
\t'inum' type_id=1 bits_offset=32
"""
    btf = Btf(raw)
    assert btf.path("net_device", "nd_net", "net") == 32
    assert btf.path("net", "ns", "inum") == 16 + 4
    with pytest.raises(Exception, match="no member"):
        btf.path("net", "nope")


def test_kernel_drops_detector_table() -> None:
    det = KernelDropDetector(10, check_reasons({"NO_SOCKET": 3, "TCP_CSUM": "off", "QUEUE_PURGE": "on"}))
    s = lambda at, drops: NamespaceSample(1, at, 0.0, kernel_drops=drops)  # noqa: E731
    assert det.observe(s(1, {"NO_SOCKET": 0, "QUEUE_PURGE": 0})) is None
    assert det.observe(s(2, {"NO_SOCKET": 2, "NOT_SPECIFIED": 900, "TCP_CSUM": 50})) is None  # below, quiet, off
    f = det.observe(s(3, {"NO_SOCKET": 5, "QUEUE_PURGE": 10, "NETFILTER_DROP": 10}))
    assert f is not None and dict(f.numbers) == {"NO_SOCKET": 3, "QUEUE_PURGE": 10, "NETFILTER_DROP": 10} and f.started_at == 2
    for bad in ({"lower": 1}, {"NO_SOCKET": 0}, {"NO_SOCKET": "maybe"}, ["NO_SOCKET"]):
        with pytest.raises(ValueError):
            check_reasons(bad)


# -- the real thing ------------------------------------------------------------------------------


@pytest.mark.daemon_log_allows("anomaly_capture_refused")
def test_drop_reasons_attributed_to_the_right_container(nstap, containers: Containers, docker_image: str) -> None:
    d: Daemon = nstap(EBPF)
    victim = containers.docker(docker_image, *HTTPD, name="dropvictim")
    bystander = containers.docker(docker_image, *HTTPD, name="dropbystander")
    ip = containers.inspect("docker", victim)["NetworkSettings"]["IPAddress"]
    wait_until(lambda: d.events("ebpf_loaded"), 20, message="eBPF program loaded")
    d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=bystander[:12]) and m.find("nstap_interface_up", container_id=victim[:12]), 10)
    loaded = d.events("ebpf_loaded")[0]
    assert loaded["compile_seconds"] > 0 and loaded["reasons"] > 50

    # NO_SOCKET: connections to a port nothing listens on.
    for _ in range(20):
        with socket.socket() as s:
            s.settimeout(2)
            try:
                s.connect((ip, 81))
            except OSError:
                pass
    m = d.wait_metric(lambda m: drops_of(m, victim).get("NO_SOCKET", 0) >= 20 and m, 5, "NO_SOCKET counted")
    event = wait_until(lambda: d.events("anomaly_detected", kind="kernel_drops", container_id=victim[:12]), 5, message="kernel_drops anomaly")[0]
    assert "NO_SOCKET" in event["numbers"]

    # NETFILTER_DROP: a DROP rule inside the victim's namespace, during a manual capture.
    pid = containers.pid("docker", victim)
    sh("nsenter", "-t", str(pid), "-n", "iptables", "-A", "INPUT", "-p", "udp", "--dport", "5000", "-j", "DROP")
    status, cap = d.api("/api/v1/captures", method="POST", body=b'{"container": "%s", "duration": 3}' % victim[:12].encode())
    assert status == 202, cap
    time.sleep(1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(30):
            s.sendto(b"x", (ip, 5000))
    d.wait_metric(lambda m: drops_of(m, victim).get("NETFILTER_DROP", 0) >= 30, 5, "NETFILTER_DROP counted")

    # Nothing of that in the bystander.
    m = d.scrape()
    assert not {"NO_SOCKET", "NETFILTER_DROP"} & set(drops_of(m, bystander))
    assert not d.events("anomaly_detected", kind="kernel_drops", container_id=bystander[:12])
    assert m.value("nstap_collector_up", collector="ebpf_drops") == 1

    # The capture's evidence lists the drops counted in its window.
    done = wait_until(lambda: (lambda r: r if r["state"] != "running" else None)(d.api(f"/api/v1/captures/{cap['id']}")[1]), 20, message="capture ends")
    evidence = wait_until(lambda: (lambda st, body: body if st == 200 and "end" in body else None)(*d.api(f"/api/v1/captures/{done['id']}/evidence")), 10)
    assert evidence["kernel_drop_deltas"].get("NETFILTER_DROP", 0) >= 30
    assert "kernel_drops" in evidence["start"]["ebpf"]


def test_retransmitted_flow_lists_the_peer(nstap, containers: Containers, docker_image: str) -> None:
    d: Daemon = nstap(EBPF)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((gateway(), 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True).start()
    try:
        # The container sends zeros to the test for ever; then its namespace drops the test's ACKs.
        cid = containers.docker(docker_image, "sh", "-c", f"nc {gateway()} {port} < /dev/zero", name="retrans")
        wait_until(lambda: accepted, 10, message="connection from the container")
        wait_until(lambda: d.events("ebpf_loaded"), 20, message="eBPF program loaded")
        pid = containers.pid("docker", cid)
        sh("nsenter", "-t", str(pid), "-n", "iptables", "-A", "INPUT", "-p", "tcp", "--sport", str(port), "-j", "DROP")
        accepted[0].setblocking(False)
        deadline = time.time() + 20
        flows: list = []
        while time.time() < deadline and not flows:
            try:
                while accepted[0].recv(65536):
                    pass
            except BlockingIOError:
                pass
            status, body = d.api(f"/api/v1/containers/{cid[:12]}/retransmits")
            assert status == 200, body
            flows = [f for f in body["flows"] if f["remote"] == gateway() and f["remote_port"] == port]
            time.sleep(1)
        assert flows and flows[0]["retransmits"] >= 1, body
    finally:
        server.close()
        for s in accepted:
            s.close()


def test_without_bcc_it_degrades_and_says_how_to_fix(nstap, tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "nobcc" / "bcc"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("bcc hidden by the test")\n')
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    d: Daemon = nstap({"ebpf": "auto"})
    event = wait_until(lambda: d.events("ebpf_unavailable"), 10, message="ebpf_unavailable logged")[0]
    assert "bcc is not importable" in event["error"] and "python3-bpfcc" in event["error"]
    m = d.wait_metric(lambda m: m.value("nstap_collector_up", collector="ebpf_drops") == 0 and m, 5)
    assert m.value("nstap_namespaces_watched") is not None  # everything else runs
    status, _ = d.api("/api/v1/containers")
    assert status == 200
    # ebpf: on refuses to start, exit code 2, naming what is missing.
    config = tmp_path / "on.yaml"
    config.write_text(f"ebpf: 'on'\ndata_dir: {tmp_path / 'on'}\nmetrics_listen: 127.0.0.1:{free_port()}\napi_listen: 127.0.0.1:{free_port()}\n")
    proc = subprocess.run([sys.executable, "-m", "nstap", "run", "--config", str(config)], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(fake.parent)})
    assert proc.returncode == 2 and "ebpf: on, but bcc is not importable" in proc.stderr


def test_doctor(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "nstap", "doctor"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert ok.returncode == 0, ok.stdout
    lines = ok.stdout.splitlines()
    assert lines[0].split()[:3] == ["FEATURE", "CHECK", "STATUS"]
    for check in ("tcpdump", "nsenter", "bcc", "BTF", "drop reasons", "setns", "conntrack", "data dir"):
        assert any(check in line and " OK " in line for line in lines), (check, ok.stdout)
    # tcpdump hidden from PATH: a MISSING line with its fix, exit code 1.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("nsenter", "iptables", "iptables-save", "nft", "bpftool", "ip"):
        path = subprocess.run(["sh", "-c", f"command -v {tool} || ls /usr/sbin/{tool} /sbin/{tool} 2>/dev/null"], capture_output=True, text=True).stdout.split()
        if path:
            (bin_dir / tool).symlink_to(path[0])
    hidden = subprocess.run([sys.executable, "-m", "nstap", "doctor", "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "PATH": str(bin_dir)})
    assert hidden.returncode == 1
    import json

    doc = json.loads(hidden.stdout)
    missing = [c for c in doc["checks"] if c["status"] == "MISSING"]
    assert [c["check"] for c in missing] == ["tcpdump"] and "apt-get install tcpdump" in missing[0]["fix"]
