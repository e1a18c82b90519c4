"""The local API's bearer token: one secret in a 0600 file under the data dir, made on first start.

The file is written whole or not at all: the token goes into a temporary file, which is synced and
then linked into place, so a crash can never leave an empty token file behind. An empty or
truncated one that an older daemon left is replaced (nobody can have used it).
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

import structlog

log = structlog.get_logger("nstap.api")

TOKEN_FILE = "api-token"
WEBHOOK_TOKEN_FILE = "webhook-token"  # a second secret, good only for POST /api/v1/alertmanager


class TokenError(Exception):
    """The token file exists but cannot be used."""


class TokenEmpty(TokenError):
    """The token file is empty or too short (never a usable token)."""


def token_path(data_dir: Path, name: str = TOKEN_FILE) -> Path:
    """Where a token lives for a data dir."""
    return data_dir / name


def ensure_token(data_dir: Path, name: str = TOKEN_FILE) -> str:
    """Read the token, creating it (0600, atomically) if there is none or only an empty one.

    The data dir is made (or tightened to) 0700, an existing token file tightened to 0600.
    """
    path = token_path(data_dir, name)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data_dir, 0o700)
    replace = False
    if path.exists():
        try:
            token = read_token(path)
        except TokenEmpty:
            log.warning("api_token_replaced", path=str(path), reason="the token file was empty or truncated")
            replace = True
        else:
            os.chmod(path, 0o600)
            return token
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # never over a token another process made meanwhile
            except FileExistsError:
                return read_token(path)
        dir_fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)
    return token


def read_token(path: Path) -> str:
    """The token in ``path``; TokenError if it is unreadable or empty."""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise TokenError(f"cannot read API token {path}: {exc.strerror or exc}") from None
    if len(token) < 16:
        raise TokenEmpty(f"API token in {path} is empty or too short")
    return token


def bearer_ok(header: str | None, token: str) -> bool:
    """True if an Authorization header carries exactly this bearer token."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())
