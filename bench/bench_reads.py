#!/usr/bin/env python3
"""Benchmark: what each kernel read nstap makes costs, with nstap's own code, on real containers.

Two busybox httpd containers are started: one in a namespace sharing the host's TCP established
hash (the default) and one created after ``net.ipv4.tcp_child_ehash_entries`` was set, which has
its own. For each it reports CPU µs per call (user+system, this process) of:

* each /proc/net file nstap reads (``pread`` on a kept descriptor);
* a LISTEN sock_diag dump vs the exact lookups nstap uses for known listeners;
* a per-state TCP walk (one address family).

    .venv/bin/python bench/bench_reads.py [--rounds N]

The containers are removed and the sysctl restored at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "daemon"))
sys.path.insert(0, str(ROOT / "tests"))
from images import ensure_image  # noqa: E402
from nstap.netns import netlink  # noqa: E402
from nstap.netns.handles import NamespaceOpener  # noqa: E402
from nstap.samplers.sockets import TCP_LISTEN_MASK, TCP_WALK_MASK  # noqa: E402

EHASH = Path("/proc/sys/net/ipv4/tcp_child_ehash_entries")


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def per_call_us(fn, rounds: int) -> float:
    fn()
    start = cpu()
    for _ in range(rounds):
        fn()
    return (cpu() - start) / rounds * 1e6


def start(image: str, name: str) -> str:
    cid = subprocess.run(
        ["docker", "run", "-d", "--label", "nstap.bench=1", "--name", name, image, "httpd", "-f", "-p", "80", "-h", "/www"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    return cid


async def measure(pid: int, rounds: int) -> dict[str, float]:
    opener = NamespaceOpener()
    handles = await opener.open(pid)
    try:
        out = {}
        for name, f in handles.proc.items():
            out[f"pread /proc/net/{name}"] = per_call_us(f.read, rounds)
        listeners = netlink.dump_inet(handles.diag, socket.AF_INET6, socket.IPPROTO_TCP, TCP_LISTEN_MASK)
        request = netlink.LookupRequest(socket.AF_INET6, socket.IPPROTO_TCP, TCP_LISTEN_MASK, [s.sockid for s in listeners])
        out["LISTEN dump (IPv6)"] = per_call_us(lambda: netlink.dump_inet(handles.diag, socket.AF_INET6, socket.IPPROTO_TCP, TCP_LISTEN_MASK), rounds)
        out[f"exact lookup of {len(listeners)} listener(s)"] = per_call_us(lambda: netlink.lookup_inet(handles.diag, request), rounds)
        out["TCP state walk (IPv4)"] = per_call_us(
            lambda: netlink.dump_inet(handles.diag_walk, socket.AF_INET, socket.IPPROTO_TCP, TCP_WALK_MASK), max(rounds // 20, 10)
        )
        return out
    finally:
        handles.close()
        opener.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    image = ensure_image("docker")
    old = EHASH.read_text().strip()
    ids = []
    try:
        EHASH.write_text("0")
        ids.append(start(image, f"nstap-bench-shared-{os.getpid()}"))
        EHASH.write_text("1024")
        ids.append(start(image, f"nstap-bench-own-{os.getpid()}"))
        EHASH.write_text(old)
        pids = [int(subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", c], capture_output=True, text=True).stdout) for c in ids]
        shared = asyncio.run(measure(pids[0], args.rounds))
        own = asyncio.run(measure(pids[1], args.rounds))
        print("| read | shared TCP hash (default) | own TCP hash (tcp_child_ehash_entries=1024) |")
        print("|---|---|---|")
        for key in shared:
            print(f"| {key} | {shared[key]:.1f} µs | {own[key]:.1f} µs |")
        return 0
    finally:
        EHASH.write_text(old)
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)


if __name__ == "__main__":
    raise SystemExit(main())
