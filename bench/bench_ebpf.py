#!/usr/bin/env python3
"""Benchmark: what an eBPF collector (the drop reasons, or DNS) costs the traffic and the daemon.

Two busybox containers in dockerd; iperf3 (the host's, run inside their network namespaces with
nsenter) sends TCP from one to the other for ``--seconds`` (20) while ``nstap run`` (1 s interval)
watches them with ``ebpf: off`` and ``ebpf: on``, three runs each, interleaved. Reports the
throughput of every run, the daemon's CPU during the transfer, and, with
``kernel.bpf_stats_enabled=1`` during a further 3 s transfer (off during the measured one: its two
clock reads per run cost the traffic too; restored afterwards), how often the kernel ran each
program and for how long (``bpftool prog show``): the per-event cost in the kernel. No per-packet work happens
in user space: the maps are read once per sampling round.

``--collector dns`` does the same with ``dns.mode`` off and on (and ``ebpf: off`` in both): the
DNS program runs on every packet of both containers' veths (egress and ingress) and lo, so the
transfer measures what it costs the traffic that is not DNS, the common case. A third mode,
``empty``, attaches a program that returns at once the same way (TCX links in both namespaces,
made by this script): the lower bound of any tc program here, measured in the same run, which
the DNS program's time per packet is reported against.

    make bench-ebpf
    make bench-ebpf ARGS="--seconds 10 --runs 2"
    make bench-ebpf ARGS="--collector dns"
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from bench_nat import cpu_seconds  # noqa: E402
from conftest import free_port  # noqa: E402
from images import ensure_image  # noqa: E402

LABEL = "nstap.bench=ebpf"
STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
STATS_SECONDS = 3  # the transfer during which the programs' run time is counted
PROGRAMS = {"drops": ("on_drop", "on_retransmit"), "dns": ("dns_egress", "dns_ingress")}
EMPTY = "int dns_egress(struct __sk_buff *skb) { return -1; }\nint dns_ingress(struct __sk_buff *skb) { return -1; }\n"


def empty_links(pids: list[int]) -> tuple[object, list]:
    """An empty tc program on every interface of the namespaces of ``pids`` (the lower bound):
    (the bcc object, the links; close both to detach)."""
    import threading  # noqa: PLC0415

    import bcc  # noqa: PLC0415 - only this mode needs it

    sys.path.insert(0, str(ROOT / "daemon"))
    from nstap.dns import tcx  # noqa: PLC0415

    program = bcc.BPF(text=EMPTY)
    egress, ingress = (program.load_func(name, bcc.BPF.SCHED_CLS).fd for name in ("dns_egress", "dns_ingress"))
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    links: list = []
    for pid in pids:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        worker = threading.Thread(target=lambda fd=fd: links.append(tcx.attach_namespace(fd, home, pid, egress, ingress)))
        worker.start()
        worker.join()
        os.close(fd)
    os.close(home)
    return program, links


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout.strip()


def prog_stats(collector: str) -> dict[str, tuple[int, int]]:
    """run_cnt and run_time_ns of nstap's programs, by name."""
    out: dict[str, tuple[int, int]] = {}
    for prog in json.loads(sh("bpftool", "prog", "show", "--json") or "[]"):
        name = prog.get("name", "")
        if name in PROGRAMS[collector]:
            cnt, ns = out.get(name, (0, 0))
            out[name] = (cnt + prog.get("run_cnt", 0), ns + prog.get("run_time_ns", 0))
    return out


