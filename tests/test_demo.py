"""make demo, against the daemon: the two broken containers show up as anomalies with captures."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import ROOT, sh, wait_until

pytestmark = pytest.mark.docker


def test_demo_shows_anomalies_and_a_capture(nstap, docker_image: str) -> None:
    d = nstap()
    env = {**os.environ, "NSTAP_DEMO_BREAK_AFTER": "4"}
    try:
        subprocess.run([str(ROOT / "deploy/demo.sh"), "up"], check=True, env=env, capture_output=True, cwd=ROOT, timeout=120)

        def seen():
            status, body = d.api("/api/v1/anomalies")
            kinds = {(a["container"], a["kind"]) for a in body["anomalies"]}
            return kinds if {("demo-flaky", "tcp_retransmits"), ("demo-stuck", "tcp_listen_overflows")} <= kinds else None

        wait_until(seen, 60, 0.5, "both demo anomalies")

        def downloadable():
            status, body = d.api("/api/v1/captures?container=demo-flaky")
            done = [c for c in body["captures"] if c["state"] == "complete"]
            return done[0] if done else None

        capture = wait_until(downloadable, 40, 0.5, "a finished capture of demo-flaky")
        assert capture["mode"] == "ring" and capture["pre_packets"] > 0
        assert d.api(f"/api/v1/captures/{capture['id']}/pcap")[0] == 200
    finally:
        subprocess.run([str(ROOT / "deploy/demo.sh"), "down"], check=True, capture_output=True, cwd=ROOT, timeout=120)
    assert sh("docker", "ps", "-aq", "--filter", "label=nstap.demo=1").stdout.strip() == ""
