"""Command line: ``nstap run`` (the daemon) and commands that ask a running daemon through its API.

Exit codes: 0 success, 1 runtime failure (cannot listen, daemon unreachable), 2 bad usage or
configuration (with one line naming the flag or key).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from . import __version__
from .config import Config, ConfigError, load_config

EXIT_FAILURE = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nstap", description="Watch the network of every container on this host.")
    parser.add_argument("--version", action="version", version=f"nstap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", type=Path, help="YAML config file")
    run.add_argument("--metrics-listen", metavar="HOST:PORT", help="where /metrics listens (default 0.0.0.0:9880)")
    run.add_argument("--api-listen", metavar="HOST:PORT", help="where the local API listens (default 127.0.0.1:9881)")
    run.add_argument("--interval", metavar="SECONDS", type=float, help="seconds between samples (default 1)")
    run.add_argument("--data-dir", metavar="DIR", type=Path, help="state directory (default /var/lib/nstap)")
    run.add_argument("--log-format", choices=["auto", "json", "console", "journald"], help="default: journald under systemd, else json unless stderr is a TTY")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="the least level logged (default info)")
    run.add_argument("--web.config.file", dest="web_config_file", metavar="FILE", type=Path,
                     help="TLS and basic auth of the listeners, in the Prometheus exporter toolkit's format")

    containers = sub.add_parser("containers", help="list what a running daemon watches")
    _client_args(containers)
    containers.add_argument("--json", action="store_true", help="print the API's JSON")

    anomalies = sub.add_parser("anomalies", help="list anomaly events")
    _client_args(anomalies)
    anomalies.add_argument("--container", help="name or id")
    anomalies.add_argument("--active", action="store_true", help="only those going on now")
    anomalies.add_argument("--limit", type=int, default=50, help="at most this many, newest first")
    anomalies.add_argument("--json", action="store_true", help="print the API's JSON")

    sub.add_parser("config-example", help="print every configuration key with its default, commented (/etc/nstap/config.yaml)")

    doctor = sub.add_parser("doctor", help="check every prerequisite of every feature on this host")
    doctor.add_argument("--config", type=Path, help="the daemon's YAML config file (which features are on)")
    doctor.add_argument("--json", action="store_true", help="machine-readable")

    nat = sub.add_parser("nat", help="published ports and their verified state, with counters")
    _client_args(nat)
    nat.add_argument("container", nargs="?", help="name or id (default: every forward on the host)")
    nat.add_argument("--json", action="store_true", help="print the API's JSON")

    for name, what in (("exposure", "a container's listeners: published, internal only, or loopback"),
                       ("talkers", "a container's peers by bytes over the last minute (conntrack accounting)"),
                       ("dns", "a container's DNS lookups: outcomes, the last minute's failing names, the servers asked")):
        view = sub.add_parser(name, help=what)
        _client_args(view)
        view.add_argument("container", help="name or id")
        view.add_argument("--json", action="store_true", help="print the API's JSON")

    _capture_parsers(sub)
    return parser


def _capture_parsers(sub: argparse._SubParsersAction) -> None:
    """``nstap captures list|get`` and ``nstap capture``."""
    captures = sub.add_parser("captures", help="list or download captures")
    captures_sub = captures.add_subparsers(dest="captures_command", required=True)
    listing = captures_sub.add_parser("list", help="list captures, newest first")
    _client_args(listing)
    listing.add_argument("--container", help="name or id")
    listing.add_argument("--kind", help="anomaly kind or alert name")
    listing.add_argument("--limit", type=int, default=50, help="at most this many, newest first")
    listing.add_argument("--json", action="store_true", help="print the API's JSON")
    listing.add_argument("--all-hosts", action="store_true", help="every host's captures, from the bucket's catalogue (storage.s3)")
    get = captures_sub.add_parser("get", help="download one capture's pcap (or its bundle)")
    _client_args(get)
    get.add_argument("id", help="capture id")
    get.add_argument("--bundle", action="store_true", help="the .tar.gz with the pcap, the evidence and a summary")
    get.add_argument("--host", help="another host's capture, from the bucket (a HOST of captures list --all-hosts)")
    get.add_argument("-o", "--output", type=Path, help="file to write (default: the name the daemon suggests; - for stdout)")

    capture = sub.add_parser("capture", help="capture a container's packets now")
    _client_args(capture)
    capture.add_argument("container", help="name or id")
    capture.add_argument("--seconds", type=float, help="post-trigger window (default: the daemon's post_seconds)")
    capture.add_argument("--pre", type=float, dest="pre_seconds", help="seconds before now, from the flight recorder")
    capture.add_argument("--filter", help="tcpdump filter expression")
    capture.add_argument("--side", choices=["container", "host"], help="host: the host end of the container's veth")
    capture.add_argument("--interface", help="with --side host: which host-side interface (default: the first)")
    capture.add_argument("--wait", action="store_true", help="wait for the capture to finish and download it")
    capture.add_argument("-o", "--output", type=Path, help="with --wait: file to write")


def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="the daemon's YAML config file (for its API address and data dir)")
    parser.add_argument("--data-dir", type=Path, help="the daemon's data dir (holds the API token)")
    parser.add_argument("--api", metavar="URL", help="API base URL (default: from the config's api_listen)")


def _config(args: argparse.Namespace, keys: tuple[str, ...]) -> Config:
    overrides = {key: getattr(args, key, None) for key in keys}
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nstap`` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            keys = ("metrics_listen", "api_listen", "interval", "data_dir", "log_format", "log_level", "web_config_file")
            return _run(_config(args, keys), lambda: _config(args, keys))
        if args.command == "containers":
            return _containers(args, _config(args, ("data_dir",)))
        if args.command == "anomalies":
            return _anomalies(args, _config(args, ("data_dir",)))
        if args.command == "config-example":
            from .config import example_yaml

            print(example_yaml())
            return 0
        if args.command == "doctor":
            return _doctor(args, _config(args, ()))
        if args.command == "nat":
            return _nat(args, _config(args, ("data_dir",)))
        if args.command in ("exposure", "talkers", "dns"):
            return _container_view(args, _config(args, ("data_dir",)))
        if args.command == "captures":
            return _captures(args, _config(args, ("data_dir",)))
        if args.command == "capture":
            return _capture(args, _config(args, ("data_dir",)))
    except ConfigError as exc:
        print(f"nstap: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE


def _watch_children_with_pidfds() -> None:
    """Reap tcpdump children through pidfds in the event loop, not one waiting thread per child.

    Python 3.11's default child watcher starts a thread per subprocess (one per flight recorder);
    3.12 picks pidfds itself and deprecates setting a watcher, so this is only done before 3.12.
    """
    if sys.version_info >= (3, 12) or not hasattr(asyncio, "PidfdChildWatcher"):
        return
    import warnings

    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return  # kernel without pidfd_open: keep the threaded watcher
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_child_watcher(asyncio.PidfdChildWatcher())


def _run(config: Config, reread: Any = None) -> int:
    from .app import App, StartupError
    from .heap import limit_malloc_arenas
    from .log import configure_logging
    from .priority import apply_nice

    limit_malloc_arenas()
    configure_logging(config.log_format, config.log_level)
    apply_nice(config.nice)  # before any worker thread: they and the children inherit it
    _watch_children_with_pidfds()
    try:
        asyncio.run(App(config, reread).run())
    except StartupError as exc:
        print(f"nstap: {exc}", file=sys.stderr)
        return exc.code
    return 0


def _client(args: argparse.Namespace, config: Config) -> Any:
    from .api.auth import TokenError
    from .api.webconfig import WebConfigError
    from .client import ApiClient

    try:
        return ApiClient.from_config(config, api_url=args.api)
    except (TokenError, WebConfigError) as exc:
        raise SystemExit(f"nstap: {exc}") from None


def _containers(args: argparse.Namespace, config: Config) -> int:
    from .client import ApiUnavailable

    try:
        data = _client(args, config).get_json("/api/v1/containers")
    except ApiUnavailable as exc:
        print(f"nstap: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [("CONTAINER", "RUNTIME", "PID", "NETNS", "WATCHED", "IPS", "PORTS")]
    # By runtime; a namespace's owner, then the containers that share it; host-network ones last.
    listed = sorted(data.get("containers", []), key=lambda c: (
        c["runtime"], c["netns"] == "host", c.get("netns_owner") or c["name"], c["name"] != c.get("netns_owner"), c["name"]))
    for c in listed:
        ips = ",".join(ip for n in c["networks"] for ip in (n["ipv4"], n["ipv6"]) if ip) or "-"
        ports = ",".join(
            f"{p['host_ip'] + ':' if p['host_ip'] else ''}{p['host_port']}->{p['container_port']}/{p['protocol']}" for p in c["ports"]
        ) or "-"
        if c["netns"] == "host":
            watched = "host-net"
        elif not c["enabled"]:
            watched = "opted-out"
        elif c["watched"]:
            watched = "yes" if c["netns_owner"] == c["name"] else f"via {c['netns_owner']}"
        else:
            watched = "no"
        rows.append((c["name"], c["runtime"], str(c["pid"]), str(c["netns"]), watched, ips, ports))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return 0


def _when(ts: float | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


def _query(**params: object) -> str:
    from urllib.parse import urlencode

    kept = {k: v for k, v in params.items() if v not in (None, False, "")}
    return "?" + urlencode(kept) if kept else ""


def _anomalies(args: argparse.Namespace, config: Config) -> int:
    from .client import ApiUnavailable

    try:
        data = _client(args, config).get_json("/api/v1/anomalies" + _query(container=args.container, active="true" if args.active else None, limit=args.limit))
    except ApiUnavailable as exc:
        print(f"nstap: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [("STARTED", "DETECTED", "LAST SEEN", "STATE", "CONTAINER", "KIND", "CAUSE", "CAPTURE", "SUMMARY")]
    for a in data["anomalies"]:
        after = a.get("detected_after")
        detected = _when(a["first_seen"]) + (f" (+{after:.1f}s)" if after is not None else "")
        rows.append((
            _when(a.get("started_at")), detected, _when(a["last_seen"]), "active" if a["active"] else "ended",
            a["container"], a["kind"], (a.get("cause") or {}).get("kind", "unknown"), a["capture_id"] or "-", a["summary"],
        ))
        text = (a.get("cause") or {}).get("text")
        if text:
            rows.append(("", "", "", "", "", "", "", "", f"why: {text}"))
    _print_table(rows)
    return 0


def _doctor(args: argparse.Namespace, config: Config) -> int:
    from .doctor import MISSING, report, run_checks

    checks = run_checks(config)
    print(report(checks, args.json))
    return EXIT_FAILURE if any(c.status == MISSING for c in checks) else 0


def _nat(args: argparse.Namespace, config: Config) -> int:
    from urllib.parse import quote

    from .client import ApiUnavailable

    path = f"/api/v1/containers/{quote(args.container, safe='')}/nat" if args.container else "/api/v1/nat"
    try:
        data = _client(args, config).get_json(path)
    except ApiUnavailable as exc:
        print(f"nstap: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [("CONTAINER", "PROTO", "HOST", "CONTAINER ADDRESS", "BACKEND", "STATE", "NEW CONNS", "WHY")]
    for f in data.get("forwards", []):
        host_ip, dest_ip = f["host_ip"] or "*", f["container_ip"] or "?"
        host = f"[{host_ip}]:{f['host_port']}" if ":" in host_ip else f"{host_ip}:{f['host_port']}"
        dest = f"[{dest_ip}]:{f['container_port']}" if ":" in dest_ip else f"{dest_ip}:{f['container_port']}"
        why = f["detail"] + (f"  [{f['rule']}]" if f["state"] != "ok" and f["rule"] else "")
        rows.append((f["container"] or "(none)", f["protocol"], host, dest, f["backend"], f["state"], str(f["new_connections"]), why or "-"))
    _print_table(rows)
    _print_verdicts(data.get("forwards", []))
    for m in data.get("masquerade", []):
        if m["state"] != "ok":
            print(f"masquerade {m['network']} {m['subnet']}: {m['state']}: {m['detail']}")
    fw = data.get("firewall")
    if fw:
        for r in fw["drop_rules"]:
            print(f"firewall {r['table']} {r['chain']}:{r['position']} {r['target']} {r['packets']} packets  {r['rule']}")
    conntrack = data.get("conntrack")
    if conntrack:
        print("conntrack " + ", ".join(f"{k}={v}" for k, v in conntrack.items()))
    return 0


def _yes(value: object) -> str:
    return {True: "ok", False: "NO", None: "?"}.get(value, "?")  # type: ignore[arg-type]


def _print_verdicts(forwards: list[dict]) -> None:
    """One verdict per published port: rule ok, listener ok, probe ok (path, latency), and why not."""
    judged = [f for f in forwards if "verdict" in f]
    if not judged:
        return
    print()
    rows = [("CONTAINER", "PORT", "RULE", "LISTENER", "PROBE", "LATENCY", "PATH", "WHY")]
    for f in judged:
        v = f["verdict"]
        probe = v.get("probe")
        port = f"{f['protocol']}/{f['host_port']}"
        if probe is None:
            rows.append((f["container"], port, _yes(v["rule"]), _yes(v["listener"]), "-", "-", "-", v.get("not_probed", "")))
            continue
        via = f" via {probe['via']}" if probe.get("via") else ""
        why = v["cause"]["kind"] + ": " + v["cause"]["text"] if "cause" in v else probe["error"] or "-"
        listener = "loopback" if v.get("listener_loopback_only") else _yes(v["listener"])
        rows.append((f["container"], port, _yes(v["rule"]), listener, "ok" if probe["ok"] else "FAILED",
                     f"{probe['latency_ms']:.2f} ms", probe["path"] + via, why))
    _print_table(rows)


def _container_view(args: argparse.Namespace, config: Config) -> int:
    from urllib.parse import quote

    from .client import ApiUnavailable

    try:
        data = _client(args, config).get_json(f"/api/v1/containers/{quote(args.container, safe='')}/{args.command}")
    except ApiUnavailable as exc:
        print(f"nstap: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    if data.get("error"):
        print(f"nstap: {data['error']}", file=sys.stderr)
    if args.command == "exposure":
        rows = [("PROTO", "ADDRESS", "PORT", "EXPOSURE", "PUBLISHED ON", "NOTE")]
        for e in data.get("listeners", []):
            note = "all host addresses" if e.get("all_host_addresses") else e.get("note", "")
            rows.append((e["protocol"], e["address"], str(e["port"]), e["exposure"], ", ".join(e.get("published_on", [])) or "-", note or "-"))
        _print_table(rows)
        for p in data.get("published_without_listener", []):
            print(f"published, nothing listens: {p}")
        return 0
    if args.command == "dns":
        _print_dns(data)
        return 0
    print(f"{data['container']}: peers over the last {data['window_seconds']:g} s (from {data['source']})")
    rows = [("PEER", "BYTES OUT", "PKTS OUT", "BYTES IN", "PKTS IN", "NEW FLOWS")]
    for p in data.get("peers", []):
        rows.append((p["peer"], str(p["bytes_out"]), str(p["packets_out"]), str(p["bytes_in"]), str(p["packets_in"]), str(p["new_flows"])))
    _print_table(rows)
    return 0


def _print_dns(data: dict) -> None:
    """``nstap dns C``: what ``dig`` and ``tcpdump port 53`` would have shown, summed up."""
    total = sum(r["count"] for r in data.get("requests", []))
    mean = data.get("mean_latency_ms")
    print(f"{data['container']}: {total} lookups ({data.get('failed', 0)} failed), "
          f"mean latency {'-' if mean is None else f'{mean:g} ms'}; unanswered after {data['timeout_seconds']:g} s is a timeout")
    rows = [("RCODE", "QTYPE", "LOOKUPS")]
    rows += [(r["rcode"], r["qtype"], str(r["count"])) for r in data.get("requests", [])]
    _print_table(rows)
    print(f"\nfailing names, last {data['window_seconds']:g} s:")
    names = [("NAME", "RCODE", "QTYPE", "COUNT", "LAST SEEN")]
    names += [(n["name"], n["rcode"], n["qtype"], str(n["count"]), time.strftime("%H:%M:%S", time.localtime(n["last_seen"])))
              for n in data.get("failing_names", [])]
    if len(names) > 1:
        _print_table(names)
    else:
        print("  none")
    print("\nservers asked:")
    servers = [("SERVER", "QUERIES", "ANSWERS", "FAILURES", "TIMEOUTS", "MEAN MS", "VIA EMBEDDED")]
    servers += [(f"{s['address']}:{s['port']}", str(s["queries"]), str(s["answers"]), str(s["failures"]), str(s["timeouts"]),
                 "-" if s["mean_latency_ms"] is None else f"{s['mean_latency_ms']:g}", str(s["via_embedded_resolver"]))
                for s in data.get("servers", [])]
    if len(servers) > 1:
        _print_table(servers)
    else:
        print("  none")


def _captures(args: argparse.Namespace, config: Config) -> int:
    from .client import ApiUnavailable

    client = _client(args, config)
    try:
        if args.captures_command == "list" and args.all_hosts:
            data = client.get_json("/api/v1/fleet/captures" + _query(limit=args.limit))
            if args.json:
                print(json.dumps(data, indent=2))
                return 0
            rows = [("HOST", "ID", "TRIGGER", "CONTAINER", "REASON", "KIND", "STATE", "PACKETS", "BYTES")]
            for d in data["captures"]:
                c = d["capture"]
                rows.append((d["host"], c["id"], _when(c["trigger_at"]), c["container"], c["reason"], c["kind"] or "-", c["state"], str(c["packets"]), str(c["bytes"])))
            _print_table(rows)
            return 0
        if args.captures_command == "list":
            data = client.get_json("/api/v1/captures" + _query(container=args.container, kind=args.kind, limit=args.limit))
            if args.json:
                print(json.dumps(data, indent=2))
                return 0
            rows = [("ID", "TRIGGER", "CONTAINER", "REASON", "KIND", "STATE", "PACKETS", "BYTES", "WHERE")]
            for c in data["captures"]:
                rows.append((c["id"], _when(c["trigger_at"]), c["container"], c["reason"], c["kind"] or "-", c["state"], str(c["packets"]), str(c["bytes"]), c.get("location", "-")))
            _print_table(rows)
            return 0
        what = "bundle" if args.bundle else "pcap"
        if args.host:
            return _download(client, args.id, args.output, what, f"/api/v1/fleet/captures/{quote(args.host, safe='')}/{quote(args.id, safe='')}/{what}")
        return _download(client, args.id, args.output, what)
    except ApiUnavailable as exc:
        print(f"nstap: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def safe_file_name(text: str) -> str:
    """A name for a file in the current directory: the last part of ``text``, with only letters,
    digits, ``_``, ``.`` and ``-``, not starting with a dot, at most 128 characters."""
    base = text.replace("\\", "/").rsplit("/", 1)[-1]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", base)[:128].lstrip(".")
    return safe or "capture"


def _download(client: Any, capture_id: str, output: Path | None, what: str = "pcap", path: str = "") -> int:
    path = path or f"/api/v1/captures/{quote(capture_id, safe='')}/{what}"
    if output is not None and str(output) == "-":
        name, size = client.download(path, sys.stdout.buffer)
        return 0
    tmp = Path(f".nstap-{safe_file_name(capture_id)}.part")
    try:
        # 0600: a pcap holds other people's packets; O_EXCL: never through a link someone left there.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb") as f:
            name, size = client.download(path, f)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The server suggests a name; only its last part, in safe characters, is used: never a path.
    dest = output or Path(safe_file_name(name) if name else f"{safe_file_name(capture_id)}.{'tar.gz' if what == 'bundle' else 'pcap'}")
    tmp.rename(dest)
    print(f"{dest} ({size} bytes)")
    return 0


def _capture(args: argparse.Namespace, config: Config) -> int:
    import time

    from .client import ApiUnavailable

    client = _client(args, config)
    body: dict[str, Any] = {"container": args.container}
    if args.seconds is not None:
        body["duration"] = args.seconds
    if args.pre_seconds is not None:
        body["pre_seconds"] = args.pre_seconds
    if args.filter:
        body["filter"] = args.filter
    if args.side:
        body["side"] = args.side
    if args.interface:
        body["interface"] = args.interface
    try:
        row = client.post_json("/api/v1/captures", body)
        print(f"capture {row['id']} started ({row['mode']}): {_when(row['window_start'])} to {_when(row['window_end'])}")
        if not args.wait:
            return 0
        while row["state"] == "running":
            time.sleep(0.5)
            row = client.get_json(f"/api/v1/captures/{row['id']}")
        print(f"capture {row['id']} {row['state']}: {row['packets']} packets, {row['bytes']} bytes" + (f" ({row['error']})" if row["error"] else ""))
        if row["state"] in ("complete", "incomplete"):
            return _download(client, row["id"], args.output)
        return EXIT_FAILURE
    except ApiUnavailable as exc:
        print(f"nstap: {exc}", file=sys.stderr)
        return EXIT_FAILURE

