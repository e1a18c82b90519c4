"""From alert to pcap, end to end, with real components on loopback.

Prometheus and Alertmanager from Debian's packages run with the files of deploy/ (only addresses,
intervals and the token's path changed), and scrape a daemon that watches real dockerd containers.
A reset storm is induced for real; NstapContainerAnomaly fires; Alertmanager calls the webhook;
nstap captures; the pcap holds the storm. Then every query of both dashboards runs against that
Prometheus and must return a series, and the capture page is driven in Debian's headless chromium
(Selenium with its chromedriver). Screenshots of each page go to build/test-artifacts/.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import Containers, free_port, tool, wait_until
from test_anomalies import container_ip, download, finished_capture, in_netns, tcpdump_lines
from test_dns import ask_in, attached, host_dns_server
from test_ebpf import gateway

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "build" / "test-artifacts"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


class Processes:
    """Started processes, each stopped (and its log kept) at the end of the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, *argv: str) -> subprocess.Popen:
        log = open(self.tmp_path / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


@pytest.fixture
def processes(tmp_path: Path):
    procs = Processes(tmp_path)
    yield procs
    procs.stop()


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_alertmanager(processes: Processes, tmp_path: Path, webhook: str, token_file: Path) -> str:
    """deploy/alertmanager/alertmanager.yml with this test's webhook address, token path and short waits."""
    config = yaml.safe_load((ROOT / "deploy" / "alertmanager" / "alertmanager.yml").read_text())
    for route in config["route"]["routes"]:
        route.update(group_wait="1s", group_interval="2s")
    config["route"].update(group_wait="1s", group_interval="2s")
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            if receiver["name"] == "nstap-capture":
                hook["url"] = webhook
                hook["http_config"]["authorization"]["credentials_file"] = str(token_file)
            else:
                hook["url"] = f"http://127.0.0.1:{free_port()}/oncall"  # nobody there: Alertmanager logs it
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    processes.start(
        "alertmanager", tool("prometheus-alertmanager"), f"--config.file={path}", f"--storage.path={tmp_path / 'am'}",
        f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
    )
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: ready(f"{base}/-/ready"), 30, 0.2, "alertmanager ready")
    return base


