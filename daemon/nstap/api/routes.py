"""API routes for anomalies and captures, and the Alertmanager webhook.

Every input is checked before it is used: ids must look like ids and are only ever looked up in
the index (a file name comes from the index, never from the request), filters are compiled by
tcpdump before a capture starts, numbers must be finite and in range, unknown fields are refused.
Errors are JSON with a 4xx status.
"""

from __future__ import annotations

import asyncio
import io
import math
import re
import time
from datetime import datetime, timezone
from typing import Any

import structlog
from aiohttp import web

from .. import labels as nstap_labels
from ..alertmanager.captures import AlertCaptures
from ..capture.bundle import ChunkSink, bundle_name, write_bundle
from .bucket import fleet_list, fleet_object, from_bucket
from ..threads import worker_threads
from ..capture.engine import CaptureEngine
from ..capture.model import SIDES, CaptureTarget
from ..capture.store import CaptureStore
from ..index import CaptureRow
from ..index.captures import EVICTED, RUNNING
from ..capture.tcpdump import FilterError
from ..dns.lookups import WINDOW as DNS_WINDOW
from ..dns.lookups import to_json as dns_json
from ..dns.service import DnsService
from ..ebpf.service import EbpfService
from ..nat.monitor import NatMonitor
from ..registry import ContainerRegistry, WatchedNamespace
from ..runtime.records import ContainerRecord
from ..storage.location import capture_storage
from .endpoints import WEBHOOK, Param, endpoint, routes
from .server import BadRequest

log = structlog.get_logger("nstap.api")

MAX_LIMIT = 1000
MAX_ALERTS = 500
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")  # what may name an interface (IFNAMSIZ - 1 characters)


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a number")
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low:g} and {high:g}")
    return float(value)


def _time_param(request: web.Request, name: str) -> float | None:
    """A time query parameter: Unix seconds or an ISO 8601 / RFC 3339 timestamp."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise BadRequest(f"{name} must be Unix seconds or an ISO 8601 time") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.timestamp()
    if not math.isfinite(value):
        raise BadRequest(f"{name} must be finite")
    return value


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def _text_param(request: web.Request, name: str, max_len: int = 256) -> str | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    if len(raw) > max_len or any(ord(c) < 32 for c in raw):
        raise BadRequest(f"{name} is not a valid value")
    return raw


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except web.HTTPRequestEntityTooLarge:
        raise
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def _with_verdicts(monitor: NatMonitor, forwards: list[Any]) -> list[dict[str, Any]]:
    """The forwards as JSON, each with its verdict (rule, listener, probe) when the prober runs."""
    out = [f.to_json() for f in forwards]
    if monitor.probes is not None:
        for entry, verdict in zip(out, monitor.probes.verdicts(forwards)):
            entry["verdict"] = verdict
    return out


def download_name(row_container: str, what: str, at: float) -> str:
    """A readable, safe file name for a capture."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(at))
    parts = [_SAFE.sub("_", p).strip("._-")[:60] for p in ("nstap", row_container, what, stamp)]
    return "-".join(p for p in parts if p) + ".pcap"


BUNDLE_CHUNK = 256 * 1024  # bytes of a bundle sent at a time

# Parameters and answers several endpoints share (their declarations: docs/reference/api.md).
CONTAINER = Param("name", "path", "container name, full id or unique id prefix (4+ hex digits)")
CONTAINER_FILTER = Param("container", "query", "container name, id or id prefix")
CAPTURE_ID = Param("id", "path", "capture id")
LIMIT = Param("limit", "query", f"at most this many (1 to {MAX_LIMIT}, default 100)")
BAD_PARAM = (400, "a parameter that cannot be used")
NO_CAPTURE = (404, "no such capture")
NO_CONTAINER = (404, "no running container by that name or id (409: the name matches several)")
NAT_OFF = (409, "the NAT monitor is off (nat.enabled: false)")


