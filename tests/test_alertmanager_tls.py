"""nstap pulls from a real Alertmanager served over TLS with basic auth (its --web.config.file, as
exporter-toolkit does it), trusting a CA of the test's own: the alert is captured; a wrong
password, or a CA that did not sign the server's certificate, is an error that nstap reports
(nstap_alertmanager_up 0, polls counted as errors, logged once) and never a crash.
"""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import urllib.error
import urllib.request
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from conftest import Containers, free_port, sh, tool, wait_until

pytestmark = pytest.mark.docker

PASSWORD = "pull-s3cret"


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA (certificate, key) named ``name``."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert))
    return cert, key


def server_cert(directory: Path, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by ``ca``."""
    key, csr, cert, ext = (directory / n for n in ("am.key", "am.csr", "am.crt", "am.ext"))
    sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr))
    ext.write_text("subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth\n")
    sh("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(cert))
    return cert, key


def bcrypt(password: str) -> str:
    """The bcrypt hash Alertmanager's web config takes (glibc's libxcrypt, through the crypt module:
    deprecated in Python 3.11, still there)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt as _crypt

        return _crypt.crypt(password, _crypt.mksalt(_crypt.METHOD_BLOWFISH, rounds=1 << 10))


class SecureAlertmanager:
    """One Alertmanager on https://127.0.0.1:<port>, basic auth user ``nstap``."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.ca = make_ca(tmp_path, "test-ca")
        self.cert = server_cert(tmp_path, self.ca)
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        web = self.dir / "web.yml"
        web.write_text(yaml.safe_dump({
            "tls_server_config": {"cert_file": str(self.cert[0]), "key_file": str(self.cert[1])},
            "basic_auth_users": {"nstap": bcrypt(PASSWORD)},
        }))
        config = self.dir / "am.yml"
        config.write_text(yaml.safe_dump({"route": {"receiver": "null"}, "receivers": [{"name": "null"}]}))
        self.proc = subprocess.Popen(
            [tool("prometheus-alertmanager"), f"--config.file={config}", f"--web.config.file={web}", f"--storage.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address="],
            stdout=open(self.dir / "am.log", "wb"), stderr=subprocess.STDOUT,
        )
        wait_until(lambda: self.call("/-/ready") is not None, 30, 0.2, "alertmanager over TLS ready")

    def call(self, path: str, body=None, password: str = PASSWORD):
        """The decoded answer (None when it cannot be reached yet)."""
        context = ssl.create_default_context(cafile=str(self.ca[0]))
        auth = base64.b64encode(f"nstap:{password}".encode()).decode()
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, method="POST" if data else "GET",
                                         headers={"Content-Type": "application/json", "Authorization": f"Basic {auth}"})
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as r:
                text = r.read()
        except (ConnectionError, urllib.error.URLError) as exc:
            if isinstance(exc, urllib.error.HTTPError):
                raise
            return None
        try:
            return json.loads(text) if text else {}
        except ValueError:
            return {"text": text.decode(errors="replace")}

    def post_alert(self, labels: dict[str, str]) -> None:
        now = datetime.now(timezone.utc)
        self.call("/api/v2/alerts", [{"labels": labels, "annotations": {"summary": "test"}, "startsAt": (now - timedelta(seconds=5)).isoformat()}])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def secure_am(tmp_path: Path):
    am = SecureAlertmanager(tmp_path)
    am.start()
    yield am
    am.stop()


def test_pull_over_tls_with_basic_auth(nstap, secure_am: SecureAlertmanager, containers: Containers, docker_image: str, tmp_path: Path) -> None:
    # The server refuses what nstap must not do: no credentials, or a wrong password.
    with pytest.raises(urllib.error.HTTPError) as refused:
        secure_am.call("/api/v2/alerts", password="wrong")
    assert refused.value.code == 401
    password_file = tmp_path / "am-password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    pull = {"urls": [secure_am.url], "poll_interval": 1.0, "timeout": 2.0,
            "tls_config": {"ca_file": str(secure_am.ca[0])}, "basic_auth": {"username": "nstap", "password_file": str(password_file)}}
    d = nstap({"capture": {"post_seconds": 2}, "detect": {"capture": False}, "alertmanager": pull})
    cid = containers.docker(docker_image, "httpd", "-f", "-p", "80", "-h", "/www", name="tlspulled")
    d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=cid[:12]), 10)
    secure_am.post_alert({"alertname": "PullTls", "instance": f"127.0.0.1:{d.metrics_port}", "container_id": cid})

    def captures(kind: str) -> list[dict]:
        return [c for c in d.api("/api/v1/captures?reason=alertmanager")[1]["captures"] if c["kind"] == kind]

    wait_until(lambda: captures("PullTls"), 20, 0.1, "the alert pulled over TLS with basic auth captured")
    m = d.scrape()
    assert m.value("nstap_alertmanager_up", url=secure_am.url) == 1
    assert m.value("nstap_alertmanager_polls_total", url=secure_am.url, result="ok") >= 1

    # The password file changed to a wrong one (it is read at every poll): refused, reported, no crash.
    password_file.write_text("wrong\n")
    wait_until(lambda: d.scrape().value("nstap_alertmanager_up", url=secure_am.url) == 0, 10, 0.2, "down with a wrong password")
    errors = d.scrape().value("nstap_alertmanager_polls_total", url=secure_am.url, result="error")
    wait_until(lambda: d.scrape().value("nstap_alertmanager_polls_total", url=secure_am.url, result="error") > errors, 10, 0.2, "more errors counted")
    down = [json.loads(line) for line in d.log_path.read_text().splitlines() if '"alertmanager_down"' in line]
    assert len(down) == 1 and "401" in json.dumps(down[0]), down
    password_file.write_text(PASSWORD + "\n")
    wait_until(lambda: d.scrape().value("nstap_alertmanager_up", url=secure_am.url) == 1, 10, 0.2, "up again with the right password")
    assert d.stop() == 0

    # A CA that did not sign the server's certificate: every poll fails its TLS handshake.
    other_ca = make_ca(tmp_path, "other-ca")
    pull["tls_config"] = {"ca_file": str(other_ca[0])}
    d2 = nstap({"detect": {"capture": False}, "alertmanager": pull})
    wait_until(lambda: (d2.scrape().value("nstap_alertmanager_polls_total", url=secure_am.url, result="error") or 0) >= 2, 15, 0.2, "TLS errors counted")
    assert d2.scrape().value("nstap_alertmanager_up", url=secure_am.url) == 0
    down = [json.loads(line) for line in d2.log_path.read_text().splitlines() if '"alertmanager_down"' in line]
    assert len(down) == 1 and "certificate" in json.dumps(down[0]).lower(), down
