"""HTTP listeners: /metrics for Prometheus, and the local API (bearer token) for people and the CLI."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ..capture.model import CaptureRefused
from ..config import parse_listen
from ..exporter import ContainerCollector, ScrapeState
from ..registry import ContainerRegistry
from ..runtime.records import ContainerRecord
from ..supervisor import FailureReport, log_failure
from .ahead import Part, RenderAhead, Tag, samples_body, scrape_body
from .auth import bearer_ok
from .endpoints import BASIC, NONE, endpoint, routes
from .webconfig import WebConfig, basic_auth_middleware
from ..threads import worker_threads

log = structlog.get_logger("nstap.api")

MAX_BODY = 64 * 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, message: str) -> web.Response:
    """A JSON error answer."""
    return web.json_response({"error": message}, status=status)


class BadRequest(Exception):
    """A request that cannot be served as asked; becomes a JSON error with ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def container_view(record: ContainerRecord, registry: ContainerRegistry, watched: set[int]) -> dict[str, Any]:
    """One container as the API shows it; members of a shared namespace show its owner's addresses."""
    namespace = registry.namespaces().get(record.netns)
    owner = namespace.owner if namespace is not None else record
    networks = record.networks or (owner.networks if owner is not record else ())
    return {
        "id": record.id,
        "name": record.name,
        "runtime": record.runtime,
        "pid": record.pid,
        "status": record.status,
        "image": record.image,
        "netns": "host" if record.host_network else record.netns,
        "watched": namespace is not None and record.netns in watched,
        "enabled": record.enabled,
        "netns_owner": owner.name if namespace is not None else None,
        "shares_netns_with": [m.name for m in namespace.members if m.id != record.id] if namespace else [],
        "compose_project": record.compose_project,
        "compose_service": record.compose_service,
        "pod": record.pod,
        "network_mode": record.network_mode,
        "networks": [{"network": n.network, "ipv4": n.ipv4, "ipv6": n.ipv6, "mac": n.mac} for n in networks],
        "ports": [
            {"container_port": p.container_port, "protocol": p.protocol, "host_ip": p.host_ip, "host_port": p.host_port}
            for p in record.ports
        ],
    }


WEBHOOK_PATH = "/api/v1/alertmanager"


