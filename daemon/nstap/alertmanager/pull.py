"""Pull this host's alerts from every Alertmanager, so one route serves a whole fleet.

Alertmanager cluster members share silences and the notification log, not alerts: each member
holds the alerts that were sent to it. So every ``alertmanager.poll_interval`` (jittered) nstap
asks *each* configured member for the alerts whose host label names this host that have not
resolved, and merges the answers by fingerprint + ``startsAt``. Each active, unsilenced,
uninhibited alert it has not handled yet goes through
:class:`~nstap.alertmanager.captures.AlertCaptures`, as a webhook notification does, so an alert
pushed and pulled is captured once.

Resolution, as the webhook's ``send_resolved`` notification records it: an alert handed on is
recorded as resolved once no member holds it any more, that is once every member whose answer
held it has answered (in full: not cut at ``max_alerts``) without it. Silenced and inhibited
alerts are asked for too, and count as held: a silence mutes an alert, it does not resolve it. A
member that is down holds on to its alerts until it answers again (or FORGET_AFTER passes).

Bounded: one request per member per poll, each with a timeout and a size cap, at most
``max_alerts`` alerts taken from an answer; members are asked at the same time and each answer is
acted on as soon as it arrives, so a slow or dead member delays nobody. A member that fails is
asked again after a backoff that doubles up to :data:`MAX_BACKOFF`; its going down and coming
back are logged once each, and every poll is counted in ``nstap_alertmanager_polls_total``.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..config import AlertmanagerConfig, TlsConfig, parse_listen
from .captures import normal_time

log = structlog.get_logger("nstap.alertmanager")

JITTER = 0.1  # the poll interval varies by +-10%, so a fleet's hosts do not ask in step
MAX_BACKOFF = 300.0  # seconds between two attempts at a member that keeps failing, at most
FORGET_AFTER = 3600.0  # seconds an alert that only unreachable members hold is remembered
MAX_REMEMBERED = 100_000  # alerts remembered, at most (the index still dedups the rest)
CHUNK = 64 * 1024
RESULTS = ("ok", "error", "timeout", "too_large", "bad_answer")

AlertHandler = Callable[[dict[str, Any], str], Awaitable[Any]]
FailureReport = Callable[[str, BaseException], None]


class PullFailed(Exception):
    """A member's answer could not be used; ``result`` is the polls_total label."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result


def scrape_address(metrics_listen: str) -> str:
    """This host's address as Prometheus scrapes it (its ``instance`` label): the metrics
    listener's host, or this host's name when it listens on every address."""
    host, port = parse_listen(metrics_listen)
    if host in ("0.0.0.0", "::"):
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def host_value(host_label: str, metrics_listen: str) -> str:
    """This host's value of ``host_label`` when the config gives none: its scrape address for
    ``instance`` (Prometheus scraping every host directly), its name for any other label. Through
    Prometheus agents or a PodMonitor every host's ``instance`` reads alike (127.0.0.1:9880, or a
    pod address), so fleets tell hosts apart by a label holding the host's name (the agents'
    external label ``host``, the PodMonitor's node name): that name is what this host calls itself."""
    return scrape_address(metrics_listen) if host_label == "instance" else socket.gethostname()


def alerts_query(host_label: str, host: str) -> str:
    """The query of ``GET /api/v2/alerts``: this host's alerts that have not resolved, silenced and
    inhibited ones included (they still fire: see held_alert)."""
    value = host.replace("\\", "\\\\").replace('"', '\\"')
    return urlencode({"active": "true", "silenced": "true", "inhibited": "true", "unprocessed": "true", "filter": f'{host_label}="{value}"'})


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """The TLS context of https:// members (ssl.SSLError or OSError if a file is unusable)."""
    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def held_alert(alert: Any, host_label: str, host: str) -> tuple[dict[str, Any], bool] | None:
    """(the alert in the webhook's shape, whether to act on it) for an alert of this host that
    still fires; None for another host's alert (checked again here: a proxy or an old Alertmanager
    may ignore the query's filter, and another host's container must never be captured) or what
    is not an alert. Acted on: active, neither silenced nor inhibited; a suppressed or not yet
    processed alert is held but not acted on."""
    if not isinstance(alert, dict):
        return None
    labels, status = alert.get("labels"), alert.get("status")
    if not isinstance(labels, dict) or labels.get(host_label) != host or not isinstance(status, dict):
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        return None
    fingerprint, starts_at = alert.get("fingerprint"), alert.get("startsAt")
    if not isinstance(fingerprint, str) or not fingerprint or not isinstance(starts_at, str):
        return None
    act = status.get("state") == "active" and not status.get("silencedBy") and not status.get("inhibitedBy")
    return {"status": "firing", "labels": labels, "fingerprint": fingerprint, "startsAt": starts_at}, act


