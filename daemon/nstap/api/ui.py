"""The capture page (/ui/ on the API listener): anomalies and captures per container, one capture's
anomaly, evidence and downloads, and a form to start a capture.

Server-side Jinja2 templates (autoescaped) and one stylesheet; no JavaScript at all, and a
Content-Security-Policy that forbids scripts, inline or not. Behind the API's token: a login form
trades it for a session cookie (HttpOnly, SameSite=Strict, an HMAC of the token and the time it was
issued: no server-side state, and a new token ends every session), or the bearer header as for the
API. Every POST carries a CSRF field derived from the session, and a cross-origin Origin is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import sqlite3
import time
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import structlog
from aiohttp import web

from ..capture.model import CaptureRefused
from ..capture.store import CaptureStore
from ..index import Index
from ..index.captures import EVICTED, RUNNING
from .auth import bearer_ok
from .evidence_view import load_evidence
from .endpoints import NONE, SESSION, Param, endpoint, routes
from .routes import IFNAME, CaptureApi
from .server import BadRequest

log = structlog.get_logger("nstap.api")

HERE = Path(__file__).resolve().parent
COOKIE = "nstap_session"
SESSION_SECONDS = 12 * 3600
LIST_LIMIT = 200
MAX_REVOKED = 10_000  # sessions ended by a logout, remembered until they would have expired anyway
_MAC = re.compile(r"^[0-9a-f]{64}$")
CAPTURE_STATES = ("running", "complete", "incomplete", "failed", "evicted")
CSP = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # no-referrer would make browsers send "Origin: null" with our own forms
    "Cache-Control": "no-store",
}


def _when(ts: float | None) -> str:
    if ts is None:
        return "—"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.1f} s" if abs(value) < 120 else f"{value / 60:.1f} min"


def _size(n: int | None) -> str:
    n = n or 0
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


UI_FILTERS = (
    Param("container", "query", "container name or id"), Param("kind", "query", "anomaly kind"), Param("reason", "query", "capture reason"),
    Param("state", "query", "active or resolved (anomalies), or a capture state"),
)
FILTER_LENGTHS = {"container": 256, "kind": 64, "reason": 32, "state": 16}  # longer values are ignored


def _safe_next(target: str | None) -> str:
    """Where to go after the login: a path of the capture page only (never another site)."""
    if not target or not target.startswith("/ui/") or target.startswith("//") or "\\" in target or any(ord(c) < 32 for c in target):
        return "/ui/"
    return target


class CapturePage:
    """The /ui/ routes."""

    @property
    def indexed(self) -> Index:
        """The index the page reads captures, anomalies, alerts and sessions from."""
        return self.store.index

    def __init__(self, api: CaptureApi, store: CaptureStore, token: str) -> None:
        self.api = api
        self.store = store
        self.token = token
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.env.filters.update(when=_when, seconds=_seconds, size=_size, quote=lambda v: urllib.parse.quote(str(v), safe=""))
        self.css = (HERE / "static" / "nstap.css").read_bytes()
        self._revoked: dict[str, float] = {}  # session -> when it was issued

    async def load_revoked(self, now: float | None = None) -> None:
        """The sessions ended by a logout before this start, from the index."""
        now = time.time() if now is None else now
        for value, issued in (await self.indexed.sessions.revoked(now - SESSION_SECONDS)).items():
            self._revoked[value] = issued
        while len(self._revoked) > MAX_REVOKED:
            del self._revoked[next(iter(self._revoked))]

    def routes(self) -> list[web.RouteDef]:
        """The routes, for ApiServer.add_routes (the API's auth middleware lets /ui/ through: this checks)."""
        return routes(self)

    # -- sessions ----------------------------------------------------------------------------------

    def _sign(self, what: str) -> str:
        return hmac.new(self.token.encode(), what.encode(), hashlib.sha256).hexdigest()

    def new_session(self, now: float | None = None) -> str:
        """A session cookie value: the time it was issued and its HMAC under the token."""
        issued = str(int(now if now is not None else time.time()))
        return f"{issued}.{self._sign('session:' + issued)}"

    def session_ok(self, value: str | None, now: float | None = None) -> bool:
        """True for a session this token issued less than SESSION_SECONDS ago."""
        if not value or len(value) > 128:
            return False
        issued, _, mac = value.partition(".")
        # Checked before the comparison: a cookie is anyone's input (compare_digest refuses non-ASCII text).
        if not issued.isascii() or not issued.isdigit() or len(issued) > 12 or not _MAC.match(mac):
            return False
        if not hmac.compare_digest(mac.encode(), self._sign("session:" + issued).encode()) or value in self._revoked:
            return False
        age = (now if now is not None else time.time()) - int(issued)
        return -60 <= age <= SESSION_SECONDS

    def revoke(self, value: str, now: float | None = None) -> None:
        """End a session (logout): its cookie is refused from now on, even if a copy of it is kept."""
        now = now if now is not None else time.time()
        for old in [v for v, issued in self._revoked.items() if now - issued > SESSION_SECONDS]:
            del self._revoked[old]
        if len(self._revoked) >= MAX_REVOKED:
            del self._revoked[next(iter(self._revoked))]
        self._revoked[value] = float(value.partition(".")[0])

    def csrf_of(self, request: web.Request) -> str:
        """The CSRF field of the forms this request's page holds (bound to its session or bearer)."""
        return self._sign("csrf:" + (request.cookies.get(COOKIE) or "bearer"))

    def _authenticated(self, request: web.Request) -> bool:
        return bearer_ok(request.headers.get("Authorization"), self.token) or self.session_ok(request.cookies.get(COOKIE))

    def _require(self, request: web.Request) -> None:
        """Redirect to the login form unless the request carries the session or the bearer token."""
        if not self._authenticated(request):
            target = request.path_qs if request.method == "GET" else "/ui/"
            raise web.HTTPSeeOther(location="/ui/login?" + urllib.parse.urlencode({"next": target}), headers=HEADERS)

    def _same_origin(self, request: web.Request) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and origin != "null" and urllib.parse.urlsplit(origin).netloc != request.host:
            raise BadRequest("cross-origin form refused", 403)
        if origin == "null":
            raise BadRequest("cross-origin form refused", 403)

    async def _form(self, request: web.Request, csrf: bool = True) -> dict[str, str]:
        self._same_origin(request)
        try:
            form = await request.post()
        except web.HTTPException:
            raise
        except (ValueError, LookupError, RuntimeError, AssertionError):  # undecodable body, unknown charset, bad multipart
            raise BadRequest("the form could not be read") from None
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        if csrf and not hmac.compare_digest(fields.get("csrf", "").encode("utf-8", "replace"), self.csrf_of(request).encode()):
            raise BadRequest("the form expired or did not come from this page: reload it and try again", 403)
        return fields

    # -- rendering -----------------------------------------------------------------------------

    def _page(self, request: web.Request, template: str, status: int = 200, **values: Any) -> web.Response:
        values.setdefault("authenticated", self._authenticated(request))
        values.setdefault("csrf", self.csrf_of(request))
        values.setdefault("cookie_session", COOKIE in request.cookies)
        body = self.env.get_template(template).render(**values)
        return web.Response(text=body, content_type="text/html", charset="utf-8", status=status, headers=HEADERS)

    def _error(self, request: web.Request, status: int, message: str) -> web.Response:
        return self._page(request, "error.html", status=status, status_code=status, message=message)

    # -- routes ----------------------------------------------------------------------------------

    @endpoint("GET", "/ui", "Redirects to /ui/.", auth=NONE, answers=((308, "to /ui/"),))
    async def root(self, request: web.Request) -> web.Response:
        raise web.HTTPPermanentRedirect("/ui/", headers=HEADERS)

    @endpoint("GET", "/ui/static/nstap.css", "The page's one stylesheet.", auth=NONE, answers=((200, "text/css"),))
    async def stylesheet(self, request: web.Request) -> web.Response:
        return web.Response(body=self.css, content_type="text/css", headers={**HEADERS, "Cache-Control": "max-age=3600"})

    @endpoint(
        "GET", "/ui/login", "The login form (the API token, once).", auth=NONE,
        params=(Param("next", "query", "the /ui/ page to go to after the login"),), answers=((200, "HTML"),),
    )
    async def login_form(self, request: web.Request) -> web.Response:
        return self._page(request, "login.html", next=_safe_next(request.query.get("next")), failed=False, authenticated=False)

    @endpoint(
        "POST", "/ui/login", "Trade the API token for a session cookie (HttpOnly, SameSite=Strict, Path=/ui/, 12 hours).", auth=NONE,
        params=(Param("token", "form", "the API token"), Param("next", "form", "the /ui/ page to go to")),
        answers=((303, "to next, with the cookie"), (401, "wrong token: the form again"), (403, "cross-origin form")),
    )
    async def login(self, request: web.Request) -> web.Response:
        try:
            form = await self._form(request, csrf=False)  # no session yet; SameSite and Origin guard it
        except BadRequest as exc:
            return self._error(request, exc.status, str(exc))
        target = _safe_next(form.get("next"))
        if not bearer_ok("Bearer " + form.get("token", ""), self.token):
            log.warning("ui_login_failed", remote=request.remote)
            return self._page(request, "login.html", status=401, next=target, failed=True, authenticated=False)
        response = web.Response(status=303, headers={**HEADERS, "Location": target})
        response.set_cookie(
            COOKIE, self.new_session(), max_age=SESSION_SECONDS, path="/ui/", httponly=True, samesite="Strict",
            secure=request.secure,
        )
        log.info("ui_login", remote=request.remote)
        return response

    @endpoint(
        "POST", "/ui/logout", "End the session (the cookie is refused from then on, across restarts).", auth=SESSION,
        params=(Param("csrf", "form", "the session's CSRF field"),), answers=((303, "to /ui/login"), (403, "missing CSRF field or cross-origin")),
    )
    async def logout(self, request: web.Request) -> web.Response:
        try:
            self._require(request)
            await self._form(request)
        except BadRequest as exc:
            return self._error(request, exc.status, str(exc))
        session = request.cookies.get(COOKIE)
        if session and self.session_ok(session):
            self.revoke(session)
            try:  # kept in the index: a restart does not bring the session back
                await self.indexed.sessions.revoke(session, self._revoked[session])
            except (OSError, sqlite3.Error) as exc:
                log.warning("session_revoke_unsaved", error=str(exc))
        response = web.Response(status=303, headers={**HEADERS, "Location": "/ui/login"})
        response.del_cookie(COOKIE, path="/ui/")
        return response

    def _filters(self, request: web.Request) -> dict[str, str]:
        out = {}
        for param in UI_FILTERS:
            value = request.query.get(param.name, "").strip()
            if value and len(value) <= FILTER_LENGTHS[param.name] and value.isprintable():
                out[param.name] = value
        return out

    async def _lists(self, container: str | None, filters: dict[str, str]) -> tuple[list, list]:
        """Anomalies and captures, newest first, filtered in the index (state: active/resolved
        filters the anomalies, a capture state the captures)."""
        kind, state = filters.get("kind"), filters.get("state")
        active = {"active": True, "resolved": False}.get(state or "")
        anomalies = await self.indexed.anomalies.list(container=container, kind=kind, active=active, limit=LIST_LIMIT)
        rows = await self.indexed.captures.list(
            container=container, kind=kind, reason=filters.get("reason"), state=state if state in CAPTURE_STATES else None, limit=LIST_LIMIT,
        )
        return anomalies, [self.api.current(r) for r in rows]

    @endpoint(
        "GET", "/ui/", "Anomalies and captures of every container, newest first.", auth=SESSION, params=UI_FILTERS,
        answers=((200, "HTML"), (303, "to the login form without a session")),
    )
    async def index(self, request: web.Request) -> web.Response:
        self._require(request)
        filters = self._filters(request)
        anomalies, captures = await self._lists(filters.get("container"), filters)
        watched = {r.short_id for r in self.api.registry.containers()}
        containers = sorted(self.api.registry.containers(), key=lambda r: r.name)
        return self._page(request, "index.html", filters=filters, anomalies=anomalies, captures=captures, containers=containers, watched=watched)

    @endpoint(
        "GET", "/ui/containers/{ref}", "One container's anomalies and captures; a running one's capture form.", auth=SESSION,
        params=(Param("ref", "path", "container name or id (a gone container: its name or 12-character id)"), *UI_FILTERS),
        answers=((200, "HTML"), (303, "to the login form without a session"), (404, "an id prefix too short to name one container")),
    )
    async def container(self, request: web.Request) -> web.Response:
        self._require(request)
        return await self._container_page(request, request.match_info["ref"])

    async def _container_page(self, request: web.Request, ref: str, error: str = "", status: int = 200) -> web.Response:
        if len(ref) > 256 or not ref.isprintable():
            return self._error(request, 400, "not a container name or id")
        try:
            record = self.api.find(ref)
        except BadRequest:
            record = None  # gone: its anomalies and captures are still here
            if all(c in "0123456789abcdef" for c in ref) and len(ref) < 12:
                # The index matches an id prefix: a short one would mix several containers.
                return self._error(request, 404, "no running container by that name or id: name a gone one by its name or 12-character id")
        name = record.name if record is not None else ref
        filters = self._filters(request)
        anomalies, captures = await self._lists(record.short_id if record is not None else ref, filters)
        settings = self.api.engine.settings
        return self._page(
            request, "container.html", status=status, ref=ref, name=name, record=record, filters=filters, anomalies=anomalies,
            captures=captures, defaults={"duration": settings.post_seconds, "pre_seconds": settings.pre_seconds},
            max_seconds=self.api.max_seconds, error=error, forwards=self.api.forwards_of(record) if record is not None else [],
        )

    @endpoint(
        "POST", "/ui/containers/{ref}/capture", "Start a capture from the form (the fields of POST /api/v1/captures).", auth=SESSION,
        params=(Param("ref", "path", "container name or id"), Param("csrf", "form", "the session's CSRF field"),
                Param("duration", "form", "seconds after now"), Param("pre_seconds", "form", "seconds before now"), Param("filter", "form", "tcpdump filter"),
                Param("side", "form", "container or host"), Param("interface", "form", "with side host: the host-side interface")),
        answers=((303, "to the capture's page"), (400, "the container's page again, saying why"), (403, "missing CSRF field or cross-origin")),
    )
    async def start_capture(self, request: web.Request) -> web.Response:
        self._require(request)
        ref = request.match_info["ref"]
        try:
            form = await self._form(request)
            body: dict[str, Any] = {"container": ref, "filter": form.get("filter", "").strip()}
            for name in ("duration", "pre_seconds"):
                raw = form.get(name, "").strip()
                if raw:
                    try:
                        value = float(raw)
                    except ValueError:
                        raise BadRequest(f"{name} must be a number of seconds") from None
                    if not math.isfinite(value):
                        raise BadRequest(f"{name} must be a number of seconds")
                    body[name] = value
            side = form.get("side", "container")
            if side != "container":
                body["side"] = side
                interface = form.get("interface", "").strip()
                if interface:
                    if not IFNAME.match(interface):
                        raise BadRequest("interface must be a host-side interface name")
                    body["interface"] = interface
            row = await self.api.start(body)
        except (BadRequest, CaptureRefused) as exc:
            # The container's page again, with why (as this answer: never a message carried in a URL).
            return await self._container_page(request, ref, error=str(exc), status=getattr(exc, "status", 400))
        log.info("ui_capture_started", capture_id=row.id, container=row.container)
        raise web.HTTPSeeOther(location=f"/ui/captures/{row.id}", headers=HEADERS)

    @endpoint(
        "GET", "/ui/captures/{id}", "One capture: the anomaly that triggered it (or that the alert reported), the alerts that asked for it, "
        "its evidence, its downloads.", auth=SESSION, params=(Param("id", "path", "capture id"),),
        answers=((200, "HTML"), (303, "to the login form without a session"), (404, "no such capture")),
    )
    async def capture(self, request: web.Request) -> web.Response:
        self._require(request)
        row = await self.indexed.captures.get(request.match_info["id"])
        if row is None:
            return self._error(request, 404, "no such capture")
        row = self.api.current(row)
        alerts = await self.indexed.alerts.for_capture(row.id)
        anomaly = await self._anomaly_of(row, alerts)
        storage = (await self.api.storage([row]))[row.id]
        location = row.to_json()["location"]
        in_bucket = storage is not None and location == "bucket"  # evicted here after its upload: served from the bucket
        evidence_uploaded = in_bucket and storage["objects"].get("evidence", {}).get("uploaded", False)
        evidence = await load_evidence(self.store, self.api.bucket, row, evidence_uploaded)
        local = row.state not in (RUNNING, EVICTED) and self.store.path_of(row) is not None
        return self._page(
            request, "capture.html", row=row, anomaly=anomaly, alerts=alerts, evidence=evidence, storage=storage, location=location,
            has_evidence=evidence_uploaded or self.store.evidence_path(row) is not None,
            downloadable=local or (in_bucket and row.state != RUNNING), running=row.state == RUNNING,
        )

    async def _anomaly_of(self, row, alerts: list[dict[str, Any]]):
        """The capture's anomaly; for an alert's capture, the anomaly the alert reports (nstap's own
        event of that kind in the container, begun by the time of the capture), when it names one."""
        if row.anomaly_id:
            own = await self.indexed.anomalies.get(row.anomaly_id)
            if own is not None:
                return own
        kinds = {a["labels"].get("kind") for a in alerts if isinstance(a.get("labels"), dict)} - {None}
        for kind in sorted(kinds):
            found = await self.indexed.anomalies.list(
                container=row.container_id, kind=kind, since=row.trigger_at - 300, until=row.trigger_at, limit=1,
            )
            if found and row.container_id:
                return found[0]
        return None

    @endpoint("GET", "/ui/captures/{id}/pcap", "The pcap, with the page's session.", auth=SESSION, params=(Param("id", "path", "capture id"),),
              answers=((200, "as GET /api/v1/captures/{id}/pcap"),))
    @endpoint("GET", "/ui/captures/{id}/bundle", "The bundle, with the page's session.", auth=SESSION, params=(Param("id", "path", "capture id"),),
              answers=((200, "as GET /api/v1/captures/{id}/bundle"),))
    @endpoint("GET", "/ui/captures/{id}/evidence", "The evidence, with the page's session.", auth=SESSION, params=(Param("id", "path", "capture id"),),
              answers=((200, "as GET /api/v1/captures/{id}/evidence"),))
    async def download(self, request: web.Request) -> web.StreamResponse:
        """The pcap, bundle or evidence of a capture, with the page's session (the API's handlers)."""
        self._require(request)
        handler = {"pcap": self.api.pcap, "bundle": self.api.bundle, "evidence": self.api.evidence}[request.path.rsplit("/", 1)[1]]
        try:
            response = await handler(request)
        except BadRequest as exc:
            return self._error(request, exc.status, str(exc))
        response.headers.update(HEADERS)
        return response
