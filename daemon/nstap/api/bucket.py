"""Downloads from the bucket (``storage.s3``) for captures the local store no longer holds, and the fleet's catalogue.

Proxied rather than redirected to a presigned URL: the bucket's endpoint is often reachable from
the host only, the API's own authentication stays the only one a user needs, and the keys never
leave the daemon. The body streams through, a chunk at a time.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..index.captures import CaptureRow
from ..index.ids import well_formed
from ..storage.s3 import S3Error
from .server import BadRequest

CHUNK = 256 * 1024


CONTENT_TYPES = {"pcap": "application/vnd.tcpdump.pcap", "evidence": "application/json", "bundle": "application/gzip"}
SUFFIXES = {"pcap": ".pcap", "evidence": ".evidence.json", "bundle": ".tar.gz"}
HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")  # a prefix name: never "/" or ".." (keys stay under the fleet's parent)


async def from_bucket(request: web.Request, bucket: Any, row: CaptureRow, what: str, content_type: str, name: str | None) -> web.StreamResponse:
    """Stream a capture's object from the bucket to the client."""
    return await _stream(request, lambda: bucket.open(row.id, what), what, content_type, name, row.sha256 if what == "pcap" else "", 410)


async def fleet_object(request: web.Request, bucket: Any, host: str, capture_id: str, what: str) -> web.StreamResponse:
    """Stream another host's capture object (``pcap``, ``evidence`` or ``bundle``) from the bucket:
    the keys of its prefix beside this host's, as ``captures list --all-hosts`` listed it."""
    if not HOST_NAME.match(host):
        raise BadRequest("host: a prefix name of the fleet (letters, digits, '.', '_', '-')", 400)
    if not well_formed(capture_id):
        raise BadRequest("no such capture", 404)
    if what not in CONTENT_TYPES:
        raise BadRequest("object: pcap, evidence or bundle", 400)
    name = f"nstap-{host}-{capture_id}{SUFFIXES[what]}"
    return await _stream(request, lambda: bucket.open_fleet(host, capture_id, what), what, CONTENT_TYPES[what], name, "", 404)


async def _stream(
    request: web.Request, opener: Callable[[], Awaitable[Any]], what: str, content_type: str, name: str | None, sha256: str, missing: int
) -> web.StreamResponse:
    """The bucket's object, a chunk at a time (``missing``: the status when the bucket has none)."""
    try:
        upstream = await opener()
    except S3Error as exc:
        if exc.status == 404:
            raise BadRequest(f"the capture's {what} is not in the bucket", missing) from None
        raise BadRequest(f"the bucket did not answer: {exc.code}", 502) from None
    try:
        headers = {"Content-Type": content_type, "X-Nstap-Source": "bucket"}
        if name:
            headers["Content-Disposition"] = f'attachment; filename="{name}"'
        if sha256:
            headers["X-Content-SHA256"] = sha256
        response = web.StreamResponse(headers=headers)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(CHUNK):
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        upstream.release()


async def fleet_list(bucket: Any, limit: int, host: str | None) -> list[dict[str, Any]]:
    """The fleet's newest captures from the bucket's index documents."""
    try:
        return await bucket.fleet(limit, host)
    except S3Error as exc:
        raise BadRequest(f"the bucket did not answer: {exc.code}", 502) from None
