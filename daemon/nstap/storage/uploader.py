"""Uploads finished captures to the bucket: the pcap, its evidence, its bundle, then its index document.

The queue is the index's ``uploads`` table (it survives a restart); this loop takes what is due,
at most ``concurrency`` captures at a time, and uploads each one's objects in order, noting each
confirmed object in the queue row, so that a restart resumes after the last one. Every object is
sent with its SHA-256 as the S3 checksum and with If-None-Match: * (nothing is overwritten; a key
that already holds the same digest, a retry after a lost answer, counts as done). The small index
document ``<prefix>index/<id>.json`` goes last: its presence in the bucket says the capture's
objects are all there, and it is what ``nstap captures list --all-hosts`` reads.

A failure that may pass (no answer, 5xx, throttling) is retried with exponential backoff (with
jitter, up to ``max_backoff``); a refusal (403, BadDigest) is retried the same way up to
MAX_ATTEMPTS, then given up and logged. Bodies stream from their files; a bundle is written to a
``.tmp`` file beside the captures first (the store's start removes any a crash left).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from ..capture.bundle import write_bundle
from ..capture.store import CaptureStore
from ..index.captures import EVICTED, FINISHED, CaptureRow
from ..index.uploads import UploadRow
from ..supervisor import event_or_timeout
from .location import BucketPlace
from .s3 import S3Client, S3Conflict, S3Error, file_sha256

log = structlog.get_logger("nstap.storage")

MAX_ATTEMPTS = 10  # tries of a capture whose upload the server refuses (a refusal that may pass: no limit)
IDLE_POLL = 5.0  # longest seconds the loop sleeps with nothing due
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
OBJECTS = ("pcap", "evidence", "bundle", "index")


def default_prefix() -> str:
    """``<hostname>/``: each host's objects under its own name."""
    return socket.gethostname() + "/"


class HashingFile(io.RawIOBase):
    """A file being written, its SHA-256 and size kept as it goes."""

    def __init__(self, f: io.BufferedWriter) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)


