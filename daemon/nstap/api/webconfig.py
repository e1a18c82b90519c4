"""TLS and basic authentication of nstap's listeners, from a file in the Prometheus exporter
toolkit's format (the one node_exporter and Prometheus read with ``--web.config.file``)::

    tls_server_config:
      cert_file: /etc/nstap/tls.crt
      key_file: /etc/nstap/tls.key
      client_auth_type: NoClientCert      # or RequireAndVerifyClientCert, with client_ca_file
      client_ca_file: /etc/nstap/ca.crt
      min_version: TLS12                  # TLS12 (default) or TLS13
    basic_auth_users:
      prometheus: $2y$10$...              # bcrypt hashes (htpasswd -nBC 10 "" | tr -d ':\\n')

TLS applies to both listeners. Basic authentication applies to the /metrics listener (its
``/healthz`` stays open, for probes); the API listener takes its bearer tokens, over TLS when it
is configured. A file that names an unknown key, a missing certificate or a hash that is not
bcrypt is an error at start (exit 2), not a listener that silently serves without it.
"""

from __future__ import annotations

import base64
import binascii
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "RequireAndVerifyClientCert": ssl.CERT_REQUIRED, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL}
TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version"}


class WebConfigError(Exception):
    """The web configuration file cannot be used (the daemon does not start)."""


@dataclass(frozen=True)
class WebConfig:
    """What the file says: an SSL context for the listeners, and the /metrics users."""

    path: Path | None = None
    tls: ssl.SSLContext | None = None
    cert_file: Path | None = None
    users: Mapping[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash

    def check_basic(self, header: str | None) -> bool:
        """True if no users are configured, or ``header`` carries one's right password."""
        if not self.users:
            return True
        if not header or not header.lower().startswith("basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        hashed = self.users.get(user)
        if hashed is None:
            return False
        return _bcrypt_check(password.encode(), hashed)


def _bcrypt_check(password: bytes, hashed: bytes) -> bool:
    import bcrypt  # noqa: PLC0415 - only needed when users are configured

    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        return False


def load_web_config(path: Path | None) -> WebConfig:
    """Read and check the file (None: plain HTTP, no basic authentication)."""
    if path is None:
        return WebConfig()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise WebConfigError(f"cannot read web config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError:
        raise WebConfigError(f"web config {path} is not valid YAML") from None
    if not isinstance(data, dict):
        raise WebConfigError(f"web config {path}: expected a mapping")
    unknown = set(data) - {"tls_server_config", "basic_auth_users", "http_server_config"}
    if unknown:
        raise WebConfigError(f"web config {path}: unknown key {sorted(unknown)[0]!r}")
    tls, cert = _tls(path, data.get("tls_server_config"))
    users = _users(path, data.get("basic_auth_users"))
    return WebConfig(path, tls, cert, users)


def _tls(path: Path, section: Any) -> tuple[ssl.SSLContext | None, Path | None]:
    if section is None:
        return None, None
    if not isinstance(section, dict):
        raise WebConfigError(f"web config {path}: tls_server_config must be a mapping")
    unknown = set(section) - TLS_KEYS
    if unknown:
        raise WebConfigError(f"web config {path}: unknown key tls_server_config.{sorted(unknown)[0]}")
    cert, key = section.get("cert_file"), section.get("key_file")
    if not cert or not key:
        raise WebConfigError(f"web config {path}: tls_server_config needs cert_file and key_file")
    base = path.parent
    cert_path, key_path = base / str(cert), base / str(key)  # relative to the file, as the toolkit does
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    version = str(section.get("min_version", "TLS12"))
    if version not in TLS_VERSIONS:
        raise WebConfigError(f"web config {path}: tls_server_config.min_version must be one of {', '.join(TLS_VERSIONS)}")
    context.minimum_version = TLS_VERSIONS[version]
    try:
        context.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise WebConfigError(f"web config {path}: cannot load {cert_path} / {key_path}: {exc}") from None
    auth = str(section.get("client_auth_type", "NoClientCert"))
    if auth not in CLIENT_AUTH:
        raise WebConfigError(f"web config {path}: tls_server_config.client_auth_type must be one of {', '.join(CLIENT_AUTH)}")
    context.verify_mode = CLIENT_AUTH[auth]
    if auth != "NoClientCert":
        ca = section.get("client_ca_file")
        if not ca:
            raise WebConfigError(f"web config {path}: client_auth_type {auth} needs client_ca_file")
        try:
            context.load_verify_locations(base / str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise WebConfigError(f"web config {path}: cannot load client_ca_file: {exc}") from None
    return context, cert_path


def _users(path: Path, section: Any) -> dict[str, bytes]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise WebConfigError(f"web config {path}: basic_auth_users must be a mapping of user to bcrypt hash")
    out = {}
    for user, hashed in section.items():
        text = str(hashed)
        if not text.startswith(("$2a$", "$2b$", "$2y$")) or len(text) != 60:
            raise WebConfigError(f"web config {path}: basic_auth_users.{user} is not a bcrypt hash")
        out[str(user)] = text.replace("$2y$", "$2b$", 1).encode()  # htpasswd's $2y$ is bcrypt's $2b$
    return out


def basic_auth_middleware(config: WebConfig) -> Callable:
    """Require one of the configured users on every path of the /metrics listener but /healthz."""
    from aiohttp import web  # noqa: PLC0415

    @web.middleware
    async def middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
        if request.path not in ("/healthz", "/readyz") and not config.check_basic(request.headers.get("Authorization")):
            return web.Response(status=401, text="unauthorized\n", headers={"WWW-Authenticate": 'Basic realm="nstap"'})
        return await handler(request)

    return middleware
