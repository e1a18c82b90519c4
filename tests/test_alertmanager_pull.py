"""nstap pulls this host's alerts from every member of a real two-node Alertmanager cluster.

Members share silences (gossip) but not alerts, so an alert posted to one member is only there:
nstap must ask both. An alert pushed by the webhook and pulled is captured once; silenced,
inhibited and other hosts' alerts are not captured; with one member killed the other still serves.
A pulled alert is recorded as resolved once no member holds it any more (a silenced one is still
held). The puller's bookkeeping is also tested alone, with answers given to it directly.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from conftest import Containers, free_port, tool, wait_until
from nstap.alertmanager.captures import AlertCaptures
from nstap.alertmanager.pull import MAX_REMEMBERED, AlertPuller, held_alert, host_value
from nstap.config import AlertmanagerConfig
from nstap.index import Index
from test_alertmanager import _ready, post_alert


def am_call(base: str, path: str, body=None):
    """GET (or POST ``body`` as JSON to) an Alertmanager API path; the decoded answer."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}{path}", data=data, headers={"Content-Type": "application/json"}, method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=5) as r:
        text = r.read()
    return json.loads(text) if text else None


class Cluster:
    """Two Alertmanagers gossiping on loopback, routing alerts labelled push="yes" to nstap's webhook."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.ports = [free_port(), free_port()]
        self.gossip = [free_port(), free_port()]
        self.urls = [f"http://127.0.0.1:{p}" for p in self.ports]
        self.procs: list[subprocess.Popen | None] = [None, None]

    def start(self, webhook: str, token_file: Path) -> None:
        config = self.tmp_path / "am.yml"
        config.write_text(yaml.safe_dump({
            "route": {
                "receiver": "null", "group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h", "group_by": ["alertname", "container_id"],
                "routes": [{"matchers": ['push="yes"'], "receiver": "nstap"}],
            },
            "receivers": [
                {"name": "null"},
                {"name": "nstap", "webhook_configs": [
                    {"url": webhook, "send_resolved": True, "http_config": {"authorization": {"type": "Bearer", "credentials_file": str(token_file)}}},
                ]},
            ],
            "inhibit_rules": [{"source_matchers": ['alertname="PullInhibitor"'], "target_matchers": ['alertname="PullInhibited"'], "equal": ["instance"]}],
        }))
        for i in (0, 1):
            log = open(self.tmp_path / f"am{i}.log", "wb")
            self.procs[i] = subprocess.Popen(
                [
                    tool("prometheus-alertmanager"), f"--config.file={config}", f"--storage.path={self.tmp_path / f'am{i}-data'}",
                    f"--web.listen-address=127.0.0.1:{self.ports[i]}", f"--cluster.listen-address=127.0.0.1:{self.gossip[i]}",
                    f"--cluster.peer=127.0.0.1:{self.gossip[1 - i]}", "--cluster.gossip-interval=100ms", "--cluster.settle-timeout=1s",
                    # A member notifies after its position in the cluster times this (15 s by default),
                    # the first one at once: the webhook's notifications within seconds whichever holds the alert.
                    "--cluster.peer-timeout=1s",
                ],
                stdout=log, stderr=subprocess.STDOUT,
            )
        for url in self.urls:
            wait_until(lambda: _ready(url), 30, 0.2, f"alertmanager {url} ready")
        wait_until(lambda: all(len(am_call(u, "/api/v2/status")["cluster"]["peers"]) == 2 for u in self.urls), 30, 0.2, "both members see each other")

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(20)


@pytest.fixture
def cluster(tmp_path: Path):
    c = Cluster(tmp_path)
    yield c
    c.stop()


def suppressed(base: str, alertname: str, by: str) -> bool:
    """The member holds the alert and marks it silenced/inhibited (``by``: silencedBy or inhibitedBy)."""
    alerts = am_call(base, "/api/v2/alerts?" + urllib.parse.urlencode({"filter": f'alertname="{alertname}"'}))
    return bool(alerts) and all(a["status"][by] for a in alerts)


@pytest.mark.docker
def test_pull_from_every_member_of_a_cluster(nstap, cluster: Cluster, containers: Containers, docker_image: str, tmp_path: Path) -> None:
    # detect.capture off: other tests' containers on this machine must not take the capture slots.
    d = nstap({"capture": {"post_seconds": 2}, "detect": {"capture": False}, "alertmanager": {"urls": cluster.urls, "poll_interval": 1.0, "timeout": 2.0}})
    cluster.start(f"http://127.0.0.1:{d.api_port}/api/v1/alertmanager", d.data_dir / "api-token")
    host = f"127.0.0.1:{d.metrics_port}"  # the default host: this daemon's scrape address
    cid = containers.docker(docker_image, "httpd", "-f", "-p", "80", "-h", "/www", name="pulled")
    d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=cid[:12]), 5)
    mine = {"instance": host, "container_id": cid}
    a, b = cluster.urls

    # What must not be captured: another host's alert, a silenced one (silence made on b, gossiped
    # to a), an inhibited one (its inhibitor on the same member).
    post_alert(a, {"alertname": "PullOtherHost", "instance": "elsewhere:9880", "container_id": cid})
    silence = {
        "matchers": [{"name": "alertname", "value": "PullSilenced", "isRegex": False, "isEqual": True}],
        "startsAt": datetime.now(timezone.utc).isoformat(), "endsAt": (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat(),
        "createdBy": "test", "comment": "not this one",
    }
    am_call(b, "/api/v2/silences", silence)
    wait_until(lambda: any(s["status"]["state"] == "active" for s in am_call(a, "/api/v2/silences")), 20, 0.2, "the silence gossiped to the other member")
    post_alert(a, {"alertname": "PullSilenced", **mine})
    post_alert(a, {"alertname": "PullInhibitor", "instance": host})
    post_alert(a, {"alertname": "PullInhibited", **mine})
    wait_until(lambda: suppressed(a, "PullSilenced", "silencedBy") and suppressed(a, "PullInhibited", "inhibitedBy"), 20, 0.2, "silenced and inhibited")

    def captures(kind: str | None = None) -> list[dict]:
        status, body = d.api("/api/v1/captures?reason=alertmanager")
        assert status == 200
        return [c for c in body["captures"] if kind is None or c["kind"] == kind]

    def alert_rows(name: str) -> list[dict]:
        return [r for r in d.api("/api/v1/alerts")[1]["alerts"] if r["alertname"] == name and r["status"] == "firing"]

    # Pulled only (no webhook route): posted to member a, captured; the time it took is the figure.
    posted = time.time()
    post_alert(a, {"alertname": "PullOnly", **mine})
    first = wait_until(lambda: captures("PullOnly"), 20, 0.05, "the pulled alert's capture")
    pull_latency = first[0]["created_at"] - posted

    # Pushed and pulled (routed to the webhook too), posted to member b only: one capture.
    post_alert(b, {"alertname": "PullPushed", "push": "yes", **mine})
    wait_until(lambda: len(alert_rows("PullPushed")) >= 2, 20, 0.2, "the alert both pushed and pulled")
    time.sleep(3)  # three more polls
    rows = alert_rows("PullPushed")
    assert len(rows) == 2, rows  # one notification, one pull: the puller does not record it again each poll
    assert len(captures("PullPushed")) == 1 and {r["capture_id"] for r in rows} == {captures("PullPushed")[0]["id"]}
    assert sorted(r["note"] for r in rows) == ["already captured for this alert", "capture started"]

    assert len(captures()) == 2, [c["kind"] for c in captures()]  # nothing of another host, silenced or inhibited
    m = d.scrape()
    assert m.value("nstap_alertmanager_up", url=a) == 1 and m.value("nstap_alertmanager_up", url=b) == 1
    assert m.value("nstap_alertmanager_polls_total", url=a, result="ok") >= 3

    # Member a dies: b still serves; a's going down is logged once.
    before_kill = len(d.log_path.read_text().splitlines())
    cluster.kill(0)
    post_alert(b, {"alertname": "PullAfterKill", **mine})
    wait_until(lambda: captures("PullAfterKill"), 20, 0.1, "a capture with one member dead")
    wait_until(lambda: d.scrape().value("nstap_alertmanager_up", url=a) == 0, 10, 0.2, "member a down")
    time.sleep(4)  # more attempts at a (backoff 1, 2 s)
    m = d.scrape()
    assert m.value("nstap_alertmanager_polls_total", url=a, result="error") >= 2
    assert m.value("nstap_alertmanager_up", url=b) == 1
    down = [line for line in d.log_path.read_text().splitlines()[before_kill:] if '"alertmanager_down"' in line and a in line]
    assert len(down) == 1, down
    assert len(captures()) == 3
    print(f"\npull-to-capture latency (poll_interval 1 s): {pull_latency:.2f} s")
    (tmp_path.parent / "pull_latency.txt").write_text(f"{pull_latency:.3f}\n")


@pytest.mark.docker
def test_a_fleet_through_agents_pulls_by_the_host_label(nstap, cluster: Cluster, containers: Containers, docker_image: str) -> None:
    """Through Prometheus agents (deploy/prometheus/prometheus-agent.yml) every host's alerts say
    instance="127.0.0.1:9880", and the agent's external label ``host`` holds the host's name: with
    ``host_label: host`` and no ``host`` set, nstap takes its own name and captures its alerts only."""
    d = nstap({"capture": {"post_seconds": 2}, "detect": {"capture": False},
               "alertmanager": {"urls": cluster.urls, "poll_interval": 1.0, "timeout": 2.0, "host_label": "host"}})
    cluster.start(f"http://127.0.0.1:{d.api_port}/api/v1/alertmanager", d.data_dir / "api-token")
    cid = containers.docker(docker_image, "httpd", "-f", "-p", "80", "-h", "/www", name="fleetpulled")
    d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=cid[:12]), 5)
    agent = {"instance": "127.0.0.1:9880", "container_id": cid}  # what every host's agent sends
    a, b = cluster.urls
    post_alert(a, {"alertname": "FleetOtherHost", "host": "another-node", **agent})
    post_alert(b, {"alertname": "FleetMine", "host": socket.gethostname(), **agent})

    def kinds() -> list[str]:
        return [c["kind"] for c in d.api("/api/v1/captures?reason=alertmanager")[1]["captures"]]

    wait_until(lambda: "FleetMine" in kinds(), 20, 0.1, "this host's alert captured")
    time.sleep(3)  # three more polls: another host's alert is still not captured
    assert kinds() == ["FleetMine"]
    assert d.scrape().value("nstap_alertmanager_alerts", url=b) == 1 and d.scrape().value("nstap_alertmanager_alerts", url=a) == 0


# -- resolution: the puller's bookkeeping alone, then against the real cluster ----------------------


def _alert(name: str, starts: str = "2026-01-01T00:00:00.000Z") -> dict:
    return {"status": "firing", "labels": {"alertname": name, "instance": "h:9880"}, "fingerprint": f"fp-{name}", "startsAt": starts}


def _am(name: str, state: str = "active", silenced: bool = False, instance: str = "h:9880") -> dict:
    """An alert as Alertmanager's v2 API answers it."""
    return {"labels": {"alertname": name, "instance": instance}, "fingerprint": f"fp-{name}", "startsAt": "2026-01-01T00:00:00.000Z",
            "status": {"state": state, "silencedBy": ["s1"] if silenced else [], "inhibitedBy": []}}


