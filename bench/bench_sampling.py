#!/usr/bin/env python3
"""Benchmark: nstap's cost per container-sample, memory, scrape time, and start-to-first-sample.

Starts N busybox httpd containers in dockerd, drives light HTTP traffic to each from the host
(one request per container per second), runs ``nstap run`` at a 1 s interval for the measured
window while scraping it every 15 s like Prometheus would, and reports:

* daemon CPU per container-sample (user+system of the whole process, threads included, divided
  by the samples it took), next to the lower bound of ``../shared/tools/nslimit.c`` (C, kept
  descriptors, no parsing) measured on the same containers;
* RSS, /metrics scrape time and size;
* time from ``docker run`` returning to the container's first sample in /metrics;
* how late the sampling ticks started (``nstap_tick_lag_seconds``, p50/p99/max bucket): what
  anything blocking the event loop costs.

With ``--capture-load``, one more container has a flight recorder (``--ring-bytes``, 8 MiB) and is
downloaded from without pause, so its ring stays full, and every 3-7 s a capture with 60 s of
pre-trigger packets is taken from it: the whole ring is read back while the ticks go on.
``--scrape-every 1`` scrapes every second (jittered) instead of every 15.

    make bench                          # 50 containers, 60 s
    make bench ARGS="--containers 200"  # or --large
    make bench ARGS="--child-ehash 1024" # namespaces with their own TCP hash (see README)
    make bench ARGS="--large --scrape-every 1 --capture-load"   # tick lateness under load

Everything it starts is removed at the end, and tcp_child_ehash_entries is restored.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from images import ensure_image  # noqa: E402

LABEL = "nstap.bench=1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
EHASH = Path("/proc/sys/net/ipv4/tcp_child_ehash_entries")


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def scrape(port: int) -> tuple[float, str]:
    """GET /metrics as Prometheus does (gzip accepted); returns (seconds, uncompressed text)."""
    t0 = time.perf_counter()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=30) as r:
        body = r.read()
        seconds = time.perf_counter() - t0  # the scraper's own decompression is not nstap's time
        if r.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
    return seconds, body.decode()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{}"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def start_container(image: str, name: str, *extra: str) -> str:
    return sh("docker", "run", "-d", "--label", LABEL, *extra, "--name", name, image, "httpd", "-f", "-p", "80", "-h", "/www")


BIG_WEB = ("sh", "-c", "dd if=/dev/urandom of=/www/big bs=1024 count=4096 2>/dev/null; exec httpd -f -p 80 -h /www")


class CaptureLoad(threading.Thread):
    """Downloads from a flight-recorded container without pause and takes a capture with 60 s of
    pre-trigger packets from it every 3-7 s (each reads its whole ring back)."""

    def __init__(self, ip: str, name: str, api_port: int, token: str) -> None:
        super().__init__(daemon=True)
        self.ip, self.name, self.api_port, self.token = ip, name, api_port, token
        self.stop = threading.Event()
        self.captures: list[str] = []
        self.downloader = threading.Thread(target=self._download, daemon=True)

    def _download(self) -> None:
        while not self.stop.is_set():
            subprocess.run(["busybox", "wget", "-q", "-O", "/dev/null", f"http://{self.ip}/big"], capture_output=True, timeout=60)

    def run(self) -> None:
        self.downloader.start()
        while not self.stop.wait(random.uniform(3, 7)):  # jittered, like the scrapes
            body = json.dumps({"container": self.name, "duration": 3, "pre_seconds": 60}).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{self.api_port}/api/v1/captures", data=body, method="POST",
                headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as r:
                    self.captures.append(json.load(r)["mode"])
            except OSError:
                self.captures.append("refused")


def lag_quantiles(before: str, after: str) -> dict[str, float]:
    """p50, p99 and the largest bucket of nstap_tick_lag_seconds between two scrapes (bucket bounds, ms)."""
    def buckets(text: str) -> dict[float, float]:
        out = {}
        for line in text.splitlines():
            if line.startswith("nstap_tick_lag_seconds_bucket{"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                out[float(le)] = float(line.rsplit(" ", 1)[1])
        return out

    b0, b1 = buckets(before), buckets(after)
    if not b1:
        return {}
    bounds = sorted(b1)
    total = b1[float("inf")] - b0.get(float("inf"), 0.0)
    out = {}
    for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
        for bound in bounds:
            if total and (b1[bound] - b0.get(bound, 0.0)) / total >= q:
                out[name] = bound * 1000
                break
    out["ticks"] = total
    previous = 0.0
    out["histogram"] = {}
    for bound in bounds:
        count = b1[bound] - b0.get(bound, 0.0)
        out["histogram"][f"<={bound * 1000:g}ms"] = count - previous
        previous = count
    return out


def container_ips(ids: list[str]) -> list[str]:
    out = sh("docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", *ids)
    return out.split()


class Traffic(threading.Thread):
    """One HTTP request per container per second from the host, until stopped."""

    def __init__(self, ips: list[str]) -> None:
        super().__init__(daemon=True)
        self.ips = ips
        self.stop = threading.Event()
        self.requests = 0

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            for ip in self.ips:
                try:
                    with urllib.request.urlopen(f"http://{ip}/index.html", timeout=2) as r:
                        r.read()
                    self.requests += 1
                except OSError:
                    pass
            self.stop.wait(max(0.0, 1.0 - (time.monotonic() - t0)))


def nslimit(pids: list[int]) -> float | None:
    """Lower bound (µs per namespace-sample: 4 proc files + LISTEN sock_diag) from the shared tool."""
    source = ROOT.parent / "shared/tools/nslimit.c"
    if not source.exists() or not shutil.which("gcc"):
        return None
    binary = Path(tempfile.gettempdir()) / "nstap-nslimit"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(source)], check=True)
    out = sh(str(binary), "2000", *map(str, pids))
    parts = out.split()
    return float(parts[1]) + float(parts[3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--containers", type=int, default=50)
    parser.add_argument("--large", action="store_true", help="200 containers")
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--child-ehash", type=int, default=0, help="set tcp_child_ehash_entries before starting containers")
    parser.add_argument("--first-sample-probes", type=int, default=5)
    parser.add_argument("--scrape-every", type=float, default=15.0, help="seconds between scrapes during the measured window")
    parser.add_argument("--capture-load", action="store_true", help="a flight-recorded container downloaded from, captured every 5 s")
    parser.add_argument("--ring-bytes", type=int, default=8 * 1024 * 1024, help="capture.ring_bytes (with --capture-load)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    n = 200 if args.large else args.containers
    image = ensure_image("docker")
    old_ehash = EHASH.read_text().strip() if EHASH.exists() else None
    workdir = Path(tempfile.mkdtemp(prefix="nstap-bench-"))
    daemon = None
    traffic = None
    load = None
    ids: list[str] = []
    try:
        if args.child_ehash and old_ehash is not None:
            EHASH.write_text(str(args.child_ehash))
        print(f"starting {n} containers ...", file=sys.stderr)
        for i in range(n):
            ids.append(start_container(image, f"nstap-bench-{i}"))
        ips = container_ips(ids)
        pids = [int(p) for p in sh("docker", "inspect", "-f", "{{.State.Pid}}", *ids).split()]
        if args.capture_load:
            ids.append(sh("docker", "run", "-d", "--label", LABEL, "--label", "nstap.capture=ring", "--name", "nstap-bench-ring", image, *BIG_WEB))
        port = 19880 + os.getpid() % 1000
        config = workdir / "nstap.yaml"
        config.write_text(
            f"interval: 1\nmetrics_listen: 127.0.0.1:{port}\napi_listen: 127.0.0.1:{port + 1}\n"
            f"data_dir: {workdir}/data\nlog_format: json\nlog_level: warning\n"
            f"capture: {{ring_bytes: {args.ring_bytes}, pre_seconds: 60, max_seconds: 120}}\n"
        )
        log = open(workdir / "nstap.log", "wb")
        daemon = subprocess.Popen([str(ROOT / ".venv/bin/nstap"), "run", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                _, text = scrape(port)
                if metric(text, "nstap_namespaces_watched") >= n + (1 if args.capture_load else 0):
                    break
            except (OSError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit("nstap did not attach to every container within 60 s")
            time.sleep(0.2)
        traffic = Traffic(ips)
        traffic.start()
        if args.capture_load:
            token = (workdir / "data/api-token").read_text().strip()
            load = CaptureLoad(container_ips([ids[-1]])[0], "nstap-bench-ring", port + 1, token)
            load.start()
            time.sleep(20)  # the ring fills
        time.sleep(5)  # warm-up: the first walks and layouts are done, traffic is flowing

        _, text = scrape(port)
        lag_text0 = text
        samples0, cpu0, t0 = metric(text, "nstap_sample_duration_seconds_count"), cpu_seconds(daemon.pid), time.monotonic()
        scrapes: list[tuple[float, int]] = []
        next_scrape = t0
        while time.monotonic() - t0 < args.duration:
            if time.monotonic() >= next_scrape:
                seconds, text = scrape(port)
                scrapes.append((seconds, len(text.encode())))
                # Jittered: a scraper at a fixed phase to the 1 s ticks would meet them always or never.
                next_scrape += args.scrape_every * random.uniform(0.5, 1.5)
            time.sleep(0.01)
        cpu1, t1 = cpu_seconds(daemon.pid), time.monotonic()
        traffic.stop.set()
        if load is not None:
            load.stop.set()
        _, text = scrape(port)
        lag = lag_quantiles(lag_text0, text)
        samples1 = metric(text, "nstap_sample_duration_seconds_count")
        samples = samples1 - samples0
        per_sample_ms = (cpu1 - cpu0) / samples * 1000
        walks = metric(text, "nstap_socket_walk_cpu_seconds_count")

        first_sample = []
        for i in range(args.first_sample_probes):
            start = time.monotonic()
            cid = start_container(image, f"nstap-bench-probe-{i}")
            ids.append(cid)
            while True:
                _, text = scrape(port)
                if f'container_id="{cid[:12]}"' in text and "nstap_sample_timestamp_seconds{" in text and any(
                    line.startswith("nstap_sample_timestamp_seconds{") and cid[:12] in line for line in text.splitlines()
                ):
                    first_sample.append(time.monotonic() - start)
                    break
                if time.monotonic() - start > 10:
                    first_sample.append(float("inf"))
                    break
                time.sleep(0.02)
        lower = nslimit(pids[: min(len(pids), 50)])
        result = {
            "containers": n,
            "interval_s": 1.0,
            "measured_s": round(t1 - t0, 1),
            "samples": int(samples),
            "cpu_ms_per_container_sample": round(per_sample_ms, 3),
            "daemon_cpu_percent": round((cpu1 - cpu0) / (t1 - t0) * 100, 1),
            "lower_bound_ms": round(lower / 1000, 3) if lower else None,
            "multiple_of_lower_bound": round(per_sample_ms / (lower / 1000), 2) if lower else None,
            "rss_mib": round(rss_mib(daemon.pid), 1),
            "scrape_ms_median": round(statistics.median(s for s, _ in scrapes) * 1000, 1),
            "scrape_ms_max": round(max(s for s, _ in scrapes) * 1000, 1),
            "scrape_kib": round(statistics.median(b for _, b in scrapes) / 1024, 1),
            "socket_walks": int(walks),
            "first_sample_s_median": round(statistics.median(first_sample), 2),
            "first_sample_s_max": round(max(first_sample), 2),
            "http_requests": traffic.requests,
            "child_ehash": args.child_ehash,
            "scrape_every_s": args.scrape_every,
            "tick_lag_ms": lag,
            "captures": dict((m, load.captures.count(m)) for m in set(load.captures)) if load is not None else None,
        }
        print(json.dumps(result))
        print()
        print("| containers | CPU per container-sample | lower bound (nslimit) | daemon CPU | RSS | scrape (median/max) | scrape size | start → first sample (median/max) |")
        print("|---|---|---|---|---|---|---|---|")
        lb = f"{result['lower_bound_ms']} ms (×{result['multiple_of_lower_bound']})" if lower else "n/a"
        print(
            f"| {n} | {result['cpu_ms_per_container_sample']} ms | {lb} | {result['daemon_cpu_percent']} % | "
            f"{result['rss_mib']} MiB | {result['scrape_ms_median']} / {result['scrape_ms_max']} ms | {result['scrape_kib']} KiB | "
            f"{result['first_sample_s_median']} / {result['first_sample_s_max']} s |"
        )
        if lag:
            print(f"\ntick lag (ms, bucket bounds): p50 {lag.get('p50')}  p99 {lag.get('p99')}  max {lag.get('max')}  over {int(lag['ticks'])} ticks")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return 0
    finally:
        if traffic is not None:
            traffic.stop.set()
            traffic.join()
        if load is not None:
            load.stop.set()
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)
        if args.child_ehash and old_ehash is not None:
            EHASH.write_text(old_ehash)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