class CaptureApi:
    """The /api/v1 routes that read and start captures and anomalies."""

    def __init__(
        self, registry: ContainerRegistry, engine: CaptureEngine, store: CaptureStore, max_seconds: float,
        nat: NatMonitor | None = None, ebpf: EbpfService | None = None, dns: DnsService | None = None,
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.store = store
        self.index = store.index
        self.max_seconds = max_seconds
        self.nat = nat
        self.ebpf = ebpf
        self.dns = dns
        self._bundles = worker_threads("nstap-bundle")  # bundles are made here, one at a time
        self.bucket: Any = None  # storage.s3: the CaptureUploader (downloads of evicted captures, the fleet list)
        self.alert_captures = AlertCaptures(self.index.alerts, engine, self)  # the webhook's and the puller's

    def close(self) -> None:
        """Stop the bundle thread (a bundle being made is finished first)."""
        self._bundles.shutdown(wait=True)

    def routes(self) -> list[web.RouteDef]:
        """The routes, for ApiServer.add_routes (from the handlers' declarations)."""
        return routes(self)

    # -- reading ---------------------------------------------------------------------------------

    @endpoint(
        "GET", "/api/v1/anomalies", "Anomaly events, newest first.",
        params=(CONTAINER_FILTER, Param("kind", "query", "detector kind"), Param("active", "query", "true: only those going on; false: only ended ones"),
                Param("since", "query", "events still going on at or after this time (Unix seconds or ISO 8601)"),
                Param("until", "query", "events that began at or before this time"), LIMIT),
        answers=((200, '{"anomalies": [anomaly, ...]}'), BAD_PARAM),
    )
    async def anomalies(self, request: web.Request) -> web.Response:
        active_raw = request.query.get("active")
        if active_raw not in (None, "", "true", "false"):
            raise BadRequest("active must be true or false")
        rows = await self.index.anomalies.list(
            container=_text_param(request, "container"),
            kind=_text_param(request, "kind", 64),
            since=_time_param(request, "since"),
            until=_time_param(request, "until"),
            active=None if not active_raw else active_raw == "true",
            limit=_limit(request),
        )
        return web.json_response({"anomalies": [r.to_json() for r in rows]})

    @endpoint(
        "GET", "/api/v1/captures", "Captures, newest first.",
        params=(CONTAINER_FILTER, Param("kind", "query", "anomaly kind or alert name"), Param("reason", "query", "anomaly, manual or alertmanager"),
                Param("since", "query", "captures started at or after this time (Unix seconds or ISO 8601)"),
                Param("until", "query", "captures started at or before this time"), LIMIT),
        answers=((200, '{"captures": [capture, ...]}'), BAD_PARAM),
    )
    async def captures(self, request: web.Request) -> web.Response:
        rows = await self.index.captures.list(
            container=_text_param(request, "container"),
            kind=_text_param(request, "kind", 64),
            reason=_text_param(request, "reason", 32),
            since=_time_param(request, "since"),
            until=_time_param(request, "until"),
            limit=_limit(request),
        )
        storage = await self.storage(rows)
        return web.json_response({"captures": [self._view(r, storage[r.id]) for r in rows]})

    def current(self, row: CaptureRow) -> CaptureRow:
        """The row as it is: a finished capture whose outcome the index could not take yet (a full
        disk) is shown finished, not running for good."""
        if row.state == RUNNING:
            outcome = self.engine.unsaved(row.id)
            if outcome is not None:
                for key, value in outcome.items():
                    setattr(row, key, value)
        return row

    async def _row(self, request: web.Request) -> CaptureRow:
        row = await self.index.captures.get(request.match_info["id"])
        if row is None:
            raise BadRequest("no such capture", 404)
        return self.current(row)

    async def storage(self, rows: list[CaptureRow]) -> dict[str, dict[str, Any] | None]:
        """Each capture's place in the bucket and its upload's record (None each: no bucket configured)."""
        bucket = self.bucket
        if bucket is None:
            return {r.id: None for r in rows}
        queued = await self.index.db.run(self.index.uploads.of, [r.id for r in rows])
        return {r.id: capture_storage(r, queued.get(r.id), bucket.uploading(r.id), bucket.place(r)) for r in rows}

    def _view(self, row: CaptureRow, storage: dict[str, Any] | None) -> dict[str, Any]:
        view = self.current(row).to_json()
        view["storage"] = storage
        view["links"] = {
            "self": f"/api/v1/captures/{row.id}",
            "pcap": f"/api/v1/captures/{row.id}/pcap",
            "evidence": f"/api/v1/captures/{row.id}/evidence",
            "bundle": f"/api/v1/captures/{row.id}/bundle",
        }
        return view

    @endpoint(
        "GET", "/api/v1/captures/{id}", "One capture's metadata.",
        params=(CAPTURE_ID,),
        answers=((200, "capture"), NO_CAPTURE),
    )
    async def capture(self, request: web.Request) -> web.Response:
        row = await self._row(request)
        return web.json_response(self._view(row, (await self.storage([row]))[row.id]))

    @endpoint(
        "GET", "/api/v1/captures/{id}/pcap", "The capture's pcap, streamed (from the bucket once the local file is evicted, with storage.s3).",
        params=(CAPTURE_ID,),
        answers=((200, 'the pcap; Content-Disposition: attachment; filename="nstap-<container>-<kind, alert or reason>-<UTC time>.pcap", '
                       "X-Content-SHA256"), NO_CAPTURE, (409, "the capture is still running"), (410, "the file was evicted by retention")),
    )
    async def pcap(self, request: web.Request) -> web.StreamResponse:
        row = await self._row(request)
        if row.state == RUNNING:
            raise BadRequest("the capture is still running", 409)
        path = self.store.path_of(row)
        if (row.state == EVICTED or path is None) and self.bucket is not None and row.uploaded_at:
            name = download_name(row.container or "capture", row.kind or row.reason, row.trigger_at or row.created_at)
            return await from_bucket(request, self.bucket, row, "pcap", "application/vnd.tcpdump.pcap", name)
        if row.state == EVICTED or path is None:
            raise BadRequest("the capture's file is gone (evicted by retention)", 410)
        name = download_name(row.container or "capture", row.kind or row.reason, row.trigger_at or row.created_at)
        return web.FileResponse(
            path,
            headers={
                "Content-Type": "application/vnd.tcpdump.pcap",
                "Content-Disposition": f'attachment; filename="{name}"',
                "X-Content-SHA256": row.sha256,
            },
        )

    @endpoint(
        "GET", "/api/v1/captures/{id}/evidence", "The capture's evidence document (JSON).",
        params=(CAPTURE_ID,),
        answers=((200, "anomaly, capture, start and end snapshots of the namespace, counter_deltas"),
                 (404, "no such capture, or its start snapshot is not in yet"), (410, "evicted by retention")),
    )
    async def evidence(self, request: web.Request) -> web.StreamResponse:
        row = await self._row(request)
        path = self.store.evidence_path(row)
        if path is None and self.bucket is not None and row.uploaded_at and row.state == EVICTED:
            return await from_bucket(request, self.bucket, row, "evidence", "application/json", None)
        if path is None:
            if row.state == EVICTED:
                raise BadRequest("the capture's evidence is gone (evicted by retention)", 410)
            raise BadRequest("no evidence recorded for this capture (yet)", 404)
        return web.FileResponse(path, headers={"Content-Type": "application/json"})

    @endpoint(
        "GET", "/api/v1/captures/{id}/bundle", "nstap-<container>-<id>.tar.gz: SUMMARY.txt, capture.pcap and evidence.json.",
        params=(CAPTURE_ID,),
        answers=((200, "the bundle, made as it is sent"), NO_CAPTURE, (409, "the capture is still running"), (410, "evicted by retention")),
    )
    async def bundle(self, request: web.Request) -> web.Response:
        row = await self._row(request)
        if row.state == RUNNING:
            raise BadRequest("the capture is still running", 409)
        pcap = self.store.path_of(row)
        if (row.state == EVICTED or pcap is None) and self.bucket is not None and row.uploaded_at:
            return await from_bucket(request, self.bucket, row, "bundle", "application/gzip", bundle_name(row))
        if row.state == EVICTED or pcap is None:
            raise BadRequest("the capture's file is gone (evicted by retention)", 410)
        anomaly = await self.index.anomalies.get(row.anomaly_id) if row.anomaly_id else None
        response = web.StreamResponse(
            headers={"Content-Type": "application/gzip", "Content-Disposition": f'attachment; filename="{bundle_name(row)}"'},
        )
        await response.prepare(request)
        # Made in a thread of its own as it is sent (a ring read back for a capture never waits
        # behind a download, and a 20 MB pcap is never held whole in memory).
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        sink = ChunkSink(loop, queue)
        evidence = self.store.evidence_path(row)

        def produce() -> None:
            try:
                with io.BufferedWriter(sink, BUNDLE_CHUNK) as out:
                    write_bundle(out, row, anomaly, pcap, evidence)
            finally:
                sink.end()

        making = loop.run_in_executor(self._bundles, produce)
        try:
            while (chunk := await queue.get()) is not None:
                await response.write(chunk)
                sink.taken()
        except BaseException:
            sink.abandon()
            await asyncio.gather(making, return_exceptions=True)
            raise
        await making
        await response.write_eof()
        return response

    @endpoint(
        "GET", "/api/v1/fleet/captures", "Every host's newest captures, from the index documents in the bucket (storage.s3).",
        params=(Param("host", "query", "one host's prefix name only"), LIMIT),
        answers=((200, '{"captures": [...]}: each host\'s index documents (host, capture, keys)'), (404, "no bucket configured")),
    )
    async def fleet_captures(self, request: web.Request) -> web.Response:
        if self.bucket is None:
            raise BadRequest("no bucket configured (storage.s3)", 404)
        return web.json_response({"captures": await fleet_list(self.bucket, _limit(request), _text_param(request, "host"))})

    @endpoint(
        "GET", "/api/v1/fleet/captures/{host}/{id}/{object}", "Another host's capture (its pcap, evidence or bundle), streamed from the bucket (storage.s3).",
        params=(Param("host", "path", "the host's prefix name, as the fleet list names it"), CAPTURE_ID, Param("object", "path", "pcap, evidence or bundle")),
        answers=((200, "the object; Content-Disposition: attachment; filename=\"nstap-<host>-<id>.pcap\" (.evidence.json, .tar.gz)"),
                 (400, "a host or object that cannot be"), (404, "no bucket configured, or no such object"), (502, "the bucket did not answer")),
    )
    async def fleet_capture_object(self, request: web.Request) -> web.StreamResponse:
        if self.bucket is None:
            raise BadRequest("no bucket configured (storage.s3)", 404)
        m = request.match_info
        return await fleet_object(request, self.bucket, m["host"], m["id"], m["object"])

    @endpoint(
        "GET", "/api/v1/alerts", "The alerts received (webhook and pull), newest first.",
        params=(LIMIT,),
        answers=((200, '{"alerts": [alert, ...]}'), BAD_PARAM),
    )
    async def alerts(self, request: web.Request) -> web.Response:
        return web.json_response({"alerts": await self.index.alerts.list(_limit(request))})

    # -- NAT ---------------------------------------------------------------------------------------

    def _monitor(self) -> NatMonitor:
        if self.nat is None:
            raise BadRequest("the NAT monitor is off (nat.enabled: false)", 409)
        return self.nat

    @endpoint(
        "GET", "/api/v1/nat", "Every port forward on the host with its verified state, counters, deciding rule and verdict; the rules read; conntrack's totals.",
        answers=((200, "read_at, rules, errors, forwards (each with verdict {rule, listener, probe, cause} when probes run), conntrack"), NAT_OFF),
    )
    async def nat_all(self, request: web.Request) -> web.Response:
        monitor = self._monitor()
        state = monitor.state
        return web.json_response({
            "read_at": state.read_at, "rules": dict(state.rules), "errors": list(state.errors),
            "forwards": _with_verdicts(monitor, list(state.forwards)),
            "conntrack": monitor.conntrack_json(),
        })

    @endpoint(
        "GET", "/api/v1/containers/{name}/nat",
        "One container's forwards (with verdicts), masquerade, conntrack flows by protocol and state, its own firewall's DROP/REJECT rules with counters.",
        params=(CONTAINER,),
        answers=((200, "forwards, masquerade, conntrack, firewall"), NO_CONTAINER, NAT_OFF),
    )
    async def nat_of(self, request: web.Request) -> web.Response:
        monitor = self._monitor()
        record = self.find(request.match_info["name"])
        view = monitor.container_json(record)
        view["forwards"] = self.forwards_of(record)
        return web.json_response(view)

    def forwards_of(self, record: ContainerRecord) -> list[dict[str, Any]]:
        """The published ports of ``record``'s namespace with their verdicts ([] without the NAT monitor)."""
        monitor = self.nat
        if monitor is None:
            return []
        ns = self.registry.namespaces().get(record.netns)
        return _with_verdicts(monitor, monitor.state.forwards_of({m.id for m in ns.members} if ns is not None else {record.id}))

    @endpoint(
        "GET", "/api/v1/containers/{name}/exposure", "The container's listeners: published, internal or loopback (the nmap step).",
        params=(CONTAINER,),
        answers=((200, "container, listeners (protocol, address, port, exposure, published_on), published_without_listener"), NO_CONTAINER,
                 (409, "the NAT monitor is off, or the container is not watched")),
    )
    async def exposure(self, request: web.Request) -> web.Response:
        """The container's listeners: published, internal only, or loopback (the nmap step)."""
        monitor = self._monitor()
        record = self.find(request.match_info["name"])
        namespace = self._watched(record)
        if monitor.exposure is None:
            raise BadRequest(f"{record.name} is not watched (host network, opted out or not started yet)", 409)
        view = await monitor.exposure(namespace)
        return web.json_response({"container": record.name, "container_id": record.short_id, "runtime": record.runtime, **view})

    @endpoint(
        "GET", "/api/v1/containers/{name}/talkers", "The container's peers by bytes and packets over the last minute, from conntrack accounting (the iftop step).",
        params=(CONTAINER,),
        answers=((200, "container, window_seconds, source, peers (peer, bytes_out, packets_out, bytes_in, packets_in, new_flows)"), NO_CONTAINER,
                 (409, "the NAT monitor is off, or talkers are not tracked")),
    )
    async def talkers(self, request: web.Request) -> web.Response:
        """The container's peers by bytes over the last minute (the iftop step)."""
        monitor = self._monitor()
        record = self.find(request.match_info["name"])
        if monitor.talkers is None:
            raise BadRequest("top talkers are not tracked", 409)
        return web.json_response(monitor.talkers.talkers_json(record))

    @endpoint(
        "GET", "/api/v1/containers/{name}/retransmits",
        "The flows of the container's namespace that retransmitted in the last minute, and its kernel drops by reason (eBPF).",
        params=(CONTAINER,),
        answers=((200, "container, window_seconds, flows (local port, remote address and port, count), kernel_drops"), NO_CONTAINER,
                 (409, "the eBPF collector is not running, or the container is not watched")),
    )
    async def retransmits(self, request: web.Request) -> web.Response:
        record = self.find(request.match_info["name"])
        ebpf = self.ebpf
        if ebpf is None or not ebpf.up:
            raise BadRequest(f"the eBPF collector is not running: {ebpf.error if ebpf is not None else 'off'}", 409)
        namespace = self._watched(record)
        return web.json_response({
            "container": record.name, "container_id": record.short_id, "runtime": record.runtime, "window_seconds": 60,
            "flows": ebpf.retransmits({namespace.inode}),
            "kernel_drops": dict(ebpf.counts.get(namespace.inode, {})),
        })

    @endpoint(
        "GET", "/api/v1/containers/{name}/dns",
        "The container's DNS lookups (from the kernel): so far by outcome and type, the last minute's failing names, the servers asked with their latency (the dig / tcpdump port 53 step).",
        params=(CONTAINER,),
        answers=((200, "container, attached (the program is on its interfaces), interfaces (how many), timeout_seconds, window_seconds, requests (rcode, qtype, count), answered, failed, mean_latency_ms, "
                       "failing_names (name, rcode, qtype, count, last_seen), servers (address, port, queries, answers, failures, timeouts, "
                       "mean_latency_ms, via_embedded_resolver)"), NO_CONTAINER,
                 (409, "the DNS collector is not running, or the container is not watched")),
    )
    async def dns_view(self, request: web.Request) -> web.Response:
        record = self.find(request.match_info["name"])
        dns = self.dns
        if dns is None or not dns.up:
            raise BadRequest(f"the DNS collector is not running: {dns.error if dns is not None else 'off'}", 409)
        namespace = self._watched(record)
        await dns.refresh()
        lookups = dns.of(namespace.inode)
        body = {"container": record.name, "container_id": record.short_id, "runtime": record.runtime,
                "attached": dns.attached_to(namespace.inode), "interfaces": dns.interfaces_of(namespace.inode), "timeout_seconds": dns.tally.timeout, "window_seconds": DNS_WINDOW}
        body.update(dns_json(lookups) or {"requests": [], "answered": 0, "failed": 0, "mean_latency_ms": None, "failing_names": [], "servers": []})
        return web.json_response(body)

    def _watched(self, record: ContainerRecord) -> WatchedNamespace:
        """The namespace of a container nstap watches; 409 if it is not watched."""
        namespace = self.registry.namespaces().get(record.netns)
        if namespace is None:
            raise BadRequest(f"{record.name} is not watched (host network, opted out or not started yet)", 409)
        return namespace

    # -- starting captures -----------------------------------------------------------------------

    def find(self, ref: Any) -> ContainerRecord:
        """The container a request names: name, full id or unique id prefix."""
        if not isinstance(ref, str) or not 1 <= len(ref) <= 256:
            raise BadRequest("container must be a container name or id")
        records = self.registry.containers()
        found = [r for r in records if r.name == ref or r.id == ref]
        if not found and len(ref) >= 4 and all(c in "0123456789abcdef" for c in ref):
            found = [r for r in records if r.id.startswith(ref)]
        if not found:
            raise BadRequest(f"no running container {ref!r}", 404)
        if len(found) > 1:
            raise BadRequest(f"{ref!r} matches {len(found)} containers", 409)
        return found[0]

    def resolve(self, ref: Any) -> tuple[ContainerRecord, CaptureTarget]:
        """The container a request names (name, full id or unique id prefix) and what to capture."""
        record = self.find(ref)
        if nstap_labels.capture_opted_out(record.labels):
            raise BadRequest(f"{record.name} opted out of captures (nstap.capture=off)", 403)
        if record.host_network:
            raise BadRequest(f"{record.name} uses the host's network: nothing of its own to capture", 409)
        namespace = self.registry.namespaces().get(record.netns)
        if namespace is None:
            raise BadRequest(f"{record.name} is not watched (opted out or not started yet)", 409)
        # A capture of the namespace records every container's packets: one that opted out vetoes
        # it, whether nstap watches it or not.
        if namespace.vetoes:
            raise BadRequest(f"{record.name} shares its network with {', '.join(namespace.vetoes)}, which opted out of captures", 403)
        target = CaptureTarget(record.name, record.short_id, record.runtime, namespace.inode)
        return record, target

    @endpoint(
        "POST", "/api/v1/captures", "Start a capture of a container now.",
        params=(Param("container", "body", "name, full id or unique id prefix (required)"),
                Param("duration", "body", "seconds after now (default capture.post_seconds, at most capture.max_seconds)"),
                Param("pre_seconds", "body", "seconds before now, from the flight recorder (default capture.pre_seconds)"),
                Param("filter", "body", "tcpdump filter expression (compiled before the capture starts)"),
                Param("side", "body", "container (default) or host: the host end of the container's veth"),
                Param("interface", "body", "with side host: which host-side interface (default: the first)")),
        answers=((202, "capture (state running)"), (400, "unknown field, bad number, bad filter"),
                 (403, "a container of the namespace is labelled nstap.capture=off"), NO_CONTAINER,
                 (409, "host network, or not watched"), (429, "capture.max_concurrent captures are running"),
                 (503, "tcpdump, nsenter or setpriv is missing"), (507, "the store cannot take it")),
    )
    async def start_capture(self, request: web.Request) -> web.Response:
        row = await self.start(await _json_object(request))
        return web.json_response(self._view(row, (await self.storage([row]))[row.id]), status=202)

    async def start(self, body: dict[str, Any]) -> CaptureRow:
        """Start a manual capture as ``body`` asks (the JSON API's and the capture page's form's
        fields); BadRequest or CaptureRefused if it cannot be."""
        unknown = sorted(set(body) - {"container", "duration", "filter", "pre_seconds", "side", "interface"})
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r}")
        if "container" not in body:
            raise BadRequest("container is required")
        _record, target = self.resolve(body["container"])
        settings = self.engine.settings
        duration = _number(body.get("duration", settings.post_seconds), "duration", 1, self.max_seconds)
        pre = _number(body.get("pre_seconds", settings.pre_seconds), "pre_seconds", 0, self.max_seconds)
        bpf = body.get("filter", "")
        if bpf is None:
            bpf = ""
        if not isinstance(bpf, str):
            raise BadRequest("filter must be a string")
        side = body.get("side", "container")
        if side not in SIDES:
            raise BadRequest(f"side must be one of {', '.join(SIDES)}")
        interface = body.get("interface")
        if interface is not None and (side != "host" or not isinstance(interface, str) or not IFNAME.match(interface)):
            raise BadRequest("interface must be a host-side interface name, with side host")
        try:
            await self.engine.check_filter(bpf)
        except FilterError as exc:
            raise BadRequest(f"bad filter: {exc}") from None
        return await self.engine.capture(target, "manual", post_seconds=duration, pre_seconds=pre, bpf=bpf, side=side, interface=interface)

    async def anomaly_capture(self, ref: str, kind: str | None) -> str | None:
        """The capture nstap took for the container's ongoing anomaly of ``kind`` (an alert on
        nstap_anomaly_active names the kind): reused, rather than a second capture of the same
        fault that starts later and holds less of it."""
        if not kind or len(kind) > 64:
            return None
        try:
            record = self.find(ref)
        except BadRequest:
            return None
        found = await self.index.anomalies.list(container=record.short_id, kind=kind, active=True, limit=1)
        return found[0].capture_id if found and found[0].container_id == record.short_id and found[0].capture_id else None

    @endpoint(
        "POST", "/api/v1/alertmanager",
        "Alertmanager webhook (payload version 4): every firing alert with a container_id or container label captures that container, "
        "once per firing (fingerprint and startsAt); an alert whose kind label names an ongoing anomaly nstap captured gets that capture; "
        "resolved alerts are recorded.",
        auth=WEBHOOK,
        params=(Param("alerts", "body", f"the webhook's alerts (at most {MAX_ALERTS})"), Param("version", "body", '"4" if present')),
        answers=((200, '{"captures": [ids], "results": [{alertname, fingerprint, status, capture_id, note}]}'), (400, "not a version 4 payload")),
    )
    async def alertmanager(self, request: web.Request) -> web.Response:
        """Alertmanager webhook (v4): a capture for each firing alert naming a container."""
        body = await _json_object(request)
        alerts = body.get("alerts")
        if not isinstance(alerts, list) or len(alerts) > MAX_ALERTS:
            raise BadRequest(f"alerts must be a list of at most {MAX_ALERTS}")
        if "version" in body and str(body["version"]) != "4":
            raise BadRequest("only webhook payload version 4 is understood")
        results = []
        captures = []
        for alert in alerts:
            result = await self.alert_captures.handle(alert, "webhook")
            results.append(result)
            if result.get("capture_id"):
                captures.append(result["capture_id"])
        return web.json_response({"captures": captures, "results": results})
