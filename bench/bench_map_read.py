#!/usr/bin/env python3
"""Benchmark: reading an eBPF hash map whole, alone and beside a thread running Python.

nstap reads its eBPF maps (the drop reasons, the flows, DNS) in a worker thread with
``BPF_MAP_LOOKUP_BATCH``. Every call is a system call that lets the GIL go; getting it back takes a
switch interval (5 ms) whenever another thread of the daemon is running Python meanwhile (a
firewall parse, a socket walk's count, a scrape's render). So the number of calls a read makes, not
the kernel's work, sets its wall time on a busy daemon, and the read runs just before each sampling
tick, which waits for it.

This creates a real kernel hash map the size of nstap's drop map (``--max-entries``, 16,384) with
``--entries`` entries (4,000: a few drop reasons for each of 1,000 containers), and reads it whole
with nstap's ``BpfMap.items``: asking for 256 entries a call (as before) and for the whole map at
once (what a read asks for once it knows the map's size), each alone and beside one thread that
runs Python without pause. Reports the median wall time of ``--runs`` reads of each, and the calls
each read made. Needs root (bpf(2)).

    .venv/bin/python bench/bench_map_read.py [--entries 4000] [--runs 9]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "daemon"))
from nstap.ebpf import maps  # noqa: E402
from nstap.ebpf.collector import DROP_COUNT, DROP_KEY, MAX_DROP_KEYS  # noqa: E402

BPF_MAP_TYPE_HASH = 1


class MapCreateAttr(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32)]


def read(bpf_map: maps.BpfMap, whole: bool, runs: int) -> tuple[float, int]:
    """Median ms of ``runs`` reads, and the batch calls one read made."""
    calls = [0]
    real = maps.bpf

    def counted(cmd: int, attr: ctypes.Structure) -> int:
        calls[0] += cmd == maps.BPF_MAP_LOOKUP_BATCH
        return real(cmd, attr)

    maps.bpf = counted
    try:
        took = []
        bpf_map.items()  # a first read: the map's size, which the next read asks for (twice over) at once
        for _ in range(runs):
            if not whole:
                bpf_map.found = 0  # as before: BATCH entries a call
            calls[0] = 0
            started = time.perf_counter()
            bpf_map.items()
            took.append(time.perf_counter() - started)
    finally:
        maps.bpf = real
    return statistics.median(took) * 1000, calls[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=4000)
    parser.add_argument("--max-entries", type=int, default=MAX_DROP_KEYS)
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    fd = maps.bpf(maps.BPF_MAP_CREATE, MapCreateAttr(BPF_MAP_TYPE_HASH, DROP_KEY.size, DROP_COUNT.size, args.max_entries))
    bpf_map = maps.BpfMap.from_fd(fd, "bench")
    try:
        for i in range(args.entries):
            bpf_map.update(DROP_KEY.pack(4026531840 + i // 4, 2 + i % 4), DROP_COUNT.pack(i))
        rows = []
        for beside in (False, True):
            stop = threading.Event()

            def python(stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    sum(range(1000))

            thread = threading.Thread(target=python) if beside else None
            if thread is not None:
                thread.start()
            try:
                for whole in (False, True):
                    ms, calls = read(bpf_map, whole, args.runs)
                    rows.append((beside, whole, ms, calls))
            finally:
                stop.set()
                if thread is not None:
                    thread.join()
        print(f"A hash map of {args.max_entries} entries holding {args.entries}, read whole (median of {args.runs} reads):\n")
        print("| asked per call | alone | beside a thread running Python | calls per read |")
        print("|---|---|---|---|")
        for whole in (False, True):
            alone = next(r for r in rows if not r[0] and r[1] == whole)
            busy = next(r for r in rows if r[0] and r[1] == whole)
            label = "the whole map (twice the last read's entries)" if whole else f"{maps.BATCH} entries"
            print(f"| {label} | {alone[2]:.1f} ms | {busy[2]:.1f} ms | {alone[3]} |")
    finally:
        bpf_map.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
