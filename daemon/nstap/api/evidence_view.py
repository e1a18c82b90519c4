"""A capture's evidence as its page shows it: the document indented, and the top talkers it recorded.

The document is read from the store, or from the bucket for a capture this host evicted after its
upload. Bounded: a document over MAX_SHOWN bytes is only offered for download (its talkers are
still shown), one over MAX_READ is not read at all. A document that is not what nstap writes
(another version, a damaged file) gives what can be read of it and a note, never an exception.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..capture.store import CaptureStore
from ..index.captures import CaptureRow
from ..storage.s3 import S3Error

MAX_SHOWN = 2 << 20  # bytes of evidence shown on a page; a larger one is only downloaded
MAX_READ = 16 << 20  # bytes of evidence read for its talkers at most
PEER_COUNTS = ("bytes_out", "packets_out", "bytes_in", "packets_in", "new_flows")


@dataclass
class EvidenceView:
    """What the page shows of one capture's evidence."""

    text: str = ""  # the document, indented ("" when not shown)
    note: str = ""  # why it is not shown, when it is not
    source: str = ""  # "local" or "bucket" ("" when there is none)
    talkers: list[dict[str, Any]] = field(default_factory=list)


def _count(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0 else 0


def _talkers_of(snapshot: Any, when: str) -> dict[str, Any] | None:
    nat = snapshot.get("nat") if isinstance(snapshot, dict) else None
    talkers = nat.get("talkers") if isinstance(nat, dict) else None
    if not isinstance(talkers, dict):
        return None
    peers = talkers.get("peers") if isinstance(talkers.get("peers"), list) else []
    taken_at = snapshot.get("taken_at")
    return {
        "when": when,
        "taken_at": float(taken_at) if _count(taken_at) else None,
        "window_seconds": float(talkers["window_seconds"]) if _count(talkers.get("window_seconds")) else 0.0,
        "source": str(talkers.get("source", "")),
        "error": str(talkers.get("error") or ""),
        "peers": [{"peer": str(p.get("peer", "?")), **{k: _count(p.get(k)) for k in PEER_COUNTS}} for p in peers if isinstance(p, dict)],
    }


def recorded_talkers(doc: Any) -> list[dict[str, Any]]:
    """The top talkers an evidence document recorded when the capture started and when it ended
    (each: when, taken_at, window_seconds, source, error, peers); [] if it recorded none."""
    if not isinstance(doc, dict):
        return []
    found = (_talkers_of(doc.get(when), when) for when in ("start", "end"))
    return [t for t in found if t is not None]


def view_of(data: bytes, source: str) -> EvidenceView:
    """The view of one evidence document's bytes."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        return EvidenceView(note=f"unreadable: {exc}", source=source)
    view = EvidenceView(source=source, talkers=recorded_talkers(doc))
    if len(data) > MAX_SHOWN:
        view.note = f"of {len(data)} bytes: too large to show here, download it"
    else:
        view.text = json.dumps(doc, indent=2, sort_keys=True)
    return view


def _local(store: CaptureStore, row: CaptureRow) -> EvidenceView | None:
    """The view of the store's copy (blocking: a thread); None if the store has none."""
    path = store.evidence_path(row)
    if path is None:
        return None
    try:
        size = path.stat().st_size
        if size > MAX_READ:
            return EvidenceView(note=f"of {size} bytes: too large to show here, download it", source="local")
        return view_of(path.read_bytes(), "local")
    except OSError as exc:
        return EvidenceView(note=f"unreadable: {exc}", source="local")


async def load_evidence(store: CaptureStore, bucket: Any, row: CaptureRow, in_bucket: bool) -> EvidenceView:
    """The view of a capture's evidence: the store's copy, else the bucket's (``in_bucket``: the
    capture's evidence was uploaded and ``bucket`` is the CaptureUploader)."""
    view = await asyncio.to_thread(_local, store, row)
    if view is not None or not in_bucket:
        return view or EvidenceView()
    try:
        data = await bucket.client.get_bytes(bucket.key(row.id, "evidence"), MAX_READ)
    except S3Error as exc:
        return EvidenceView(note=f"could not be read from the bucket: {exc}", source="bucket")
    return await asyncio.to_thread(view_of, data, "bucket")