@pytest.mark.parametrize("answer, expected", [
    (_am("X"), (_alert("X"), True)),
    (_am("X", "suppressed", silenced=True), (_alert("X"), False)),  # muted, still firing: held
    (_am("X", "unprocessed"), (_alert("X"), False)),
    (_am("X", instance="elsewhere:9880"), None),  # another host's
    ({**_am("X"), "labels": {"alertname": "X", "instance": "h:9880", "n": 1}}, None),
    ({**_am("X"), "fingerprint": ""}, None),
    ({**_am("X"), "status": "active"}, None),
    ("not an alert", None),
])
def test_held_alert(answer: object, expected: object) -> None:
    assert held_alert(answer, "instance", "h:9880") == expected


@pytest.mark.parametrize("label, listen, expected", [
    ("instance", "0.0.0.0:9880", f"{socket.gethostname()}:9880"),  # scraped directly: the scrape address
    ("instance", "10.0.0.5:9991", "10.0.0.5:9991"),
    ("instance", "[fd00::5]:9880", "[fd00::5]:9880"),
    ("host", "127.0.0.1:9880", socket.gethostname()),  # the agents' external label: the host's name
    ("nstap_host", "0.0.0.0:9880", socket.gethostname()),
])
def test_the_default_host_value_follows_the_label(label: str, listen: str, expected: str) -> None:
    assert host_value(label, listen) == expected