def start_daemon(workdir: Path, mode: str, collector: str = "drops") -> tuple[subprocess.Popen, Path]:
    ebpf, dns = (mode, "off") if collector == "drops" else ("off", mode)
    config = {
        "interval": 1.0, "metrics_listen": f"127.0.0.1:{free_port()}", "api_listen": f"127.0.0.1:{free_port()}",
        "data_dir": str(workdir / "data"), "log_format": "json", "ebpf": ebpf, "dns": {"mode": dns},
        "runtimes": [{"name": "docker", "socket": "/var/run/docker.sock"}], "capture": {"ring": "off"}, "detect": {"capture": False},
    }
    path = workdir / "nstap.yaml"
    path.write_text(json.dumps(config))
    log = workdir / "nstap.log"
    proc = subprocess.Popen([sys.executable, "-m", "nstap", "run", "--config", str(path)], stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 30
    want = "watcher_attached" if mode == "off" else ("ebpf_loaded" if collector == "drops" else "dns_loaded")
    while want not in log.read_text():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"the daemon did not get ready: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    time.sleep(2)
    return proc, log


def iperf(server_pid: int, client_pid: int, server_ip: str, seconds: float) -> float:
    """Gbit/s of one TCP transfer from the client's namespace to the server's."""
    server = subprocess.Popen(["nsenter", "-t", str(server_pid), "-n", "iperf3", "-s", "-1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = sh("nsenter", "-t", str(client_pid), "-n", "iperf3", "-c", server_ip, "-t", str(int(seconds)), "-J")
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        server.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--collector", choices=("drops", "dns"), default="drops")
    parser.add_argument("--out", type=Path, help="default: bench/results/ebpf.json (dns: ebpf-dns.json)")
    args = parser.parse_args()
    args.out = args.out or ROOT / "bench" / "results" / ("ebpf.json" if args.collector == "drops" else "ebpf-dns.json")
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    image = ensure_image("docker")
    stats_before = STATS.read_text().strip() if STATS.exists() else None
    ids = [sh("docker", "run", "-d", "--label", LABEL, image, "sleep", "3600") for _ in range(2)]
    runs: list[dict] = []
    try:
        pids = [int(sh("docker", "inspect", "-f", "{{.State.Pid}}", cid)) for cid in ids]
        server_ip = sh("docker", "inspect", "-f", "{{.NetworkSettings.IPAddress}}", ids[0])
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.runs):
                for mode in ("off", "on") if args.collector == "drops" else ("off", "empty", "on"):
                    workdir = Path(tmp) / f"{mode}{i}"
                    workdir.mkdir()
                    proc, _log = start_daemon(workdir, "off" if mode == "empty" else mode, args.collector)
                    empty = empty_links(pids) if mode == "empty" else None
                    try:
                        cpu_before = cpu_seconds(proc.pid)
                        started = time.monotonic()
                        gbps = iperf(pids[0], pids[1], server_ip, args.seconds)  # kernel.bpf_stats_enabled=0: its clock reads cost per packet too
                        elapsed = time.monotonic() - started
                        cpu = cpu_seconds(proc.pid) - cpu_before
                        # Then a shorter transfer with the statistics on: the programs' time per run.
                        progs_before = prog_stats(args.collector)
                        if stats_before is not None and mode != "off":
                            STATS.write_text("1\n")
                            try:
                                iperf(pids[0], pids[1], server_ip, STATS_SECONDS)
                            finally:
                                STATS.write_text("0\n")
                        progs_after = prog_stats(args.collector)
                    finally:
                        proc.send_signal(signal.SIGTERM)
                        proc.wait(30)
                        if empty is not None:
                            for links in empty[1]:
                                links.close()
                            empty[0].cleanup()
                    run = {"mode": mode, "gbit_s": round(gbps, 3), "daemon_cpu_percent": round(100 * cpu / elapsed, 2)}
                    if mode != "off":
                        run["programs"] = {
                            name: {"runs": cnt - progs_before.get(name, (0, 0))[0], "ns": ns - progs_before.get(name, (0, 0))[1]}
                            for name, (cnt, ns) in progs_after.items()
                        }
                    runs.append(run)
                    print(json.dumps(run), flush=True)
    finally:
        sh("docker", "rm", "-f", *ids, check=False)
        if stats_before is not None:
            STATS.write_text(stats_before + "\n")
    off = [r["gbit_s"] for r in runs if r["mode"] == "off"]
    on = [r["gbit_s"] for r in runs if r["mode"] == "on"]
    events = sum(p["runs"] for r in runs if r["mode"] == "on" for p in r["programs"].values())
    kernel_ns = sum(p["ns"] for r in runs if r["mode"] == "on" for p in r["programs"].values())
    bound_events = sum(p["runs"] for r in runs if r["mode"] == "empty" for p in r["programs"].values())
    bound_ns = sum(p["ns"] for r in runs if r["mode"] == "empty" for p in r["programs"].values())
    result = {
        "collector": args.collector, "seconds": args.seconds, "runs": runs,
        "throughput_off_median_gbit_s": statistics.median(off), "throughput_on_median_gbit_s": statistics.median(on),
        "throughput_change_percent": round(100 * (statistics.median(on) - statistics.median(off)) / statistics.median(off), 2),
        "throughput_off_spread_percent": round(100 * (max(off) - min(off)) / statistics.median(off), 2),
        "throughput_on_spread_percent": round(100 * (max(on) - min(on)) / statistics.median(on), 2),
        "daemon_cpu_off_median_percent": statistics.median(r["daemon_cpu_percent"] for r in runs if r["mode"] == "off"),
        "daemon_cpu_on_median_percent": statistics.median(r["daemon_cpu_percent"] for r in runs if r["mode"] == "on"),
        "program_runs": events, "kernel_ns_per_run": round(kernel_ns / events, 1) if events else None,
    }
    if bound_events and events:
        empty = [r["gbit_s"] for r in runs if r["mode"] == "empty"]
        result.update({
            "throughput_empty_median_gbit_s": statistics.median(empty),
            "empty_program_ns_per_run": round(bound_ns / bound_events, 1),
            "kernel_ns_per_run_x_empty": round((kernel_ns / events) / (bound_ns / bound_events), 2),
        })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
