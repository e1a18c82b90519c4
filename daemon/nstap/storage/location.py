"""Where a capture is, and how its upload stands: the bucket, the objects' keys, the queue's record.

Made only from what nstap records: the capture's index row (its state, its file, ``uploaded_at``),
its row in the upload queue when it has one (queued when, tries, the next try, the objects already
confirmed, the last error), whether the uploader is sending it right now, and the bucket the
uploader writes to. Pure: tested with a table in tests/test_capture_location.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..index.captures import EVICTED, RUNNING, CaptureRow
from ..index.uploads import UploadRow

# The upload states, each with what it means (the capture page shows the sentence).
UPLOAD_STATES = {
    "uploaded": "every object is in the bucket",
    "uploading": "being uploaded now",
    "queued": "queued for the bucket",
    "retrying": "the last try failed; it is tried again",
    "running": "uploaded once the capture ends",
    "nothing": "nothing to upload: the capture wrote no file",
    "evicted": "evicted from this host before its upload: it is in neither place",
    "not_queued": (
        "not in the upload queue: given up after the bucket refused it (the daemon's log says why, capture_upload_failed), "
        "or taken before the bucket was configured (queued at the next start)"
    ),
}


@dataclass(frozen=True)
class BucketPlace:
    """The bucket a capture's objects go to, and their keys (``pcap``, ``evidence``, ``bundle``, ``index``)."""

    endpoint: str
    bucket: str
    prefix: str
    keys: dict[str, str]


def upload_state(row: CaptureRow, upload: UploadRow | None, uploading: bool) -> str:
    """One of UPLOAD_STATES for a capture."""
    if row.uploaded_at:
        return "uploaded"
    if upload is not None:
        return "uploading" if uploading else "retrying" if upload.attempts else "queued"
    if row.state == RUNNING:
        return "running"
    if row.state == EVICTED:
        return "evicted"
    return "nothing" if row.file is None else "not_queued"


def capture_storage(row: CaptureRow, upload: UploadRow | None, uploading: bool, place: BucketPlace | None) -> dict[str, Any] | None:
    """The capture's place in the bucket and its upload's record, as the API and the page show it
    (None: no bucket is configured)."""
    if place is None:
        return None
    state = upload_state(row, upload, uploading)
    if state == "uploaded":  # what the upload confirmed (an index older than that record: all of them)
        done = set(row.uploaded_objects.split(",")) - {""} or set(place.keys)
    else:
        done = upload.done_set if upload is not None else set()
    out: dict[str, Any] = {
        "endpoint": place.endpoint,
        "bucket": place.bucket,
        "prefix": place.prefix,
        "objects": {what: {"key": key, "uploaded": what in done} for what, key in place.keys.items()},
        "upload": {"state": state, "text": UPLOAD_STATES[state], "uploaded_at": row.uploaded_at},
    }
    if upload is not None:
        out["upload"].update(queued_at=upload.queued_at, attempts=upload.attempts, next_try_at=upload.next_at or None, error=upload.error)
    return out