class CaptureUploader:
    """The upload loop, the bucket's keys for a capture, downloads from the bucket and the fleet's catalogue."""

    def __init__(
        self, store: CaptureStore, client: S3Client, prefix: str, concurrency: int = 2, multipart_bytes: int = 16 << 20,
        max_backoff: float = 300.0, busy: Callable[[str], bool] = lambda _id: False,
    ) -> None:
        self.store, self.client, self.prefix = store, client, prefix
        self.concurrency, self.multipart_bytes, self.max_backoff = concurrency, multipart_bytes, max_backoff
        self.busy = busy  # a capture whose evidence is still being recorded waits
        self.results: Counter[str] = Counter({r: 0 for r in ("ok", "retry", "failed", "gone")})
        self.seconds: list[int] = [0] * (len(BUCKETS) + 1)
        self.seconds_sum = 0.0
        self.bytes_total = 0
        self.queue_length = 0  # rows in the queue, as the loop last counted them (read by collect())
        self._wake = asyncio.Event()
        self._inflight: dict[str, asyncio.Task] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        store.uploads_enabled = True
        store.upload_listeners.append(self.wake)

    # -- keys --------------------------------------------------------------------------------------

    def key(self, capture_id: str, what: str, prefix: str | None = None) -> str:
        """The object key of a capture's ``pcap``, ``evidence``, ``bundle`` or ``index``."""
        p = self.prefix if prefix is None else prefix
        if what == "index":
            return f"{p}index/{capture_id}.json"
        return f"{p}captures/{capture_id}/" + {"pcap": "capture.pcap", "evidence": "evidence.json", "bundle": "bundle.tar.gz"}[what]

    def place(self, row: CaptureRow) -> BucketPlace:
        """The bucket a capture's objects go to and their keys (the evidence's only if it has one
        here, or the upload confirmed one: an evicted capture's row no longer names its file)."""
        has_evidence = row.evidence is not None or "evidence" in row.uploaded_objects.split(",")
        keys = {w: self.key(row.id, w) for w in OBJECTS if w != "evidence" or has_evidence}
        return BucketPlace(self.client.endpoint, self.client.bucket, self.prefix, keys)

    def uploading(self, capture_id: str) -> bool:
        """True while the capture's objects are being sent."""
        return capture_id in self._inflight

    # -- the loop ----------------------------------------------------------------------------------

    def wake(self) -> None:
        """Something was queued (callable from any thread)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        """Upload what is due, for ever (a supervised service)."""
        self._loop = asyncio.get_running_loop()
        db, uploads = self.store.index.db, self.store.index.uploads
        try:
            while True:
                self._wake.clear()
                now = time.time()
                free = self.concurrency - len(self._inflight)
                self.queue_length = await db.run(uploads.count)
                if free > 0:
                    for job in await db.run(uploads.due, now, free + len(self._inflight), tuple(self._inflight)):
                        if len(self._inflight) >= self.concurrency:
                            break
                        if self.busy(job.capture_id):
                            continue
                        task = asyncio.get_running_loop().create_task(self._one(job), name="upload")
                        self._inflight[job.capture_id] = task
                        task.add_done_callback(lambda _t, cid=job.capture_id: (self._inflight.pop(cid, None), self._wake.set()))
                next_at = await db.run(uploads.next_due)
                wait = IDLE_POLL if next_at is None else min(IDLE_POLL, max(next_at - time.time(), 0.05))
                if self._inflight and len(self._inflight) >= self.concurrency:
                    wait = IDLE_POLL
                await event_or_timeout(self._wake, wait)
        finally:
            for task in list(self._inflight.values()):
                task.cancel()
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)
            self._inflight.clear()

    async def close(self) -> None:
        await self.client.close()

    async def _one(self, job: UploadRow) -> None:
        db, uploads = self.store.index.db, self.store.index.uploads
        started = time.monotonic()
        row = await self.store.index.captures.get(job.capture_id)
        if row is None or row.state == EVICTED or row.file is None or row.state not in FINISHED:
            await db.run(uploads.drop, job.capture_id)
            self.results["gone"] += 1
            return
        done = job.done_set
        try:
            for what in OBJECTS:
                if what in done:
                    continue
                if what == "evidence" and row.evidence is None:
                    continue
                sent = await self._object(row, what)
                self.bytes_total += sent
                done.add(what)
                await db.run(uploads.progress, row.id, done)
        except asyncio.CancelledError:
            raise
        except (S3Error, OSError) as exc:
            await self._failed(job, row, exc)
            return
        await db.run(uploads.finish, row.id, time.time(), done)
        seconds = time.monotonic() - started
        self.results["ok"] += 1
        self._observe(seconds)
        log.info("capture_uploaded", capture_id=row.id, bucket=self.client.bucket, key=self.key(row.id, "pcap"), bytes=row.bytes, seconds=round(seconds, 3))
        if await self.store.enforce():  # a cache now: what retention held back for this upload may go
            log.info("captures_evicted", store_bytes=self.store.total_bytes)

    async def _failed(self, job: UploadRow, row: CaptureRow, exc: Exception) -> None:
        db, uploads = self.store.index.db, self.store.index.uploads
        current = await self.store.index.captures.get(row.id)
        if current is None or current.state == EVICTED:  # evicted while being uploaded
            await db.run(uploads.drop, row.id)
            self.results["gone"] += 1
            return
        may_pass = isinstance(exc, S3Error) and exc.retryable and not isinstance(exc, S3Conflict)
        if not may_pass and job.attempts + 1 >= MAX_ATTEMPTS or isinstance(exc, S3Conflict):
            await db.run(uploads.drop, row.id)
            self.results["failed"] += 1
            log.error("capture_upload_failed", capture_id=row.id, bucket=self.client.bucket, attempts=job.attempts + 1, error=str(exc))
            return
        delay = min(self.max_backoff, 2.0 ** min(job.attempts, 20)) * random.uniform(0.5, 1.0)
        await db.run(uploads.retry, row.id, time.time() + delay, str(exc))
        self.results["retry"] += 1
        log.warning("capture_upload_retry", capture_id=row.id, attempts=job.attempts + 1, retry_in=round(delay, 1), error=str(exc))

    async def _object(self, row: CaptureRow, what: str) -> int:
        """Upload one of a capture's objects; returns its bytes."""
        key = self.key(row.id, what)
        meta = {"capture-id": row.id}
        if what == "pcap":
            path = self.store.files.path(row.file)  # type: ignore[arg-type]
            digest = row.sha256 or await asyncio.to_thread(file_sha256, path)
            return await self._file(key, path, digest, "application/vnd.tcpdump.pcap", meta)
        if what == "evidence":
            path = self.store.files.path(row.evidence)  # type: ignore[arg-type]
            return await self._file(key, path, await asyncio.to_thread(file_sha256, path), "application/json", meta)
        if what == "bundle":
            return await self._bundle(row, key, meta)
        doc = json.dumps(self.index_document(row), sort_keys=True, separators=(",", ":")).encode()
        await self.client.put_bytes(key, doc, metadata=meta)
        return len(doc)

    async def _file(self, key: str, path: Path, digest: str, content_type: str, meta: dict[str, str]) -> int:
        size = path.stat().st_size
        if size > self.multipart_bytes:
            await self.client.put_multipart(key, path, digest, size, self.multipart_bytes, content_type, meta)
        else:
            await self.client.put(key, path, digest, size, content_type, meta)
        return size

    async def _bundle(self, row: CaptureRow, key: str, meta: dict[str, str]) -> int:
        anomaly = await self.store.index.anomalies.get(row.anomaly_id) if row.anomaly_id else None
        tmp = self.store.files.path(f"{row.id}.bundle.tmp")
        pcap, evidence = self.store.path_of(row), self.store.evidence_path(row)

        def make() -> tuple[str, int]:
            with open(tmp, "wb") as f:
                out = HashingFile(f)
                with io.BufferedWriter(out, 256 * 1024) as buffered:
                    write_bundle(buffered, row, anomaly, pcap, evidence)  # type: ignore[arg-type]
                return out.sha.hexdigest(), out.size

        try:
            digest, _size = await asyncio.to_thread(make)
            return await self._file(key, tmp, digest, "application/gzip", meta)
        finally:
            tmp.unlink(missing_ok=True)

    def index_document(self, row: CaptureRow) -> dict[str, Any]:
        """The capture's small JSON in the bucket (the fleet catalogue's entry); the same bytes for
        the same capture, so a retry meets If-None-Match with an equal digest."""
        capture = row.to_json()
        for k in ("location", "uploaded_at", "downloadable"):
            capture.pop(k, None)
        objects = {w: self.key(row.id, w) for w in ("pcap", "bundle")}
        if row.evidence is not None:
            objects["evidence"] = self.key(row.id, "evidence")
        return {"version": 1, "host": self.prefix.rstrip("/").rsplit("/", 1)[-1], "prefix": self.prefix, "capture": capture, "objects": objects}

    def _observe(self, seconds: float) -> None:
        self.seconds_sum += seconds
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.seconds[i] += 1
                return
        self.seconds[-1] += 1

    # -- reading back ------------------------------------------------------------------------------

    async def open(self, capture_id: str, what: str) -> Any:
        """The bucket's response for a capture's object, open for streaming (``release()`` it)."""
        return await self.client.get(self.key(capture_id, what))

    async def open_fleet(self, host: str, capture_id: str, what: str) -> Any:
        """Another host's capture object (under its prefix beside this host's), open for streaming."""
        return await self.client.get(self.key(capture_id, what, self._parent() + host + "/"))

    def _parent(self) -> str:
        """The prefix the fleet's hosts share (``fleet/<host>/`` → ``fleet/``; none: "")."""
        parent = self.prefix.rstrip("/").rpartition("/")[0]
        return parent + "/" if parent else ""

    async def fleet(self, limit: int = 100, host: str | None = None) -> list[dict[str, Any]]:
        """The newest captures of every host sharing the bucket (their index documents), newest first.

        Hosts are the prefixes beside this host's (``fleet/<host>/`` → ``fleet/``)."""
        parent = self._parent()
        _keys, hosts = await self.client.list(parent, "/")
        if host is not None:
            hosts = [h for h in hosts if h == f"{parent}{host}/"]
        found: list[str] = []
        for h in hosts:
            keys, _ = await self.client.list(h + "index/")
            found += sorted(k for k in keys if k.endswith(".json"))[-limit:]
        found.sort(key=lambda k: k.rsplit("/", 1)[-1], reverse=True)
        found = found[:limit]
        gate = asyncio.Semaphore(8)

        async def fetch(k: str) -> dict[str, Any] | None:
            async with gate:
                try:
                    return json.loads(await self.client.get_bytes(k, 256 * 1024))
                except (S3Error, ValueError):
                    return None

        docs = await asyncio.gather(*(fetch(k) for k in found))
        return [d for d in docs if isinstance(d, dict)]

    # -- metrics -----------------------------------------------------------------------------------

    def describe(self) -> Iterator[Any]:
        return iter(())

    def collect(self) -> Iterator[Any]:
        """nstap_capture_uploads_total{result}, nstap_capture_upload_queue, nstap_capture_upload_seconds (no I/O)."""
        uploads = CounterMetricFamily("nstap_capture_uploads", "Capture uploads to the bucket by result (ok, retry, failed, gone).", labels=["result"])
        for result, n in sorted(self.results.items()):
            uploads.add_metric([result], n)
        yield uploads
        yield GaugeMetricFamily("nstap_capture_upload_queue", "Finished captures waiting for their upload.", value=self.queue_length)
        acc, buckets = 0, []
        for bound, n in zip((*map(str, BUCKETS), "+Inf"), self.seconds):
            acc += n
            buckets.append((bound, acc))
        yield HistogramMetricFamily("nstap_capture_upload_seconds", "Seconds to upload one capture's objects.", buckets=buckets, sum_value=self.seconds_sum)
        yield CounterMetricFamily("nstap_capture_upload_bytes", "Bytes uploaded to the bucket.", value=self.bytes_total)
        yield CounterMetricFamily(
            "nstap_capture_evicted_before_upload", "Queued captures the disk budget evicted before their upload.", value=self.store.evicted_before_upload
        )
