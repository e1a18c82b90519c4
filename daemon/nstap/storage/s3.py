"""A small S3 client over aiohttp: Signature V4, streamed bodies, the calls nstap needs and no more.

Why not botocore/aiobotocore: nstap needs eight calls (put, multipart create/part/complete/abort,
head, get, list), all with bodies streamed from disk; botocore is ~14 MB with urllib3, jmespath
and dateutil, and aiobotocore pins botocore to narrow ranges. aiohttp is already nstap's HTTP
stack. Tested against a real S3 server (SeaweedFS) in ``tests/test_s3_storage.py``.

Every body is signed with its real SHA-256 (``x-amz-content-sha256``) and carries it as the
object checksum (``x-amz-checksum-sha256``), so the server refuses a body that is not the one
nstap hashed (``BadDigest``). Bodies are read from their file in chunks, in a thread: an upload
holds at most one chunk in memory. Credentials are kept in this object only and never logged
(``repr`` hides them).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import aiohttp
import yarl

CHUNK = 256 * 1024  # bytes read from a file at a time
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
MIN_PART = 5 * 1024 * 1024  # S3's smallest part but the last


class S3Error(Exception):
    """An S3 call that failed: ``status`` (0: no answer), ``code`` (the error document's Code)."""

    def __init__(self, status: int, code: str, message: str = "") -> None:
        super().__init__(f"{status} {code}{': ' + message if message else ''}")
        self.status, self.code = status, code

    @property
    def retryable(self) -> bool:
        """Worth another try later: no answer, throttled or a server error."""
        return self.status == 0 or self.status == 429 or self.status >= 500 or self.code in ("RequestTimeout", "SlowDown")


class S3Conflict(S3Error):
    """The key holds an object with other content (If-None-Match refused and the digests differ)."""


@dataclass(frozen=True)
class Credentials:
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    session_token: str = field(default="", repr=False)


def _uri(text: str) -> str:
    return quote(text, safe="-_.~")


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sign(
    creds: Credentials, region: str, method: str, host: str, path: str, query: dict[str, str], headers: dict[str, str],
    payload_sha256: str, now: float | None = None,
) -> dict[str, str]:
    """The headers of a request signed with AWS Signature V4 (``path`` already URI-encoded)."""
    t = time.gmtime(now if now is not None else time.time())
    amz_date, day = time.strftime("%Y%m%dT%H%M%SZ", t), time.strftime("%Y%m%d", t)
    out = {**headers, "host": host, "x-amz-date": amz_date, "x-amz-content-sha256": payload_sha256}
    if creds.session_token:
        out["x-amz-security-token"] = creds.session_token
    signed = {k.lower(): " ".join(str(v).split()) for k, v in out.items()}
    names = sorted(signed)
    canonical_query = "&".join(f"{_uri(k)}={_uri(v)}" for k, v in sorted(query.items()))
    canonical = "\n".join(
        [method, path, canonical_query, "".join(f"{n}:{signed[n]}\n" for n in names), ";".join(names), payload_sha256]
    )
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(("AWS4" + creds.secret_key).encode(), day), region), "s3"), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out["Authorization"] = f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, SignedHeaders={';'.join(names)}, Signature={signature}"
    return out


def _error(status: int, body: bytes) -> S3Error:
    code = message = ""
    m = re.search(rb"<Code>([^<]*)</Code>", body)
    if m:
        code = m.group(1).decode(errors="replace")
    m = re.search(rb"<Message>([^<]*)</Message>", body)
    if m:
        message = m.group(1).decode(errors="replace")[:200]
    return S3Error(status, code or f"HTTP{status}", message)


def _strip_ns(root: ET.Element) -> None:
    for el in root.iter():
        if "}" in el.tag:
            el.tag = el.tag.split("}", 1)[1]


