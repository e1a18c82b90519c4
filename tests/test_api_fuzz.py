"""The API against bad input: a table of known tricks, then generated input (hypothesis).

Whatever comes in, the answer is JSON with a status below 500, nothing is read or written
outside the capture store, and the daemon keeps running. The inputs name the container that
really runs, so they get past the lookup to the validation of every field: each test counts the
errors by what they refused, and fails unless its input reached the checks it is there to test.
The chaos run (test_chaos.py) sends ten thousand of them; here a few hundred.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import RUN_ID, Containers, Daemon

pytestmark = pytest.mark.docker

ALLOWED = {200, 202, 400, 401, 403, 404, 405, 409, 410, 413, 415, 429}
NAME = f"fuzz-{RUN_ID}"  # the container the fixture runs
# What an answer refused, from its error message: validation reached or not.
REFUSALS = (
    ("duration", "duration must"),
    ("pre_seconds", "pre_seconds must"),
    ("filter", "filter"),
    ("unknown_field", "unknown field"),
    ("container_missing", "container is required"),
    ("container_type", "container must be"),
    ("no_container", "no running container"),
    ("json", "not valid JSON"),
    ("not_object", "must be a JSON object"),
    ("alerts", "alerts must"),
    ("version", "version 4"),
    ("limit", "limit must"),
    ("time", "must be Unix seconds"),
    ("finite", "must be finite"),
    ("active", "active must"),
    ("text", "is not a valid value"),
    ("concurrency", "already running"),
)


def refusal(status: int, body: bytes) -> str:
    """What an answer says about how far the request got."""
    if status < 300:
        return f"ok{status}"
    try:
        message = json.loads(body).get("error", "")
    except ValueError:
        return f"status{status}"
    for name, text in REFUSALS:
        if text in message:
            return name
    return f"other{status}"


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
    assert Containers.inspect("docker", cid)["Name"] == "/" + NAME
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
    ("POST", "/api/v1/captures", b'{"container": "NAME", "duration": 1e309}'),
    ("POST", "/api/v1/captures", b'{"container": "NAME", "duration": true}'),
    ("POST", "/api/v1/captures", b'{"container": "NAME", "duration": -1}'),
    ("POST", "/api/v1/captures", b'{"container": "NAME", "pre_seconds": "10"}'),
    ("POST", "/api/v1/captures", b'{"container": "NAME", "filter": "-w /tmp/nstap-fuzz-escape.pcap"}'),
    ("POST", "/api/v1/captures", b'{"container": "NAME", "filter": "tcp port"}'),
    ("POST", "/api/v1/captures", b'{"container": "NAME", "filter": ["tcp"]}'),
    ("POST", "/api/v1/captures", b'{"container": "NAME", "extra": 1}'),
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
TRICKS = [(m, p, b.replace(b"NAME", NAME.encode()) if b else b) for m, p, b in TRICKS]
# Each table entry that names the container must be refused by the check it targets.
TRICK_REFUSALS = {
    b'"duration": 1e309': "duration", b'"duration": true': "duration", b'"duration": -1': "duration",
    b'"pre_seconds": "10"': "pre_seconds", b'"filter": "-w': "filter", b'"filter": "tcp port"': "filter",
    b'"filter": ["tcp"]': "filter", b'"extra": 1': "unknown_field",
}


def test_table_of_bad_inputs(daemon) -> None:
    d, cid = daemon
    before = files_under(d.data_dir)
    for method, path, body in TRICKS:
        status, answer = call(d, method, path, body, headers={"Content-Type": "application/json"})
        check(status, answer, path)
        assert status != 200 or method == "GET" or path.endswith("alertmanager"), (method, path, status)
        for fragment, expected in TRICK_REFUSALS.items():
            if body and fragment in body:
                assert refusal(status, answer) == expected, (body, status, answer)
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
# Each family of generated bodies aims at one check: the fields before it valid, its own field
# generated (strictly invalid where it aims at a refusal), so every check is reached every run.
valid_seconds = st.one_of(st.integers(1, 30), st.floats(0.5, 30))
bad_seconds = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not 0 <= x <= 120),
    st.integers(max_value=-1),
    st.integers(min_value=100_000),
    st.text(max_size=10),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)
filters = st.one_of(
    st.sampled_from(["tcp", "udp port 53", "icmp", "tcp port", "icmp and", "-w /tmp/x", "port 99999", "", "host 1.2.3", "tcp[13] & 2 != 0"]),
    st.text(max_size=60),
    json_values,
)
capture_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"container": st.one_of(st.sampled_from(["nope", "", "../x"]), st.text(max_size=20), st.integers())}),
    st.fixed_dictionaries({"container": st.just(NAME), "duration": bad_seconds}),
    st.fixed_dictionaries({"container": st.just(NAME), "duration": valid_seconds, "pre_seconds": bad_seconds}),
    st.fixed_dictionaries({"container": st.just(NAME), "duration": valid_seconds, "pre_seconds": valid_seconds, "filter": filters}),
    st.fixed_dictionaries({"container": st.just(NAME)}, optional={"duration": valid_seconds, "zzz": json_values, "extra": st.integers()}),
)
label_values = st.one_of(st.just(NAME), st.text(max_size=20))
alert = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "status": st.sampled_from(["firing", "resolved", "unknown"]) | json_values,
            "labels": st.dictionaries(st.sampled_from(["alertname", "container", "container_id", "x"]), label_values | json_values, max_size=3),
            "fingerprint": st.text(max_size=20) | json_values,
            "startsAt": st.text(max_size=30),
        },
    ),
    st.fixed_dictionaries(
        {
            "status": st.sampled_from(["firing", "firing", "resolved"]),
            "labels": st.fixed_dictionaries({"alertname": st.text(max_size=20), "container": label_values}),
            "fingerprint": st.text(alphabet="0123456789abcdef", max_size=16),
            "startsAt": st.text(max_size=30),
        }
    ),
)
alert_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"alerts": st.lists(alert | json_values, max_size=4)}, optional={"version": json_values}),
    st.fixed_dictionaries({"version": st.just("4"), "alerts": st.lists(alert, min_size=1, max_size=3)}),
)
queries = st.dictionaries(
    st.sampled_from(["container", "kind", "since", "until", "limit", "reason", "active"]),
    st.one_of(st.text(max_size=30), st.sampled_from(["nan", "inf", "-1", "0", "1001", "1e400", "2026-13-01", "true", NAME])),
    max_size=4,
)
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def fuzz_post(d: Daemon, path: str, bodies, examples: int) -> Counter:
    """POST generated JSON bodies to ``path``; returns what they were refused for (and, for the
    Alertmanager webhook, what happened to each alert)."""
    seen: Counter = Counter()

    @settings(FUZZ, max_examples=examples)
    @given(body=bodies)
    def one(body) -> None:
        status, answer = call(d, "POST", path, json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        check(status, answer, path)
        seen[refusal(status, answer)] += 1
        if status == 200 and path.endswith("/alertmanager"):
            for result in json.loads(answer)["results"]:
                seen["alert:" + str(result.get("note") or result.get("reason") or "")[:24]] += 1

    one()
    return seen


def fuzz_captures(d: Daemon, examples: int) -> Counter:
    """Generated capture requests."""
    return fuzz_post(d, "/api/v1/captures", capture_bodies, examples)


def fuzz_alerts(d: Daemon, examples: int) -> Counter:
    """Generated Alertmanager payloads."""
    return fuzz_post(d, "/api/v1/alertmanager", alert_bodies, examples)


def fuzz_reads(d: Daemon, examples: int) -> Counter:
    """GET generated ids and queries; returns what they were refused for."""
    seen: Counter = Counter()

    @settings(FUZZ, max_examples=examples)
    @given(ident=st.text(max_size=80), query=queries)
    def one(ident: str, query: dict) -> None:
        quoted = urllib.parse.quote(ident, safe="")
        for path in (f"/api/v1/captures/{quoted}", f"/api/v1/captures/{quoted}/pcap", "/api/v1/captures?" + urllib.parse.urlencode(query), "/api/v1/anomalies?" + urllib.parse.urlencode(query)):
            status, answer = call(d, "GET", path)
            check(status, answer, path)
            seen[refusal(status, answer)] += 1
            if status == 200 and path.endswith("/pcap"):
                pytest.fail(f"downloaded something for a made-up id {ident!r}")

    one()
    return seen


def test_generated_capture_requests(daemon) -> None:
    d, _ = daemon
    seen = fuzz_captures(d, 200)
    # The generated requests reached every check of the body, not only the container lookup.
    for check_name in ("duration", "pre_seconds", "filter", "unknown_field"):
        assert seen[check_name] > 0, seen
    assert seen["ok202"] + seen["concurrency"] > 0, seen  # and some were valid


def test_generated_alertmanager_payloads(daemon) -> None:
    d, _ = daemon
    seen = fuzz_alerts(d, 200)
    assert seen["ok200"] > 0 and seen["alerts"] > 0 and seen["alert:recorded"] > 0, seen
    # Firing alerts that named the container reached the capture (started, refused at the
    # concurrency limit, or deduplicated), not only the payload checks.
    assert sum(n for k, n in seen.items() if k.startswith(("alert:capture started", "alert:refused", "alert:already captured"))) > 0, seen


def test_generated_ids_and_queries(daemon) -> None:
    d, _ = daemon
    seen = fuzz_reads(d, 200)
    for check_name in ("limit", "time", "active"):
        assert seen[check_name] > 0, seen
    assert os.path.exists(d.data_dir / "nstap.db")
