"""Configuration: a YAML file and command-line flags, validated before anything starts.

Every key has a default; the file and the flags override them (flags win). Unknown keys and bad
values stop the daemon with exit code 2 and one line naming the key.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .priority import DEFAULT_NICE
from .samplers import SAMPLERS


_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key."""


def parse_listen(value: str) -> tuple[str, int]:
    """Split "HOST:PORT" or "[V6]:PORT" into (host, port), checking both."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError("expected HOST:PORT")
    host, _, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r}")
    if not host:
        raise ValueError("missing host")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.match(host):
            raise ValueError(f"bad host {host!r}") from None
    return host, int(port_text)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuntimeEndpoint(Strict):
    """A runtime socket to follow: dockerd or a Podman service (the Docker API, told apart by its
    answer), or containerd's gRPC API (``kind: containerd``) over some of its namespaces."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$", description="the runtime label value")
    socket: Path = Field(description="path of the unix socket")
    kind: Literal["docker", "podman", "containerd"] | None = Field(None, description="containerd for its gRPC API; else the Docker API")
    namespaces: tuple[Annotated[str, Field(pattern=r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$", max_length=76)], ...] = Field(
        ("k8s.io", "default"), min_length=1, max_length=32, description="containerd namespaces to follow (kind containerd only)"
    )

    @field_validator("socket")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError("must be an absolute path")
        return value

    @model_validator(mode="after")
    def _namespaces_for_containerd(self) -> RuntimeEndpoint:
        if self.kind != "containerd" and self.namespaces != ("k8s.io", "default"):
            raise ValueError("namespaces are containerd's: set kind: containerd")
        if len(set(self.namespaces)) != len(self.namespaces):
            raise ValueError("namespaces must be unique")
        return self


class SocketWalk(Strict):
    """How much CPU the per-state TCP socket walks may use."""

    budget_ms: float = Field(0.05, ge=0.0, le=100.0, description="CPU ms per container-sample, for all namespaces' walks together at every round (0: each namespace walks every max_interval)")
    max_interval: float = Field(300.0, ge=1.0, le=3600.0, description="longest seconds between walks (the budget decides below it)")


class DetectConfig(Strict):
    """Anomaly detection: which detectors, their parameters, and how events are damped."""

    enabled: bool = Field(True, description="false: no detection at all")
    cooldown: float = Field(60.0, ge=0.0, le=86400.0, description="seconds after an event ends during which it is reopened")
    resolve_after: float = Field(10.0, ge=0.0, le=3600.0, description="seconds without a finding that end an event")
    capture: bool = Field(True, description="capture packets when an event starts")
    disabled: tuple[str, ...] = Field((), description="detector kinds switched off for every container (a label cannot switch them on)")
    detectors: dict[str, dict[str, Any]] = Field(default_factory=dict, description="parameters by detector kind (the same ranges as labels)")

    @field_validator("disabled")
    @classmethod
    def _known_kinds(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from .detect import DETECTORS
        from .detect.nat import KINDS
        from .detect.probe import KINDS as PROBE_KINDS

        known = (*DETECTORS, *KINDS, *PROBE_KINDS)
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown detector {unknown[0]!r} (known: {', '.join(known)})")
        return value

    @field_validator("detectors")
    @classmethod
    def _known_params(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
        from .detect import DETECTORS, check_params

        out = {}
        for kind, params in value.items():
            spec = DETECTORS.get(kind)
            if spec is None:
                raise ValueError(f"unknown detector {kind!r} (known: {', '.join(DETECTORS)})")
            out[kind] = check_params(spec, params)
        return out


class CaptureConfig(Strict):
    """Packet captures: their limits, the store's budget, the flight recorders."""

    snaplen: int = Field(256, ge=64, le=65535, description="bytes kept of each packet")
    pre_seconds: float = Field(10.0, ge=0.0, le=600.0, description="seconds of packets before the trigger (an anomaly: before its onset), from the flight recorder")
    max_pre_seconds: float = Field(60.0, ge=0.0, le=3600.0, description="how far before its trigger an anomaly capture may start (from the onset)")
    post_seconds: float = Field(10.0, ge=1.0, le=600.0, description="seconds a capture goes on after its trigger")
    max_seconds: float = Field(120.0, ge=1.0, le=3600.0, description="longest post-trigger window a request may ask for")
    max_bytes: int = Field(20 * 1024 * 1024, ge=64 * 1024, le=1 << 34, description="bytes per capture")
    max_concurrent: int = Field(4, ge=1, le=64, description="captures running at once (one more is refused: 429)")
    max_per_container_per_hour: int = Field(6, ge=1, le=3600, description="anomaly captures of one container per hour")
    buffer_kib: int = Field(4096, ge=256, le=1 << 20, description="tcpdump -B")
    store_max_bytes: int = Field(1 << 30, ge=1 << 20, le=1 << 44, description="disk budget of the capture store")
    store_max_age: float = Field(7 * 86400.0, ge=60.0, le=365 * 86400.0, description="seconds a capture is kept")
    index_max_age: float = Field(
        30 * 86400.0, ge=3600.0, le=10 * 365 * 86400.0,
        description="seconds the index keeps an ended anomaly, an alert, and an evicted capture's entry",
    )
    index_max_rows: int = Field(100_000, ge=1000, le=10_000_000, description="entries the index keeps per table (captures, anomalies, alerts), newest first")
    ring: Literal["off", "labeled", "all"] = Field("labeled", description="flight recorders: none, label nstap.capture=ring, every namespace")
    ring_bytes: int = Field(8 * 1024 * 1024, ge=256 * 1024, le=1 << 32, description="flight-recorder bytes per namespace")
    ring_segments: int = Field(16, ge=2, le=64, description="pcap files a flight recorder's ring_bytes are split into")
    ring_seconds: float = Field(60.0, ge=1.0, le=86400.0, description="reach a flight recorder should have; a shorter one is logged")
    evidence: bool = Field(True, description="record the namespace's state (sockets, interfaces, routes, firewall) with every capture")

    @model_validator(mode="after")
    def _windows_fit(self) -> CaptureConfig:
        if self.post_seconds > self.max_seconds:
            raise ValueError("post_seconds must not exceed max_seconds")
        if self.pre_seconds > self.max_pre_seconds:
            raise ValueError("pre_seconds must not exceed max_pre_seconds")
        return self


class ProbeConfig(Strict):
    """Published-port probes: a TCP connect to every published port, from nstap's own namespace."""

    enabled: bool = Field(True, description="probe every published port of a watched container (label nstap.probe=off opts one out)")
    interval: float = Field(30.0, ge=1.0, le=3600.0, description="seconds between two probes of one port (jittered +-20%); a NAT change probes at once")
    timeout: float = Field(2.0, ge=0.1, le=30.0, description="seconds a connect may take before the probe fails")
    udp: bool = Field(False, description="probe UDP ports too (a datagram; only an ICMP port-unreachable is a failure)")
    rate: float = Field(20.0, gt=0.0, le=1000.0, description="probes per second at most, host-wide")
    max_concurrent: int = Field(8, ge=1, le=64, description="probes in flight at once")
    max_per_container: int = Field(64, ge=1, le=10000, description="published ports probed per container (the lowest); the rest are listed as not probed")
    subnet: str = Field("169.254.252.0/22", description="IPv4 pool of the probe namespace's /30 (the first one no host route overlaps)")
    subnet6: str = Field(
        "fd6e:7374:6170::/48",
        description="IPv6 pool of the probe namespace's /64 (the first one no host route overlaps); \"\" for IPv4 probes only",
    )

    @field_validator("subnet")
    @classmethod
    def _pool(cls, value: str) -> str:
        return _pool_of(value, 4, 30)

    @field_validator("subnet6")
    @classmethod
    def _pool6(cls, value: str) -> str:
        return value if value == "" else _pool_of(value, 6, 64)


def _pool_of(value: str, version: int, longest: int) -> str:
    """``value`` if it is an IPv``version`` network of /``longest`` or larger; ValueError otherwise."""
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"not an IPv{version} network: {exc}") from None
    if net.version != version or net.prefixlen > longest:
        raise ValueError(f"must be an IPv{version} network of /{longest} or larger")
    return value


class TalkersConfig(Strict):
    """Top talkers per container (bytes and packets per peer over the last minute), from conntrack accounting."""

    conntrack_acct: bool = Field(
        False,
        description="let nstap set net.netfilter.nf_conntrack_acct=1 (16 more bytes per conntrack entry, a counter update per packet) if it is off",
    )
    interval: float = Field(10.0, ge=2.0, le=300.0, description="seconds between two reads of the counters (one conntrack dump each)")
    max_peers: int = Field(50, ge=1, le=1000, description="peers kept per container (the rest summed as 'other')")
    max_flows: int = Field(65536, ge=1000, le=1_000_000, description="flows followed at once, host-wide")


class DnsConfig(Strict):
    """DNS per container (eBPF tc programs in each watched namespace)."""

    mode: Literal["auto", "on", "off"] = Field("auto", description="lookups by outcome and latency (bcc, TCX: Linux 6.14+): on = required (exit 2 without)")
    timeout: float = Field(5.0, ge=0.5, le=60.0, description="seconds a lookup may go unanswered before it counts as rcode=\"timeout\"")


class NatConfig(Strict):
    """NAT rules, conntrack and the containers' own firewalls."""

    enabled: bool = Field(True, description="read the NAT rules, conntrack and the containers' own firewalls")
    interval: float = Field(15.0, ge=1.0, le=3600.0, description="longest seconds between reads of the NAT rules for the counters of published ports (legacy tables: for any change); a change is read at once")
    conntrack_interval: float = Field(30.0, ge=1.0, le=3600.0, description="seconds between per-container conntrack passes (longer when a pass costs more than conntrack_budget)")
    conntrack_budget: float = Field(0.005, gt=0.0, le=0.5, description="share of one core the per-container conntrack pass may use")
    conntrack_full_ratio: float = Field(0.9, gt=0.0, le=1.0, description="conntrack_full above this share of nf_conntrack_max")
    userland_proxy: Literal["auto", "on", "off"] = Field("auto", description="check Docker's docker-proxy listeners (auto: unless /etc/docker/daemon.json turns userland-proxy off)")
    firewall_budget: float = Field(0.05, gt=0.0, le=1.0, description="share of the time one namespace's firewall reads may take: a firewall that changes all the time is read less often")
    max_firewall_rules: int = Field(32, ge=1, le=1000, description="DROP/REJECT rules exported per container")
    read_timeout: float = Field(10.0, ge=1.0, le=300.0, description="seconds a rule read (iptables-save, nft) may take")
    probe: ProbeConfig = ProbeConfig()
    talkers: TalkersConfig = TalkersConfig()


def _readable(value: Path | None) -> Path | None:
    """A file nstap reads later (a CA, a key, a password): it must be readable now."""
    if value is not None:
        try:
            with open(value, "rb"):
                pass
        except OSError as exc:
            raise ValueError(f"cannot read {value}: {exc.strerror or exc}") from None
    return value


class TlsConfig(Strict):
    """TLS towards Alertmanager, named as Prometheus' alertmanager_config names it."""

    ca_file: Path | None = Field(None, description="CA certificates to trust (default: the system's)")
    cert_file: Path | None = Field(None, description="client certificate (with key_file)")
    key_file: Path | None = Field(None, description="client key (with cert_file)")
    insecure_skip_verify: bool = Field(False, description="do not verify the server's certificate")

    _files = field_validator("ca_file", "cert_file", "key_file")(_readable)

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class BasicAuth(Strict):
    """HTTP basic auth towards Alertmanager; the password is read from a file at every poll."""

    username: str = Field(min_length=1, max_length=256, description="user name")
    password_file: Path | None = Field(None, description="file holding the password (read at every poll)")

    _files = field_validator("password_file")(_readable)


class Authorization(Strict):
    """An Authorization header towards Alertmanager (``type credentials``), read from a file at every poll."""

    type: str = Field("Bearer", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,31}$", description="the scheme")
    credentials_file: Path = Field(description="file holding the credentials (read at every poll)")

    _files = field_validator("credentials_file")(_readable)


class AlertmanagerConfig(Strict):
    """Pull this host's alerts from every Alertmanager (cluster members do not share alerts): a capture for each, as the webhook does."""

    urls: tuple[str, ...] = Field((), max_length=32, description="every Alertmanager to ask (each cluster member), http:// or https://; none: pull off")
    poll_interval: float = Field(15.0, ge=1.0, le=3600.0, description="seconds between two polls of each Alertmanager (jittered +-10%)")
    host_label: str = Field("instance", pattern=r"^[a-zA-Z_][a-zA-Z0-9_]{0,127}$", description="the label naming the host an alert belongs to")
    host: str | None = Field(None, min_length=1, max_length=256, description="its value for this host (default: for instance, this host's scrape address, hostname:metrics port; for any other label, this host's name)")
    timeout: float = Field(10.0, ge=0.5, le=300.0, description="seconds one request may take")
    max_alerts: int = Field(1000, ge=1, le=100_000, description="alerts taken from one answer (the rest are logged as skipped)")
    max_response_bytes: int = Field(8 * 1024 * 1024, ge=64 * 1024, le=1 << 30, description="bytes one answer may have")
    tls_config: TlsConfig = TlsConfig()
    basic_auth: BasicAuth | None = None
    authorization: Authorization | None = None

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from urllib.parse import urlsplit  # noqa: PLC0415

        for url in value:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{url!r} is not an http:// or https:// URL")
            if parts.username or parts.password:
                raise ValueError(f"{url!r}: put credentials in basic_auth, not in the URL (URLs are logged and exported)")
            if parts.query or parts.fragment:
                raise ValueError(f"{url!r}: no query or fragment (nstap adds /api/v2/alerts)")
        if len(set(value)) != len(value):
            raise ValueError("urls must be unique")
        return value

    @model_validator(mode="after")
    def _one_auth(self) -> AlertmanagerConfig:
        if self.basic_auth is not None and self.authorization is not None:
            raise ValueError("basic_auth and authorization are mutually exclusive")
        return self


DEFAULT_RUNTIMES = (
    RuntimeEndpoint(name="docker", socket=Path("/var/run/docker.sock")),
    RuntimeEndpoint(name="podman", socket=Path("/run/podman/podman.sock")),
)


class MetricsConfig(Strict):
    """What /metrics leaves out, and when it is rendered."""

    disabled: tuple[str, ...] = Field(
        (), description="metric families not exported: names or shell patterns (nstap_udp_*), each matching at least one family nstap exports"
    )
    render_ahead: bool = Field(
        True,
        description="render the per-container families after the sampling round before a scrape expected from a scraper's steady cadence "
        "(served only if no later round completed and no namespace came or went); false: every scrape renders at its arrival",
    )

    @field_validator("disabled")
    @classmethod
    def _known_families(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from .exporter import family_names  # noqa: PLC0415 - the exporter's own list, read only when this is set

        known = family_names()
        for pattern in value:
            if not fnmatch.filter(known, pattern):
                raise ValueError(f"{pattern!r} matches no metric family (see nstap config-example)")
        return value

    def expand(self) -> frozenset[str]:
        """The family names disabled."""
        if not self.disabled:
            return frozenset()
        from .exporter import family_names  # noqa: PLC0415

        known = family_names()
        return frozenset(name for pattern in self.disabled for name in fnmatch.filter(known, pattern))


class S3Config(Strict):
    """An S3-compatible bucket the finished captures, their evidence and bundles are uploaded to."""

    endpoint: str = Field(description="URL of the S3 server, e.g. https://s3.eu-west-1.amazonaws.com", pattern=r"^https?://[^/?#]+/?$")
    bucket: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", description="bucket name")
    prefix: str | None = Field(None, max_length=512, description="key prefix of this host's objects (default: '<hostname>/')")
    region: str = Field("us-east-1", pattern=r"^[a-z0-9-]{1,32}$", description="region the requests are signed for (SigV4)")
    access_key_file: Path | None = Field(None, description="file holding the access key id (else AWS_ACCESS_KEY_ID)")
    secret_key_file: Path | None = Field(None, description="file holding the secret key (else AWS_SECRET_ACCESS_KEY)")
    path_style: bool = Field(False, description="ENDPOINT/BUCKET/KEY instead of BUCKET.ENDPOINT/KEY (MinIO, SeaweedFS, Ceph)")
    verify_tls: bool = Field(True, description="verify the server's certificate")
    concurrency: int = Field(2, ge=1, le=16, description="uploads at once")
    multipart_bytes: int = Field(16 * 1024 * 1024, ge=5 * 1024 * 1024, le=1 << 32, description="files larger go in parts of this size")
    max_backoff: float = Field(300.0, ge=1.0, le=86400.0, description="longest seconds between two tries of one upload")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        if value is not None and (value.startswith("/") or (value and not value.endswith("/"))):
            raise ValueError("must end with '/' and not start with one")
        return value


class StorageConfig(Strict):
    """Where finished captures go beyond the host."""

    s3: S3Config | None = None


class Config(Strict):
    """Everything ``nstap run`` can be told."""

    interval: float = Field(1.0, ge=0.1, le=300.0, description="seconds between samples")
    nice: int = Field(
        DEFAULT_NICE, ge=-20, le=19,
        description="CPU priority (Linux nice) of the daemon's threads and children, and of its session's autogroup when it leads its session: below 0 its ticks keep time on a saturated host (needs CAP_SYS_NICE); 0 as other processes",
    )
    metrics_listen: str = Field("0.0.0.0:9880", description="HOST:PORT of /metrics")
    api_listen: str = Field("127.0.0.1:9881", description="HOST:PORT of the local API")
    data_dir: Path = Field(Path("/var/lib/nstap"), description="state: API token, captures")
    web_config_file: Path | None = Field(None, description="TLS and basic auth of the listeners (Prometheus exporter toolkit format)")
    log_format: Literal["auto", "json", "console", "journald"] = Field(
        "auto", description="auto: journald when stderr is systemd's journal stream, else console on a TTY, else json"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="the least level logged")
    proc_root: Path = Field(Path("/proc"), description="where the host's procfs is mounted (/host/proc in the Kubernetes pod)")
    runtimes: tuple[RuntimeEndpoint, ...] = Field(DEFAULT_RUNTIMES, description="the runtime sockets to follow (an absent one is retried, not an error)")
    reconcile_interval: float = Field(30.0, ge=1.0, le=3600.0, description="seconds between full lists of each runtime's containers")
    reconnect_max_backoff: float = Field(5.0, ge=0.1, le=300.0, description="cap of a runtime's reconnect backoff, seconds")
    samplers: dict[str, bool] = Field(default_factory=dict, description="switch samplers on or off by name, e.g. {sockets: false}")
    socket_walk: SocketWalk = SocketWalk()
    max_listen_ports: int = Field(64, ge=1, le=10000, description="listener ports per container before port=\"other\"")
    sample_budget_ms: float = Field(2.0, ge=0.1, le=1000.0, description="CPU ms one namespace's sample may cost (3 samples in a row) before it is sampled less often")
    max_interfaces: int = Field(64, ge=1, le=10000, description="interfaces per container before interface=\"other\"")
    tcp_child_ehash_entries: int = Field(0, ge=0, le=1 << 24, description="set net.ipv4.tcp_child_ehash_entries at start (0: leave it)")
    detect: DetectConfig = DetectConfig()
    capture: CaptureConfig = CaptureConfig()
    nat: NatConfig = NatConfig()
    metrics: MetricsConfig = MetricsConfig()
    storage: StorageConfig = StorageConfig()
    alertmanager: AlertmanagerConfig = AlertmanagerConfig()
    ebpf: Literal["auto", "on", "off"] = Field("auto", description="kernel drop reasons and retransmitted flows (bcc): on = required (exit 2 without)")
    dns: DnsConfig = DnsConfig()

    @field_validator("interval", "reconcile_interval", "reconnect_max_backoff", "sample_budget_ms")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("metrics_listen", "api_listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("samplers")
    @classmethod
    def _known_samplers(cls, value: dict[str, bool]) -> dict[str, bool]:
        unknown = sorted(set(value) - set(SAMPLERS))
        if unknown:
            raise ValueError(f"unknown sampler {unknown[0]!r} (known: {', '.join(SAMPLERS)})")
        return value

    @field_validator("runtimes")
    @classmethod
    def _unique_runtimes(cls, value: tuple[RuntimeEndpoint, ...]) -> tuple[RuntimeEndpoint, ...]:
        names = [r.name for r in value]
        if len(set(names)) != len(names):
            raise ValueError("runtime names must be unique")
        return value

    @field_validator("api_listen")
    @classmethod
    def _not_the_metrics_listener(cls, value: str, info: ValidationInfo) -> str:
        metrics = info.data.get("metrics_listen")
        if metrics is not None and parse_listen(metrics) == parse_listen(value):
            raise ValueError("must differ from metrics_listen")
        return value


def _key_of(error: dict[str, Any]) -> str:
    loc = [str(p) for p in error.get("loc", ())]
    return ".".join(loc) or "config"


def load_config(path: Path | None, overrides: dict[str, Any]) -> Config:
    """Read the YAML file (if any), apply the flag overrides, validate; ConfigError on any problem."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" (line {where.line + 1})" if where is not None else ""
            raise ConfigError(f"config file {path} is not valid YAML{at}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = _key_of(first)
        if first.get("type") == "extra_forbidden":
            raise ConfigError(f"unknown config key {key!r}") from None
        message = first.get("msg", "invalid value")
        raise ConfigError(f"invalid value for {key!r}: {message}") from None


def _yaml_value(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, tuple):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text[:-4].strip() if text.endswith("\n...") else text


def example_yaml(model: type[BaseModel] = None, indent: str = "") -> str:  # type: ignore[assignment]
    """Every key of the configuration with its default and description, commented out: the
    example ``/etc/nstap/config.yaml`` (``nstap config-example``)."""
    model = model or Config
    lines = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        default = field.get_default(call_default_factory=True)
        help_ = field.description or ""
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(f"{indent}# {name}:" + (f"  # {annotation.__doc__.strip().splitlines()[0]}" if annotation.__doc__ else ""))
            lines.append(example_yaml(annotation, indent + "#   ").replace(f"{indent}#   # ", f"{indent}#   "))
            continue
        comment = f"  # {help_}" if help_ else ""
        lines.append(f"{indent}# {name}: {_yaml_value(default)}{comment}")
    return "\n".join(lines)