async def file_chunks(path: Path, start: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
    """A file's bytes from ``start`` (``length`` of them, or to the end), a chunk at a time, read in a thread."""
    f = await asyncio.to_thread(open, path, "rb")
    try:
        await asyncio.to_thread(f.seek, start)
        left = length
        while left is None or left > 0:
            chunk = await asyncio.to_thread(f.read, CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                break
            if left is not None:
                left -= len(chunk)
            yield chunk
    finally:
        await asyncio.to_thread(f.close)


def file_sha256(path: Path, start: int = 0, length: int | None = None) -> str:
    """SHA-256 (hex) of a file or of a range of it (blocking)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left is None or left > 0:
            chunk = f.read(CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                break
            if left is not None:
                left -= len(chunk)
            h.update(chunk)
    return h.hexdigest()


class S3Client:
    """One bucket of an S3-compatible server."""

    def __init__(
        self, endpoint: str, bucket: str, region: str, creds: Credentials, path_style: bool = True, verify_tls: bool = True,
        timeout: float = 60.0,
    ) -> None:
        url = yarl.URL(endpoint)
        self.bucket, self.region, self._creds = bucket, region, creds
        if path_style:
            self._base = url.with_path("/")
            self._root = "/" + _uri(bucket)
        else:
            self._base = url.with_host(f"{bucket}.{url.host}").with_path("/")
            self._root = ""
        self._host = self._base.raw_authority
        self._verify = verify_tls
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"S3Client({self._base}, bucket={self.bucket!r})"

    @property
    def endpoint(self) -> str:
        """The server's URL the requests go to, without any user or password a config put in it."""
        return str(self._base.with_user(None))

    async def close(self) -> None:
        """Close the connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, connector=aiohttp.TCPConnector(limit=16, ssl=None if self._verify else False), auto_decompress=False
            )
        return self._session

    async def _call(
        self, method: str, key: str | None, query: dict[str, str] | None = None, headers: dict[str, str] | None = None,
        body: object = None, payload_sha256: str = EMPTY_SHA256, stream: bool = False,
    ) -> aiohttp.ClientResponse:
        """One signed request; a non-2xx answer raises S3Error (the response is closed), else the
        response is returned read (or, with ``stream``, open: the caller releases it)."""
        path = self._root + ("/" + quote(key, safe="/-_.~") if key is not None else "/")
        query = query or {}
        signed = sign(self._creds, self.region, method, self._host, path, query, headers or {}, payload_sha256)
        qs = "&".join(f"{_uri(k)}={_uri(v)}" if v != "" else _uri(k) for k, v in sorted(query.items()))
        url = yarl.URL(str(self._base.with_path("")) + path + (f"?{qs}" if qs else ""), encoded=True)
        try:
            resp = await self._http().request(method, url, headers=signed, data=body, allow_redirects=False)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise S3Error(0, type(exc).__name__, str(exc)[:200]) from None
        if resp.status >= 300:
            try:
                data = await resp.read() if method != "HEAD" else b""
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                data = b""
            resp.release()
            raise _error(resp.status, data)
        if not stream:
            try:
                await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise S3Error(0, type(exc).__name__, str(exc)[:200]) from None
            finally:
                resp.release()
        return resp

    # -- objects ------------------------------------------------------------------------------

    async def put(
        self, key: str, path: Path, sha256_hex: str, size: int, content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> str:
        """Upload a file as ``key`` unless the key exists (If-None-Match: *), its SHA-256 sent as
        the object checksum. Returns "uploaded", or "exists" when the key already holds this
        content (a retry after a lost answer); S3Conflict when it holds other content."""
        headers = {
            "content-type": content_type, "if-none-match": "*", "x-amz-checksum-sha256": _b64(sha256_hex),
            "x-amz-meta-sha256": sha256_hex, **{f"x-amz-meta-{k}": v for k, v in (metadata or {}).items()},
        }
        try:
            await self._put_body(key, headers, path, 0, size, sha256_hex)
        except S3Error as exc:
            if exc.status == 412:
                return await self._existing(key, sha256_hex)
            raise
        return "uploaded"

    async def _put_body(self, key: str, headers: dict[str, str], path: Path, start: int, length: int, sha256_hex: str,
                        query: dict[str, str] | None = None) -> aiohttp.ClientResponse:
        # Content-Length given, so the streamed body is not sent chunked (S3 wants its length).
        return await self._call(
            "PUT", key, query=query, headers={**headers, "content-length": str(length)}, body=file_chunks(path, start, length),
            payload_sha256=sha256_hex,
        )

    async def _existing(self, key: str, sha256_hex: str) -> str:
        head = await self.head(key)
        if head is not None and head.get("x-amz-meta-sha256") == sha256_hex:
            return "exists"
        raise S3Conflict(412, "PreconditionFailed", f"{key} exists with other content")

    async def put_multipart(
        self, key: str, path: Path, sha256_hex: str, size: int, part_size: int, content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> str:
        """Upload a large file in parts, each with its own SHA-256 checksum, completed with
        If-None-Match: * (as :meth:`put`). A failed upload is aborted (its parts freed)."""
        part_size = max(part_size, MIN_PART)
        if await self.head(key) is not None:  # a retry after the completion's answer was lost
            return await self._existing(key, sha256_hex)
        headers = {"content-type": content_type, "x-amz-checksum-algorithm": "SHA256", "x-amz-meta-sha256": sha256_hex, **{f"x-amz-meta-{k}": v for k, v in (metadata or {}).items()}}
        resp = await self._call("POST", key, query={"uploads": ""}, headers=headers)
        upload_id = self._xml_text(resp, "UploadId")
        try:
            parts: list[tuple[int, str, str]] = []
            for number, start in enumerate(range(0, size, part_size), 1):
                length = min(part_size, size - start)
                digest = await asyncio.to_thread(file_sha256, path, start, length)
                resp = await self._put_body(
                    key, {"x-amz-checksum-sha256": _b64(digest)}, path, start, length, digest,
                    query={"partNumber": str(number), "uploadId": upload_id},
                )
                parts.append((number, resp.headers.get("ETag", ""), _b64(digest)))
            doc = "<CompleteMultipartUpload>" + "".join(
                f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag><ChecksumSHA256>{c}</ChecksumSHA256></Part>" for n, etag, c in parts
            ) + "</CompleteMultipartUpload>"
            body = doc.encode()
            try:
                await self._call(
                    "POST", key, query={"uploadId": upload_id}, headers={"if-none-match": "*", "content-type": "application/xml"},
                    body=body, payload_sha256=hashlib.sha256(body).hexdigest(),
                )
            except S3Error as exc:
                if exc.status == 412:
                    return await self._existing(key, sha256_hex)
                raise
        except BaseException:
            try:
                await asyncio.shield(self._call("DELETE", key, query={"uploadId": upload_id}))
            except (S3Error, asyncio.CancelledError):
                pass
            raise
        return "uploaded"

    def _xml_text(self, resp: aiohttp.ClientResponse, tag: str) -> str:
        body = resp._body or b""  # read by _call
        m = re.search(rb"<" + tag.encode() + rb">([^<]*)</", body)
        if not m:
            raise S3Error(resp.status, "BadResponse", f"no {tag} in the answer")
        return m.group(1).decode()

    async def put_bytes(self, key: str, data: bytes, content_type: str = "application/json", metadata: dict[str, str] | None = None) -> str:
        """A small object from memory (the capture's index document), as :meth:`put`."""
        digest = hashlib.sha256(data).hexdigest()
        headers = {
            "content-type": content_type, "if-none-match": "*", "x-amz-checksum-sha256": _b64(digest),
            "x-amz-meta-sha256": digest, **{f"x-amz-meta-{k}": v for k, v in (metadata or {}).items()},
        }
        try:
            await self._call("PUT", key, headers=headers, body=data, payload_sha256=digest)
        except S3Error as exc:
            if exc.status == 412:
                return await self._existing(key, digest)
            raise
        return "uploaded"

    async def head(self, key: str) -> dict[str, str] | None:
        """The object's headers (lower-case names), or None if there is none."""
        try:
            resp = await self._call("HEAD", key)
        except S3Error as exc:
            if exc.status == 404:
                return None
            raise
        return {k.lower(): v for k, v in resp.headers.items()}

    async def get(self, key: str) -> aiohttp.ClientResponse:
        """An object's response, open for streaming (``release()`` it); S3Error 404 if there is none."""
        return await self._call("GET", key, stream=True)

    async def get_bytes(self, key: str, limit: int = 1 << 20) -> bytes:
        """A small object whole (at most ``limit`` bytes)."""
        resp = await self.get(key)
        data = bytearray()
        try:
            while len(data) <= limit:  # read(n) returns what has arrived, up to n: not the whole body
                chunk = await resp.content.read(limit + 1 - len(data))
                if not chunk:
                    break
                data += chunk
        finally:
            resp.release()
        if len(data) > limit:
            raise S3Error(resp.status, "TooLarge", f"{key} is over {limit} bytes")
        return bytes(data)

    async def list(self, prefix: str, delimiter: str = "") -> tuple[list[str], list[str]]:
        """Keys and common prefixes under ``prefix`` (every page)."""
        keys: list[str] = []
        prefixes: list[str] = []
        token = ""
        while True:
            query = {"list-type": "2", "prefix": prefix}
            if delimiter:
                query["delimiter"] = delimiter
            if token:
                query["continuation-token"] = token
            resp = await self._call("GET", None, query=query)
            root = ET.fromstring(resp._body or b"<x/>")
            _strip_ns(root)
            keys += [el.text or "" for el in root.findall("./Contents/Key")]
            prefixes += [el.text or "" for el in root.findall("./CommonPrefixes/Prefix")]
            token = root.findtext("NextContinuationToken") or ""
            if root.findtext("IsTruncated") != "true" or not token:
                return keys, prefixes


def load_credentials(access_key_file: Path | None, secret_key_file: Path | None, environ: dict[str, str] | None = None) -> Credentials:
    """The keys from their files, else from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and
    AWS_SESSION_TOKEN); ValueError naming what is missing (never the values)."""
    env = os.environ if environ is None else environ
    if access_key_file is not None or secret_key_file is not None:
        if access_key_file is None or secret_key_file is None:
            raise ValueError("storage.s3: access_key_file and secret_key_file go together")
        access = access_key_file.read_text().strip()
        secret = secret_key_file.read_text().strip()
        return Credentials(access, secret)
    access, secret = env.get("AWS_ACCESS_KEY_ID", ""), env.get("AWS_SECRET_ACCESS_KEY", "")
    if not access or not secret:
        raise ValueError("storage.s3: no credentials (access_key_file/secret_key_file, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    return Credentials(access, secret, env.get("AWS_SESSION_TOKEN", ""))
