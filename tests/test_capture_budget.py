"""The capture store under pressure and across restarts, with the real daemon and real traffic."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time

import pytest

from conftest import Containers, sh, wait_until
from test_anomalies import container_ip, finished_capture

pytestmark = pytest.mark.docker

BIG_WEB = ("sh", "-c", "dd if=/dev/urandom of=/www/big bs=1024 count=8192 2>/dev/null; exec httpd -f -p 80 -h /www")


def dead(pid: int) -> bool:
    """True if the process is gone or a zombie waiting to be reaped."""
    try:
        return "State:\tZ" in open(f"/proc/{pid}/status").read()
    except FileNotFoundError:
        return True


def downloads(ip: str, seconds: float) -> threading.Thread:
    """Fetch an 8 MiB file over and over for ``seconds``, in the background."""

    def run() -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            subprocess.run(["busybox", "wget", "-q", "-O", "/dev/null", f"http://{ip}/big"], capture_output=True, timeout=30)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def start_capture(d, name: str, seconds: float) -> dict:
    status, body = d.api("/api/v1/captures", method="POST", body=json.dumps({"container": name, "duration": seconds}).encode())
    assert status == 202, body
    return body


def test_budget_evicts_oldest_and_restart_keeps_the_rest(nstap, containers: Containers, docker_image: str) -> None:
    # (no anomaly captures: bulk downloads may trip a detector, whose capture would take the one slot)
    config = {"capture": {"store_max_bytes": 1 << 20, "max_bytes": 400 * 1024, "post_seconds": 2, "max_concurrent": 1}, "detect": {"capture": False}}
    d = nstap(config)
    cid = containers.docker(docker_image, *BIG_WEB, name="bulk")
    d.wait_metric(lambda m: m.value("nstap_tcp_listen_queue_limit", container_id=cid[:12], port="80"), 10)
    wait_until(lambda: sh("busybox", "wget", "-q", "-O", "/dev/null", f"http://{container_ip(cid)}/big", check=False).returncode == 0, 20)
    traffic = downloads(container_ip(cid), 40)
    ids = []
    for _ in range(5):  # 5 x ~400 KiB into a 1 MiB store
        ids.append(start_capture(d, cid[:12], 2)["id"])
        finished_capture(d, ids[-1])
    traffic.join(60)
    # Each capture's end snapshot is filed after its pcap (and counts in the budget too): the
    # states are final once every capture has its evidence or was evicted.
    settled = lambda: all(r["has_evidence"] or r["state"] == "evicted" for r in (d.api(f"/api/v1/captures/{i}")[1] for i in ids))  # noqa: E731
    wait_until(settled, 20, 0.3, "every capture's evidence filed")
    rows = {i: d.api(f"/api/v1/captures/{i}")[1] for i in ids}
    assert all(rows[i]["bytes"] > 300 * 1024 or rows[i]["state"] == "evicted" for i in ids)
    evicted = [i for i in ids if rows[i]["state"] == "evicted"]
    kept = [i for i in ids if rows[i]["state"] != "evicted"]
    assert evicted == ids[: len(evicted)] and len(evicted) >= 2  # the oldest went first
    assert d.api(f"/api/v1/captures/{evicted[0]}/pcap")[0] == 410
    assert d.scrape().value("nstap_capture_store_bytes") <= 1 << 20
    assert d.api("/healthz", token=None)[0] == 200
    linked = {s.labels["capture_id"]: s.labels["state"] for s in d.scrape().find("nstap_capture_info", container_id=cid[:12])}
    assert linked == {i: rows[i]["state"] for i in ids}  # the evicted ones say so
    hashes = {}
    for i in kept:
        path = d.data_dir / "captures" / f"{i}.pcap"
        hashes[i] = hashlib.sha256(path.read_bytes()).hexdigest()
        assert hashes[i] == rows[i]["sha256"]

    # An orderly restart: index and files as they were.
    assert d.stop() == 0
    d.start()
    for i in ids:
        status, row = d.api(f"/api/v1/captures/{i}")
        assert status == 200 and row["state"] == rows[i]["state"] and row["sha256"] == rows[i]["sha256"]
    for i in kept:
        assert hashlib.sha256((d.data_dir / "captures" / f"{i}.pcap").read_bytes()).hexdigest() == hashes[i]

    # A crash in the middle of a capture: the capture is kept, marked incomplete, with what it holds.
    d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=cid[:12]), 10, "container watched again")
    # The dashboards' links to the container's captures survive the restart (newest ten, all states).
    linked = {s.labels["capture_id"]: s.labels["state"] for s in d.scrape().find("nstap_capture_info", container_id=cid[:12])}
    assert linked == {i: rows[i]["state"] for i in ids}
    status, body = d.api("/api/v1/captures", method="POST", body=json.dumps({"container": cid[:12], "duration": 20, "filter": "icmp"}).encode())
    assert status == 202, body
    running = body["id"]
    sh("ping", "-c", "15", "-i", "0.2", "-q", container_ip(cid))
    tcpdumps = d.children("tcpdump")
    assert tcpdumps
    d.kill()
    # Its tcpdumps die with it (parent-death signal), instead of holding the namespace open.
    wait_until(lambda: all(dead(p) for p in tcpdumps), 5, 0.1, "the killed daemon's tcpdumps are gone")
    d.start()
    status, row = d.api(f"/api/v1/captures/{running}")
    assert status == 200 and row["state"] == "incomplete" and row["bytes"] > 24 and row["packets"] > 0
    assert "stopped before" in row["error"]
    assert d.events("capture_store_recovered")
