"""The local API's bearer token: one secret in a 0600 file under the data dir, made on first start."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

TOKEN_FILE = "api-token"


class TokenError(Exception):
    """The token file exists but cannot be used."""


def token_path(data_dir: Path) -> Path:
    """Where the token lives for a data dir."""
    return data_dir / TOKEN_FILE


def ensure_token(data_dir: Path) -> str:
    """Read the token, creating it (0600, atomically) if there is none yet."""
    path = token_path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return read_token(path)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def read_token(path: Path) -> str:
    """The token in ``path``; TokenError if it is unreadable or empty."""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise TokenError(f"cannot read API token {path}: {exc.strerror or exc}") from None
    if len(token) < 16:
        raise TokenError(f"API token in {path} is empty or too short")
    return token


def bearer_ok(header: str | None, token: str) -> bool:
    """True if an Authorization header carries exactly this bearer token."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())
