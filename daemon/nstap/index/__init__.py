"""The index: nstap's SQLite database of captures, anomalies, alerts and revoked sessions.

One database (:mod:`.db`: the connection in its own thread, the schema and its migrations) and
one owner per table, each with its retention. :class:`Index` puts them together; the capture
store owns the captures' files and keeps them and their rows in step, the incident tracker writes
anomalies, the API reads all of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .alerts import AlertIndex
from .anomalies import AnomalyIndex, AnomalyRow
from .captures import CaptureIndex, CaptureRow
from .db import IndexDb
from .ids import new_id, well_formed
from .sessions import SessionIndex
from .uploads import UploadIndex

__all__ = ["AlertIndex", "AnomalyIndex", "AnomalyRow", "CaptureIndex", "CaptureRow", "Index", "IndexRetention", "new_id", "well_formed"]


@dataclass(frozen=True)
class IndexRetention:
    """How long and how many of the index's entries are kept (``capture.index_max_age``,
    ``capture.index_max_rows``); a capture with its file is the byte budget's, not this one's."""

    max_age: float = 30 * 86400.0
    max_rows: int = 100_000


class Index:
    """The database and its tables."""

    def __init__(self, path: Path, retention: IndexRetention = IndexRetention()) -> None:
        self.db = IndexDb(path)
        self.retention = retention
        self.captures = CaptureIndex(self.db)
        self.anomalies = AnomalyIndex(self.db)
        self.alerts = AlertIndex(self.db)
        self.sessions = SessionIndex(self.db)
        self.uploads = UploadIndex(self.db)  # storage.s3: captures waiting for the bucket
        self.pruned_total = 0  # entries deleted by age or count

    def prune(self, now: float | None = None) -> int:
        """Delete every table's entries past the retention (blocking: the index's thread);
        returns how many went, and gives their room back to the disk."""
        horizon = (now if now is not None else time.time()) - self.retention.max_age
        keep = self.retention.max_rows
        gone = sum(table.prune(horizon, keep) for table in (self.anomalies, self.alerts, self.captures))
        if gone:
            self.db.checkpoint()
        self.pruned_total += gone
        return gone