async def test_a_pulled_alert_resolves_once_no_member_holds_it() -> None:
    puller = AlertPuller(AlertmanagerConfig(urls=("http://a:9093", "http://b:9093")), "h:9880", lambda *_: None)
    calls: list[tuple[str, str, str]] = []

    async def handle(alert: dict, source: str) -> dict:
        calls.append((alert["status"], alert["labels"]["alertname"], source))
        return {"capture_id": None}

    puller.handle = handle
    a, b = puller.members
    x, muted = _alert("X"), _alert("Muted")
    await puller.answered(a, [(x, True), (muted, False)])  # Muted was silenced before it was ever pulled
    await puller.answered(b, [(x, True)])
    await puller.resolve()
    assert calls == [("firing", "X", "pull")]  # merged across members, handed on once
    await puller.answered(a, [(x, False)])  # silenced now: still held, nothing recorded
    await puller.resolve()
    assert calls == [("firing", "X", "pull")]
    await puller.answered(a, [])  # gone from a; b still holds it
    await puller.resolve()
    assert calls == [("firing", "X", "pull")] and "Muted" not in {k[0][3:] for k in puller.pulled}  # never handed on: forgotten, not "resolved"
    b.truncated = True
    await puller.answered(b, [])  # an answer cut at max_alerts says nothing of what is left out
    await puller.resolve()
    assert len(calls) == 1
    b.truncated = False
    await puller.answered(b, [])
    await puller.resolve()
    assert calls == [("firing", "X", "pull"), ("resolved", "X", "pull")]
    await puller.answered(a, [])
    await puller.answered(b, [])
    await puller.resolve()
    assert len(calls) == 2 and puller.pulled == {}  # recorded once


