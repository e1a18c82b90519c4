"""The daemon: start-up order, the long-running tasks, signal handling and orderly shutdown.

Data flows one way: runtime sources -> container registry -> watcher pool (one watcher per
namespace, holding its descriptors) -> sample store -> detectors -> incidents -> captures (which
enter a namespace only through the descriptor its watcher holds), with the exporter reading the
registry, the latest samples, the incidents and the captures at scrape time. Every task is created
through one :class:`~nstap.supervisor.TaskSupervisor`, so none dies silently. Shutdown runs the
other way round, and closes every descriptor it opened.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import signal
import sqlite3
import time
from typing import Any
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from . import __version__
from .alertmanager.pull import AlertPuller, PullCollector, host_value
from .api.auth import WEBHOOK_TOKEN_FILE, TokenError, ensure_token
from .api.webconfig import WebConfig, WebConfigError, load_web_config
from .api.routes import CaptureApi
from .api.ui import CapturePage
from .api.server import ApiServer
from .capture.anomaly import AnomalyCaptures
from .capture.engine import CaptureEngine
from .capture.model import CaptureSettings
from .capture.store import CaptureStore, Retention
from .config import Config, ConfigError
from .detect.cause_finder import CauseFinder
from .detect.process_state import ProcessStateReader
from .detect.incidents import IncidentTracker
from .detect.pipeline import DetectionPipeline
from .exporter import ContainerCollector, build_registry
from .heap import FullCollections
from .priority import apply_nice, nice_now
from .dns.service import DnsService
from .ebpf.collector import EbpfUnavailable
from .ebpf.service import EbpfService
from .instruments import Instruments
from .log import configure_logging
from .systemd import Notifier
from .nat.exposure import ExposureReader
from .nat.monitor import NatMonitor
from .nat.probe import PortProber
from .nat.talkers import TalkerTracker
from .netns.handles import NamespaceOpener
from .registry import ContainerRegistry, own_container_id
from .runtime.exits import ProcessExits
from .runtime.containerd import ContainerdSource
from .runtime.source import RuntimeSource
from .samplers import HostLinks, SamplerContext, enabled_samplers
from .samplers.protocols import RoundCounters
from .samples import SampleStore
from .supervisor import TaskSupervisor
from .watcher import Ticker, WatcherPool
from .threads import worker_threads

log = structlog.get_logger("nstap")

IO_THREADS = 2
READY_WAIT = 30.0  # seconds READY=1 waits for every watcher before it is sent anyway (logged)
STATUS_EVERY = 10.0  # seconds between STATUS= updates
RETENTION_INTERVAL = 60.0  # seconds between passes of the store's age limit (and retries of unsaved outcomes)
KNOWN_TASKS = (
    "capture-retention", "ring-pump", "capture", "ring", "evidence", "anomaly-capture", "anomaly-save", "watcher", "watcher-listener",
    "sample", "detector", "registry-listener", "sample-listener", "runtime-refresh", "metrics", "api", "nat", "firewall", "ebpf-load", "dns-load", "systemd",
    "port-probe", "talkers", "capture-upload", "alertmanager-pull",
)


class StartupError(Exception):
    """The daemon cannot start (a port is taken, the data dir is unusable, ...); ``code`` is the
    exit code (2 for a configuration that cannot be honoured, such as ``ebpf: on`` without bcc)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one (each namespace keeps ~10 descriptors)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def set_child_ehash(proc_root: Path, entries: int) -> None:
    """Give namespaces created from now on their own TCP established hash of ``entries`` buckets."""
    path = proc_root / "sys/net/ipv4/tcp_child_ehash_entries"
    try:
        path.write_text(f"{entries}\n")
    except OSError as exc:
        log.warning("tcp_child_ehash_unavailable", path=str(path), error=exc.strerror or str(exc))
    else:
        log.info("tcp_child_ehash_set", entries=entries)


