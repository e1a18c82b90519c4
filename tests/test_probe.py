"""The runbooks' active checks, done continuously: published-port probes, exposure, top talkers.

Pure parts with tables (the cause of a failed probe, the schedule's fairness and rate, the plan of
each forward, exposure, the talkers' tally). Then against a real daemon, dockerd and podman: a
port probed ok through the DNAT from nstap's own namespace and a loopback one from the host; a
shadowing DNAT and a killed server each give ``port_unreachable`` with the right cause; Docker's
DNAT deleted leaves the port served by docker-proxy (said so); Podman's deleted gives
``nat_missing``; an opted-out container is not probed; 200 published ports stay within the rate;
exposure and talkers with real traffic; the probe namespace is removed at stop and a stale one
recovered at start. Every rule and sysctl changed is restored in a ``finally``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Containers, Daemon, sh, wait_until
from nstap.detect.probe import FailedProbe, Listener, probe_cause, probe_findings, wants_anomaly
from nstap.nat.exposure import classify
from nstap.nat.forwards import Forward
from nstap.nat.probe import ProbeSchedule, TokenBucket, probe_plan
from nstap.nat.probe_netns import free_subnet, host_link_name
from nstap.nat.talkers import OTHER, tally, top
from nstap.nat.conntrack import pack

ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
PROBE_CONFIG = {"nat": {"interval": 1.0, "probe": {"interval": 2.0, "timeout": 1.0}}, "detect": {"resolve_after": 2.0, "cooldown": 0.0, "capture": False}}


def _forward(state: str = "ok", host_ip: str = "0.0.0.0", protocol: str = "tcp", port: int = 8080, cid: str = "a" * 64) -> Forward:
    return Forward(cid, "web", "docker", protocol, host_ip, port, "172.17.0.2", 80, "iptables-nft", state,
                   "-A DOCKER -j DNAT" if state != "missing" else "", "DOCKER", "" if state == "ok" else f"it is {state}", 0)


def _failed(**changes) -> FailedProbe:
    base = dict(forward="tcp 0.0.0.0:8080 -> 172.17.0.2:80 ok", state="ok", rule="-A DOCKER -j DNAT", detail="", protocol="tcp",
                container_port=80, error="refused", path="probe-netns", listener=Listener(True, 0, 128))
    base.update(changes)
    return FailedProbe(**base)


# -- pure parts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, kind", [
    (dict(state="missing", rule=""), "nat_missing"),
    (dict(state="shadowed", detail="PREROUTING rule 1 decides first"), "nat_shadowed"),
    (dict(listener=Listener(False)), "no_listener"),
    (dict(listener=Listener(True, 129, 128)), "accept_queue_full"),
    (dict(drops=(("ipv4-filter INPUT rule 1: -A INPUT -p tcp --dport 80 -j DROP", 3),), error="timeout"), "firewall_drop"),
    (dict(error="unreachable: No route to host"), "no_route"),
    (dict(error="timeout"), "unknown"),
    (dict(listener=Listener(None), error="refused"), "unknown"),  # an unknown listener is not "no listener"
    (dict(state="missing", listener=Listener(False)), "nat_missing"),  # the first broken step along the path
])
def test_cause_names_the_first_broken_step(changes: dict, kind: str) -> None:
    cause = probe_cause(_failed(**changes))
    assert cause.kind == kind and cause.text


def test_findings_one_per_container_with_onset_and_cause() -> None:
    assert probe_findings([]) == []
    (finding,) = probe_findings([_failed(listener=Listener(False), last_ok=100.0), _failed(state="missing", last_ok=90.0)])
    assert finding.kind == "port_unreachable" and finding.cause.kind == "no_listener" and finding.started_at == 100.0
    assert finding.numbers["ports"] == 2 and finding.numbers["causes"] == ["no_listener", "nat_missing"]
    # A port that never had a listener is not an incident; one whose listener went is.
    assert (wants_anomaly(Listener(False), False), wants_anomaly(Listener(False), True), wants_anomaly(Listener(True), False)) == (False, True, True)


def test_schedule_serves_containers_in_turn_and_bounds_the_rate() -> None:
    schedule = ProbeSchedule(30.0, random.Random(7))
    wanted = {("big", "tcp", "", p): ("ok",) for p in range(10_000)}
    wanted[("small", "tcp", "", 1)] = ("ok",)
    assert len(schedule.update(wanted, 0.0)) == 10_001  # new: due at once
    first = schedule.take(0.0, 4)
    assert ("small", "tcp", "", 1) in first[:2]  # one container's 10,000 ports do not starve the other
    # The rate: a token bucket of 20/s over 10 simulated seconds of ticks allows ~200 probes.
    bucket, taken, now = TokenBucket(20.0, 0.0), 0, 0.0
    while now < 10.0:
        n = schedule.take(now, bucket.available(now))
        bucket.spend(len(n))
        taken += len(n)
        now += 0.2
    assert 180 <= taken <= 221
    # Done: due again after the interval ±20 %, and a change of the rule makes it due at once.
    key = ("small", "tcp", "", 1)
    schedule.done(key, 10.0)
    assert 34.0 <= schedule.due[key] <= 46.0
    assert schedule.update({**wanted, key: ("missing",)}, 11.0) == [key] and schedule.due[key] == 11.0
    schedule.update({key: ("missing",)}, 12.0)
    assert list(schedule.due) == [key]  # gone forwards are forgotten: the state is bounded by the forwards


@pytest.mark.parametrize("forward, udp, expected", [
    (_forward(), False, ("probe-netns", "169.254.252.1")),
    (_forward(host_ip=""), False, ("probe-netns", "169.254.252.1")),
    (_forward(host_ip="127.0.0.1"), False, ("host-loopback", "127.0.0.1")),
    (_forward(host_ip="10.1.2.3"), False, ("probe-netns", "10.1.2.3")),
    (_forward(host_ip="10.9.9.9"), False, "10.9.9.9 is not an address of this host"),
    (_forward(host_ip="::"), False, "IPv6 forwards are not probed"),
    (_forward(protocol="udp"), False, "udp is not probed (nat.probe.udp: false)"),
    (_forward(protocol="udp"), True, ("probe-netns", "169.254.252.1")),
    (_forward(protocol="sctp"), True, "sctp is not probed"),
])
def test_probe_plan(forward: Forward, udp: bool, expected) -> None:
    assert probe_plan(forward, "169.254.252.2", "169.254.252.1", {"10.1.2.3"}, udp) == expected


def test_probe_plan_without_the_namespace_still_probes_loopback() -> None:
    assert probe_plan(_forward(), None, "", set(), False) == "the probe namespace is not up"
    assert probe_plan(_forward(host_ip="127.0.0.1"), None, "", set(), False) == ("host-loopback", "127.0.0.1")


def test_probe_subnet_and_link_name() -> None:
    pool = ipaddress.ip_network("169.254.252.0/22")
    taken = [ipaddress.ip_network("169.254.252.0/30"), ipaddress.ip_network("169.254.252.4/31")]
    assert str(free_subnet(pool, taken)) == "169.254.252.8/30"
    assert free_subnet(ipaddress.ip_network("10.0.0.0/30"), [ipaddress.ip_network("10.0.0.0/8")]) is None
    name = host_link_name(Path("/var/lib/nstap"))
    assert name.startswith("nsp-") and len(name) <= 15 and name != host_link_name(Path("/tmp/other"))


def test_exposure_classifies_each_listener() -> None:
    forwards = [_forward(port=8080), Forward("a" * 64, "web", "docker", "tcp", "127.0.0.1", 8443, "172.17.0.2", 443, "iptables-nft", "ok", "", "", "", 0)]
    listeners = [("tcp", "::", 80), ("tcp", "127.0.0.1", 8081), ("tcp", "0.0.0.0", 9000), ("tcp", "127.0.0.1", 443), ("udp", "0.0.0.0", 53)]
    got = {(e["protocol"], e["port"]): e for e in classify(listeners, forwards)}
    assert got[("tcp", 80)]["exposure"] == "published" and got[("tcp", 80)]["all_host_addresses"] is True
    assert got[("tcp", 80)]["published_on"] == ["0.0.0.0:8080"]
    assert got[("tcp", 8081)]["exposure"] == "loopback" and "note" not in got[("tcp", 8081)]
    assert got[("tcp", 9000)]["exposure"] == "internal" and got[("udp", 53)]["exposure"] == "internal"
    assert got[("tcp", 443)]["exposure"] == "loopback" and "published, but bound to loopback" in got[("tcp", 443)]["note"]


def test_talkers_tally_growth_peers_and_bounds() -> None:
    me, client, server = pack("172.17.0.2"), pack("192.0.2.7"), pack("198.51.100.9")
    owners = {me: "cid"}
    # (id, orig src, orig dst, reply src, orig packets, orig bytes, reply packets, reply bytes, proto)
    inbound = (1, client, pack("169.254.252.1"), me, 10, 1000, 8, 50_000, 6)  # a client of a published port (DNAT)
    outbound = (2, me, server, server, 5, 500, 5, 700, 6)
    stranger = (3, client, server, server, 9, 9, 9, 9, 6)
    growth, seen, untracked = tally([inbound, outbound, stranger], owners, None, 100, 10)
    assert growth == {} and len(seen) == 2 and untracked == 0  # the first pass is the baseline
    later_in = (1, client, pack("169.254.252.1"), me, 15, 1500, 12, 80_000, 6)
    new = (4, me, server, server, 1, 60, 1, 60, 17)
    growth, seen, _ = tally([later_in, outbound, new], owners, seen, 100, 10)
    peers = growth["cid"]
    assert peers["192.0.2.7"] == [30_000, 4, 500, 5, 0]  # it sent the replies: bytes out are the reply direction
    assert peers["198.51.100.9"] == [60, 1, 60, 1, 1]  # the unchanged flow adds nothing, the new one all it counted
    ranked = top([peers, {"192.0.2.7": [1, 1, 1, 1, 0]}], 10)
    assert ranked[0]["peer"] == "192.0.2.7" and ranked[0]["bytes_out"] == 30_001
    # Bounds: peers per container (the rest summed as "other"), flows followed host-wide.
    many = [(i, me, pack(f"10.0.{i // 250}.{i % 250 + 1}"), pack(f"10.0.{i // 250}.{i % 250 + 1}"), 1, 100, 1, 100, 6) for i in range(100, 400)]
    growth, seen, untracked = tally(many, owners, {}, 250, 5)
    assert len(growth["cid"]) == 6 and growth["cid"][OTHER][0] == 245 * 100
    assert len(seen) == 250 and untracked == 50


# -- against real runtimes ----------------------------------------------------------------------


def nstap_cli(d: Daemon, *args: str) -> subprocess.CompletedProcess:
    return sh(sys.executable, "-m", "nstap", *args, "--config", str(d.config_path))


def _verdicts(d: Daemon, cid: str) -> dict[int, dict]:
    status, view = d.api(f"/api/v1/containers/{cid[:12]}/nat")
    assert status in (200, 404), view
    return {f["host_port"]: f for f in view["forwards"]} if status == 200 else {}  # 404: not listed yet


def _probe(d: Daemon, cid: str, port: int) -> dict | None:
    return ((_verdicts(d, cid).get(port) or {}).get("verdict") or {}).get("probe")


def _unreachable(d: Daemon, cid: str, after: float) -> list[dict]:
    return [e for e in d.events("anomaly_detected", kind="port_unreachable") if e["container_id"] == cid[:12] and e["first_seen"] >= after]


def _port() -> int:
    return 29000 + int(time.time() * 7) % 900


def _ipt(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("iptables", "-t", "nat", *args, check=check)


@contextlib.contextmanager
def forward_allowed(d: Daemon) -> Iterator[None]:
    """Docker's FORWARD policy DROP also drops new connections to Podman's containers from the
    network (CNI's rules accept only their replies): let the probe namespace's address through,
    in DOCKER-USER (the operator's chain for this), for the test's time only."""
    probe = wait_until(lambda: d.events("probe_netns_ready"), 5, message="probe namespace")[0]["probe_address"]
    rule = ("DOCKER-USER", "-s", f"{probe}/32", "-d", "10.88.0.0/16", "-j", "ACCEPT")
    sh("iptables", "-I", *rule)
    try:
        yield
    finally:
        sh("iptables", "-D", *rule, check=False)


@pytest.mark.daemon_log_allows("anomaly_capture_refused")
def test_docker_ports_probed_and_failures_caused(nstap, containers: Containers, docker_image: str) -> None:
    port = _port()
    d = nstap(PROBE_CONFIG)
    # httpd in the background (PID 1 is the shell, so httpd can be killed without ending the
    # container): port 80 published on every address, 8081 bound to loopback, 8082 not published.
    web = containers.docker("-p", f"0.0.0.0:{port}:80", docker_image, "sh", "-c",
                            "httpd -p 80 -h /; httpd -p 127.0.0.1:8081 -h /; httpd -p 8082 -h /; exec sleep 600", name="probeweb")
    local = containers.docker("-p", "127.0.0.1::80", docker_image, "sh", "-c", "httpd -p 80 -h /; exec sleep 600", name="probelo")
    optout = containers.docker("--label", "nstap.probe=off", "-p", f"{port + 1}:80", docker_image, "httpd", "-f", "-p", "80", "-h", "/", name="probeoff")
    other = containers.docker(docker_image, "sleep", "600", name="probenobody")
    other_ip = containers.inspect("docker", other)["NetworkSettings"]["IPAddress"]
    lo_port = int(containers.inspect("docker", local)["NetworkSettings"]["Ports"]["80/tcp"][0]["HostPort"])

    probe = wait_until(lambda: (p := _probe(d, web, port)) and p["ok"] and p, 10, message="the published port probed ok")
    assert probe["path"].startswith("probe-netns ") and "(PREROUTING)" in probe["path"] and probe["via"] == "dnat"
    verdict = _verdicts(d, web)[port]["verdict"]
    assert verdict["rule"] is True and verdict["listener"] is True and verdict["accept_queue"]["limit"] > 0
    lo = wait_until(lambda: (p := _probe(d, local, lo_port)) and p["ok"] and p, 10, message="the loopback port probed ok")
    assert lo["path"].startswith("host-loopback -> 127.0.0.1:") and lo["via"] in ("userland-proxy", "dnat"), lo
    m = d.wait_metric(lambda m: m.value("nstap_port_probe_success", container_id=web[:12], host_port=str(port)) == 1 and m, 5, "metric")
    assert m.value("nstap_port_probe_duration_seconds", container_id=web[:12], host_port=str(port), protocol="tcp", host_ip="0.0.0.0") > 0
    assert m.value("nstap_collector_up", collector="port_probe") == 1
    # Opted out: listed, never probed, no series.
    wait_until(lambda: _verdicts(d, optout)[port + 1]["verdict"].get("not_probed") == "opted out (nstap.probe=off)", 10, message="opted out")
    assert not m.find("nstap_port_probe_success", container_id=optout[:12])
    table = nstap_cli(d, "nat", web[:12]).stdout
    assert "PROBE" in table and f"tcp/{port}" in table and "via dnat" in table

    # Exposure (the nmap step), from the container's own sockets.
    status, exposure = d.api(f"/api/v1/containers/{web[:12]}/exposure")
    got = {e["port"]: e for e in exposure["listeners"]}
    assert status == 200 and got[80]["exposure"] == "published" and got[80]["all_host_addresses"] is True
    assert got[8081]["exposure"] == "loopback" and got[8082]["exposure"] == "internal"
    assert "loopback" in nstap_cli(d, "exposure", web[:12]).stdout

    # A shadowing DNAT sends the port to a container where nothing listens.
    shadow = f"PREROUTING 1 -p tcp -m tcp --dport {port} -j DNAT --to-destination {other_ip}:80"
    started = time.time()
    _ipt("-I", *shadow.split())
    try:
        wait_until(lambda: _unreachable(d, web, started), 10, message="port_unreachable (shadowed)")
        # (the probe may fail before the NAT monitor has read the new rule: the event's cause is
        # named once it has)
        wait_until(lambda: any(a["cause"]["kind"] == "nat_shadowed" and a["first_seen"] >= started
                               for a in d.api(f"/api/v1/anomalies?container={web[:12]}&kind=port_unreachable")[1]["anomalies"]),
                   20, 0.5, "port_unreachable caused by nat_shadowed")
        # (the probe may fail before the NAT monitor has read the new rule: the verdict names it once read)
        verdict = wait_until(lambda: (v := _verdicts(d, web)[port]["verdict"]) and v["probe"] and not v["probe"]["ok"] and v.get("cause", {}).get("kind") == "nat_shadowed" and v,
                             15, message="failed verdict naming the shadowing rule")
        assert verdict["cause"]["kind"] == "nat_shadowed" and verdict["rule"] is False
        m = d.wait_metric(lambda m: m.value("nstap_port_probe_success", container_id=web[:12], host_port=str(port)) == 0 and m, 5, "failure metric")
    finally:
        _ipt("-D", "PREROUTING", *shadow.split()[2:], check=False)
    wait_until(lambda: (p := _probe(d, web, port)) and p["ok"], 10, message="repaired")

    # Docker's DNAT deleted: docker-proxy still serves the port, and the verdict says so.
    ip = containers.inspect("docker", web)["NetworkSettings"]["IPAddress"]
    rule = f"DOCKER ! -i docker0 -p tcp -m tcp --dport {port} -j DNAT --to-destination {ip}:80"
    _ipt("-D", *rule.split())
    try:
        verdict = wait_until(lambda: (v := _verdicts(d, web)[port]["verdict"]) and v["rule"] is False and v["probe"]["via"] == "userland-proxy" and v, 10,
                             message="probe through docker-proxy")
        assert verdict["probe"]["ok"] is True
    finally:
        if _ipt("-C", *rule.split(), check=False).returncode != 0:
            _ipt("-A", *rule.split())
    wait_until(lambda: (p := _probe(d, web, port)) and p["ok"] and p["via"] == "dnat", 10, message="through the DNAT again")

    # The server killed (the container lives on): no listener.
    started = time.time()
    sh("docker", "exec", web, "sh", "-c", "kill $(pidof httpd)")
    event = wait_until(lambda: _unreachable(d, web, started), 10, message="port_unreachable (no listener)")[0]
    assert event["numbers"]["causes"][0] == "no_listener"
    assert _verdicts(d, web)[port]["verdict"]["listener"] is False

    # The loopback port's server killed: docker-proxy still accepts on 127.0.0.1 (and closes at
    # once), which is not "ok": its own connection to the container is refused.
    sh("docker", "exec", local, "sh", "-c", "kill $(pidof httpd)")
    lo = wait_until(lambda: (p := _probe(d, local, lo_port)) and not p["ok"] and p, 10, message="the loopback port without a listener fails")
    if lo["via"] == "userland-proxy":
        assert "docker-proxy accepted, but its connection to" in lo["error"] and "refused" in lo["error"], lo
    verdict = wait_until(lambda: (v := _verdicts(d, local)[lo_port]["verdict"]) and v.get("cause") and v, 10, message="its verdict")
    assert verdict["listener"] is False and verdict["cause"]["kind"] == "no_listener", verdict


@pytest.mark.podman
@pytest.mark.daemon_log_allows("anomaly_capture_refused")
def test_podman_dnat_deleted_is_nat_missing(nstap, containers: Containers, podman_image: str) -> None:
    port = _port() + 50
    d = nstap(PROBE_CONFIG)
    cid = containers.podman(*ULIMITS, "-p", f"0.0.0.0:{port}:80", podman_image, "httpd", "-f", "-p", "80", "-h", "/", name="probepod")
    # On this host, a client from the network cannot reach Podman's port (Docker's FORWARD DROP):
    # the probe says so, where a connect from the host itself (OUTPUT) would have succeeded.
    probe = wait_until(lambda: (p := _probe(d, cid, port)) and p, 10, message="podman port probed")
    assert probe["ok"] is False and probe["error"] == "timeout", probe
    with forward_allowed(d):
        _podman_dnat_deleted(d, cid, port)


def _podman_dnat_deleted(d: Daemon, cid: str, port: int) -> None:
    probe = wait_until(lambda: (p := _probe(d, cid, port)) and p["ok"] and p, 10, message="podman port probed ok")
    assert probe["via"] == "dnat"
    wait_until(lambda: [e for e in d.events("anomaly_resolved", kind="port_unreachable") if e["container_id"] == cid[:12]], 10, message="FORWARD's one resolved")
    line = next(x for x in sh("iptables-save", "-t", "nat").stdout.splitlines()
                if x.startswith("-A CNI-DN-") and f"--dport {port} " in x and "-j DNAT" in x)
    started = time.time()
    _ipt("-D", *line.split()[1:])
    try:
        event = wait_until(lambda: _unreachable(d, cid, started), 10, message="port_unreachable (DNAT deleted)")[0]
        assert event["numbers"]["causes"][0] == "nat_missing"
        verdict = _verdicts(d, cid)[port]["verdict"]
        # conmon holds the host port (a reservation): the probe's SYN reached it, not the container.
        assert verdict["probe"]["ok"] is False and "not the container" in verdict["probe"]["error"] and verdict["cause"]["kind"] == "nat_missing"
    finally:
        if _ipt("-C", *line.split()[1:], check=False).returncode != 0:
            _ipt("-A", *line.split()[1:])
    wait_until(lambda: (p := _probe(d, cid, port)) and p["ok"], 10, message="repaired")
    wait_until(lambda: len([e for e in d.events("anomaly_resolved", kind="port_unreachable") if e["container_id"] == cid[:12]]) == 2, 10, message="resolved")


@pytest.mark.podman
def test_many_published_ports_stay_within_the_rate(nstap, containers: Containers, podman_image: str) -> None:
    base = 40000 + int(time.time()) % 50 * 400
    config = {"nat": {"interval": 1.0, "probe": {"interval": 1.0, "rate": 20.0, "max_per_container": 150}}, "detect": {"capture": False}}
    d = nstap(config)
    many = containers.podman(*ULIMITS, "-p", f"{base}-{base + 199}:{base}-{base + 199}", podman_image, "sleep", "600", name="probemany")
    one = containers.podman(*ULIMITS, "-p", f"{base + 300}:80", podman_image, "httpd", "-f", "-p", "80", "-h", "/", name="probeone")
    with forward_allowed(d):  # refused at once rather than timing out: the rate, not the timeout, bounds the probes
        _within_the_rate(d, many, one, base)


def _within_the_rate(d: Daemon, many: str, one: str, base: int) -> None:
    wait_until(lambda: len(_verdicts(d, many)) == 200, 10, message="200 forwards")
    first = d.wait_metric(lambda m: (m.value("nstap_port_probes_total") or 0) >= 20 and m, 10, "probing")
    t0, n0 = time.monotonic(), first.value("nstap_port_probes_total")
    seen = set()
    while time.monotonic() - t0 < 4.0:  # the small container is probed in turn meanwhile
        probe = _probe(d, one, base + 300)
        if probe:
            seen.add(probe["at"])
        time.sleep(0.3)
    later = d.scrape()
    rate = (later.value("nstap_port_probes_total") - n0) / (time.monotonic() - t0)
    assert rate <= 20.0 * 1.25, rate  # demand is 150 ports a second: the bound holds
    assert len(seen) >= 2, seen
    verdicts = _verdicts(d, many)
    assert sum(1 for f in verdicts.values() if f["verdict"].get("not_probed", "").startswith("over nat.probe.max_per_container")) == 50


def test_talkers_from_conntrack_accounting(nstap, containers: Containers, docker_image: str) -> None:
    acct = Path("/proc/sys/net/netfilter/nf_conntrack_acct")
    before = acct.read_text().strip()
    try:
        d = nstap({"nat": {"talkers": {"conntrack_acct": True, "interval": 2.0}, "probe": {"enabled": False}}})
        assert acct.read_text().strip() == "1"
        web = containers.docker(docker_image, "httpd", "-f", "-p", "80", "-h", "/", name="talkweb")
        ip = containers.inspect("docker", web)["NetworkSettings"]["IPAddress"]
        wait_until(lambda: d.api(f"/api/v1/containers/{web[:12]}/talkers")[0] == 200, 10, message="watched")
        time.sleep(2.5)  # a pass with the container's address known, before the traffic
        for _ in range(5):  # ~5 MB from the container to the host (bounded)
            with urllib.request.urlopen(f"http://{ip}/bin/busybox", timeout=5) as r:
                size = len(r.read())
        view = wait_until(lambda: (v := d.api(f"/api/v1/containers/{web[:12]}/talkers")[1]) and v["peers"] and v["peers"][0]["bytes_out"] >= 5 * size and v,
                          10, message="talkers")
        assert view["peers"][0]["new_flows"] == 5 and view["peers"][0]["packets_in"] > 0 and view["source"] == "conntrack"
        assert "BYTES OUT" in nstap_cli(d, "talkers", web[:12]).stdout
        m = d.scrape()
        assert not [s for s in m.samples if view["peers"][0]["peer"] in s.labels.values()]  # a peer is never a label value
    finally:
        acct.write_text(before + "\n")


def test_talkers_off_without_consent(nstap, containers: Containers, docker_image: str) -> None:
    acct = Path("/proc/sys/net/netfilter/nf_conntrack_acct")
    if acct.read_text().strip() != "0":
        pytest.skip("conntrack accounting is on already")
    d = nstap({"nat": {"probe": {"enabled": False}}})
    web = containers.docker(docker_image, "sleep", "600", name="talkoff")
    view = wait_until(lambda: (r := d.api(f"/api/v1/containers/{web[:12]}/talkers")) and r[0] == 200 and r[1], 10, message="answer")
    assert "conntrack_acct: true" in view["error"] and view["peers"] == [] and acct.read_text().strip() == "0"


def test_probe_namespace_removed_at_stop_and_stale_one_recovered(nstap, tmp_path: Path) -> None:
    data = tmp_path / "probe-data"
    name = host_link_name(data)
    # What a killed daemon of this data dir could leave: its half of a veth pair (here with the
    # other half in the host, so the two can be told apart).
    sh("ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}x")
    try:
        d = nstap({"data_dir": str(data), "runtimes": []})
        wait_until(lambda: d.events("probe_netns_ready"), 5, message="ready")
        assert d.events("probe_netns_recovered")
        assert "link-netns" in sh("ip", "-d", "link", "show", name).stdout  # the new pair: its peer is in the probe namespace
        assert sh("ip", "link", "show", f"{name}x", check=False).returncode != 0
        d.stop()
        assert sh("ip", "link", "show", name, check=False).returncode != 0
    finally:
        sh("ip", "link", "del", name, check=False)
        sh("ip", "link", "del", f"{name}x", check=False)
