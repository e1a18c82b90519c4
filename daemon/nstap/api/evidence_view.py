"""A capture's evidence as its page shows it: the document indented.

The document is read from the store, or from the bucket for a capture this host evicted after its
upload. Bounded: a document over MAX_SHOWN bytes is only offered for download, one over MAX_READ
is not read at all. A document that is not what nstap writes
(another version, a damaged file) gives what can be read of it and a note, never an exception.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from ..capture.store import CaptureStore
from ..index.captures import CaptureRow
from ..storage.s3 import S3Error

MAX_SHOWN = 2 << 20  # bytes of evidence shown on a page; a larger one is only downloaded
MAX_READ = 16 << 20  # bytes of evidence read for its talkers at most


@dataclass
class EvidenceView:
    """What the page shows of one capture's evidence."""

    text: str = ""  # the document, indented ("" when not shown)
    note: str = ""  # why it is not shown, when it is not
    source: str = ""  # "local" or "bucket" ("" when there is none)


def view_of(data: bytes, source: str) -> EvidenceView:
    """The view of one evidence document's bytes."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        return EvidenceView(note=f"unreadable: {exc}", source=source)
    view = EvidenceView(source=source)
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
