#!/usr/bin/env python3
"""Benchmark: what uploading captures to S3-compatible storage costs the daemon (storage.s3).

A private SeaweedFS (``weed mini`` from the test extra, as the tests run it) on loopback, a capture
store in a temporary data dir with ``--captures`` finished captures of ``--mib`` MiB each (and
their evidence), and the daemon's own uploader (nstap.storage.uploader.CaptureUploader, multipart
above 5 MiB as configured by default) draining the queue in this process. Reported, per MiB
uploaded: this process's CPU (every thread: the event loop's signing and sending, the part
hashing in worker threads), against the lower bound measured in the same run (reading every
byte once and hashing it with SHA-256, which any upload with a checksum must do); the
throughput; and the RSS the upload added (peak over the drain, sampled every 50 ms). The S3
server's own CPU is not the daemon's and is not counted.

    .venv/bin/python bench/bench_upload.py                     # 20 captures of 8 MiB
    .venv/bin/python bench/bench_upload.py --captures 50 --mib 1
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "daemon"))

from test_s3_storage import Weed, _capture, _drain, _store  # noqa: E402

from nstap.index import new_id  # noqa: E402
from nstap.storage.uploader import CaptureUploader  # noqa: E402


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def floor_seconds(paths: list[Path]) -> float:
    """CPU to read every byte once and hash it (the least an upload with a checksum does)."""
    start = cpu()
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return cpu() - start


async def run(args: argparse.Namespace, root: Path) -> dict:
    weed = Weed(root / "weed")
    weed.start()
    try:
        store = await _store(root / "data")
        rows = [await _capture(store, size=args.mib << 20) for _ in range(args.captures)]
        paths = [store.files.path(row.file) for row in rows]
        total_mib = sum(p.stat().st_size for p in paths) / 2**20
        floor = min(floor_seconds(paths) for _ in range(3))  # warm page cache, as the upload's reads are
        up = CaptureUploader(store, weed.client(), f"bench-{new_id()}/")
        peak, stop = [rss_mib()], threading.Event()
        base_rss = peak[0]

        def watch() -> None:
            while not stop.wait(0.05):
                peak[0] = max(peak[0], rss_mib())

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started_cpu, started = cpu(), time.monotonic()
        try:
            await _drain(up, timeout=600)
        finally:
            stop.set()
            watcher.join()
        spent, elapsed = cpu() - started_cpu, time.monotonic() - started
        assert up.results["ok"] == args.captures, up.results
        await up.close()
        await store.close()
        return {
            "captures": args.captures, "mib_each": args.mib, "mib_uploaded": round(total_mib, 1),
            "cpu_ms_per_mib": round(spent / total_mib * 1000, 2), "floor_ms_per_mib": round(floor / total_mib * 1000, 2),
            "multiple_of_floor": round(spent / floor, 2) if floor else None,
            "throughput_mib_s": round(total_mib / elapsed, 1), "seconds": round(elapsed, 2),
            "rss_added_mib": round(peak[0] - base_rss, 1),
        }
    finally:
        weed.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captures", type=int, default=20)
    parser.add_argument("--mib", type=int, default=8, help="MiB per capture")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nstap-bench-upload-") as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    print(json.dumps(result))
    print(f"{result['mib_uploaded']} MiB in {result['captures']} captures: {result['cpu_ms_per_mib']} ms of CPU per MiB "
          f"(x{result['multiple_of_floor']} the floor of reading and hashing it, {result['floor_ms_per_mib']} ms), "
          f"{result['throughput_mib_s']} MiB/s, RSS +{result['rss_added_mib']} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
