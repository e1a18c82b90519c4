"""Logging: structlog, one JSON object per line off a TTY, readable lines on one.

Events are short constant names (``watcher_attached``) with key/values; the standard library
loggers of aiodocker, aiohttp and asyncio go through the same processors.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(fmt: Literal["auto", "json", "console", "journald"] = "auto", level: str = "info") -> None:
    """Route structlog and stdlib logging to stderr in the chosen format, or to journald with
    structured fields (``auto`` does that when stderr is the journal stream systemd connected)."""
    from .systemd import JOURNAL_SOCKET, JournalHandler, under_journal

    if fmt == "auto":
        fmt = "journald" if under_journal() and JOURNAL_SOCKET.exists() else "console" if sys.stderr.isatty() else "json"
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = structlog.processors.JSONRenderer() if fmt in ("json", "journald") else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler: logging.Handler = JournalHandler() if fmt == "journald" else logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in root.handlers:  # a reload configures again
        old.close()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS.get(level, logging.INFO))
    # Access logs of every scrape would drown everything else.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class Once:
    """Remembers which keys were logged, so that a condition is logged once, not every time it is
    seen: at most ``limit`` keys (the oldest is forgotten first, and logged again if it recurs),
    because keys made of errors and names are not a bounded set."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._seen: dict[str, None] = {}

    def first(self, key: str) -> bool:
        """True the first time ``key`` is seen (since it was last forgotten)."""
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > self.limit:
            del self._seen[next(iter(self._seen))]
        return True

    def __len__(self) -> int:
        return len(self._seen)