@dataclass
class Member:
    """One Alertmanager and what nstap knows of it."""

    url: str
    up: bool | None = None  # None: not asked yet
    failures: int = 0  # consecutive
    next_at: float = 0.0  # monotonic time of the next attempt
    alerts: int = 0  # this host's alerts in its last answer
    truncated: bool = False  # its last answer held more than max_alerts
    polls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESULTS, 0))


@dataclass
class PulledAlert:
    """One alert of this host that a member returned, and what was done with it."""

    alert: dict[str, Any]  # in the webhook's shape, as last returned
    seen_at: float  # monotonic time a member last returned it
    holders: set[str] = field(default_factory=set)  # the members whose last full answer held it
    retry_at: float = 0.0  # monotonic time to hand it on (again); math.inf: done
    tries: int = 0  # hand-ons that got no capture
    recorded: bool = False  # handed on as firing: its resolution is recorded when no member holds it


class AlertPuller:
    """Asks every configured Alertmanager for this host's alerts and hands new ones to ``handle``."""

    def __init__(self, config: AlertmanagerConfig, host: str, failed: FailureReport) -> None:
        self.config = config
        self.host = host
        self.failed = failed
        self.handle: AlertHandler | None = None  # set before run(): the webhook's AlertCaptures.handle
        # set before run(): the alerts the index holds as firing and not resolved (AlertIndex.unresolved)
        self.remembered: Callable[[int], Awaitable[list[dict[str, Any]]]] | None = None
        self.members = [Member(url.rstrip("/")) for url in config.urls]
        self.tls = tls_context(config.tls_config) if any(url.startswith("https:") for url in config.urls) else None
        self.query = alerts_query(config.host_label, host)
        self.pulled: dict[tuple[str, str], PulledAlert] = {}  # by fingerprint and startsAt

    # -- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll until cancelled (a supervised service)."""
        cfg = self.config
        timeout = aiohttp.ClientTimeout(total=cfg.timeout)
        connector = aiohttp.TCPConnector(ssl=self.tls if self.tls is not None else True, limit_per_host=2)
        if self.remembered is not None and not self.pulled:
            try:
                self.restore(await self.remembered(MAX_REMEMBERED))
            except Exception as exc:  # noqa: BLE001 - the index unreadable: pull all the same, as a first start would
                self.failed("alertmanager-pull", exc)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector, raise_for_status=False) as session:
            while True:
                started = time.monotonic()
                await self.poll(session)
                pause = cfg.poll_interval * random.uniform(1 - JITTER, 1 + JITTER)
                await asyncio.sleep(max(0.0, started + pause - time.monotonic()))

    async def poll(self, session: aiohttp.ClientSession) -> None:
        """Ask every member that is due, at the same time; act on each answer as it arrives, then
        record what no member holds any more as resolved."""
        now = time.monotonic()
        asks = [asyncio.ensure_future(self._ask(session, m)) for m in self.members if m.next_at <= now]
        try:
            for answer in asyncio.as_completed(asks):
                member, held = await answer
                if held is not None:
                    await self.answered(member, held)
        finally:
            for ask in asks:
                ask.cancel()
        await self.resolve()
        self._forget(time.monotonic())

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """Take back what the puller held before the daemon stopped (the index's firing alerts of
        this host with no resolution recorded): each counts as held by every member until each has
        answered without it, so an alert that resolved while the daemon was down is recorded
        resolved at the first polls, and one still firing is not handed on (recorded) again."""
        now = time.monotonic()
        members = {m.url for m in self.members}
        for row in rows:
            labels = row.get("labels")
            if not isinstance(labels, dict) or labels.get(self.config.host_label) != self.host or not row.get("fingerprint"):
                continue
            alert = {"status": "firing", "labels": labels, "fingerprint": row["fingerprint"], "startsAt": row["starts_at"]}
            done = bool(row.get("capture_id")) or not (labels.get("container_id") or labels.get("container"))
            key = (row["fingerprint"], normal_time(row["starts_at"]))
            self.pulled[key] = PulledAlert(alert, now, set(members), math.inf if done else 0.0, 0, True)
        if self.pulled:
            log.info("alertmanager_pull_restored", alerts=len(self.pulled))

    async def answered(self, member: Member, held: list[tuple[dict[str, Any], bool]]) -> None:
        """One member's answer (``held``: this host's alerts in it, each with whether to act on it):
        the alerts to act on are handed on, and the member no longer holds what it left out."""
        now = time.monotonic()
        keys = set()
        for alert, act in held:
            key = (alert["fingerprint"], normal_time(alert["startsAt"]))
            keys.add(key)
            pulled = self.pulled.get(key)
            if pulled is None:
                pulled = self.pulled[key] = PulledAlert(alert, now)
            pulled.alert, pulled.seen_at = alert, now
            pulled.holders.add(member.url)
            if act:
                await self._take(pulled)
        if not member.truncated:  # an answer cut at max_alerts does not say what the member no longer holds
            for key, pulled in self.pulled.items():
                if key not in keys:
                    pulled.holders.discard(member.url)

    async def _take(self, pulled: PulledAlert) -> None:
        """Hand an alert on unless that was done (merged by fingerprint + startsAt); one that got no
        capture (slots full, container not running yet) is tried again after a backoff, as
        Alertmanager's repeat_interval would push it again."""
        now = time.monotonic()
        if self.handle is None or now < pulled.retry_at:
            return
        try:
            result = await self.handle(pulled.alert, "pull")
        except Exception as exc:  # noqa: BLE001 - one alert's failure (the index, a capture) must not stop the others
            self.failed("alertmanager-pull", exc)
            result = {}
        else:
            pulled.recorded = True
        labels = pulled.alert["labels"]
        if (isinstance(result, dict) and result.get("capture_id")) or not (labels.get("container_id") or labels.get("container")):
            pulled.retry_at = math.inf  # captured, or names no container: done
        else:
            pulled.tries += 1
            pulled.retry_at = now + min(self.config.poll_interval * 2 ** pulled.tries, MAX_BACKOFF)

    async def resolve(self) -> None:
        """Record each alert handed on that no member holds any more as resolved, as the webhook
        records Alertmanager's resolved notification; forget it (and the others no one holds)."""
        for key in [k for k, p in self.pulled.items() if not p.holders]:
            pulled = self.pulled.pop(key)
            if not pulled.recorded or self.handle is None:
                continue
            try:
                await self.handle({**pulled.alert, "status": "resolved"}, "pull")
            except Exception as exc:  # noqa: BLE001 - one alert's failure (the index) must not stop the others
                self.failed("alertmanager-pull", exc)

    def _forget(self, now: float) -> None:
        """Forget alerts that only unreachable members have held for a while; the oldest first beyond the cap."""
        for key in [k for k, p in self.pulled.items() if now - p.seen_at > FORGET_AFTER]:
            del self.pulled[key]
        if len(self.pulled) > MAX_REMEMBERED:
            for key, _pulled in sorted(self.pulled.items(), key=lambda kv: kv[1].seen_at)[: len(self.pulled) - MAX_REMEMBERED]:
                del self.pulled[key]

    # -- one member ------------------------------------------------------------------------------

    async def _ask(self, session: aiohttp.ClientSession, member: Member) -> tuple[Member, list[tuple[dict[str, Any], bool]] | None]:
        """This host's alerts from one member, each with whether to act on it; None when it fails
        (counted, logged on a change of state)."""
        try:
            answer = await self._get(session, member)
        except asyncio.TimeoutError:
            self._failed(member, "timeout", f"no answer within {self.config.timeout:g}s")
            return member, None
        except PullFailed as exc:
            self._failed(member, exc.result, str(exc))
            return member, None
        except (aiohttp.ClientError, OSError) as exc:
            self._failed(member, "error", str(exc) or type(exc).__name__)
            return member, None
        limit = self.config.max_alerts
        if len(answer) > limit and not member.truncated:
            log.warning("alertmanager_answer_truncated", url=member.url, alerts=len(answer), max_alerts=limit)
        member.truncated = len(answer) > limit
        held = [h for h in (held_alert(alert, self.config.host_label, self.host) for alert in answer[:limit]) if h is not None]
        member.polls["ok"] += 1
        member.alerts = sum(1 for _alert, act in held if act)
        if member.up is not True:
            log.info("alertmanager_up", url=member.url, alerts=member.alerts, after_failures=member.failures)
        member.up, member.failures, member.next_at = True, 0, 0.0
        return member, held

    async def _get(self, session: aiohttp.ClientSession, member: Member) -> list[Any]:
        cap = self.config.max_response_bytes
        async with session.get(f"{member.url}/api/v2/alerts?{self.query}", headers=self._auth_headers(), allow_redirects=False) as response:
            if response.status != 200:
                raise PullFailed("error", f"HTTP {response.status}")
            if response.content_length is not None and response.content_length > cap:
                raise PullFailed("too_large", f"answer of {response.content_length} bytes (max_response_bytes {cap})")
            body = bytearray()
            async for chunk in response.content.iter_chunked(CHUNK):
                body += chunk
                if len(body) > cap:
                    raise PullFailed("too_large", f"answer over {cap} bytes (max_response_bytes)")
        try:
            answer = json.loads(body)
        except ValueError:
            raise PullFailed("bad_answer", "answer is not JSON") from None
        if not isinstance(answer, list):
            raise PullFailed("bad_answer", "answer is not a list of alerts")
        return answer

    def _auth_headers(self) -> dict[str, str]:
        """Basic auth or an Authorization header, the secret read from its file now (files are
        rotated; OSError if it cannot be read, counted as an error of the poll)."""
        cfg = self.config
        if cfg.authorization is not None:
            return {"Authorization": f"{cfg.authorization.type} {cfg.authorization.credentials_file.read_text().strip()}"}
        if cfg.basic_auth is not None:
            password = cfg.basic_auth.password_file.read_text().strip() if cfg.basic_auth.password_file else ""
            return {"Authorization": aiohttp.BasicAuth(cfg.basic_auth.username, password).encode()}
        return {}

    def _failed(self, member: Member, result: str, error: str) -> None:
        member.polls[result] += 1
        member.failures += 1
        backoff = min(self.config.poll_interval * 2 ** (member.failures - 1), MAX_BACKOFF)
        member.next_at = time.monotonic() + backoff * random.uniform(1 - JITTER, 1)
        if member.up is not False:
            log.warning("alertmanager_down", url=member.url, result=result, error=error, retry_in=round(backoff, 1))
        member.up = False


class PullCollector(Collector):
    """nstap_alertmanager_* from the members' state (no I/O at scrape time)."""

    def __init__(self, puller: AlertPuller) -> None:
        self.puller = puller

    def collect(self) -> Iterator[Metric]:
        polls = CounterMetricFamily("nstap_alertmanager_polls", "Requests for this host's alerts, per Alertmanager and result.", labels=["url", "result"])
        up = GaugeMetricFamily("nstap_alertmanager_up", "1 if the Alertmanager's last answer was usable.", labels=["url"])
        alerts = GaugeMetricFamily("nstap_alertmanager_alerts", "This host's active alerts in the Alertmanager's last answer.", labels=["url"])
        for member in list(self.puller.members):
            for result, count in list(member.polls.items()):
                polls.add_metric([member.url, result], count)
            up.add_metric([member.url], 1.0 if member.up else 0.0)
            alerts.add_metric([member.url], member.alerts)
        yield polls
        yield up
        yield alerts
