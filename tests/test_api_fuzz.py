"""The API against bad input: a table of known tricks, then generated input (hypothesis).

Whatever comes in, the answer is JSON with a status below 500, nothing is read or written
outside the capture store, and the daemon keeps running.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Containers, Daemon

pytestmark = pytest.mark.docker

ALLOWED = {200, 202, 400, 401, 403, 404, 405, 409, 410, 413, 415, 429}


def call(d: Daemon, method: str, path: str, body: bytes | None = None, token: str | None = "", headers: dict | None = None) -> tuple[int, bytes]:
    if token == "":
        token = (d.data_dir / "api-token").read_text().strip()
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"http://127.0.0.1:{d.api_port}{path}", data=body, method=method, headers=h)
    try:
        with urllib.request.urlopen(request, timeout=15) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def check(status: int, body: bytes, path: str) -> None:
    assert status in ALLOWED, (status, path, body[:300])
    if status >= 400:
        assert "error" in json.loads(body), body


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def daemon(nstap, containers: Containers, docker_image: str) -> tuple[Daemon, str]:
    d = nstap({"capture": {"max_concurrent": 2, "post_seconds": 1}})
    cid = containers.docker(docker_image, "httpd", "-f", "-p", "80", "-h", "/www", name="fuzz")
    d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=cid[:12]), 5)
    return d, cid


TRICKS = [
    ("GET", "/api/v1/captures/..%2F..%2Fnstap.db", None),
    ("GET", "/api/v1/captures/..%2F..%2Fapi-token/pcap", None),
    ("GET", "/api/v1/captures/%2e%2e/pcap", None),
    ("GET", "/api/v1/captures/" + "a" * 300, None),
    ("GET", "/api/v1/captures/nul%00byte/pcap", None),
    ("GET", "/api/v1/captures?limit=0", None),
    ("GET", "/api/v1/captures?limit=99999999999999999999", None),
    ("GET", "/api/v1/captures?since=yesterday", None),
    ("GET", "/api/v1/captures?since=nan", None),
    ("GET", "/api/v1/anomalies?active=maybe", None),
    ("GET", "/api/v1/anomalies?container=%0a", None),
    ("POST", "/api/v1/captures", b"{not json"),
    ("POST", "/api/v1/captures", b"[]"),
    ("POST", "/api/v1/captures", b'"string"'),
    ("POST", "/api/v1/captures", b"{}"),
    ("POST", "/api/v1/captures", b'{"container": 5}'),
    ("POST", "/api/v1/captures", b'{"container": "no-such-container"}'),
    ("POST", "/api/v1/captures", b'{"container": "fuzz", "duration": 1e309}'),
    ("POST", "/api/v1/captures", b'{"container": "fuzz", "duration": true}'),
    ("POST", "/api/v1/captures", b'{"container": "fuzz", "duration": -1}'),
    ("POST", "/api/v1/captures", b'{"container": "fuzz", "filter": "-w /tmp/nstap-fuzz-escape.pcap"}'),
    ("POST", "/api/v1/captures", b'{"container": "fuzz", "filter": "tcp port"}'),
    ("POST", "/api/v1/captures", b'{"container": "fuzz", "filter": ["tcp"]}'),
    ("POST", "/api/v1/captures", b'{"container": "fuzz", "extra": 1}'),
    ("POST", "/api/v1/captures", b"\xff\xfe\x00garbage"),
    ("POST", "/api/v1/captures", b'{"container": "' + b"x" * 100_000 + b'"}'),
    ("POST", "/api/v1/alertmanager", b"{}"),
    ("POST", "/api/v1/alertmanager", b'{"alerts": "x"}'),
    ("POST", "/api/v1/alertmanager", b'{"version": "3", "alerts": []}'),
    ("POST", "/api/v1/alertmanager", b'{"alerts": [1, null, {"status": "firing", "labels": {"container": 7}}]}'),
    ("POST", "/api/v1/alertmanager", b'{"alerts": [{"status": "firing", "labels": {"container": "../../etc"}}]}'),
    ("DELETE", "/api/v1/captures", None),
    ("PUT", "/api/v1/alertmanager", b"{}"),
]


def test_table_of_bad_inputs(daemon) -> None:
    d, cid = daemon
    before = files_under(d.data_dir)
    for method, path, body in TRICKS:
        status, answer = call(d, method, path, body, headers={"Content-Type": "application/json"})
        check(status, answer, path)
        assert status != 200 or method == "GET" or path.endswith("alertmanager"), (method, path, status)
    assert not Path("/tmp/nstap-fuzz-escape.pcap").exists()
    after = files_under(d.data_dir)
    assert all(f.startswith("captures/") or f.startswith("nstap.db") for f in after - before), after - before
    for method, path, body in TRICKS[:3]:
        assert call(d, method, path, body, token=None)[0] == 401
    assert call(d, "GET", "/healthz", token=None)[0] == 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
capture_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"container": st.one_of(st.sampled_from(["fuzz", "nope", "", "../x"]), st.text(max_size=20), st.integers())},
        optional={"duration": json_values, "filter": st.one_of(st.text(max_size=60), json_values), "pre_seconds": json_values, "zzz": json_values},
    ),
)
alert = st.fixed_dictionaries(
    {},
    optional={
        "status": st.sampled_from(["firing", "resolved", "unknown"]) | json_values,
        "labels": st.dictionaries(st.sampled_from(["alertname", "container", "container_id", "x"]), st.text(max_size=20) | json_values, max_size=3),
        "fingerprint": st.text(max_size=20) | json_values,
        "startsAt": st.text(max_size=30),
    },
)
alert_bodies = st.one_of(json_values, st.fixed_dictionaries({"alerts": st.lists(alert | json_values, max_size=4)}, optional={"version": json_values}))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=capture_bodies)
def test_generated_capture_requests(daemon, body) -> None:
    d, _ = daemon
    status, answer = call(d, "POST", "/api/v1/captures", json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    check(status, answer, "/api/v1/captures")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=alert_bodies)
def test_generated_alertmanager_payloads(daemon, body) -> None:
    d, _ = daemon
    status, answer = call(d, "POST", "/api/v1/alertmanager", json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    check(status, answer, "/api/v1/alertmanager")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ident=st.text(max_size=80), query=st.dictionaries(st.sampled_from(["container", "kind", "since", "until", "limit", "reason", "active"]), st.text(max_size=30), max_size=4))
def test_generated_ids_and_queries(daemon, ident: str, query: dict) -> None:
    d, _ = daemon
    quoted = urllib.parse.quote(ident, safe="")
    for path in (f"/api/v1/captures/{quoted}", f"/api/v1/captures/{quoted}/pcap", "/api/v1/captures?" + urllib.parse.urlencode(query), "/api/v1/anomalies?" + urllib.parse.urlencode(query)):
        status, answer = call(d, "GET", path)
        check(status, answer, path)
        if status == 200 and path.endswith("/pcap"):
            pytest.fail(f"downloaded something for a made-up id {ident!r}")
    assert os.path.exists(d.data_dir / "nstap.db")