def start_prometheus(processes: Processes, tmp_path: Path, target: str, alertmanager: str) -> str:
    """deploy/prometheus/prometheus.yml and nstap-rules.yml, scraping and evaluating every second."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ROOT / "deploy" / "prometheus" / "nstap-rules.yml")]
    config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [alertmanager.removeprefix("http://")]
    job = config["scrape_configs"][0]
    job.update(scrape_interval="1s", scrape_timeout="900ms", static_configs=[{"targets": [target]}])
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    processes.start(
        "prometheus", tool("prometheus"), f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    )
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: ready(f"{base}/-/ready"), 30, 0.2, "prometheus ready")
    return base


def reset_storm(ip: str, stop: threading.Event, limit: float = 90) -> threading.Thread:
    """SYNs to a closed port (every one answered by a RST) until ``stop`` or ``limit`` seconds."""

    def run() -> None:
        deadline = time.monotonic() + limit
        while not stop.is_set() and time.monotonic() < deadline:
            for _ in range(20):
                with socket.socket() as c:
                    c.settimeout(1)
                    c.connect_ex((ip, 81))
            stop.wait(0.1)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def dashboard_queries(substitute: dict[str, str]) -> list[tuple[str, str, str]]:
    """(dashboard, panel, expr) of every target and annotation of both dashboards, variables substituted."""
    out = []
    for name in ("nstap-host.json", "nstap-container.json"):
        board = json.loads((ROOT / "grafana" / "dashboards" / name).read_text())
        exprs = [(p.get("title", ""), t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
        exprs += [(f"annotation {a['name']}", a["expr"]) for a in board.get("annotations", {}).get("list", []) if a.get("expr")]
        for title, expr in exprs:
            for var, value in substitute.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, (title, expr)
            out.append((name, title, expr))
    return out


def range_query(base: str, expr: str, start: float, end: float) -> list:
    url = f"{base}/api/v1/query_range?" + urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "1"})
    answer = get_json(url)
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def chromium(download_dir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir), "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
    driver.implicitly_wait(10)  # an element is looked for until the page that holds it has loaded
    return driver


def test_alert_to_pcap_dashboards_and_capture_page(nstap, containers: Containers, docker_image: str, processes: Processes, tmp_path: Path) -> None:
    started = time.time()
    d = nstap({
        "ebpf": "auto",
        "interval": 0.5,
        "detect": {"resolve_after": 5, "capture": True},
        "capture": {"pre_seconds": 20, "post_seconds": 3, "ring": "labeled"},
        "nat": {"interval": 2, "conntrack_interval": 2},
    })
    port = free_port()
    cid = containers.docker(
        "--label", "nstap.capture=ring", "-p", f"127.0.0.1:{port}:80", docker_image, "httpd", "-f", "-p", "80", "-h", "/", name="e2e",
    )
    name = Containers.inspect("docker", cid)["Name"].lstrip("/")
    ip = container_ip(cid)
    pid = containers.pid("docker", cid)
    # The container's own firewall drops what comes to port 82 (the drill-down's firewall panel).
    rule = ("iptables", "-I", "INPUT", "-p", "tcp", "--dport", "82", "-j", "DROP")
    in_netns(pid, *rule)
    try:
        d.wait_metric(lambda m: m.value("nstap_flight_recorders_running") == 1 and m.find("nstap_nat_port_forward_info", container_id=cid[:12]), 20)
        token_file = tmp_path / "token"  # what deploy/alertmanager calls /etc/prometheus/nstap-webhook-token
        shutil.copy(d.data_dir / "webhook-token", token_file)
        am = start_alertmanager(processes, tmp_path, f"http://127.0.0.1:{d.api_port}/api/v1/alertmanager", token_file)
        prom = start_prometheus(processes, tmp_path, f"127.0.0.1:{d.metrics_port}", am)
        instance = f"127.0.0.1:{d.metrics_port}"
        wait_until(lambda: [t for t in get_json(f"{prom}/api/v1/targets")["data"]["activeTargets"] if t["health"] == "up"], 30, 0.5, "nstap scraped")
        # Some healthy traffic (published port, firewall), then the fault, for real.
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
                c.sendall(b"GET / HTTP/1.0\r\n\r\n")
                c.recv(100)
            with socket.socket() as c:
                c.settimeout(0.3)
                c.connect_ex((ip, 82))
        # DNS lookups, two of them failing (the DNS panels), to the test's server on docker0.
        with host_dns_server(gateway()):
            attached(d, cid)
            assert ask_in(pid, gateway(), "ok.test", 3) + ask_in(pid, gateway(), "nxe2e.test", 2) == ["NOERROR"] * 3 + ["NXDOMAIN"] * 2
        stop = threading.Event()
        storm = reset_storm(ip, stop)
        try:
            def alert_capture():
                status, body = d.api("/api/v1/alerts")
                return [a for a in body["alerts"] if a["alertname"] == "NstapContainerAnomaly" and a["capture_id"]] if status == 200 else None

            answered = wait_until(alert_capture, 60, 0.5, "the alert answered with a capture, through Alertmanager's webhook")
        finally:
            stop.set()
            storm.join(10)
        # The webhook answers an anomaly's alert with the capture nstap took at the anomaly (from
        # before its onset), rather than starting a second, later one.
        assert answered[0]["note"] == "the anomaly's own capture" and answered[0]["labels"]["container_id"] == cid[:12]
        capture = finished_capture(d, answered[0]["capture_id"])
        assert capture["container_id"] == cid[:12] and capture["reason"] == "anomaly" and capture["state"] == "complete"
        # (the capture of the anomaly the alert names: its own, or the one it shares with another
        # anomaly of the same fault, started first)
        kind = answered[0]["labels"]["kind"]
        events = d.api(f"/api/v1/anomalies?container={cid[:12]}&kind={kind}")[1]["anomalies"]
        assert capture["id"] in {e["capture_id"] for e in events}, (capture, events)
        # A capture of the webhook's own is only for an alert whose anomaly had none to give when it
        # came (Alertmanager sends another kind's group later: by then the storm has stopped and that
        # anomaly may have ended, as it did once in a loaded CI run).
        recorded = d.api("/api/v1/alerts")[1]["alerts"]
        for extra in d.api("/api/v1/captures?reason=alertmanager")[1]["captures"]:
            alert = next(a for a in recorded if a["capture_id"] == extra["id"])
            assert alert["note"] == "capture started", (extra, alert)
            same = d.api(f"/api/v1/anomalies?container={cid[:12]}&kind={alert['labels']['kind']}")[1]["anomalies"]
            assert not [
                e for e in same
                if e["capture_id"] and e["first_seen"] <= extra["created_at"] and (e["resolved_at"] is None or e["resolved_at"] > extra["created_at"])
            ], (extra, alert, same)
        alerts = get_json(f"{am}/api/v2/alerts")
        fired = [a for a in alerts if a["labels"]["alertname"] == "NstapContainerAnomaly"]
        # The storm is seen as resets and as the kernel's NO_SOCKET drops: an alert each, both for this container.
        assert {a["labels"]["kind"] for a in fired} <= {"tcp_reset_spike", "kernel_drops", "tcp_collapse"}  # (the storm's refused connections: collapse too)
        assert "tcp_reset_spike" in {a["labels"]["kind"] for a in fired}
        assert all(a["labels"]["container_id"] == cid[:12] and a["labels"]["container"] == name for a in fired)
        assert all(f"var-container={name}" in a["annotations"]["dashboard"] for a in fired)
        path = download(d, capture["id"], tmp_path / "alert.pcap")
        rsts = [line for line in tcpdump_lines(path, f"src host {ip} and tcp[tcpflags] & tcp-rst != 0") if f"{ip}.81 >" in line]
        assert len(rsts) >= 10, "the induced resets are not in the pcap the alert triggered"

        # Every panel and annotation query of both dashboards returns a series from this Prometheus.
        wait_until(lambda: d.scrape().find("nstap_kernel_drops_total", container_id=cid[:12])
                   and d.scrape().find("nstap_container_conntrack_entries", container_id=cid[:12])
                   and d.scrape().find("nstap_firewall_rule_packets_total", container_id=cid[:12])
                   and d.scrape().find("nstap_capture_info", container_id=cid[:12])
                   and d.scrape().find("nstap_dns_requests_total", container_id=cid[:12]), 30, 0.5, "kernel drops, conntrack, firewall, captures, DNS")
        time.sleep(6)  # a few more scrapes of them
        substitute = {"$__rate_interval": "10s", "$__range": f"{int(time.time() - started) + 60}s", "$instance": instance, "$container": name, "$host": ".*"}
        empty = [(board, title, expr) for board, title, expr in dashboard_queries(substitute)
                 if not range_query(prom, expr, started, time.time())]
        assert not empty, "queries without a series:\n" + "\n".join(f"{b} / {t}: {e}" for b, t, e in empty)
        for label, match in (("instance", "nstap_build_info"), ("container", f'nstap_container_info{{instance="{instance}"}}')):
            values = get_json(f"{prom}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": match}))["data"]
            assert (instance if label == "instance" else name) in values  # the dashboards' variables offer them

        # The capture page in a real browser.
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        from selenium.webdriver.common.by import By

        driver = chromium(downloads)
        try:
            ui = f"http://127.0.0.1:{d.api_port}"
            driver.get(f"{ui}/ui/captures/{capture['id']}")  # a link from Grafana, before logging in
            assert "/ui/login" in driver.current_url and name not in driver.page_source and "download-pcap" not in driver.page_source
            driver.save_screenshot(str(ARTIFACTS / "1-login.png"))
            driver.find_element(By.ID, "token").send_keys("not-the-token-at-all")
            driver.find_element(By.ID, "login").click()
            assert driver.find_element(By.ID, "login-error") and "download-pcap" not in driver.page_source
            assert "NstapContainerAnomaly" not in driver.page_source and name not in driver.page_source
            driver.find_element(By.ID, "token").send_keys((d.data_dir / "api-token").read_text().strip())
            driver.find_element(By.ID, "login").click()
            wait_until(lambda: driver.current_url.endswith(f"/ui/captures/{capture['id']}"), 10, 0.1, "back to the capture after the login")
            assert not driver.execute_script("return document.cookie")  # HttpOnly: scripts never see the session
            driver.get(f"{ui}/ui/")
            driver.find_element(By.LINK_TEXT, name).click()  # the container
            wait_until(lambda: "/ui/containers/" in driver.current_url, 10, 0.1)
            driver.save_screenshot(str(ARTIFACTS / "2-container.png"))
            assert "tcp_reset_spike" in driver.page_source
            driver.find_element(By.LINK_TEXT, capture["id"]).click()  # the alert's capture
            wait_until(lambda: driver.current_url.endswith(f"/ui/captures/{capture['id']}"), 10, 0.1)
            driver.save_screenshot(str(ARTIFACTS / "3-capture.png"))
            page = driver.page_source
            assert "NstapContainerAnomaly" in page and driver.find_element(By.ID, "evidence").text.strip().startswith("{")
            assert "onset" in driver.find_element(By.ID, "anomaly").text  # the anomaly the alert reported, with its numbers
            driver.find_element(By.ID, "download-pcap").click()
            pcap = wait_until(lambda: [p for p in downloads.glob("*.pcap")], 20, 0.2, "the pcap downloaded by the browser")[0]
            assert len(tcpdump_lines(pcap)) == capture["packets"]  # tcpdump -r reads it, whole
            # A manual capture from the container's page.
            driver.find_element(By.PARTIAL_LINK_TEXT, name).click()
            driver.find_element(By.NAME, "duration").clear()
            driver.find_element(By.NAME, "duration").send_keys("1")
            driver.find_element(By.ID, "start-capture").click()
            wait_until(lambda: re.search(r"/ui/captures/[0-9TZ]+-[0-9a-f]+$", driver.current_url), 10, 0.1, "the new capture's page")
            manual_id = driver.current_url.rsplit("/", 1)[1]
            assert finished_capture(d, manual_id)["reason"] == "manual"
            driver.refresh()
            assert driver.find_element(By.ID, "capture-state").text.startswith("complete")
            driver.save_screenshot(str(ARTIFACTS / "4-manual-capture.png"))
            # The CSP forbids scripts: the browser reports none ran and none was allowed.
            logs = driver.get_log("browser")
            assert not [entry for entry in logs if "Content Security Policy" in entry.get("message", "")], logs
        finally:
            driver.quit()
    finally:
        in_netns(pid, "iptables", "-D", *rule[2:], check=False)
    assert d.scrape().value("nstap_capture_info", container_id=cid[:12], capture_id=capture["id"]) is not None