def capture_settings(cfg: Config) -> CaptureSettings:
    """The capture engine's settings from the ``capture`` section."""
    cap = cfg.capture
    return CaptureSettings(
        snaplen=cap.snaplen, buffer_kib=cap.buffer_kib, pre_seconds=cap.pre_seconds, max_pre_seconds=cap.max_pre_seconds,
        post_seconds=cap.post_seconds, max_seconds=cap.max_seconds, max_bytes=cap.max_bytes, max_concurrent=cap.max_concurrent,
        max_per_container_per_hour=cap.max_per_container_per_hour, ring=cap.ring, ring_bytes=cap.ring_bytes,
        ring_segments=cap.ring_segments, ring_seconds=cap.ring_seconds, evidence=cap.evidence,
    )


def collect_after_rounds(collections: FullCollections, ticker: Ticker, api: ApiServer) -> None:
    """The daemon's full collections, after sampling rounds: one waits for a round that leaves it
    room before the next tick and before the next scrape (or while one is answered), as it holds
    the event loop's thread."""
    ticker.done_hooks.append(lambda: collections.after_round(min(ticker.room(), api.quiet(ticker.interval))))


@dataclass
class Parts:
    """The daemon's parts, as :meth:`App._build` wired them."""

    store: CaptureStore
    opener: NamespaceOpener
    host_links: HostLinks
    exits: ProcessExits
    pool: WatcherPool
    engine: CaptureEngine
    tracker: IncidentTracker
    nat: NatMonitor | None
    ebpf: EbpfService
    dns: DnsService
    pipeline: DetectionPipeline
    collector: ContainerCollector
    capture_api: CaptureApi | None = None
    probes: PortProber | None = None
    talkers: TalkerTracker | None = None
    exposure: ExposureReader | None = None
    puller: AlertPuller | None = None


