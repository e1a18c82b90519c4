"""``nstap doctor``: every prerequisite of every feature on this host, with the exact fix.

Each check says OK, DEGRADED (the feature runs with less) or MISSING (a feature the configuration
enables cannot work). The exit code is 0 when nothing is MISSING, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import Config
from .ebpf import collector as ebpf

OK, DEGRADED, MISSING = "OK", "DEGRADED", "MISSING"
CAPABILITIES = {  # bit -> name, and why nstap needs it
    21: ("CAP_SYS_ADMIN", "setns() into containers' namespaces, loading eBPF"),
    19: ("CAP_SYS_PTRACE", "reading other processes' /proc/<pid>/ns and net files"),
    12: ("CAP_NET_ADMIN", "netlink (conntrack, nftables generation), tcpdump"),
    13: ("CAP_NET_RAW", "tcpdump's packet sockets"),
    2: ("CAP_DAC_READ_SEARCH", "reading /proc of processes of other users"),
    39: ("CAP_BPF", "loading eBPF (with CAP_PERFMON)"),
    38: ("CAP_PERFMON", "attaching eBPF to tracepoints"),
    23: ("CAP_SYS_NICE", "its CPU priority (nice below the one it was started with)"),
}
_CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    feature: str
    check: str
    status: str
    detail: str
    fix: str = ""


def _which(name: str) -> str | None:
    return shutil.which(name)  # the PATH the daemon runs with, nothing added


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


async def _runtime_version(socket_path: Path) -> str:
    import aiohttp  # noqa: PLC0415

    connector = aiohttp.UnixConnector(path=str(socket_path))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get("http://localhost/version") as response:
            data = await response.json(content_type=None)
    return f"{data.get('Components', [{}])[0].get('Name') or 'engine'} {data.get('Version', '?')} (API {data.get('ApiVersion', '?')})"


def check_runtimes(config: Config) -> list[Check]:
    """Every configured runtime socket: reachable, and its version."""
    out = []
    for endpoint in config.runtimes:
        name = f"runtime {endpoint.name}"
        if not endpoint.socket.exists():
            out.append(Check("runtimes", name, DEGRADED, f"{endpoint.socket} does not exist", f"start {endpoint.name} (make run starts dockerd and podman system service)"))
            continue
        try:
            version = asyncio.run(_runtime_version(endpoint.socket))
        except Exception as exc:  # noqa: BLE001 - any failure to talk to it is the finding
            out.append(Check("runtimes", name, DEGRADED, f"{endpoint.socket} does not answer: {type(exc).__name__}: {exc}", f"restart {endpoint.name}"))
        else:
            out.append(Check("runtimes", name, OK, f"{endpoint.socket}: {version}"))
    if out and all(c.status != OK for c in out):
        out.append(Check("runtimes", "any runtime", MISSING, "no configured runtime answers: no container is watched", "start Docker or Podman's API service"))
    return out


def _cap_effective() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_scanner() -> list[Check]:
    """Whether the /proc/net scanner and the /metrics line formatter were built (C) or run in Python."""
    from . import exporter  # noqa: PLC0415
    from .netns import scan  # noqa: PLC0415

    fix = "apt-get install gcc python3-dev, then reinstall nstap (make run does both)"
    if scan.COMPILED:
        out = [Check("sampling", "/proc/net scanner", OK, "compiled (nstap.netns._scan)")]
    else:
        out = [Check("sampling", "/proc/net scanner", DEGRADED, "not built: /proc/net files are scanned in Python, at several times the CPU per sample", fix)]
    if exporter.COMPILED:
        out.append(Check("sampling", "/metrics line formatter", OK, "compiled (nstap._exposition)"))
    else:
        out.append(Check("sampling", "/metrics line formatter", DEGRADED, "not built: a scrape's lines are formatted in Python, at about twice the CPU", fix))
    return out


def check_process(config: Config) -> list[Check]:
    """/proc of other pids, setns, capabilities."""
    out = []
    proc = config.proc_root
    read, denied, last_error = [], [], ""
    for pid in sorted((int(p.name) for p in proc.iterdir() if p.name.isdigit() and int(p.name) != os.getpid()))[:64]:
        try:
            os.stat(proc / str(pid) / "ns/net")
            (proc / str(pid) / "net/dev").read_bytes()
        except FileNotFoundError:
            continue  # it exited meanwhile
        except OSError as exc:
            denied.append(pid)
            last_error = exc.strerror or str(exc)
        else:
            read.append(pid)
    fix = "run as root (or with CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH), with --pid=host in a container"
    if not read:
        out.append(Check("sampling", "/proc of other pids", MISSING, f"no other process's ns/net readable in {proc} ({last_error or 'no other process'})", fix))
    elif denied:
        # Some processes cannot be read even by root (a non-dumpable init in a sandbox): only a
        # container process among them would matter.
        out.append(Check("sampling", "/proc of other pids", OK, f"{len(read)} of {len(read) + len(denied)} processes readable (not: {', '.join(map(str, denied[:5]))}: {last_error})"))
    else:
        out.append(Check("sampling", "/proc of other pids", OK, f"{len(read)} processes' ns/net and net/dev readable"))
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        try:
            allowed = libc.setns(fd, _CLONE_NEWNET) == 0
            err = ctypes.get_errno()
        finally:
            os.close(fd)
        if allowed:
            out.append(Check("sampling", "setns", OK, "setns(CLONE_NEWNET) allowed"))
        else:
            out.append(Check("sampling", "setns", MISSING, f"setns refused: {os.strerror(err)}", "run as root or with CAP_SYS_ADMIN"))
    except OSError as exc:
        out.append(Check("sampling", "setns", MISSING, str(exc), "run as root or with CAP_SYS_ADMIN"))
    caps = _cap_effective()
    missing = [f"{name} ({why})" for bit, (name, why) in CAPABILITIES.items() if not caps >> bit & 1]
    if missing:
        out.append(Check("process", "capabilities", DEGRADED, "missing: " + "; ".join(missing), "run as root, or grant them (see systemd/nstap.service)"))
    else:
        out.append(Check("process", "capabilities", OK, ", ".join(name for name, _ in CAPABILITIES.values())))
    return out


def check_tools(config: Config) -> list[Check]:
    """tcpdump and nsenter (captures), the iptables and nft back ends (NAT)."""
    out = []
    for tool, why in (("tcpdump", "captures and flight recorders"), ("nsenter", "captures inside namespaces, evidence")):
        path = _which(tool)
        if path:
            version = _run([path, "--version"]).splitlines()
            out.append(Check("captures", tool, OK, f"{path} {version[0] if version else ''}".strip()))
        else:
            package = "tcpdump" if tool == "tcpdump" else "util-linux"
            out.append(Check("captures", tool, MISSING, f"{tool} is not on PATH ({os.environ.get('PATH', '')}) — needed for {why}", f"apt-get install {package}"))
    if not config.nat.enabled:
        out.append(Check("nat", "NAT monitor", OK, "off in the configuration"))
        return out
    save = _which("iptables-save")
    if save:
        version = _run(["iptables", "--version"])
        backend = "nf_tables" if "nf_tables" in version else "legacy" if "legacy" in version else "?"
        out.append(Check("nat", "iptables", OK, f"{version} (back end: {backend})"))
    else:
        out.append(Check("nat", "iptables", MISSING, "iptables-save is not on PATH: port forwards cannot be verified", "apt-get install iptables"))
    nft = _which("nft")
    out.append(Check("nat", "nft", OK, _run(["nft", "--version"])) if nft else Check("nat", "nft", DEGRADED, "nft is not on PATH: native nftables tables are not read", "apt-get install nftables"))
    try:
        count = int(Path("/proc/sys/net/netfilter/nf_conntrack_count").read_text())
        limit = int(Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text())
        out.append(Check("nat", "conntrack", OK, f"{count}/{limit} entries"))
    except (OSError, ValueError):
        out.append(Check("nat", "conntrack", DEGRADED, "nf_conntrack is not loaded: conntrack pressure is not watched", "modprobe nf_conntrack"))
    return out


def check_ebpf(config: Config) -> list[Check]:
    """Everything the drop-reason collector needs, each on its own line."""
    if config.ebpf == "off":
        return [Check("ebpf", "drop reasons", OK, "off in the configuration")]
    bad = MISSING if config.ebpf == "on" else DEGRADED
    out = []
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("privileges", ebpf.need_root),
        ("bcc", ebpf.need_bcc),
        ("kernel headers", ebpf.need_headers),
        ("tracepoints", ebpf.need_tracepoints),
        ("drop reasons", lambda: ebpf.reason_names(ebpf.need_tracepoints())),
        ("BTF", ebpf.need_offsets),
    ]
    for name, step in steps:
        try:
            result = step()
        except ebpf.EbpfUnavailable as exc:
            out.append(Check("ebpf", name, bad, str(exc), _fix_for(name)))
            continue
        if name == "bcc":
            detail = f"bcc {getattr(result, '__version__', '')} at {Path(result.__file__).parent}".replace("  ", " ")
        elif name == "drop reasons":
            detail = f"{len(result)} reasons in this kernel's kfree_skb tracepoint"
        elif name == "BTF":
            detail = f"/sys/kernel/btf/vmlinux: {asdict(result)}"
        else:
            detail = str(result)
        out.append(Check("ebpf", name, OK, detail))
    return out


def check_dns(config: Config) -> list[Check]:
    """What the DNS collector needs: its program loaded and verified, and a TCX link made."""
    if config.dns.mode == "off":
        return [Check("dns", "DNS program", OK, "off in the configuration")]
    bad = MISSING if config.dns.mode == "on" else DEGRADED
    from .dns import service, tcx  # noqa: PLC0415 - only this check needs them

    try:
        steps = asyncio.run(service.probe())
    except tcx.NoTcx as exc:
        return [Check("dns", "DNS program", OK, "compiled and verified"), Check("dns", "TCX links", bad, str(exc), "a kernel of 6.6 or later")]
    except (ebpf.EbpfUnavailable, OSError) as exc:
        return [Check("dns", "DNS program", bad, str(exc), "the eBPF checks above; bpf_get_netns_cookie in tc programs needs Linux 6.14 or later")]
    return [Check("dns", name, OK, detail) for name, detail in steps.items()]


def _fix_for(name: str) -> str:
    return {
        "privileges": "run as root (or with CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN)",
        "bcc": "apt-get install python3-bpfcc; deploy/link-bcc.sh .venv (make run does both)",
        "kernel headers": "deploy/kernel-headers.sh (make run runs it)",
        "tracepoints": "mount -t tracefs nodev /sys/kernel/tracing",
        "drop reasons": "a kernel of 5.17 or later",
        "BTF": "a kernel built with CONFIG_DEBUG_INFO_BTF, and apt-get install bpftool",
    }.get(name, "")


def check_data_dir(config: Config) -> list[Check]:
    """The data dir: writable, and room for the capture budget."""
    path = config.data_dir
    probe = path / ".nstap-doctor"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("x")
        probe.unlink()
    except OSError as exc:
        return [Check("captures", "data dir", MISSING, f"{path}: {exc.strerror or exc}", f"make {path} writable by nstap, or set data_dir")]
    usage = shutil.disk_usage(path)
    budget = config.capture.store_max_bytes + config.capture.ring_bytes
    detail = f"{path} writable; {usage.free / 2**30:.1f} GiB free, capture budget {config.capture.store_max_bytes / 2**30:.2f} GiB"
    if usage.free < budget:
        return [Check("captures", "data dir", DEGRADED, detail + ": less free space than the budget", "free space, or lower capture.store_max_bytes")]
    return [Check("captures", "data dir", OK, detail)]


def run_checks(config: Config) -> list[Check]:
    """Every check, in report order."""
    return [*check_runtimes(config), *check_process(config), *check_scanner(), *check_tools(config), *check_ebpf(config), *check_dns(config), *check_data_dir(config)]


def report(checks: list[Check], as_json: bool) -> str:
    """The table (or JSON) ``nstap doctor`` prints."""
    if as_json:
        return json.dumps({"ok": all(c.status != MISSING for c in checks), "checks": [asdict(c) for c in checks]}, indent=2)
    rows = [("FEATURE", "CHECK", "STATUS", "DETAIL")] + [(c.feature, c.check, c.status, c.detail) for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    for c in checks:
        if c.status != OK and c.fix:
            lines.append(f"{c.status}: {c.feature} {c.check}: fix: {c.fix}")
    return "\n".join(lines)