def auth_middleware(token: str, webhook_token: str | None = None) -> Callable:
    """Require the bearer token on everything but /healthz and the capture page (/ui/, which takes
    the token or its session cookie itself, and answers with its login form). The webhook token
    (``webhook-token`` in the data dir: what an Alertmanager's config holds) is good for one thing
    only: POST /api/v1/alertmanager, which starts captures and reads nothing."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/ui" or request.path.startswith("/ui/") or request.path == "/healthz":
            return await handler(request)
        header = request.headers.get("Authorization")
        if bearer_ok(header, token):
            return await handler(request)
        if webhook_token and bearer_ok(header, webhook_token):
            if request.method == "POST" and request.path == WEBHOOK_PATH:
                return await handler(request)
            return web.json_response({"error": "the webhook token is good for POST /api/v1/alertmanager only"}, status=403)
        return web.json_response({"error": "missing or wrong bearer token"}, status=401, headers={"WWW-Authenticate": "Bearer"})

    return middleware


def error_middleware(task: str, on_error: FailureReport) -> Callable:
    """Every error as JSON: aiohttp's own (404, 405, 413), refused requests, and — logged, counted
    as failures of ``task`` — bugs."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return json_error(exc.status, exc.reason or "error")
        except BadRequest as exc:
            return json_error(exc.status, str(exc))
        except CaptureRefused as exc:
            return json_error(exc.status, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must answer 500 without a traceback, and be reported
            on_error(task, exc)
            return json_error(500, "internal error (logged)")

    return middleware


class ApiServer:
    """Serves /metrics on one listener and the token-protected API on another."""

    def __init__(
        self,
        metrics_listen: str,
        api_listen: str,
        prometheus: CollectorRegistry,
        collector: ContainerCollector,
        registry: ContainerRegistry,
        watched: Callable[[], set[int]],
        token: str,
        on_error: FailureReport = log_failure,
        webhook_token: str | None = None,
        web_config: WebConfig | None = None,
        ready: Callable[[], bool] = lambda: True,
        render_ahead: bool = True,
        count_ahead: Callable[[str], None] = lambda result: None,
    ) -> None:
        self.ready = ready  # what /readyz answers: every runtime tried and its running containers' watchers attached
        self.metrics_listen = parse_listen(metrics_listen)
        self.api_listen = parse_listen(api_listen)
        self.registry = registry
        self.watched = watched
        self.prometheus = prometheus
        self.collector = collector
        # One thread renders every scrape: the collector's label cache is not shared between two.
        self._render_thread = worker_threads("nstap-metrics")
        self._on_error = on_error
        self._count_ahead = count_ahead
        self.ahead: RenderAhead | None = None
        self._scraping = 0  # /metrics requests being answered
        self.render_ahead = render_ahead
        self.web = web_config or WebConfig()
        metrics_middlewares = [error_middleware("metrics", on_error)]
        if self.web.users:
            metrics_middlewares.append(basic_auth_middleware(self.web))
        self.metrics_app = web.Application(middlewares=metrics_middlewares)
        self.metrics_app.router.add_routes(routes(self, "metrics"))
        self.api_app = web.Application(middlewares=[error_middleware("api", on_error), auth_middleware(token, webhook_token)], client_max_size=MAX_BODY)
        self.api_app.router.add_routes(routes(self, "api"))
        self._runners: list[web.AppRunner] = []

    @property
    def render_ahead(self) -> bool:
        """Whether bodies are rendered ahead of expected scrapes (metrics.render_ahead; a reload sets it)."""
        return self.ahead is not None

    @render_ahead.setter
    def render_ahead(self, on: bool) -> None:
        if on != self.render_ahead:
            self.ahead = RenderAhead(self._count_ahead) if on else None

    def after_round(self, period: float) -> None:
        """A sampling round completed (on the event loop): the body ahead made before it is out of
        date, and if a scraper's next scrape is expected before the next round ends, its body is
        rendered now, from this round's state."""
        ahead = self.ahead
        if ahead is None:
            return
        loop = asyncio.get_running_loop()
        ahead.round_done(loop.time(), period)
        compress = ahead.due(loop.time(), period)
        if compress is None:
            return
        scrape = self.collector.snapshot()
        body = loop.run_in_executor(self._render_thread, self._render_ahead, scrape, compress)
        body.add_done_callback(self._rendered_ahead)
        ahead.started(self._tag(ahead, compress), body)

    def quiet(self, period: float) -> float:
        """Seconds until a scrape is expected (0 while one is being answered, or one expected is
        overdue: see RenderAhead.quiet); infinite if no scraper keeps a steady cadence, or
        metrics.render_ahead is off (no cadence is learnt: only a scrape under way counts). On
        the event loop.

        A full garbage collection holds the event loop's thread for 50-200 ms at 1,000
        containers: one that ran just after a scrape's body was made held its response back
        (261 ms instead of 80-145). The daemon's collections wait for a round that leaves them
        this much room (nstap.heap.FullCollections.after_round)."""
        if self._scraping:
            return 0.0
        ahead = self.ahead
        return math.inf if ahead is None else ahead.quiet(asyncio.get_running_loop().time(), period)

    def _tag(self, ahead: RenderAhead, compress: bool) -> Tag:
        """What a body ahead must have been made from to be served now."""
        collector = self.collector
        return Tag(ahead.round, collector.store.generation, collector.registry.namespaces(), collector.disabled, compress)

    def _render_ahead(self, scrape: ScrapeState, compress: bool) -> Part:
        return samples_body(self.collector, scrape, compress)

    def _rendered_ahead(self, body: asyncio.Future[Part]) -> None:
        if not body.cancelled() and (exc := body.exception()) is not None:
            self._on_error("metrics-ahead", exc)

    def add_routes(self, routes: list[web.RouteDef]) -> None:
        """Add more API routes (before :meth:`start`)."""
        self.api_app.router.add_routes(routes)

    @endpoint(
        "GET", "/metrics", "Every metric family in the Prometheus text format (gzip when asked): docs/reference/metrics.md.",
        listener="metrics", auth=BASIC, answers=((200, "text/plain; version=0.0.4"), (401, "basic auth required")),
    )
    async def metrics(self, request: web.Request) -> web.Response:
        """The daemon's own metrics (prometheus-client) followed by every per-container family.

        The state is taken on the event loop; text and gzip are made in the render thread, so a
        scrape of hundreds of containers (tens of milliseconds) does not delay the next tick. The
        samples' families come from the body rendered ahead for this scrape if there is one that
        may be served (api/ahead.py), the rest is rendered now.
        """
        loop = asyncio.get_running_loop()
        compress = "gzip" in request.headers.get("Accept-Encoding", "")
        self._scraping += 1
        try:
            body = await self._ahead_body(request, loop, compress)
            if body is None:
                scrape = self.collector.snapshot()
                body = await loop.run_in_executor(self._render_thread, self._render, scrape, compress)
        finally:
            self._scraping -= 1
        headers = {"Content-Type": CONTENT_TYPE_LATEST}
        if compress:
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    async def _ahead_body(self, request: web.Request, loop: asyncio.AbstractEventLoop, compress: bool) -> bytes | None:
        """The scrape's body from the one rendered ahead for it, or None if there is none to serve."""
        ahead = self.ahead
        if ahead is None:
            return None
        ahead.scraped((request.remote or "", request.headers.get("User-Agent", "")), loop.time(), compress)
        tag = self._tag(ahead, compress)
        pending = ahead.body(tag)
        if pending is None:
            return None
        try:
            part = await asyncio.shield(pending)  # (a scraper that hangs up does not cancel it for the others)
        except Exception:  # noqa: BLE001 - reported by _rendered_ahead; this scrape renders at once
            return None
        if not ahead.serve(tag):  # a round completed while it was being made
            return None
        return await loop.run_in_executor(self._render_thread, self._join, part, self.collector.snapshot(), compress)

    def _join(self, part: Part, scrape: ScrapeState, compress: bool) -> bytes:
        return scrape_body(self.collector, scrape, compress, generate_latest(self.prometheus), part)

    def _render(self, scrape: ScrapeState, compress: bool) -> bytes:
        return scrape_body(self.collector, scrape, compress, generate_latest(self.prometheus))

    @endpoint("GET", "/healthz", "Liveness: the listener is up.", listener="metrics", auth=NONE, answers=((200, '{"status": "ok"}'),))
    @endpoint("GET", "/healthz", "Liveness: the listener is up.", auth=NONE, answers=((200, '{"status": "ok"}'),))
    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    @endpoint(
        "GET", "/readyz", "Readiness: every runtime tried and the running containers' watchers attached (what READY=1 means under systemd).",
        listener="metrics", auth=NONE, answers=((200, '{"status": "ready"}'), (503, '{"status": "starting"}')),
    )
    async def readyz(self, request: web.Request) -> web.Response:
        """200 once every runtime was tried and the running containers' watchers are attached (what
        READY=1 means under systemd; a Kubernetes readiness probe), 503 before."""
        if self.ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "starting"}, status=503)

    @endpoint("GET", "/api/v1/containers", "What is watched: every running container.", answers=((200, '{"containers": [container, ...]}'),))
    async def containers(self, request: web.Request) -> web.Response:
        watched = self.watched()
        views = [container_view(r, self.registry, watched) for r in self.registry.containers()]
        return web.Response(text=json.dumps({"containers": views}), content_type="application/json")

    async def start(self) -> None:
        """Bind both listeners (OSError if a port is taken)."""
        for app, (host, port) in ((self.metrics_app, self.metrics_listen), (self.api_app, self.api_listen)):
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            self._runners.append(runner)
            await web.TCPSite(runner, host, port, reuse_address=True, ssl_context=self.web.tls).start()

    async def stop(self) -> None:
        """Close both listeners."""
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        self.ahead = None  # no render ahead after the thread is gone
        self._render_thread.shutdown(wait=True)
