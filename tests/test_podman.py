"""The daemon against real Podman (its Docker-compatible API service): containers and pods."""

from __future__ import annotations

import os
import time

import pytest

from conftest import RUN_ID, Containers

pytestmark = pytest.mark.podman

ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")


def test_podman_container_appears_counts_and_goes(nstap, containers: Containers, podman_image: str) -> None:
    d = nstap()
    cid = containers.podman(*ULIMITS, podman_image, "httpd", "-f", "-p", "80", "-h", "/www", name="pweb")
    started = time.monotonic()
    m = d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=cid[:12], side="host") and m, 2, "podman container watched")
    assert time.monotonic() - started < 2.5
    info = m.find("nstap_container_info", container_id=cid[:12])[0].labels
    assert info["runtime"] == "podman" and info["container"] == f"pweb-{RUN_ID}"
    assert m.value("nstap_runtime_info", runtime="podman", kind="podman") == 1
    assert m.value("nstap_tcp_listen_queue_limit", container_id=cid[:12], port="80") > 0
    containers.remove("podman", cid)
    d.wait_metric(lambda m: not [s for s in m.samples if s.labels.get("container_id") == cid[:12]], 2, "series gone")


def test_pod_is_one_namespace_with_every_member_listed(nstap, containers: Containers, podman_image: str) -> None:
    d = nstap()
    pod = containers.pod("shop", "-p", "127.0.0.1::80")
    web = containers.podman("--pod", pod, podman_image, "httpd", "-f", "-p", "80", "-h", "/www", name="shopweb")
    side = containers.podman("--pod", pod, podman_image, "sleep", "600", name="shopside")
    def listed_and_sampled(m):
        # The three members listed, and the pod's namespace sampled (under whichever member owns it):
        # a scrape may list the last member to start before the namespace's first sample is in
        # (seen once in CI).
        ids = {s.labels["container_id"] for s in m.find("nstap_container_info") if s.labels["pod"] == pod}
        sampled = {s.labels["container_id"] for s in m.find("nstap_interface_up", side="container", interface="eth0")}
        return len(ids) == 3 and ids & sampled and m

    m = d.wait_metric(listed_and_sampled, 5, "pod members listed and their namespace sampled")
    members = [s.labels for s in m.find("nstap_container_info") if s.labels["pod"] == pod]
    netns = {labels["netns"] for labels in members}
    assert netns == {str(os.stat(f"/proc/{containers.pid('podman', web)}/ns/net").st_ino)}
    assert {labels["compose_project"] for labels in members} == {pod}
    # One watcher, under the pod's infra container; the members have no series of their own.
    owners = {s.labels["container_id"] for s in m.find("nstap_interface_up", side="container", interface="eth0")}
    infra = [labels["container_id"] for labels in members if labels["container_id"] not in (web[:12], side[:12])]
    assert infra and infra[0] in owners and web[:12] not in owners and side[:12] not in owners
    attached = [e for e in d.events("watcher_attached") if str(e["netns"]) in netns]
    assert len(attached) == 1
    assert m.value("nstap_tcp_listen_queue_limit", container_id=infra[0], port="80") > 0  # httpd of a member