async def test_a_restarted_puller_takes_back_what_it_held_from_the_index(tmp_path: Path) -> None:
    """Defect: the puller's memory was lost with the daemon: an alert that resolved while it was
    down was never recorded resolved, and one still firing was recorded firing again. A real index
    (SQLite) and the webhook's own handler; the Alertmanager answers are the puller's bookkeeping."""
    index = Index(tmp_path / "index.db")
    await index.db.run(index.db.open)
    try:
        record = index.alerts.record
        host = {"instance": "h:9880"}
        t = "2026-01-01T00:00:00.000Z"
        await record("firing", "Held", "fp-held", t, {"alertname": "Held", **host, "container_id": "c"}, "cap-1", "capture started")
        await record("firing", "GoneMeanwhile", "fp-gone", t, {"alertname": "GoneMeanwhile", **host}, None, "recorded")
        await record("firing", "Done", "fp-done", t, {"alertname": "Done", **host}, None, "recorded")
        await record("resolved", "Done", "fp-done", t, {"alertname": "Done", **host}, None, "recorded")
        await record("firing", "Elsewhere", "fp-else", t, {"alertname": "Elsewhere", "instance": "other:9880"}, None, "recorded")
        assert {r["fingerprint"] for r in await index.alerts.unresolved(10)} == {"fp-held", "fp-gone", "fp-else"}

        handler = AlertCaptures(index.alerts, None, None)  # type: ignore[arg-type] - no capture is asked for here
        puller = AlertPuller(AlertmanagerConfig(urls=("http://a:9093", "http://b:9093")), "h:9880", lambda *_: None)
        puller.handle, puller.remembered = handler.handle, index.alerts.unresolved
        puller.restore(await index.alerts.unresolved(MAX_REMEMBERED))
        assert set(puller.pulled) == {("fp-held", t), ("fp-gone", t)}  # another host's is not this puller's
        a, b = puller.members
        held = {**_alert("Held"), "labels": {"alertname": "Held", **host, "container_id": "c"}, "fingerprint": "fp-held", "startsAt": t}
        await puller.answered(a, [(held, True)])
        await puller.resolve()
        assert ("fp-gone", t) in puller.pulled  # b has not answered yet: it may still hold it
        await puller.answered(b, [])
        await puller.resolve()

        def rows(name: str, status: str) -> list[dict]:
            return [r for r in index.alerts.db.fetch("SELECT alertname, status FROM alerts") if r == (name, status)]

        got = await index.db.run(lambda: {name: (len(rows(name, "firing")), len(rows(name, "resolved"))) for name in ("Held", "GoneMeanwhile", "Done")})
        assert got == {"Held": (1, 0), "GoneMeanwhile": (1, 1), "Done": (1, 1)}, got  # still firing: not recorded again
        await puller.answered(a, [])
        await puller.resolve()
        assert await index.db.run(lambda: len(rows("Held", "resolved"))) == 1
        # Its resolution pushed by the webhook as well: still one row.
        assert (await handler.handle({"status": "resolved", "labels": held["labels"], "fingerprint": "fp-held", "startsAt": t}))["note"] == "resolution already recorded"
        assert await index.db.run(lambda: len(rows("Held", "resolved"))) == 1
    finally:
        await index.db.close()


