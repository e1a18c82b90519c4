"""What an evidence snapshot costs in a namespace full of sockets.

Makes a network namespace (``ip netns add``), opens N TCP connections on its loopback inside it
(2N sockets, plus the listener), then takes the namespace-side part of an evidence snapshot (the
sock_diag dump with tcp_info, UDP tables, protocol counters: what runs in nstap's worker thread)
R times through :class:`nstap.netns.evidence.NamespaceRunner`, as the daemon does, and prints the
CPU it took (median, max), the sockets listed and counted, and the size of the JSON.

    .venv/bin/python bench/bench_evidence.py [--connections 5000] [--rounds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid

from nstap.netns.evidence import NamespaceRunner, sockets_and_counters_here

HOLDER = r"""
import resource, socket, sys, time
n = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (2 * n + 100, 2 * n + 100))
lo = socket.socket(); lo.bind(("127.0.0.1", 0)); lo.listen(4096)
port = lo.getsockname()[1]
held = []
for _ in range(n):
    c = socket.create_connection(("127.0.0.1", port))
    s, _ = lo.accept()
    held += [c, s]
print("ready", flush=True)
sys.stdin.read()
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=5000, help="TCP connections (2 sockets each)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--limit", type=int, default=5000, help="sockets listed (the daemon's default)")
    args = parser.parse_args()
    name = f"nstap-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    holder = None
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        holder = subprocess.Popen(
            ["ip", "netns", "exec", name, sys.executable, "-c", HOLDER, str(args.connections)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready", "the socket holder did not start"
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            result = asyncio.run(measure(fd, args.rounds, args.limit))
        finally:
            os.close(fd)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        subprocess.run(["ip", "netns", "del", name], check=False)
    print(json.dumps(result))
    print(
        f"{result['sockets_total']} TCP sockets ({result['sockets_listed']} listed): CPU median {result['cpu_ms_median']:.1f} ms, "
        f"max {result['cpu_ms_max']:.1f} ms; wall median {result['wall_ms_median']:.1f} ms; JSON {result['json_bytes'] / 1e6:.2f} MB"
    )
    return 0


async def measure(fd: int, rounds: int, limit: int) -> dict:
    runner = NamespaceRunner()
    cpu, wall = [], []
    snap = {}
    try:
        for _ in range(rounds):
            c0, w0 = time.process_time(), time.perf_counter()
            snap = await runner.run(fd, lambda: sockets_and_counters_here(limit=limit))
            cpu.append((time.process_time() - c0) * 1000)
            wall.append((time.perf_counter() - w0) * 1000)
    finally:
        runner.close()
    return {
        "sockets_total": snap["tcp"]["total"],
        "sockets_listed": len(snap["tcp"]["sockets"]),
        "rounds": rounds,
        "cpu_ms_median": round(statistics.median(cpu), 2),
        "cpu_ms_max": round(max(cpu), 2),
        "wall_ms_median": round(statistics.median(wall), 2),
        "json_bytes": len(json.dumps(snap, separators=(",", ":"))),
    }


if __name__ == "__main__":
    sys.exit(main())
