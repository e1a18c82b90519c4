"""What the capture page and the API say of where a capture is (the bucket, its keys, the upload's
record) and of the talkers its evidence recorded: the pure parts, as tables. The same views
against a real daemon, SeaweedFS and conntrack are in test_s3_storage.py and test_ui.py."""

from __future__ import annotations

import json

import pytest

from nstap.api.evidence_view import MAX_SHOWN, recorded_talkers, view_of
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


def _doc(start: object, end: object = None) -> dict:
    return {"version": 1, "start": start, "end": end}


PEER = {"peer": "172.17.0.1", "bytes_out": 5000, "packets_out": 4, "bytes_in": 300, "packets_in": 5, "new_flows": 1, "bytes": 5300}


@pytest.mark.parametrize("doc, expected", [
    (None, []),
    ([], []),
    (_doc(None), []),
    (_doc({"taken_at": 10.0}), []),  # nat off: no talkers
    (_doc({"taken_at": 10.0, "nat": {"error": "x"}}), []),
    (_doc({"taken_at": 10.0, "nat": {"talkers": {"source": "conntrack", "window_seconds": 60.0, "error": "", "peers": [PEER]}}}),
     [{"when": "start", "taken_at": 10.0, "window_seconds": 60.0, "source": "conntrack", "error": "",
       "peers": [{k: v for k, v in PEER.items() if k != "bytes"}]}]),
    # off without consent: the reason, no peers
    (_doc({"taken_at": 10.0, "nat": {"talkers": {"source": "conntrack", "window_seconds": 0, "error": "nf_conntrack_acct is off", "peers": []}}}),
     [{"when": "start", "taken_at": 10.0, "window_seconds": 0.0, "source": "conntrack", "error": "nf_conntrack_acct is off", "peers": []}]),
    # damaged: wrong types become zeros and text, never an exception; both snapshots
    (_doc({"taken_at": "x", "nat": {"talkers": {"window_seconds": "60", "peers": [{"peer": 5, "bytes_out": "9", "packets_out": -1,
                                                                                      "bytes_in": float("nan"), "packets_in": True}, "junk"]}}},
          {"taken_at": 20.0, "nat": {"talkers": {"peers": "not a list"}}}),
     [{"when": "start", "taken_at": None, "window_seconds": 0.0, "source": "", "error": "",
       "peers": [{"peer": "5", "bytes_out": 0, "packets_out": 0, "bytes_in": 0, "packets_in": 0, "new_flows": 0}]},
      {"when": "end", "taken_at": 20.0, "window_seconds": 0.0, "source": "", "error": "", "peers": []}]),
])
def test_recorded_talkers(doc: object, expected: list) -> None:
    assert recorded_talkers(doc) == expected


def test_evidence_view_shows_small_documents_and_talkers_of_large_ones() -> None:
    talkers = {"taken_at": 1.0, "nat": {"talkers": {"peers": [PEER]}}}
    small = view_of(json.dumps(_doc(talkers)).encode(), "bucket")
    assert small.text and small.source == "bucket" and small.talkers[0]["peers"][0]["peer"] == PEER["peer"]
    large = view_of(json.dumps({**_doc(talkers), "pad": "x" * MAX_SHOWN}).encode(), "local")
    assert large.text == "" and "too large to show" in large.note and large.talkers[0]["peers"][0]["bytes_out"] == 5000
    broken = view_of(b"{not json", "local")
    assert broken.text == "" and broken.note.startswith("unreadable") and broken.talkers == []