def test_a_restarted_daemon_records_what_resolved_while_it_was_down(nstap, cluster: Cluster) -> None:
    """The real thing: a daemon pulls two alerts from a real cluster and stops; one resolves on both
    members meanwhile; a daemon started again on the same index records that resolution, and does
    not record the other (still firing) again."""
    pull = {"urls": cluster.urls, "poll_interval": 1.0, "timeout": 2.0, "host": "restarting:9880"}
    config = {"detect": {"capture": False}, "nat": {"probe": {"enabled": False}}, "alertmanager": pull}
    first = nstap(config)
    cluster.start(f"http://127.0.0.1:{first.api_port}/api/v1/alertmanager", first.data_dir / "api-token")  # nothing is routed to it
    a, b = cluster.urls
    starts = datetime.now(timezone.utc) - timedelta(seconds=5)
    gone, still = {"alertname": "GoneWhileDown", "instance": "restarting:9880"}, {"alertname": "StillFiring", "instance": "restarting:9880"}
    for member in (a, b):
        post_at(member, gone, starts)
        post_at(member, still, starts)

    def rows(d, name: str, status: str) -> list[dict]:
        return [r for r in d.api("/api/v1/alerts")[1]["alerts"] if r["alertname"] == name and r["status"] == status]

    wait_until(lambda: rows(first, "GoneWhileDown", "firing") and rows(first, "StillFiring", "firing"), 20, 0.2, "both pulled")
    assert first.stop() == 0
    ended = datetime.now(timezone.utc) - timedelta(seconds=1)
    for member in (a, b):
        post_at(member, gone, starts, ended)
    second = nstap({**config, "data_dir": str(first.data_dir)})
    wait_until(lambda: rows(second, "GoneWhileDown", "resolved"), 20, 0.2, "the resolution recorded after the restart")
    time.sleep(3)  # three more polls
    assert len(rows(second, "GoneWhileDown", "resolved")) == 1 and len(rows(second, "StillFiring", "firing")) == 1
    assert not rows(second, "StillFiring", "resolved")
    assert second.events("alertmanager_pull_restored", alerts=2)


def post_at(base: str, labels: dict[str, str], starts: datetime, ends: datetime | None = None) -> None:
    """Post one alert with its startsAt (Prometheus sends the same alert, startsAt and all, to every member)."""
    alert = {"labels": labels, "annotations": {"summary": "test"}, "startsAt": starts.isoformat()}
    if ends is not None:
        alert["endsAt"] = ends.isoformat()
    am_call(base, "/api/v2/alerts", [alert])


def silence_of(alertname: str) -> dict:
    now = datetime.now(timezone.utc)
    return {"matchers": [{"name": "alertname", "value": alertname, "isRegex": False, "isEqual": True}], "startsAt": now.isoformat(),
            "endsAt": (now + timedelta(hours=1)).isoformat(), "createdBy": "test", "comment": "muted, not resolved"}


