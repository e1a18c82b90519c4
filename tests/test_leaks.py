"""200 container start/stop cycles leave the daemon's descriptors and tasks where they started."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import Containers, sh

pytestmark = pytest.mark.docker

BATCH = 10
ROUNDS = 20  # 200 containers in all


def test_start_stop_cycles_leak_nothing(nstap, containers: Containers, docker_image: str) -> None:
    d = nstap({"interval": 0.2})
    pool = ThreadPoolExecutor(max_workers=4)

    def cycle() -> None:
        ids = list(pool.map(lambda i: containers.docker(docker_image, "sleep", "600"), range(BATCH)))
        # Every container is attached (and sampled) before it goes ...
        d.wait_metric(lambda m: all(m.find("nstap_sample_timestamp_seconds", container_id=c[:12]) for c in ids), 10, "batch attached")
        sh("docker", "rm", "-f", *ids)
        containers.created.clear()
        # ... and detached after.
        d.wait_metric(lambda m: not any(m.find("nstap_container_info", container_id=c[:12]) for c in ids), 10, "batch detached")

    def settled() -> tuple[int, float]:
        def quiet():
            m = d.scrape()
            if m.value("nstap_namespaces_watched") == baseline_ns:
                return m
            return None

        m = d.wait_metric(lambda _: quiet(), 10, "back to the baseline namespaces")
        return d.open_fds(), m.value("nstap_asyncio_tasks"), d.fd_kinds()

    baseline_ns = d.scrape().value("nstap_namespaces_watched")
    cycle()  # warm-up: the HTTP connection pool to dockerd and lazy imports settle
    fds_before, tasks_before, kinds_before = settled()
    for _ in range(ROUNDS - 1):
        cycle()
    fds_after, tasks_after, kinds_after = settled()
    pool.shutdown()
    attaches = len(d.events("watcher_attached"))
    assert attaches >= BATCH * ROUNDS
    assert tasks_after == tasks_before
    # Files, pipes, pidfds, netlink sockets...: exactly as before. Sockets: aiohttp may keep a few
    # more or fewer idle connections to the runtime sockets; a leak per container or per cycle
    # would be 190 or 19 descriptors.
    sockets_before, sockets_after = kinds_before.pop("socket", 0), kinds_after.pop("socket", 0)
    assert kinds_after == kinds_before, (kinds_before, kinds_after)
    assert abs(sockets_after - sockets_before) <= 4, (fds_before, fds_after, sockets_before, sockets_after)
