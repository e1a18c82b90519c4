"""systemd integration without a dependency: the notify protocol and the journal's native protocol.

Both are a datagram on a unix socket whose address systemd gives (``$NOTIFY_SOCKET``) or fixes
(``/run/systemd/journal/socket``): a few lines here, tested against real sockets, cost less than a
compiled binding (``systemd-python`` needs libsystemd headers to build in a venv).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
_FIELD = re.compile(r"[^A-Z0-9_]")
_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
MAX_VALUE = 4096  # bytes of one field's value sent to the journal


class Notifier:
    """sd_notify: READY=1, STATUS=..., WATCHDOG=1, RELOADING=1, STOPPING=1. A no-op outside systemd."""

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        path = env.get("NOTIFY_SOCKET", "")
        self.address = ("\0" + path[1:]) if path.startswith("@") else path
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_seconds = int(usec) / 1e6 if usec.isdigit() and (not pid or pid == str(os.getpid())) else 0.0
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """Whether systemd listens."""
        return bool(self.address)

    def send(self, **fields: Any) -> bool:
        """Send one notification (``ready=1`` -> ``READY=1``); False if nobody listens or it failed."""
        if not self.address:
            return False
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self.address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def under_journal(env: Mapping[str, str] = os.environ, fd: int = 2) -> bool:
    """True when ``fd`` is the journal stream systemd connected (``$JOURNAL_STREAM``)."""
    stream = env.get("JOURNAL_STREAM", "")
    if ":" not in stream:
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def journal_message(fields: Mapping[str, Any]) -> bytes:
    """One entry in the journal's native protocol: ``KEY=value`` lines, binary-safe for values
    holding a newline (``KEY\\n<le64 length><value>\\n``)."""
    out = bytearray()
    for key, value in fields.items():
        name = _FIELD.sub("_", str(key).upper()).lstrip("_")[:64] or "FIELD"
        text = value if isinstance(value, str) else json.dumps(value, default=str, separators=(",", ":"))
        data = text.encode("utf-8", "replace")[:MAX_VALUE]
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """A logging handler that sends each structlog event to journald with its key/values as fields
    (``journalctl -u nstap CONTAINER=web``). Its formatter must render JSON."""

    def __init__(self, path: Path = JOURNAL_SOCKET, identifier: str = "nstap") -> None:
        super().__init__()
        self.path = str(path)
        self.identifier = identifier
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:  # noqa: D102
        try:
            rendered = self.format(record)
            try:
                event = json.loads(rendered)
            except ValueError:
                event = {"event": rendered}
            if not isinstance(event, dict):
                event = {"event": str(event)}
            name = str(event.pop("event", ""))
            level = str(event.pop("level", record.levelname.lower()))
            event.pop("timestamp", None)
            details = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("logger", "exception"))
            fields = {
                "MESSAGE": f"{name} {details}".strip(), "PRIORITY": str(_PRIORITY.get(level, 6)), "SYSLOG_IDENTIFIER": self.identifier,
                "NSTAP_EVENT": name, **{k: v for k, v in event.items()},
            }
            self._sock.sendto(journal_message(fields), self.path)
        except Exception:  # noqa: BLE001 - logging must never raise into the daemon
            self.handleError(record)

    def close(self) -> None:  # noqa: D102
        self._sock.close()
        super().close()
