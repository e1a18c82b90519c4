"""The listeners as a fleet operator deploys them: TLS and basic auth from a --web.config.file in
the Prometheus exporter toolkit's format, and the webhook-only token, against a real daemon with
a certificate made by openssl and a bcrypt hash made by the bcrypt library."""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest

from conftest import wait_until, free_port, sh

WEBHOOK = {
    "version": "4", "status": "firing", "receiver": "nstap", "groupKey": "g", "truncatedAlerts": 0, "groupLabels": {}, "commonLabels": {},
    "commonAnnotations": {}, "externalURL": "http://am", "alerts": [],
}


def make_cert(directory: Path) -> tuple[Path, Path]:
    crt, key = directory / "tls.crt", directory / "tls.key"
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "1",
       "-subj", "/CN=nstap-test", "-addext", "subjectAltName=IP:127.0.0.1")
    return crt, key


def fetch(url: str, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None, body: bytes | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {}, data=body, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_tls_and_basic_auth_from_the_web_config_file(nstap, tmp_path: Path) -> None:
    crt, key = make_cert(tmp_path)
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode().replace("$2b$", "$2y$", 1)  # htpasswd's form
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {crt.name}\n  key_file: {key.name}\nbasic_auth_users:\n  prometheus: '{hashed}'\n")
    d = nstap({}, "--web.config.file", str(web), tls_cafile=str(crt), basic_auth=("prometheus", "s3cret"))
    trust = ssl.create_default_context(cafile=str(crt))
    trust.check_hostname = False
    metrics = f"https://127.0.0.1:{d.metrics_port}"
    assert d.scrape().find("nstap_build_info")  # TLS and the right password
    assert fetch(metrics + "/metrics", context=trust) == 401  # no password
    wrong = {"Authorization": "Basic " + base64.b64encode(b"prometheus:nope").decode()}
    assert fetch(metrics + "/metrics", wrong, trust) == 401
    assert fetch(metrics + "/healthz", context=trust) == 200  # probes need no password
    wait_until(lambda: fetch(metrics + "/readyz", context=trust) == 200, 10, 0.2, "ready")  # nor the readiness probe
    with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP is not served
        urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=5)
    # The API over TLS with its bearer token; the CLI finds the certificate in the web config.
    status, body = d.api("/api/v1/containers")
    assert status == 200 and "containers" in body
    d.config_path.write_text(d.config_path.read_text() + f"web_config_file: {web}\n")
    out = subprocess.run([sys.executable, "-m", "nstap", "containers", "--config", str(d.config_path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("CONTAINER"), out.stderr


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n", "cannot load"),
        ("basic_auth_users:\n  bob: plaintext\n", "not a bcrypt hash"),
        ("tls_server_config: {cert_file: a}\n", "needs cert_file and key_file"),
        ("unknown: 1\n", "unknown key 'unknown'"),
    ],
)
def test_a_web_config_that_cannot_be_used_stops_the_daemon(tmp_path: Path, text: str, error: str) -> None:
    web = tmp_path / "web.yml"
    web.write_text(text)
    (tmp_path / "c.yaml").write_text(f"data_dir: {tmp_path / 'data'}\nmetrics_listen: 127.0.0.1:{free_port()}\napi_listen: 127.0.0.1:{free_port()}\nebpf: 'off'\n")
    proc = subprocess.run([sys.executable, "-m", "nstap", "run", "--config", str(tmp_path / "c.yaml"), "--web.config.file", str(web)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and error in proc.stderr, proc.stderr


def test_the_webhook_token_starts_captures_and_reads_nothing(nstap) -> None:
    d = nstap()
    webhook = (d.data_dir / "webhook-token").read_text().strip()
    assert oct((d.data_dir / "webhook-token").stat().st_mode & 0o777) == "0o600"
    assert webhook != (d.data_dir / "api-token").read_text().strip()
    status, body = d.api("/api/v1/alertmanager", token=webhook, method="POST", body=json.dumps(WEBHOOK).encode())
    assert status == 200, body
    for path in ("/api/v1/containers", "/api/v1/captures", "/api/v1/anomalies"):
        status, body = d.api(path, token=webhook)
        assert status == 403 and "webhook token" in body["error"], (path, body)
    status, _ = d.api("/api/v1/captures", token=webhook, method="POST", body=b'{"container": "x"}')
    assert status == 403  # it cannot start a capture of its choosing either
    status, _ = d.api("/api/v1/alertmanager", token="not-a-token", method="POST", body=json.dumps(WEBHOOK).encode())
    assert status == 401


async def test_readyz_says_starting_until_the_daemon_is_ready() -> None:
    """/readyz (a Kubernetes readiness probe) follows App.ready(): 503 until every runtime was
    tried and the running containers' watchers attached, 200 after."""
    from nstap.api.server import ApiServer

    server = ApiServer.__new__(ApiServer)  # only the probe's handler is used
    state = {"ready": False}
    server.ready = lambda: state["ready"]
    assert (await server.readyz(None)).status == 503  # type: ignore[arg-type]
    state["ready"] = True
    assert (await server.readyz(None)).status == 200  # type: ignore[arg-type]
