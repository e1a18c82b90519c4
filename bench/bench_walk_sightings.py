"""How long the sockets other than listeners stay: what a scheduled TCP state walk waits for.

A walk of a namespace that shares the host's established hash costs milliseconds however few
sockets it finds (docs/performance.md, "TCP states on a CPU budget"), so nstap walks only when
sockstat shows TCP sockets that are not listeners, and (since 04c3be6) only once they were there
at two samples in a row (``nstap.samplers.sockets.PERSISTING``). This bench shows why: it starts N
busybox httpd containers, sends each one HTTP request a second from the host (the sampling bench's
traffic), samples each namespace's sockets once a second for S seconds as the daemon does, and
counts the runs of samples that found such sockets, by length. A run one sample long is a
connection that was gone by the next sample: a walk started for it would have found nothing.

    .venv/bin/python bench/bench_walk_sightings.py --containers 200 --seconds 60

Everything it starts is removed at the end (containers labelled ``nstap.bench=1``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_containers import ROOT, Traffic, container_ips, ensure_image, sh, start_container  # noqa: E402

sys.path.insert(0, str(ROOT / "daemon"))
from nstap.netns.handles import NamespaceOpener  # noqa: E402
from nstap.samplers.sockets import PERSISTING, SocketSampler  # noqa: E402


async def measure(count: int, seconds: int) -> str:
    image = ensure_image("docker")
    run = f"nstap-sightings-{int(time.time())}"
    ids: list[str] = []
    opener = NamespaceOpener()
    handles = []
    traffic: Traffic | None = None
    try:
        for n in range(count):
            ids.append(start_container(image, f"{run}-{n}"))
        pids = [int(p) for p in sh("docker", "inspect", "-f", "{{.State.Pid}}", *ids).split()]
        for pid in pids:
            handles.append(await opener.open(pid))
        samplers = [SocketSampler(h, 1.0, 0.00005, 60.0, 64) for h in handles]
        traffic = Traffic(container_ips(ids))
        traffic.start()
        await asyncio.sleep(2)
        streak = [0] * count
        runs: Counter[int] = Counter()
        sightings = 0
        for _ in range(seconds):
            started = time.monotonic()
            for i, sampler in enumerate(samplers):
                sampler.sample()
                if sampler.walk_families:
                    sightings += 1
                    streak[i] += 1
                elif streak[i]:
                    runs[streak[i]] += 1
                    streak[i] = 0
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
        still = [s for s in streak if s]
        walked = sum(n for length, n in runs.items() if length >= PERSISTING) + sum(1 for s in still if s >= PERSISTING)
        return (
            f"{count} namespaces x {seconds} samples, {traffic.requests} HTTP requests: {sightings} samples found TCP sockets "
            f"other than listeners; ended runs of such samples by length {dict(sorted(runs.items()))}, runs still going {still}; "
            f"a scheduled walk would have started for {walked} of {sum(runs.values()) + len(still)} runs (>= {PERSISTING} samples)"
        )
    finally:
        if traffic is not None:
            traffic.stop.set()
            traffic.join(5)
        for h in handles:
            h.close()
        opener.close()
        if ids:
            sh("docker", "rm", "-f", *ids)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=60)
    args = parser.parse_args()
    print(asyncio.run(measure(args.containers, min(args.seconds, 600))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
