"""Downloads from the bucket (``storage.s3``) for captures the local store no longer holds, and the fleet's catalogue.

Proxied rather than redirected to a presigned URL: the bucket's endpoint is often reachable from
the host only, the API's own authentication stays the only one a user needs, and the keys never
leave the daemon. The body streams through, a chunk at a time.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..index.captures import CaptureRow
from ..storage.s3 import S3Error
from .server import BadRequest

CHUNK = 256 * 1024


async def from_bucket(request: web.Request, bucket: Any, row: CaptureRow, what: str, content_type: str, name: str | None) -> web.StreamResponse:
    """Stream a capture's object from the bucket to the client."""
    try:
        upstream = await bucket.open(row.id, what)
    except S3Error as exc:
        if exc.status == 404:
            raise BadRequest(f"the capture's {what} is not in the bucket", 410) from None
        raise BadRequest(f"the bucket did not answer: {exc.code}", 502) from None
    try:
        headers = {"Content-Type": content_type, "X-Nstap-Source": "bucket"}
        if name:
            headers["Content-Disposition"] = f'attachment; filename="{name}"'
        if what == "pcap" and row.sha256:
            headers["X-Content-SHA256"] = row.sha256
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
