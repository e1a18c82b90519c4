"""What the capture page and the API say of where a capture is (the bucket, its keys, the upload's
record): the pure parts, as tables."""

from __future__ import annotations

import json

import pytest

from nstap.api.evidence_view import MAX_SHOWN, view_of
from nstap.index.captures import COMPLETE, EVICTED, FAILED, RUNNING, CaptureRow
from nstap.index.uploads import UploadRow
from nstap.storage.location import UPLOAD_STATES, BucketPlace, capture_storage, upload_state

PLACE = BucketPlace("http://127.0.0.1:8333/", "captures", "fleet/h1/", {
    "pcap": "fleet/h1/captures/X/capture.pcap", "evidence": "fleet/h1/captures/X/evidence.json",
    "bundle": "fleet/h1/captures/X/bundle.tar.gz", "index": "fleet/h1/index/X.json",
})


def _row(state: str = COMPLETE, file: str | None = "X.pcap", uploaded_at: float | None = None) -> CaptureRow:
    return CaptureRow(id="X", state=state, created_at=1.0, file=file, evidence="X.json", uploaded_at=uploaded_at)


@pytest.mark.parametrize("row, upload, uploading, state", [
    (_row(uploaded_at=9.0), None, False, "uploaded"),
    (_row(EVICTED, uploaded_at=9.0), None, False, "uploaded"),
    (_row(), UploadRow("X", 5.0), False, "queued"),
    (_row(), UploadRow("X", 5.0), True, "uploading"),
    (_row(), UploadRow("X", 5.0, attempts=2, next_at=8.0, error="0 ClientConnectorError"), False, "retrying"),
    (_row(RUNNING), None, False, "running"),
    (_row(EVICTED), None, False, "evicted"),
    (_row(FAILED, file=None), None, False, "nothing"),
    (_row(), None, False, "not_queued"),
])
def test_upload_state(row: CaptureRow, upload: UploadRow | None, uploading: bool, state: str) -> None:
    assert upload_state(row, upload, uploading) == state
    assert state in UPLOAD_STATES


def test_capture_storage_names_the_bucket_keys_and_the_queue_record() -> None:
    assert capture_storage(_row(), None, False, None) is None  # no bucket configured
    queued = capture_storage(_row(), UploadRow("X", 5.0, attempts=1, next_at=8.0, done="pcap,evidence", error="503 SlowDown"), False, PLACE)
    assert queued["bucket"] == "captures" and queued["endpoint"] == "http://127.0.0.1:8333/" and queued["prefix"] == "fleet/h1/"
    assert {w: o["uploaded"] for w, o in queued["objects"].items()} == {"pcap": True, "evidence": True, "bundle": False, "index": False}
    assert queued["objects"]["pcap"]["key"] == "fleet/h1/captures/X/capture.pcap"
    assert queued["upload"] == {
        "state": "retrying", "text": UPLOAD_STATES["retrying"], "uploaded_at": None, "queued_at": 5.0, "attempts": 1, "next_try_at": 8.0,
        "error": "503 SlowDown",
    }
    done = capture_storage(_row(uploaded_at=9.0), None, False, PLACE)
    assert all(o["uploaded"] for o in done["objects"].values()) and done["upload"]["uploaded_at"] == 9.0
    # what the upload confirmed, when the index recorded it: a capture without evidence
    row = _row(EVICTED, file=None, uploaded_at=9.0)
    row.uploaded_objects = "bundle,index,pcap"
    assert {w: o["uploaded"] for w, o in capture_storage(row, None, False, PLACE)["objects"].items()} == {
        "pcap": True, "evidence": False, "bundle": True, "index": True}
    assert "queued_at" not in done["upload"]
    json.dumps(done)  # the API sends it as it is


def test_evidence_view_shows_small_documents_only() -> None:
    small = view_of(json.dumps({"version": 1, "start": {}}).encode(), "bucket")
    assert small.text and small.source == "bucket"
    large = view_of(json.dumps({"version": 1, "pad": "x" * MAX_SHOWN}).encode(), "local")
    assert large.text == "" and "too large to show" in large.note
    broken = view_of(b"{not json", "local")
    assert broken.text == "" and broken.note.startswith("unreadable")