@pytest.mark.docker
def test_pulled_alerts_are_recorded_resolved_once_no_member_holds_them(nstap, cluster: Cluster, containers: Containers, docker_image: str) -> None:
    d = nstap({"capture": {"post_seconds": 1}, "detect": {"capture": False}, "nat": {"probe": {"enabled": False}},
               "alertmanager": {"urls": cluster.urls, "poll_interval": 1.0, "timeout": 2.0}})
    cluster.start(f"http://127.0.0.1:{d.api_port}/api/v1/alertmanager", d.data_dir / "api-token")  # nothing is routed to it here
    host = f"127.0.0.1:{d.metrics_port}"
    cid = containers.docker(docker_image, "sleep", "600", name="resolving")
    d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=cid[:12]), 5)
    a, b = cluster.urls
    starts = datetime.now(timezone.utc) - timedelta(seconds=5)
    both = {"alertname": "ResolveOnBoth", "instance": host, "container_id": cid}
    muted = {"alertname": "ResolveSilenced", "instance": host}
    pushed = {"alertname": "ResolvePushed", "instance": host, "push": "yes"}  # the webhook's too, with send_resolved
    post_at(a, both, starts)
    post_at(b, both, starts)
    post_at(a, muted, starts)
    post_at(a, pushed, starts)

    def rows(name: str, status: str) -> list[dict]:
        return [r for r in d.api("/api/v1/alerts")[1]["alerts"] if r["alertname"] == name and r["status"] == status]

    def member_holds(base: str, name: str) -> bool:
        return bool(am_call(base, "/api/v2/alerts?" + urllib.parse.urlencode({"filter": f'alertname="{name}"'})))

    wait_until(lambda: rows("ResolveOnBoth", "firing") and rows("ResolveSilenced", "firing"), 20, 0.2, "both alerts pulled")
    wait_until(lambda: d.events("alert_received", source="webhook", alertname="ResolvePushed", status="firing"), 20, 0.2, "the pushed alert's notification")
    assert rows("ResolveOnBoth", "firing")[0]["capture_id"]
    # Silenced after it was pulled: muted, not resolved. Resolved on member a only: b still holds it.
    am_call(b, "/api/v2/silences", silence_of("ResolveSilenced"))
    wait_until(lambda: suppressed(a, "ResolveSilenced", "silencedBy"), 20, 0.2, "the silence gossiped to the member holding the alert")
    ended = datetime.now(timezone.utc) - timedelta(seconds=1)
    post_at(a, both, starts, ended)
    wait_until(lambda: not member_holds(a, "ResolveOnBoth") and member_holds(b, "ResolveOnBoth"), 10, 0.2, "resolved on a, held by b")
    time.sleep(3)  # three polls
    assert not rows("ResolveOnBoth", "resolved") and not rows("ResolveSilenced", "resolved")
    # Resolved on b too, and the silenced one resolved: each recorded once, as the webhook records it.
    post_at(b, both, starts, ended)
    post_at(a, muted, starts, ended)
    post_at(a, pushed, starts, ended)
    wait_until(lambda: rows("ResolveOnBoth", "resolved") and rows("ResolveSilenced", "resolved"), 20, 0.2, "both resolutions recorded")
    # The pushed one: Alertmanager's resolved notification and the puller's resolution, one row.
    wait_until(
        lambda: d.events("alert_received", source="webhook", alertname="ResolvePushed", status="resolved")
        and d.events("alert_received", source="pull", alertname="ResolvePushed", status="resolved"),
        20, 0.2, "the pushed alert's resolution pushed and pulled",
    )
    time.sleep(3)
    told = d.events("alert_received", alertname="ResolvePushed", status="resolved")
    assert sorted(e["note"] for e in told) == ["recorded", "resolution already recorded"], told
    for name in ("ResolveOnBoth", "ResolveSilenced", "ResolvePushed"):
        firing, resolved = rows(name, "firing"), rows(name, "resolved")
        # The pushed one's firing: one notification and one pull, as test_pull_from_every_member.
        assert len(firing) == (2 if name == "ResolvePushed" else 1) and len(resolved) == 1, (name, firing, resolved)
        assert (resolved[0]["fingerprint"], resolved[0]["starts_at"]) == (firing[0]["fingerprint"], firing[0]["starts_at"])
        assert resolved[0]["note"] == "recorded" and resolved[0]["labels"] == firing[0]["labels"]
    assert len(d.api("/api/v1/captures?reason=alertmanager")[1]["captures"]) == 1  # a resolution starts nothing
    assert len(d.events("alert_received", source="pull", status="resolved")) == 3
