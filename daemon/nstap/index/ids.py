"""The ids of captures and anomalies: sortable, URL- and path-safe."""

from __future__ import annotations

import re
import secrets
import time

ID_PATTERN = re.compile(r"^[0-9A-Za-z][0-9A-Za-z-]{0,63}$")


def new_id(now: float | None = None) -> str:
    """A sortable, URL- and path-safe id: UTC time plus randomness."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now if now is not None else time.time()))
    return f"{stamp}-{secrets.token_hex(4)}"


def well_formed(value: object) -> bool:
    """True if ``value`` can be an id (anything else is not looked up)."""
    return isinstance(value, str) and bool(ID_PATTERN.match(value))