class App:
    """One nstap daemon."""

    def __init__(self, config: Config, reread: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.reread = reread  # reads the configuration again (SIGHUP), raising ConfigError
        self.notifier = Notifier()
        self._parts: Parts | None = None
        self.stopping = asyncio.Event()
        self.prometheus = build_registry()
        self.instruments = Instruments(self.prometheus)
        failures = self.instruments.task_failures
        self.supervisor = TaskSupervisor(lambda task: failures.labels(task).inc())
        for task in (*KNOWN_TASKS, *(f"runtime-{r.name}" for r in config.runtimes)):
            failures.labels(task)  # every series from the start, at 0: alert rules see them exist
        self.registry = ContainerRegistry(self.supervisor.failed, own_container_id(config.proc_root))
        self.store = SampleStore(self.supervisor.failed)
        self.sources: list[RuntimeSource | ContainerdSource] = []
        self.pool: WatcherPool | None = None
        self.api: ApiServer | None = None
        self.uploader: Any = None  # storage.s3: the CaptureUploader
        self.full_collections = FullCollections()

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT (or :meth:`stop`): the start-up phases in order, then the
        shutdown the other way round."""
        fd_limit = self._prepare_process()
        token, webhook_token, web_config = self._credentials()
        ebpf = await self._load_ebpf()
        dns = await self._load_dns()
        store = await self._open_store()
        try:
            parts = self._build(store, ebpf, dns)
        except BaseException:
            await store.close()
            raise
        await self._listen(parts, token, webhook_token, web_config)
        self._log_started(parts, fd_limit)
        await self._start(parts)
        try:
            await self.stopping.wait()
        finally:
            await self._shutdown(parts)

    # -- start-up phases -------------------------------------------------------------------------

    def _prepare_process(self) -> int:
        """Signals, the worker threads, the descriptor limit, the namespaces' TCP hash size;
        returns the descriptor limit."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        # asyncio.to_thread work (reading a ring back, summarising a pcap) on two threads at most:
        # with the opener, walk, store and render threads, the daemon's threads are a fixed set.
        loop.set_default_executor(worker_threads("nstap-io", IO_THREADS))
        fd_limit = raise_fd_limit()
        if cfg.tcp_child_ehash_entries:
            set_child_ehash(cfg.proc_root, cfg.tcp_child_ehash_entries)
        return fd_limit

    def _credentials(self) -> tuple[str, str, WebConfig]:
        """The API token, the webhook-only token and the web configuration (TLS, basic auth)."""
        cfg = self.config
        try:
            token = ensure_token(cfg.data_dir)
            webhook_token = ensure_token(cfg.data_dir, WEBHOOK_TOKEN_FILE)
        except OSError as exc:
            raise StartupError(f"cannot use data dir {cfg.data_dir}: {exc.strerror or exc}") from None
        except TokenError as exc:
            raise StartupError(str(exc)) from None
        try:
            return token, webhook_token, load_web_config(cfg.web_config_file)
        except WebConfigError as exc:
            raise StartupError(str(exc), 2) from None

    async def _load_ebpf(self) -> EbpfService:
        """The eBPF collector; loaded now with ``ebpf: on`` (a failure stops the start), later with ``auto``."""
        ebpf = self.ebpf = EbpfService(self.config.ebpf)
        if self.config.ebpf == "on":
            try:
                await ebpf.load()
            except EbpfUnavailable as exc:
                raise StartupError(f"ebpf: on, but {exc}", 2) from None
        return ebpf

    async def _load_dns(self) -> DnsService:
        """The DNS collector; loaded now with ``dns.mode: on`` (a failure stops the start), later with ``auto``."""
        cfg = self.config.dns
        dns = DnsService(cfg.mode, cfg.timeout, proc_root=self.config.proc_root)
        if cfg.mode == "on":
            try:
                await dns.load()
            except EbpfUnavailable as exc:
                dns.close()
                raise StartupError(f"dns.mode: on, but {exc}", 2) from None
        return dns

    async def _open_store(self) -> CaptureStore:
        """The capture store and its index, recovered from an unclean stop."""
        cfg, cap = self.config, self.config.capture
        store = CaptureStore(cfg.data_dir, Retention(cap.store_max_bytes, cap.store_max_age, cap.index_max_age, cap.index_max_rows))
        try:
            if cfg.storage.s3 is not None:  # before open: the store queues what it finds for the bucket
                from .storage import make_uploader  # noqa: PLC0415 - only with a bucket

                try:
                    self.uploader = make_uploader(cfg.storage.s3, store)
                except (OSError, ValueError) as exc:
                    raise StartupError(f"storage.s3: {exc}") from None
            recovered = await store.open()
        except (OSError, sqlite3.Error) as exc:
            await store.close()
            raise StartupError(f"cannot open the capture store in {cfg.data_dir}: {exc}") from None
        if any(recovered.values()):
            log.warning("capture_store_recovered", **recovered)
        return store

    def _build(self, store: CaptureStore, ebpf: EbpfService, dns: DnsService) -> Parts:
        """Every part, wired in the order data flows through them (nothing runs yet)."""
        cfg = self.config
        opener = NamespaceOpener(cfg.proc_root)
        host_links = HostLinks(opener.open_home())
        context = SamplerContext(
            interval=cfg.interval, host_links=host_links, walk_budget=cfg.socket_walk.budget_ms / 1000.0,
            max_walk_interval=cfg.socket_walk.max_interval, max_listen_ports=cfg.max_listen_ports, max_interfaces=cfg.max_interfaces,
            sample_budget=cfg.sample_budget_ms / 1000.0, round_counters=RoundCounters(),
        )
        self.pool = pool = WatcherPool(self.registry, opener, enabled_samplers(cfg.samplers), context, self.store, self.instruments, self.supervisor)
        engine = CaptureEngine(capture_settings(cfg), store, pool, self.registry, cfg.data_dir, self.supervisor, self.store)
        causes = CauseFinder(self.registry, ProcessStateReader(cfg.proc_root))
        tracker = IncidentTracker(
            store.index.anomalies, AnomalyCaptures(engine).for_anomaly if cfg.detect.capture else None, cfg.detect.cooldown, cfg.detect.resolve_after,
            self.supervisor, causes,
        )
        nat = None
        if cfg.nat.enabled:
            nat = NatMonitor(
                cfg.nat, cfg.interval, self.registry, pool.netns_fd, opener.home_inode, self.supervisor,
                tracker if cfg.detect.enabled else None, frozenset(cfg.detect.disabled), cfg.proc_root,
            )
            pool.ticker.early_hooks.append(nat.kick)  # its interval's reads in the same wake-up as the others'
        engine.nat, engine.ebpf, engine.dns = nat, ebpf, dns
        if self.uploader is not None:
            self.uploader.busy = engine.recording
            self.prometheus.register(self.uploader)
        causes.nat, causes.ebpf = nat, ebpf
        pool.ticker.early_hooks.append(ebpf.new_round)  # its counts ready for the tick's samples
        pool.ticker.done_hooks.append(ebpf.after_round)  # the sweep of gone namespaces' entries, between rounds
        round_counters = context.round_counters
        if round_counters is not None:  # every namespace's protocol counters, read in one pass with the drops
            pool.ticker.hooks.append(lambda: ebpf.counters_for(round_counters))
            pool.ticker.done_hooks.insert(0, round_counters.clear)
        pool.subscribe(lambda: ebpf.follow(set(pool.watched())))  # entries of namespaces no longer watched are deleted
        no_drops: dict[str, int] = {}  # a namespace without drops since the program loaded: counted, none
        pool.kernel_drops = lambda inode: ebpf.counts.get(inode, no_drops) if ebpf.up else None
        pool.kernel_drops_at = lambda: ebpf.read_at or None
        pool.ticker.early_hooks.append(dns.new_round)
        pool.subscribe(lambda: dns.follow({inode: pool.netns_fd(inode) for inode in pool.watched()}))  # links in every watched namespace
        pool.dns = dns.of
        self.store.subscribe(dns.observe)  # a namespace that gained an interface: links on it too
        pipeline = DetectionPipeline(
            self.registry, tracker, cfg.detect.detectors, {kind: False for kind in cfg.detect.disabled}, self.supervisor, causes.held,
        )
        exits = ProcessExits(asyncio.get_running_loop())
        self.sources = [
            (ContainerdSource if endpoint.kind == "containerd" else RuntimeSource)(
                endpoint.name, endpoint.socket, self.registry, exits, proc_root=cfg.proc_root, host_netns=opener.home_inode,
                reconcile_interval=cfg.reconcile_interval, max_backoff=cfg.reconnect_max_backoff, supervisor=self.supervisor,
                **({"namespaces": endpoint.namespaces} if endpoint.kind == "containerd" else {}),
            )
            for endpoint in cfg.runtimes
        ]
        collector = ContainerCollector(self.registry, self.store, self.sources, pool, tracker, engine, nat, ebpf, cfg.metrics.expand(), dns)
        parts = Parts(store, opener, host_links, exits, pool, engine, tracker, nat, ebpf, dns, pipeline, collector)
        if nat is not None:
            self._build_runbook_checks(parts, nat, pool)
        parts.puller = self._build_puller()
        return parts

    def _build_puller(self) -> AlertPuller | None:
        """The Alertmanager puller (issue 21, part 2), if any URL is configured; its TLS files are loaded now."""
        am = self.config.alertmanager
        if not am.urls:
            return None
        try:
            puller = AlertPuller(am, am.host or host_value(am.host_label, self.config.metrics_listen), self.supervisor.failed)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise StartupError(f"alertmanager.tls_config: {exc}", 2) from None
        self.prometheus.register(PullCollector(puller))
        return puller

    def _build_runbook_checks(self, parts: Parts, nat: NatMonitor, pool: WatcherPool) -> None:
        """The published-port prober, the exposure reader and the top-talker tracker (issue 20, part 3)."""
        cfg = self.config
        if cfg.nat.probe.enabled:
            parts.probes = nat.probes = PortProber(
                lambda: nat.config.probe, lambda: nat.state.forwards, self.registry, self.store, self.supervisor, cfg.data_dir,
                parts.tracker if cfg.detect.enabled else None, nat.firewalls.get, cfg.interval, lambda: nat.disabled, nat.proxied,
            )
        parts.exposure = nat.exposure = ExposureReader(pool.netns_fd, lambda ids: nat.state.forwards_of(ids))
        parts.talkers = nat.talkers = TalkerTracker(lambda: nat.config.talkers, self.registry, self.supervisor, cfg.proc_root)

    async def _listen(self, parts: Parts, token: str, webhook_token: str, web_config: WebConfig) -> None:
        """Both listeners up with every route (the capture page's logged-out sessions loaded)."""
        cfg, pool = self.config, parts.pool
        self.api = ApiServer(
            cfg.metrics_listen, cfg.api_listen, self.prometheus, parts.collector, self.registry, lambda: set(pool.watched()), token,
            self.supervisor.failed, webhook_token, web_config, self.ready, cfg.metrics.render_ahead,
            lambda result: self.instruments.renders_ahead.labels(result=result).inc(),
        )
        parts.capture_api = CaptureApi(self.registry, parts.engine, parts.store, cfg.capture.max_seconds, parts.nat, parts.ebpf, parts.dns)
        parts.capture_api.bucket = self.uploader
        self.api.add_routes(parts.capture_api.routes())
        page = CapturePage(parts.capture_api, parts.store, token)
        await page.load_revoked()
        self.api.add_routes(page.routes())
        try:
            await self.api.start()
        except OSError as exc:
            await self.api.stop()
            parts.capture_api.close()
            parts.host_links.close()
            parts.opener.close()
            await parts.store.close()
            raise StartupError(f"cannot listen: {exc.strerror or exc}") from None

    def _log_started(self, parts: Parts, fd_limit: int) -> None:
        cfg = self.config
        if self.registry.own_id:
            log.info("own_container_not_watched", container_id=self.registry.own_id[:12])
        log.info(
            "nstap_started", version=__version__, interval=cfg.interval, metrics_listen=cfg.metrics_listen, api_listen=cfg.api_listen,
            runtimes=[r.name for r in cfg.runtimes], samplers=[s.name for s in parts.pool.specs], fd_limit=fd_limit, nice=nice_now(),
        )

    async def _start(self, parts: Parts) -> None:
        """Start every long-running part, downstream first: nothing produces before its consumer runs."""
        cfg = self.config
        # Everything allocated so far (modules, config, listeners) lives as long as the daemon:
        # keep it out of the cyclic collector's full passes, which the ticker runs from now on.
        gc.freeze()
        self.full_collections.take_over()
        ticker = parts.pool.ticker
        api = self.api
        assert api is not None
        collect_after_rounds(self.full_collections, ticker, api)
        ticker.done_hooks.append(lambda: api.after_round(ticker.interval))
        if cfg.detect.enabled:
            parts.pipeline.start(self.store)
        parts.pool.start()
        await parts.engine.recover()
        await parts.engine.load_recent()
        parts.engine.start()
        if parts.nat is not None:
            parts.nat.start(self.store)
        if parts.probes is not None:
            await parts.probes.start()
        if parts.talkers is not None:
            parts.talkers.start()
        ebpf_loading = None
        if cfg.ebpf == "auto":
            ebpf_loading = self.supervisor.spawn("ebpf-load", parts.ebpf.load())  # about a second, in a child: sampling starts meanwhile
        if cfg.dns.mode == "auto":
            self.supervisor.spawn("dns-load", self._start_dns(parts, ebpf_loading))
        else:
            self._follow_dns(parts)
        for source in self.sources:
            self.supervisor.service(f"runtime-{source.name}", source.run)
        self.supervisor.service("capture-retention", lambda: self._retention(parts.store, parts.engine))
        if self.uploader is not None:
            self.supervisor.service("capture-upload", self.uploader.run)
        if parts.puller is not None and parts.capture_api is not None:
            parts.puller.handle = parts.capture_api.alert_captures.handle
            parts.puller.remembered = parts.capture_api.alert_captures.alerts.unresolved
            self.supervisor.service("alertmanager-pull", parts.puller.run)
            log.info("alertmanager_pull_started", urls=[m.url for m in parts.puller.members], host_label=cfg.alertmanager.host_label, host=parts.puller.host)
        self._parts = parts
        if self.notifier.enabled:
            self.supervisor.service("systemd", self._systemd)

    async def _start_dns(self, parts: Parts, after: asyncio.Task | None = None) -> None:
        """Load the DNS collector (a child compiles it: seconds) and attach it where watchers are;
        after the drop-reason collector's load (``after``): two compilers at once took both cores
        of a small host from the samples (a round missed in CI)."""
        if after is not None:
            await asyncio.wait({after})
        await parts.dns.load()
        self._follow_dns(parts)

    @staticmethod
    def _follow_dns(parts: Parts) -> None:
        pool = parts.pool
        parts.dns.follow({inode: pool.netns_fd(inode) for inode in pool.watched()})

    async def _shutdown(self, parts: Parts) -> None:
        """Stop everything, upstream first, and close every descriptor opened."""
        log.info("nstap_stopping")
        self.notifier.send(stopping=1, status="stopping")
        self.full_collections.give_back()
        parts.dns.stop_following()
        await self.supervisor.stop_services()
        await parts.pool.stop()
        await parts.tracker.close()
        await parts.engine.stop()
        if parts.nat is not None:
            await parts.nat.close()
        if parts.probes is not None:
            await parts.probes.close()  # the probe namespace and its veth pair go
        if parts.talkers is not None:
            parts.talkers.close()
        if parts.exposure is not None:
            parts.exposure.close()
        parts.ebpf.close()
        if self.api is not None:
            await self.api.stop()
        if parts.capture_api is not None:
            parts.capture_api.close()
        await self.supervisor.stop()
        if self.uploader is not None:
            await self.uploader.close()
        await parts.store.close()
        parts.exits.forget_all()
        parts.host_links.close()
        parts.opener.close()
        # Last, once everything else is saved and closed: the kernel takes each DNS link away under
        # its rtnl lock after an RCU grace period, some 40 s for 1,000 namespaces' 4,000 links.
        parts.dns.close()
        log.info("nstap_stopped")

    async def _retention(self, store: CaptureStore, engine: CaptureEngine) -> None:
        """Apply the capture store's age limit (the byte budget is applied after every capture), and
        write the capture outcomes the index could not take before."""
        while True:
            await engine.retry_unsaved()
            try:
                evicted = await store.enforce()
            except (OSError, sqlite3.Error) as exc:
                log.warning("capture_retention_failed", error=str(exc))
            else:
                if evicted:
                    log.info("captures_evicted", count=len(evicted), store_bytes=store.total_bytes)
            await asyncio.sleep(RETENTION_INTERVAL)

    def stop(self) -> None:
        """Ask the daemon to shut down."""
        self.stopping.set()

    # -- systemd -----------------------------------------------------------------------------

    def ready(self) -> bool:
        """Every runtime tried, the running containers' watchers attached (or given up on for now),
        both listeners up: what READY=1 promises."""
        pool = self.pool
        if pool is None or self.api is None or not all(s.tried for s in self.sources):
            return False
        return all(inode in pool.watched() or pool.attach_failed(inode) for inode in self.registry.namespaces())

    def status_line(self) -> str:
        """What it watches, for STATUS= (systemctl status shows it)."""
        runtimes = ", ".join(f"{s.name} {'up' if s.up else 'down'}" for s in self.sources)
        watched = len(self.pool.watched()) if self.pool is not None else 0
        return f"watching {watched} namespaces of {len(self.registry.containers())} containers ({runtimes})"

    async def _systemd(self) -> None:
        """READY=1 once ready, then STATUS= on change and WATCHDOG=1 from the event loop: a loop
        that is stuck stops pinging, and systemd kills and restarts the daemon."""
        notifier = self.notifier
        ping = notifier.watchdog_seconds / 3 if notifier.watchdog_seconds else 0.0
        started = time.monotonic()
        while not self.ready() and time.monotonic() - started < READY_WAIT:
            if ping:
                notifier.send(watchdog=1)
            await asyncio.sleep(0.1)
        if not self.ready():
            log.warning("ready_without_every_watcher", waited_seconds=READY_WAIT)
        status = self.status_line()
        notifier.send(ready=1, status=status, mainpid=os.getpid())
        log.info("systemd_ready", status=status, watchdog_seconds=notifier.watchdog_seconds)
        while True:
            await asyncio.sleep(min(ping, STATUS_EVERY) if ping else STATUS_EVERY)
            now = self.status_line()
            fields: dict[str, object] = {"watchdog": 1} if ping else {}
            if now != status:
                status = fields["status"] = now
            if fields:
                notifier.send(**fields)

    def reload(self) -> None:
        """SIGHUP: read the configuration again, apply what can change now, log what needs a restart."""
        if self.reread is None or self._parts is None:
            log.warning("config_reload_skipped", reason="not started yet" if self.reread else "no configuration source to read again")
            return
        self.notifier.send(reloading=1, monotonic_usec=int(time.monotonic() * 1e6))
        try:
            try:
                new = self.reread()
            except ConfigError as exc:
                log.error("config_reload_failed", error=str(exc))
                return
            applied, restart = self._apply(new)
            log.info("config_reloaded", applied=applied, needs_restart=restart)
        finally:
            self.notifier.send(ready=1, status=self.status_line() if self.pool is not None else "reloaded")

    def _apply(self, new: Config) -> tuple[list[str], list[str]]:
        old = self.config
        assert self._parts is not None
        pool, tracker, pipeline, nat, collector = (self._parts.pool, self._parts.tracker, self._parts.pipeline, self._parts.nat, self._parts.collector)
        applied: list[str] = []
        changed = [k for k in Config.model_fields if getattr(old, k) != getattr(new, k)]
        for key in changed:
            if key == "interval":
                pool.set_interval(new.interval)
                if nat is not None:
                    nat.interval = new.interval
            elif key == "nice":
                apply_nice(new.nice)
            elif key in ("log_level", "log_format"):
                configure_logging(new.log_format, new.log_level)
            elif key == "detect" and (old.detect.enabled, old.detect.capture) == (new.detect.enabled, new.detect.capture):
                tracker.cooldown, tracker.resolve_after = new.detect.cooldown, new.detect.resolve_after
                pipeline.reconfigure(new.detect.detectors, {kind: False for kind in new.detect.disabled})
                if nat is not None:
                    nat.disabled = frozenset(new.detect.disabled)
            elif key == "nat" and nat is not None and old.nat.enabled == new.nat.enabled:
                nat.config = new.nat
            elif key == "metrics":
                collector.disabled = new.metrics.expand()
                if self.api is not None:
                    self.api.render_ahead = new.metrics.render_ahead
            else:
                continue
            applied.append(key)
        restart = [k for k in changed if k not in applied]
        self.config = new.model_copy(update={k: getattr(old, k) for k in restart})  # what runs now
        return applied, restart
