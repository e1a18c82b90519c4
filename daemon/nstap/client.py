"""A small client of the local API for the CLI (blocking: the CLI does one thing and exits)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .api.auth import read_token, token_path
from .api.webconfig import load_web_config
from .config import Config, parse_listen


class ApiUnavailable(Exception):
    """The daemon's API could not be reached or refused the request."""


class ApiClient:
    """Talks to a running daemon's API with its bearer token."""

    def __init__(self, base_url: str, token: str, timeout: float = 10.0, tls: ssl.SSLContext | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.tls = tls

    @classmethod
    def from_config(cls, config: Config, api_url: str | None = None, token_file: Path | None = None) -> ApiClient:
        """A client for the daemon that runs with ``config`` (its API address and token file)."""
        tls = None
        scheme = "http"
        if config.web_config_file is not None:
            # The daemon serves TLS: its own certificate is the one to trust (on this host, by
            # address: the name in it need not be the address the CLI dials).
            web = load_web_config(config.web_config_file)
            if web.cert_file is not None:
                tls = ssl.create_default_context(cafile=str(web.cert_file))
                tls.check_hostname = False
                scheme = "https"
        if api_url is None:
            host, port = parse_listen(config.api_listen)
            if host in ("0.0.0.0", "::"):
                host = "127.0.0.1"
            api_url = f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
        token = read_token(token_file or token_path(config.data_dir))
        return cls(api_url, token, tls=tls)

    def get_json(self, path: str) -> Any:
        """GET ``path`` and decode the JSON answer."""
        return self._call(path, None, lambda response: json.load(response))

    def post_json(self, path: str, body: dict[str, Any]) -> Any:
        """POST a JSON body to ``path`` and decode the JSON answer."""
        return self._call(path, json.dumps(body).encode(), lambda response: json.load(response))

    def download(self, path: str, dest: BinaryIO) -> tuple[str, int]:
        """GET ``path`` into ``dest``; returns (the file name the server suggests, bytes written)."""

        def copy(response) -> tuple[str, int]:
            disposition = response.headers.get("Content-Disposition", "")
            name = disposition.split('filename="', 1)[1].rstrip('"') if 'filename="' in disposition else ""
            size = 0
            while chunk := response.read(1 << 16):
                dest.write(chunk)
                size += len(chunk)
            return name, size

        return self._call(path, None, copy)

    def _call(self, path: str, body: bytes | None, read: Callable[[Any], Any]) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.base_url + path, data=body, headers=headers, method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self.tls) as response:
                return read(response)
        except urllib.error.HTTPError as exc:
            try:
                message = json.load(exc).get("error", exc.reason)
            except (ValueError, AttributeError):
                message = exc.reason
            raise ApiUnavailable(f"{self.base_url}{path}: HTTP {exc.code}: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiUnavailable(f"cannot reach nstap at {self.base_url}: {reason} (is `nstap run` running?)") from None
