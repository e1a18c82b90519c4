"""A real Prometheus scrapes nstap: the target is healthy and per-container series can be queried."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
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


def served_ahead(d) -> float:
    return sum(s.value for s in d.scrape().find("nstap_metrics_renders_ahead_total", result="served"))


def test_scrapes_rendered_ahead_reach_prometheus_whole(nstap, prometheus, containers: Containers, docker_image: str) -> None:
    """Prometheus scrapes at a steady second: after a few scrapes its bodies are rendered ahead
    (metrics.render_ahead), gzip joined from the samples made ahead and the rest made at the
    scrape; Prometheus reads every one (up stays 1) and holds the same families of the container
    as a scrape rendered at once. A reload with render_ahead false renders every scrape at once."""
    d = nstap()
    cid = containers.docker(docker_image, "httpd", "-f", "-p", "80", "-h", "/www", name="ahead")
    d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=cid[:12]), 3)
    base = prometheus(f"127.0.0.1:{d.metrics_port}")
    wait_until(lambda: poll(base, 'up{job="nstap"} == 1'), 30, 0.5, "Prometheus scraped nstap")
    # Read from what Prometheus stored: the counter is in the part made at the scrape.
    served = wait_until(lambda: poll(base, 'nstap_metrics_renders_ahead_total{result="served"} >= 3'), 20, 0.5, "scrapes served ahead")
    assert float(served[0]["value"][1]) >= 3
    fresh = {s.name for s in d.scrape().samples if s.labels.get("container_id") == cid[:12]}  # no gzip: rendered at once
    assert {"nstap_interface_receive_bytes_total", "nstap_sockets", "nstap_container_info"} <= fresh

    def stored() -> set[str]:
        return {r["metric"]["__name__"] for r in poll(base, f'group by (__name__) ({{container_id="{cid[:12]}", job="nstap"}})')}

    wait_until(lambda: stored() == fresh, 10, 0.5, f"Prometheus's families of the container == a fresh scrape's (differing at first: {sorted(fresh ^ stored())})")
    assert float(query(base, 'min_over_time(up{job="nstap"}[10s])')[0]["value"][1]) == 1.0
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
        own = {s.name: s.value for f in text_string_to_metric_families(r.read().decode()) for s in f.samples}
    assert own["prometheus_target_scrapes_exceeded_sample_limit_total"] == 0
    assert own["prometheus_target_scrapes_sample_out_of_order_total"] == 0

    d.config["metrics"] = {"render_ahead": False}
    d.config_path.write_text(yaml.safe_dump(d.config))
    os.kill(d.proc.pid, signal.SIGHUP)
    assert "metrics" in wait_until(lambda: d.events("config_reloaded"), 5, message="config_reloaded")[0]["applied"]
    before = served_ahead(d)
    time.sleep(4)
    assert served_ahead(d) == before
    assert float(query(base, 'min_over_time(up{job="nstap"}[4s])')[0]["value"][1]) == 1.0
