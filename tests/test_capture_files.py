"""The capture files and their index rows kept in step, as tables: what a start finds on disk and
in the index after any crash, and what it leaves; the anomaly captures' slot quota; an index made
by the first release opening and migrating. Real SQLite and real files; no daemon."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from nstap.capture.files import CaptureFiles
from nstap.capture.quota import PERIOD, SlotQuota
from nstap.capture.store import CaptureStore, Retention
from nstap.index import CaptureRow
from nstap.index.captures import COMPLETE, EVICTED, INCOMPLETE, RUNNING
from nstap.index.db import SCHEMA

from test_capture_store import stream

CID = "20261203T000000Z-0000abcd"
PCAP = stream(5)[0]

# What a crash can leave, and what the next start must make of it. Each case: the capture's row
# (None: no row), the files on disk, then the row's state after the start (None: no row), the files
# left, and the recovery counts that are not zero.
CASES = {
    "running capture, pcap with packets": (
        dict(state=RUNNING), {".pcap": PCAP},
        INCOMPLETE, {".pcap"}, {"incomplete": 1},
    ),
    "running filtered ring capture, packets waiting unfiltered": (
        dict(state=RUNNING, filter="icmp"), {".pcap": b"", ".unfiltered": PCAP},
        RUNNING, {".pcap", ".unfiltered"}, {"to_filter": 1},
    ),
    "incomplete filtered capture, packets still unfiltered": (
        dict(state=INCOMPLETE, filter="icmp"), {".pcap": b"", ".unfiltered": PCAP},
        INCOMPLETE, {".pcap", ".unfiltered"}, {"to_filter": 1},
    ),
    "finished capture, a stray unfiltered file": (
        dict(state=COMPLETE, filter="icmp"), {".pcap": PCAP, ".unfiltered": PCAP},
        COMPLETE, {".pcap"}, {"leftovers_removed": 1},
    ),
    "unfiltered packets of an unfiltered capture": (
        dict(state=RUNNING), {".pcap": b"", ".unfiltered": PCAP},
        INCOMPLETE, set(), {"incomplete": 1, "leftovers_removed": 1},
    ),
    "a running capture killed before its pcap's header": (
        dict(state=RUNNING), {".pcap": b""},
        INCOMPLETE, set(), {"incomplete": 1},
    ),
    "unfiltered packets of no capture": (
        None, {".unfiltered": PCAP},
        None, set(), {"leftovers_removed": 1},
    ),
    "half-written evidence of a finished capture": (
        dict(state=COMPLETE), {".pcap": PCAP, ".evidence.json.tmp": b"{"},
        COMPLETE, {".pcap"}, {"leftovers_removed": 1},
    ),
    "a pcap without its row": (
        None, {".pcap": PCAP},
        INCOMPLETE, {".pcap"}, {"orphans": 1},
    ),
    "a finished capture with its evidence": (
        dict(state=COMPLETE, evidence=f"{CID}.evidence.json"), {".pcap": PCAP, ".evidence.json": b"{}"},
        COMPLETE, {".pcap", ".evidence.json"}, {},
    ),
    "an evicted capture": (
        dict(state=EVICTED, file=None), {},
        EVICTED, set(), {},
    ),
}


@pytest.mark.parametrize("row, files, state, left, counts", CASES.values(), ids=CASES.keys())
async def test_a_start_after_a_crash_leaves_files_and_rows_in_step(tmp_path: Path, row, files, state, left, counts) -> None:
    first = CaptureStore(tmp_path, Retention(10**9, 10**9))
    await first.open()
    if row is not None:
        fields = {"file": f"{CID}.pcap", **row}
        await first.index.db.run(first.index.captures.insert, CaptureRow(id=CID, created_at=time.time(), **fields))
    await first.close()
    for suffix, data in files.items():
        (first.dir / f"{CID}{suffix}").write_bytes(data)

    store = CaptureStore(tmp_path, Retention(10**9, 10**9))
    recovered = await store.open()
    try:
        assert {k: v for k, v in recovered.items() if v} == counts
        on_disk = {p.name[len(CID):] for p in store.dir.iterdir() if p.name.startswith(CID)}
        assert on_disk == left
        rows = await store.index.captures.list()
        assert (rows[0].state if rows else None) == state
        if state is not None and ".pcap" in left:
            assert store.path_of(rows[0]) is not None  # the row's file is there
            if state == INCOMPLETE and files.get(".pcap"):
                assert rows[0].packets == 5 and rows[0].bytes == len(PCAP)
        assert [r.id for r in store.unfiltered] == ([CID] if "to_filter" in counts else [])
        # The books equal the disk: every counted file, nothing else.
        assert store.total_bytes == CaptureFiles(store.dir).disk_bytes() == sum(
            p.stat().st_size for p in store.dir.iterdir() if not p.name.endswith(".tmp")
        )
    finally:
        await store.close()


async def test_a_file_that_cannot_be_made_leaves_no_row_and_no_file(tmp_path: Path) -> None:
    """The row's insert fails after the files were made (an id taken twice): neither the pcap nor
    the unfiltered file is left behind."""
    store = CaptureStore(tmp_path, Retention(10**9, 10**9))
    await store.open()
    try:
        await store.create(CaptureRow(id=CID, state=RUNNING, created_at=time.time()))
        (store.dir / f"{CID}.pcap").unlink()  # as if lost: the second create makes the file, then the row clashes
        with pytest.raises(sqlite3.IntegrityError):
            await store.create(CaptureRow(id=CID, state=RUNNING, created_at=time.time()), unfiltered=True)
        assert list(store.dir.iterdir()) == []
    finally:
        await store.close()


# The quota: each step is (container, action) with action "start" (an anomaly's first capture),
# "host" (its host-side capture), "end" (the oldest running capture of it ends); what each start
# answers ("" when admitted). Two slots each (max_concurrent 4), three captures an hour.
QUOTA_CASES = {
    "two at a time, then refused": (
        [("a", "start"), ("a", "start"), ("a", "start")],
        ["", "", "running"],
    ),
    "host-side captures take the same slots": (
        [("a", "start"), ("a", "host"), ("a", "start")],
        ["", "", "running"],
    ),
    "a slot comes back when its capture ends": (
        [("a", "start"), ("a", "host"), ("a", "end"), ("a", "start")],
        ["", "", "", ""],
    ),
    "three an hour, even one at a time": (
        [("a", "start"), ("a", "end"), ("a", "start"), ("a", "end"), ("a", "start"), ("a", "end"), ("a", "start")],
        ["", "", "", "", "", "", "last hour"],
    ),
    "one container's storm leaves the other's slots": (
        [("a", "start"), ("a", "host"), ("a", "start"), ("b", "start"), ("b", "host")],
        ["", "", "running", "", ""],
    ),
}


@pytest.mark.parametrize("steps, answers", QUOTA_CASES.values(), ids=QUOTA_CASES.keys())
def test_slot_quota(steps, answers) -> None:
    quota = SlotQuota(per_hour=3, max_concurrent=4)
    held: dict[str, list] = {}
    got = []
    for container, action in steps:
        if action == "end":
            held[container].pop(0).release()
            got.append("")
            continue
        first = action == "start"
        why = quota.refusal(container, 1000.0, first=first)
        got.append(why.split(" (")[0].split("container ")[-1] if why else "")
        if not why:
            held.setdefault(container, []).append(quota.take(container, 1000.0, first=first))
    assert [("running" if "running" in g else "last hour" if "hour" in g else g) for g in got] == answers
    assert all(quota.running(c) <= quota.share for c in held)


def test_slot_quota_forgets_gone_containers_after_their_hour() -> None:
    quota = SlotQuota(per_hour=3, max_concurrent=4)
    for i in range(500):
        quota.take(f"c{i}", 1000.0).release()
    quota.prune(current={"c1"}, now=1000.0 + PERIOD / 2)
    assert len(quota) == 500  # within the hour: a crash-looping container keeps its count
    quota.prune(current={"c1"}, now=1000.0 + PERIOD + 1)
    assert len(quota) == 1
    slot = quota.take("c1", 5000.0)
    slot.release()
    slot.release()  # twice: counted once
    assert quota.running("c1") == 0


# The first release's schema: captures and anomalies without the columns added since.
FIRST_RELEASE = SCHEMA.replace("    finished_at REAL,\n    onset_at REAL,\n    pre_truncated INTEGER NOT NULL DEFAULT 0,\n    side TEXT NOT NULL DEFAULT 'container',\n"
                               "    interface TEXT NOT NULL DEFAULT '',\n    evidence TEXT\n", "    finished_at REAL\n").replace(
    "    capture_id TEXT,\n    started_at REAL,\n    cause TEXT NOT NULL DEFAULT 'unknown',\n    cause_text TEXT NOT NULL DEFAULT ''\n", "    capture_id TEXT\n")


async def test_an_index_of_the_first_release_opens_and_migrates(tmp_path: Path) -> None:
    assert FIRST_RELEASE != SCHEMA and "evidence TEXT" not in FIRST_RELEASE and "started_at" not in FIRST_RELEASE
    (tmp_path / "captures").mkdir()
    db = sqlite3.connect(tmp_path / "nstap.db")
    db.executescript(FIRST_RELEASE)
    db.execute("INSERT INTO captures (id, state, created_at, file, bytes, packets) VALUES (?, ?, ?, ?, ?, ?)", (CID, COMPLETE, 1.0, f"{CID}.pcap", len(PCAP), 5))
    db.execute("INSERT INTO anomalies (id, kind, container, container_id, runtime, netns, first_seen, last_seen, resolved_at) VALUES "
               "('a1', 'k', 'c', 'c1', 'docker', 1, 1.0, 2.0, 2.0)")
    db.commit()
    db.close()
    (tmp_path / "captures" / f"{CID}.pcap").write_bytes(PCAP)
    store = CaptureStore(tmp_path, Retention(10**9, 10**12))
    try:
        assert not any((await store.open()).values())
        row = await store.index.captures.get(CID)
        assert row is not None and row.state == COMPLETE and row.side == "container" and row.evidence is None and not row.pre_truncated
        assert store.path_of(row) is not None
        anomaly = await store.index.anomalies.get("a1")
        assert anomaly is not None and anomaly.started_at is None and anomaly.to_json()["detected_after"] is None
        assert anomaly.to_json()["cause"] == {"kind": "unknown", "text": ""}
    finally:
        await store.close()
