"""A real Prometheus scrapes nstap: the target is healthy and per-container series can be queried."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import Containers, free_port, tool, wait_until

pytestmark = pytest.mark.docker


@pytest.fixture
def prometheus(tmp_path: Path):
    """Start Prometheus on loopback; yields a function that points it at a target."""
    procs: list[subprocess.Popen] = []

    def start(target: str) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
                    "scrape_configs": [{"job_name": "nstap", "static_configs": [{"targets": [target]}]}],
                }
            )
        )
        log = open(tmp_path / "prometheus.log", "wb")
        procs.append(
            subprocess.Popen(
                [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        return f"http://127.0.0.1:{port}"

    yield start
    for p in procs:
        p.terminate()
        p.wait(20)


def query(base: str, promql: str) -> list:
    """The result of an instant query; fails the test if Prometheus does not answer it."""
    with urllib.request.urlopen(f"{base}/api/v1/query?query={urllib.parse.quote(promql)}", timeout=5) as r:
        answer = json.load(r)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def poll(base: str, promql: str) -> list:
    """``query`` for wait_until: an empty result while Prometheus is still starting."""
    try:
        return query(base, promql)
    except OSError:
        return []


def test_prometheus_scrapes_nstap(nstap, prometheus, containers: Containers, docker_image: str) -> None:
    d = nstap()
    cid = containers.docker(docker_image, "httpd", "-f", "-p", "80", "-h", "/www", name="prom")
    d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=cid[:12]), 3)
    base = prometheus(f"127.0.0.1:{d.metrics_port}")
    up = wait_until(lambda: poll(base, 'up{job="nstap"} == 1'), 30, 0.5, "Prometheus scraped nstap")
    assert up[0]["metric"]["job"] == "nstap"
    series = wait_until(lambda: poll(base, f'nstap_interface_receive_packets_total{{container_id="{cid[:12]}",side="host"}}'), 15, 0.5)
    assert series[0]["metric"]["interface"].startswith("veth")
    joined = wait_until(
        lambda: poll(base, f'rate(nstap_interface_transmit_bytes_total{{side="container"}}[5s]) * on(container_id) group_left(image) nstap_container_info{{container_id="{cid[:12]}"}}'),
        15,
        0.5,
        "a rate joined with nstap_container_info",
    )
    assert joined[0]["metric"]["image"] == docker_image
    # No rejected samples over the whole run: Prometheus's own counters (from its /metrics; it
    # does not scrape itself here) exist and are zero.
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
        own = {s.name: s.value for f in text_string_to_metric_families(r.read().decode()) for s in f.samples}
    for counter in (
        "prometheus_target_scrapes_sample_duplicate_timestamp_total",
        "prometheus_target_scrapes_sample_out_of_order_total",
        "prometheus_target_scrapes_sample_out_of_bounds_total",
    ):
        assert own[counter] == 0, (counter, own.get(counter))
    assert own["prometheus_target_scrape_pools_total"] >= 1
    health = query(base, 'up{job="nstap"}')
    assert [float(r["value"][1]) for r in health] == [1.0]
