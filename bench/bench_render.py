#!/usr/bin/env python3
"""Benchmark: what rendering ``/metrics`` costs, without the rest of the daemon.

N synthetic containers (lo, eth0 and its host veth, every protocol counter, the socket families, one
listening port, three kernel drop reasons: the series a plain busybox httpd container has) are put in a registry and sample store, and
the exporter renders them as a scrape does; then gzip level 1 of the text, as the server sends it.
Reports the best of ``--rounds`` runs of each, in ms of CPU, and the text's lines and bytes. No container,
no kernel read: this isolates the renderer, which a scrape in the daemon also runs beside the
sampling rounds (the scrape figures of ``make bench`` include that contention). Then the body a
scrape gets (the server's own function, in a thread): its CPU, and the process's resident memory
before the first of those renders, after them, and at its peak while they ran; and that body's wall
time alone and beside a thread busy with Python as the event loop is in a sampling round (the
render thread waits for the GIL each time it gave it up).

    .venv/bin/python bench/bench_render.py [--containers 500] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "daemon"))
from prometheus_client import generate_latest  # noqa: E402

from nstap.api.ahead import scrape_body  # noqa: E402
from nstap.exporter import ContainerCollector, build_registry  # noqa: E402
from nstap.registry import ContainerRegistry  # noqa: E402
from nstap.runtime.records import ContainerRecord  # noqa: E402
from nstap.samplers.protocols import PROTOCOL_COUNTERS  # noqa: E402
from nstap.samplers.sockets import STATE_NAMES  # noqa: E402
from nstap.samples import InterfaceCounters, ListenQueue, NamespaceSample, SampleStore, SocketSample  # noqa: E402


class Runtime:
    name, kind, version, up, events_total, reconnects_total = "docker", "docker", "28.0", True, 0, 0


# Three of the kernel's drop reasons (kfree_skb): a namespace with traffic shows a few.
DROP_REASONS = ("NOT_SPECIFIED", "NO_SOCKET", "TCP_CLOSE")


def fleet(n: int) -> ContainerCollector:
    registry, store = ContainerRegistry(), SampleStore()
    for i in range(n):
        netns = 4026530000 + i
        registry.upsert(
            ContainerRecord(id=f"{i:012x}" * 5 + "0000", name=f"web{i}", runtime="docker", pid=1000 + i, status="running", image="busybox", network_mode="bridge")
            .with_netns(netns, 1)
        )
        lo = InterfaceCounters("lo", "container", "", True, 65536, 5_000 + i, 50, 0, 0, 5_000 + i, 50, 0, 0)
        iface = InterfaceCounters("eth0", "container", f"veth{i:x}", True, 1500, 10_000 + i, 200, 0, 1, 20_000, 300, 0, 0)
        host = InterfaceCounters(f"veth{i:x}", "host", "eth0", True, 1500, 20_000, 300, 0, 0, 10_000 + i, 200, 0, 4)
        states = {"listen": 1, "time_wait": 2, **{s: 0 for s in STATE_NAMES[2:]}}
        sockets = SocketSample({"tcp": 1, "udp": 0, "tcp6": 0}, states, 0.0, 0, (ListenQueue("80", 0, 128, 1),), 60.0)
        protocols = {c.key: 1000 + i for c in PROTOCOL_COUNTERS}
        drops = {reason: i + n for n, reason in enumerate(DROP_REASONS)}
        store.put(NamespaceSample(netns, 1_700_000_000.5 + i / 1000, 0.0002, (lo, iface, host), protocols, sockets, kernel_drops=drops))
    collector = ContainerCollector(registry, store, [Runtime()])
    collector.ebpf = Drops()
    return collector


class Drops:
    """What the exporter reads of the eBPF service (the host's drops and the map's state)."""

    up, collector = True, None

    def host_counts(self) -> dict[str, int]:
        return {"NOT_SPECIFIED": 10, "NO_SOCKET": 3}


def memory() -> dict[str, float]:
    """This process's resident memory now and its peak since :func:`reset_peak` (MiB)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to VmRSS (proc(5))


def wall_times(make, rounds: int, busy: bool) -> list[float]:
    """Wall seconds of ``make()`` in a thread of its own, ``rounds`` times; with ``busy``, beside a
    thread that loops over pure Python (~100 µs) and a pread, like the event loop in a round."""
    out: list[float] = []
    for _ in range(rounds):
        stop = threading.Event()

        def loop() -> None:
            fd = os.open("/proc/self/net/snmp", os.O_RDONLY)
            try:
                while not stop.is_set():
                    total = 0
                    for i in range(3000):
                        total += i
                    os.pread(fd, 65536, 0)
            finally:
                os.close(fd)

        other = threading.Thread(target=loop) if busy else None
        if other is not None:
            other.start()
            time.sleep(0.05)
        took: list[float] = []

        def made() -> None:
            started = time.perf_counter()
            make()
            took.append(time.perf_counter() - started)

        worker = threading.Thread(target=made)
        worker.start()
        worker.join()
        stop.set()
        if other is not None:
            other.join()
        out.append(took[0])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--containers", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--busy-rounds", type=int, default=15, help="bodies made beside a busy event loop")
    args = parser.parse_args()
    collector = fleet(args.containers)
    own = generate_latest(build_registry())
    # A scrape's body as the server makes it, in a thread of its own as the server's render
    # thread is (glibc gives it its own heap): the text compressed family by family.
    before = memory()["VmRSS"]
    reset_peak()
    made: list[bytes] = []
    body: list[float] = []

    def scrapes() -> None:
        for _ in range(args.rounds):
            started = time.thread_time()
            made[:] = [scrape_body(collector, collector.snapshot(), True, own)]
            body.append(time.thread_time() - started)

    thread = threading.Thread(target=scrapes)
    thread.start()
    thread.join()
    after = memory()
    # The same body's wall time, alone and beside a thread that runs Python as the event loop does
    # in a sampling round (short pure-Python stretches between preads): the render thread waits
    # for the GIL whenever it gave it up (zlib gives it up for every call).
    alone = wall_times(lambda: scrape_body(collector, collector.snapshot(), True, own), args.rounds, busy=False)
    beside = wall_times(lambda: scrape_body(collector, collector.snapshot(), True, own), args.busy_rounds, busy=True)
    render, gzip = [], []
    text = b""
    for _ in range(args.rounds):
        started = time.thread_time()  # CPU, not wall: a busy machine does not move it as much
        text = collector.exposition(collector.snapshot())
        rendered = time.thread_time()
        zlib.compressobj(1, zlib.DEFLATED, 31).compress(text)
        render.append(rendered - started)
        gzip.append(time.thread_time() - rendered)
    lines, size = text.count(b"\n"), len(text)
    del text
    print(f"{args.containers} containers: {lines} lines, {size / 1024:.0f} KiB; "
          f"render {min(render) * 1000:.1f} ms, gzip level 1 {min(gzip) * 1000:.1f} ms of CPU (best of {args.rounds}); "
          f"the server's gzip body ({len(made[0]) / 1024:.0f} KiB) {min(body) * 1000:.1f} ms; "
          f"resident memory {before:.1f} MiB before its first render, {after['VmRSS']:.1f} after, peak {after['VmHWM']:.1f}; "
          f"its wall time alone {statistics.median(alone) * 1000:.1f} ms (median), beside a busy event loop "
          f"{statistics.median(beside) * 1000:.1f} ms median, {max(beside) * 1000:.1f} max ({len(beside)} bodies)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
