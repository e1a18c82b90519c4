"""Command line: ``nstap run`` (the daemon) and commands that ask a running daemon through its API.

Exit codes: 0 success, 1 runtime failure (cannot listen, daemon unreachable), 2 bad usage or
configuration (with one line naming the flag or key).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

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
    run.add_argument("--log-format", choices=["auto", "json", "console"], help="default: json unless stderr is a TTY")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    containers = sub.add_parser("containers", help="list what a running daemon watches")
    _client_args(containers)
    containers.add_argument("--json", action="store_true", help="print the API's JSON")
    return parser


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
            return _run(_config(args, ("metrics_listen", "api_listen", "interval", "data_dir", "log_format", "log_level")))
        if args.command == "containers":
            return _containers(args, _config(args, ("data_dir",)))
    except ConfigError as exc:
        print(f"nstap: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE


def _run(config: Config) -> int:
    from .app import App, StartupError
    from .log import configure_logging

    configure_logging(config.log_format, config.log_level)
    try:
        asyncio.run(App(config).run())
    except StartupError as exc:
        print(f"nstap: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _client(args: argparse.Namespace, config: Config) -> Any:
    from .api.auth import TokenError
    from .client import ApiClient

    try:
        return ApiClient.from_config(config, api_url=args.api)
    except TokenError as exc:
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
    for c in data.get("containers", []):
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
