#!/usr/bin/env python3
"""Benchmark: what the detectors cost per sample, each of them and all together, warm and cold.

The daemon runs every namespace's detectors over each of its samples, once a second: by then the
CPU's caches hold other work, and the same Python costs more than in a tight loop. This feeds
synthetic samples shaped like a busybox web server's under one HTTP request a second (the
protocol counters nstap exports, ``lo`` and ``eth0`` with the host end of the veth, one listener,
three kernel drop reasons, DNS totals with no lookup as the DNS reader hands them (the same object
while nothing changed); no retransmission, nothing that trips) to the default detectors of
``--namespaces`` namespaces, round after round, and reports CPU µs per sample (thread time):

* ``warm``: one namespace's detectors over its samples back to back;
* ``cold``: every namespace's detectors per round, with a 64 MiB buffer written between rounds
  (the daemon's other work between two ticks), each detector kind timed over the round;
* ``pipeline``: the whole of ``DetectionPipeline`` (a registry of as many namespaces, the incident
  tracker) cold, fed one sample at a time (``on_sample``: each namespace's detectors in turn, as
  before 2026-12-05) and in batches of ``--slice`` samples (``on_samples``: one kind over the
  batch at a time, as the daemon feeds it each slice of a round: at 200-500 containers a 5 ms
  slice holds some 30 samples).

    .venv/bin/python bench/bench_detectors.py [--namespaces 500] [--rounds 40] [--slice 30] [--daemon PATH]

``--daemon`` imports nstap from another tree's ``daemon/`` (an A/B of a change: ``git worktree
add /tmp/base HEAD~1`` and ``--daemon /tmp/base/daemon``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVICT_BYTES = 64 << 20
LINE = 64


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--namespaces", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="rounds not counted (the detectors' first samples take other paths)")
    parser.add_argument("--slice", type=int, default=30, help="samples per batch of the pipeline")
    parser.add_argument("--daemon", type=Path, default=ROOT / "daemon", help="the daemon/ directory to import nstap from")
    args = parser.parse_args()
    if args.rounds <= args.warmup:
        parser.error("--rounds must be more than --warmup")
    sys.path.insert(0, str(args.daemon))
    from nstap.detect import build_detectors
    from nstap.detect.incidents import IncidentTracker
    from nstap.detect.pipeline import DetectionPipeline
    from nstap.dns.lookups import BOUNDS, Lookups
    from nstap.registry import ContainerRegistry
    from nstap.runtime.records import ContainerRecord
    from nstap.samplers.protocols import PROTOCOL_COUNTERS
    from nstap.samples import InterfaceCounters, ListenQueue, NamespaceSample, SocketSample

    keys = [c.key for c in PROTOCOL_COUNTERS]
    growth = {"tcp_segments_received": 7, "tcp_segments_sent": 7, "tcp_passive_opens": 1, "tcp_active_opens": 0}
    interfaces = (("lo", "container"), ("eth0", "container"), ("veth0", "host"))
    idle_dns: dict = {}

    def sample(netns: int, i: int) -> NamespaceSample:
        protocols = {k: 1000 + i * growth.get(k, 0) for k in keys}
        links = tuple(InterfaceCounters(n, side, "", True, 1500, 600 * i, 7 * i, 0, 0, 900 * i, 7 * i, 0, 0) for n, side in interfaces)
        sockets = SocketSample({"tcp": 1, "tcp6": 1, "udp": 0}, {"listen": 1, "time_wait": 1}, 0.0, 0, (ListenQueue("80", 0, 128, 1),), 1.0)
        drops = {"NOT_SPECIFIED": i, "TCP_OLD_DATA": 0, "NO_SOCKET": 0}
        dns = idle_dns.setdefault(netns, Lookups({}, (0,) * len(BOUNDS), 0, 0.0))  # the DNS reader hands an unchanged one again
        return NamespaceSample._make((netns, 1000.0 + i, 0.0001, links, protocols, sockets, (), 1.0, None, drops, dns, None))

    clock = time.thread_time
    evict = bytearray(EVICT_BYTES)

    def rounds() -> dict[str, float]:
        detectors = [build_detectors({}, {}, {}) for _ in range(args.namespaces)]
        kinds = {d.kind: 0.0 for d in detectors[0]}
        for r in range(args.rounds):
            batch = [sample(n, r) for n in range(args.namespaces)]
            for k in range(0, EVICT_BYTES, LINE):
                evict[k] = r & 0xFF
            for kind_at in range(len(detectors[0])):
                started = clock()
                for n, s in enumerate(batch):
                    detectors[n][kind_at].observe(s)
                if r >= args.warmup:
                    kinds[detectors[0][kind_at].kind] += clock() - started
        counted = (args.rounds - args.warmup) * args.namespaces
        return {k: v / counted * 1e6 for k, v in kinds.items()}

    def pipeline(batched: bool) -> float:
        registry = ContainerRegistry()
        for n in range(args.namespaces):
            record = ContainerRecord(id=f"{n:064x}", name=f"c{n}", runtime="docker", pid=1, status="running", image="i")
            registry.upsert(record.with_netns(n + 1, 1))
        tracker = IncidentTracker(None, None, cooldown=0, resolve_after=5)  # type: ignore[arg-type]
        tracker._save = lambda inc, at: None  # type: ignore[method-assign]  # nothing trips; no index either way
        feed = DetectionPipeline(registry, tracker, {}, {})
        total = 0.0
        for r in range(args.rounds):
            batch = [sample(n + 1, r) for n in range(args.namespaces)]
            for k in range(0, EVICT_BYTES, LINE):
                evict[k] = r & 0xFF
            started = clock()
            if batched:
                for at in range(0, len(batch), args.slice):
                    feed.on_samples(batch[at : at + args.slice])
            else:
                for s in batch:
                    feed.on_sample(s)
            if r >= args.warmup:
                total += clock() - started
        return total / ((args.rounds - args.warmup) * args.namespaces) * 1e6

    def warm() -> dict[str, float]:
        detectors = build_detectors({}, {}, {})
        batch = [sample(1, i) for i in range(args.rounds * 20)]
        out = {}
        for detector in detectors:
            for s in batch[: args.warmup]:
                detector.observe(s)
            started = clock()
            for s in batch[args.warmup:]:
                detector.observe(s)
            out[detector.kind] = (clock() - started) / (len(batch) - args.warmup) * 1e6
        return out

    hot = warm()
    by_kind = rounds()
    one, batched = [], []
    for _ in range(3):  # in turns
        one.append(pipeline(batched=False))
        batched.append(pipeline(batched=True))
    print(f"detectors of {args.namespaces} namespaces, {args.rounds - args.warmup} rounds counted ({args.daemon})")
    print("| detector | warm µs/sample | cold µs/sample (one kind over every namespace) |")
    print("|---|---|---|")
    for kind in sorted(by_kind, key=lambda k: -by_kind[k]):
        print(f"| {kind} | {hot[kind]:.2f} | {by_kind[kind]:.2f} |")
    print(f"| **all (sum)** | {sum(hot.values()):.2f} | {sum(by_kind.values()):.2f} |")
    for label, runs in (("one sample at a time", one), (f"batches of {args.slice}", batched)):
        print(f"pipeline, cold, {label}: {statistics.median(runs):.2f} µs/sample (runs: {', '.join(f'{a:.2f}' for a in runs)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
