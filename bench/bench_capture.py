#!/usr/bin/env python3
"""Benchmark: flight recorders on every container, and how fast an anomaly becomes a running capture.

Starts N busybox httpd containers (50 by default) with light traffic (one HTTP request per
container per second from the host), runs ``nstap run`` with ``capture.ring: all`` (a tcpdump
flight recorder per namespace), and reports:

* CPU of the daemon plus all its tcpdump processes, per container and per container-sample,
  over the measured window;
* for K containers, an anomaly induced for real (a burst of connections to a closed port: a
  reset storm): time from the burst to the anomaly sample, from the anomaly sample to its
  capture running, and whether the finished capture holds packets from before its trigger.

    .venv/bin/python bench/bench_capture.py [--containers N] [--duration S] [--anomalies K]

Target: the capture runs within one sampling interval of the anomaly sample; pre-trigger
packets in 100% of flight-recorder captures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_containers import Traffic, container_ips, ensure_image, start_container  # noqa: E402
from bench_sampling import ROOT, cpu_seconds, metric, rss_mib, scrape  # noqa: E402


def children_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each live child of ``pid`` (the tcpdumps)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out[int(entry.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def api(port: int, token: str, path: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.load(r)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--containers", type=int, default=50)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--anomalies", type=int, default=5)
    args = parser.parse_args()
    image = ensure_image("docker")
    workdir = Path(tempfile.mkdtemp(prefix="nstap-bench-"))
    ids: list[str] = []
    daemon = None
    traffic = None
    try:
        for i in range(args.containers):
            ids.append(start_container(image, f"nstap-bench-ring-{i}"))
        ips = container_ips(ids)
        port = 19880 + os.getpid() % 1000
        (workdir / "nstap.yaml").write_text(
            f"interval: 1\nmetrics_listen: 127.0.0.1:{port}\napi_listen: 127.0.0.1:{port + 1}\n"
            f"data_dir: {workdir}/data\nlog_format: json\nlog_level: warning\n"
            "capture: {ring: all, ring_bytes: 2097152, post_seconds: 3, pre_seconds: 5, max_concurrent: 8}\n"
        )
        log = open(workdir / "nstap.log", "wb")
        daemon = subprocess.Popen([str(ROOT / ".venv/bin/nstap"), "run", "--config", str(workdir / "nstap.yaml")], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while True:
            try:
                _, text = scrape(port)
                if metric(text, "nstap_flight_recorders_running") >= args.containers:
                    break
            except (OSError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the flight recorders did not all start within 90 s")
            time.sleep(0.5)
        token = (workdir / "data/api-token").read_text().strip()
        traffic = Traffic(ips)
        traffic.start()
        time.sleep(5)

        _, text = scrape(port)
        s0, d0, c0, t0 = metric(text, "nstap_sample_duration_seconds_count"), cpu_seconds(daemon.pid), children_cpu(daemon.pid), time.monotonic()
        time.sleep(args.duration)
        d1, c1, t1 = cpu_seconds(daemon.pid), children_cpu(daemon.pid), time.monotonic()
        _, text = scrape(port)
        samples = metric(text, "nstap_sample_duration_seconds_count") - s0
        tcpdump_cpu = sum(c1[p] - c0[p] for p in c1 if p in c0)
        seconds = t1 - t0
        daemon_cpu = d1 - d0

        detect, start, pre = [], [], []
        for i, (cid, ip) in enumerate(list(zip(ids, ips))[: args.anomalies]):
            burst = time.time()
            for _ in range(200):
                with socket.socket() as c:
                    c.settimeout(1)
                    c.connect_ex((ip, 81))
            event = None
            while event is None and time.time() - burst < 20:
                found = api(port + 1, token, f"/api/v1/anomalies?container={cid[:12]}&kind=tcp_reset_spike")["anomalies"]
                event = found[0] if found and found[0]["capture_id"] else None
                time.sleep(0.05)
            if event is None:
                raise SystemExit(f"no anomaly for {cid[:12]}")
            capture = api(port + 1, token, f"/api/v1/captures/{event['capture_id']}")
            detect.append(event["first_seen"] - burst)
            start.append(capture["created_at"] - event["first_seen"])
            while capture["state"] == "running":
                time.sleep(0.2)
                capture = api(port + 1, token, f"/api/v1/captures/{event['capture_id']}")
            pre.append(capture["pre_packets"] > 0)
        result = {
            "containers": args.containers,
            "measured_s": round(seconds, 1),
            "daemon_cpu_percent": round(daemon_cpu / seconds * 100, 1),
            "tcpdump_cpu_percent": round(tcpdump_cpu / seconds * 100, 1),
            "cpu_ms_per_container_second": round((daemon_cpu + tcpdump_cpu) / seconds / args.containers * 1000, 3),
            "cpu_ms_per_container_sample": round((daemon_cpu + tcpdump_cpu) / samples * 1000, 3),
            "daemon_rss_mib": round(rss_mib(daemon.pid), 1),
            "daemon_threads": len(os.listdir(f"/proc/{daemon.pid}/task")),
            "burst_to_anomaly_s_max": round(max(detect), 2),
            "anomaly_to_capture_running_s_max": round(max(start), 3),
            "anomaly_to_capture_running_s_median": round(statistics.median(start), 3),
            "captures_with_pre_trigger_packets": f"{sum(pre)}/{len(pre)}",
            "http_requests": traffic.requests,
        }
        print(json.dumps(result))
        print()
        print("| containers (all with a flight recorder) | daemon CPU | tcpdump CPU (all) | CPU per container-sample (daemon + tcpdump) | burst → anomaly sample (max) | anomaly sample → capture running (median / max) | captures with pre-trigger packets |")
        print("|---|---|---|---|---|---|---|")
        print(
            f"| {args.containers} | {result['daemon_cpu_percent']} % | {result['tcpdump_cpu_percent']} % | {result['cpu_ms_per_container_sample']} ms | "
            f"{result['burst_to_anomaly_s_max']} s | {result['anomaly_to_capture_running_s_median']} / {result['anomaly_to_capture_running_s_max']} s | "
            f"{result['captures_with_pre_trigger_packets']} |"
        )
        return 0
    finally:
        if traffic is not None:
            traffic.stop.set()
            traffic.join()
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)
        subprocess.run(["rm", "-rf", str(workdir)])


if __name__ == "__main__":
    raise SystemExit(main())
