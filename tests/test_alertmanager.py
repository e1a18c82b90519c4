"""A real Alertmanager calls the daemon's webhook: firing alerts start captures, resolved ones are recorded."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from conftest import Containers, free_port, tool, wait_until
from test_anomalies import download, finished_capture, tcpdump_lines

pytestmark = pytest.mark.docker


@pytest.fixture
def alertmanager(tmp_path: Path):
    """Start Alertmanager on loopback, routing every alert to a webhook URL with a bearer token file."""
    procs: list[subprocess.Popen] = []

    def start(webhook: str, token_file: Path) -> str:
        port = free_port()
        config = tmp_path / "alertmanager.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "route": {"receiver": "nstap", "group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h", "group_by": ["alertname", "container"]},
                    "receivers": [
                        {
                            "name": "nstap",
                            "webhook_configs": [
                                {
                                    "url": webhook,
                                    "send_resolved": True,
                                    "http_config": {"authorization": {"type": "Bearer", "credentials_file": str(token_file)}},
                                }
                            ],
                        }
                    ],
                }
            )
        )
        log = open(tmp_path / "alertmanager.log", "wb")
        procs.append(
            subprocess.Popen(
                [
                    tool("prometheus-alertmanager"),
                    f"--config.file={config}",
                    f"--storage.path={tmp_path / 'am-data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--cluster.listen-address=",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _ready(base), 30, 0.2, "alertmanager ready")
        return base

    yield start
    for p in procs:
        p.terminate()
        p.wait(20)


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def post_alert(base: str, labels: dict[str, str], ends: datetime | None = None) -> None:
    now = datetime.now(timezone.utc)
    alert = {"labels": labels, "annotations": {"summary": "test"}, "startsAt": (now - timedelta(seconds=5)).isoformat()}
    if ends is not None:
        alert["endsAt"] = ends.isoformat()
    request = urllib.request.Request(f"{base}/api/v2/alerts", data=json.dumps([alert]).encode(), headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=5) as r:
        assert r.status == 200


def test_alertmanager_webhook_starts_a_capture(nstap, alertmanager, containers: Containers, docker_image: str, tmp_path: Path) -> None:
    d = nstap({"capture": {"post_seconds": 2}})
    name_cid = containers.docker(docker_image, "httpd", "-f", "-p", "80", "-h", "/www", name="paged")
    name = Containers.inspect("docker", name_cid)["Name"].lstrip("/")
    d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=name_cid[:12]), 5)
    am = alertmanager(f"http://127.0.0.1:{d.api_port}/api/v1/alertmanager", d.data_dir / "api-token")
    labels = {"alertname": "NstapPagedTest", "container": name, "severity": "page"}
    post_alert(am, labels)

    def captured():
        status, body = d.api("/api/v1/captures?reason=alertmanager")
        return body["captures"] if status == 200 and body["captures"] else None

    captures = wait_until(captured, 30, 0.3, "a capture from Alertmanager's webhook")
    assert len(captures) == 1  # one alert, one capture, however often Alertmanager repeats itself
    capture = finished_capture(d, captures[0]["id"])
    assert capture["container"] == name and capture["kind"] == "NstapPagedTest" and capture["state"] == "complete"
    path = download(d, capture["id"], tmp_path / "paged.pcap")
    tcpdump_lines(path)  # opens
    assert d.api(f"/api/v1/captures/{capture['id']}/pcap", token=None)[0] == 401
    # The alert resolves: Alertmanager says so, the daemon records it, no new capture.
    post_alert(am, labels, ends=datetime.now(timezone.utc) - timedelta(seconds=1))

    def resolved():
        status, body = d.api("/api/v1/alerts")
        return [a for a in body["alerts"] if a["status"] == "resolved" and a["alertname"] == "NstapPagedTest"]

    wait_until(resolved, 30, 0.3, "the resolved notification")
    status, body = d.api("/api/v1/alerts")
    firing = [a for a in body["alerts"] if a["status"] == "firing"]
    assert firing and firing[-1]["capture_id"] == capture["id"] and firing[-1]["labels"]["container"] == name
    assert len(captured()) == 1
    assert d.scrape().value("nstap_captures_total", container_id=name_cid[:12], reason="alertmanager") == 1
