"""What an engineer gathers by hand in a namespace in the first minute, gathered by nstap.

``ss -tinm``, ``ss -uanm``, ``ip -s link``, ``ip addr``, ``ip route``, ``ip neigh``, the
namespace's firewall and ``nstat``: one snapshot, taken when a capture starts and again when it
ends, off the sampling path.

* Sockets and protocol counters are read in a worker thread that enters the namespace through the
  descriptor its watcher holds (``setns``), opens its own netlink socket there, dumps, and comes
  back: no fork. TCP sockets come from sock_diag with ``INET_DIAG_INFO`` (``struct tcp_info``:
  retransmits, RTT, congestion window), parsed by hand for speed (10,000 sockets in tens of
  milliseconds), and at most ``limit`` are listed, with the count of the rest.
* Interfaces, addresses, routes and neighbours come from ``ip -json`` and the firewall from
  ``iptables-save``/``ip6tables-save``/``nft list ruleset``, run under ``nsenter`` through a
  duplicate of the same descriptor (as tcpdump is): small outputs, one fork each per snapshot,
  with a time limit and an output cap.

Everything here is hostile input sized by the container: lists are bounded, texts are cut.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..gate import ROUND
from ..subprocesses import reap, spawn
from . import netlink
from .handles import _setns
from ..threads import worker_threads

T = TypeVar("T")

SOCKET_LIMIT = 5000
TOOL_TIMEOUT = 5.0  # seconds one ip/iptables/nft run may take
TOOL_OUTPUT_CAP = 1 << 20  # bytes of one tool's output kept
LIST_CAP = 1000  # interfaces, addresses, routes, neighbours kept per snapshot

TCP_STATE_NAMES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
    7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV",
}
ALL_STATES = 0xFFF << 1
INET_DIAG_INFO = 2
_REQ = struct.Struct("=BBBxI")
_MSG = struct.Struct("=BBBBHH16s16sIQIIIII")  # inet_diag_msg, sport/dport read big-endian below
_PORTS = struct.Struct(">HH")
_ATTR = struct.Struct("=HH")
# struct tcp_info: 8 one-byte fields, then u32s; the stable first part (Linux >= 2.6).
_TCP_INFO = struct.Struct("=BBBBBBBB24I")
_TCP_INFO_FIELDS = (
    "rto", "ato", "snd_mss", "rcv_mss", "unacked", "sacked", "lost", "retrans", "fackets",
    "last_data_sent", "last_ack_sent", "last_data_recv", "last_ack_recv", "pmtu", "rcv_ssthresh",
    "rtt", "rttvar", "snd_ssthresh", "snd_cwnd", "advmss", "reordering", "rcv_rtt", "rcv_space", "total_retrans",
)


def _address(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw[:4] if family == socket.AF_INET else raw)


def _endpoint(family: int, raw: bytes, port: int) -> str:
    addr = _address(family, raw)
    return f"[{addr}]:{port}" if family == socket.AF_INET6 else f"{addr}:{port}"


def parse_tcp_message(data: bytes, off: int, length: int) -> dict[str, Any]:
    """One sock_diag answer (inet_diag_msg and its attributes) as a socket entry."""
    base = off + 16
    family, state, _timer, retrans, _sp, _dp, src, dst, ifindex, _cookie, _expires, rqueue, wqueue, uid, inode = _MSG.unpack_from(data, base)
    sport, dport = _PORTS.unpack_from(data, base + 4)
    entry: dict[str, Any] = {
        "state": TCP_STATE_NAMES.get(state, str(state)),
        "local": _endpoint(family, src, sport),
        "peer": _endpoint(family, dst, dport),
        "recv_q": rqueue,
        "send_q": wqueue,
        "retransmits": retrans,
        "uid": uid,
        "inode": inode,
    }
    if ifindex:
        entry["ifindex"] = ifindex
    pos = base + _MSG.size
    end = off + length
    while pos + 4 <= end:
        alen, atype = _ATTR.unpack_from(data, pos)
        if alen < 4:
            break
        if atype & 0x3FFF == INET_DIAG_INFO and alen - 4 >= _TCP_INFO.size:
            values = _TCP_INFO.unpack_from(data, pos + 4)
            info = dict(zip(_TCP_INFO_FIELDS, values[8:]))
            entry["rtt_ms"] = info["rtt"] / 1000
            entry["rttvar_ms"] = info["rttvar"] / 1000
            entry["rto_ms"] = info["rto"] / 1000
            entry["cwnd"] = info["snd_cwnd"]
            entry["ssthresh"] = info["snd_ssthresh"] if info["snd_ssthresh"] < 0xFFFF else None
            entry["mss"] = info["snd_mss"]
            entry["pmtu"] = info["pmtu"]
            entry["unacked"] = info["unacked"]
            entry["lost"] = info["lost"]
            entry["retrans_now"] = info["retrans"]
            entry["total_retrans"] = info["total_retrans"]
            entry["backoff"] = values[4]
            entry["last_data_recv_ms"] = info["last_data_recv"]
            entry["last_ack_recv_ms"] = info["last_ack_recv"]
        pos += (alen + 3) & ~3
    return entry


def tcp_sockets_here(limit: int = SOCKET_LIMIT) -> tuple[list[dict[str, Any]], int, dict[str, int]]:
    """TCP sockets of the calling thread's namespace: (the first ``limit``, how many in all, count by state)."""
    listed: list[dict[str, Any]] = []
    total = 0
    states: dict[str, int] = {}
    sock = netlink.open_socket(netlink.NETLINK_SOCK_DIAG)
    try:
        for family in (socket.AF_INET, socket.AF_INET6):
            seq = netlink._next_seq()
            body = _REQ.pack(family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), ALL_STATES) + bytes(48)
            sock.send(netlink._NLMSGHDR.pack(16 + len(body), netlink.SOCK_DIAG_BY_FAMILY, netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP, seq, 0) + body)
            for _mtype, data, off in netlink._messages(sock, seq):
                ROUND.pause()  # a container's 100,000 sockets: the round goes first (see nstap.gate)
                total += 1
                state = TCP_STATE_NAMES.get(data[off + 17], str(data[off + 17]))
                states[state] = states.get(state, 0) + 1
                if len(listed) < limit:
                    (length,) = netlink._U32.unpack_from(data, off)
                    listed.append(parse_tcp_message(data, off, length))
    finally:
        sock.close()
    return listed, total, states


def parse_udp_table(text: str, family: int, limit: int) -> tuple[list[dict[str, Any]], int]:
    """``/proc/net/udp`` or ``udp6``: (the first ``limit`` sockets with queues and drops, how many in all)."""
    out: list[dict[str, Any]] = []
    total = 0
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 13:
            continue
        total += 1
        if len(out) >= limit:
            continue
        try:
            local, peer = (_proc_endpoint(family, x) for x in (f[1], f[2]))
            tx_q, rx_q = (int(x, 16) for x in f[4].split(":"))
            out.append({"local": local, "peer": peer, "recv_q": rx_q, "send_q": tx_q, "inode": int(f[9]), "drops": int(f[-1])})
        except ValueError:
            continue
    return out, total


def _proc_endpoint(family: int, text: str) -> str:
    """``0100007F:0035`` (the kernel's host-order hex words) as ``127.0.0.1:53``."""
    addr_hex, port_hex = text.split(":")
    raw = bytes.fromhex(addr_hex)
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return _endpoint(family, raw, int(port_hex, 16))


def parse_counter_file(text: str) -> dict[str, int]:
    """``/proc/net/snmp`` or ``netstat`` as ``{"Tcp.RetransSegs": n, ...}`` (every counter)."""
    out: dict[str, int] = {}
    lines = text.splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        section, _, keys = names.partition(":")
        vsection, _, vals = values.partition(":")
        if section != vsection:
            continue
        for key, value in zip(keys.split(), vals.split()):
            try:
                out[f"{section}.{key}"] = int(value)
            except ValueError:
                continue
    return out


def counter_deltas(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The counters that moved between two readings, like ``nstat`` (gauges such as CurrEstab included)."""
    return {k: after[k] - before[k] for k in after if k in before and after[k] != before[k]}


def _read(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(TOOL_OUTPUT_CAP * 4).decode("ascii", "replace")
    except OSError:
        return ""


def sockets_and_counters_here(proc_root: Path = Path("/proc"), limit: int = SOCKET_LIMIT) -> dict[str, Any]:
    """The namespace-side part of a snapshot, read in the calling thread's namespace."""
    started = time.process_time()
    net = proc_root / "thread-self/net"
    tcp, tcp_total, tcp_states = tcp_sockets_here(limit)
    udp, udp_total = parse_udp_table(_read(net / "udp"), socket.AF_INET, limit)
    udp6, udp6_total = parse_udp_table(_read(net / "udp6"), socket.AF_INET6, max(0, limit - len(udp)))
    counters = {**parse_counter_file(_read(net / "snmp")), **parse_counter_file(_read(net / "netstat"))}
    return {
        "tcp": {"sockets": tcp, "total": tcp_total, "not_listed": tcp_total - len(tcp), "states": tcp_states},
        "udp": {"sockets": udp + udp6, "total": udp_total + udp6_total, "not_listed": udp_total + udp6_total - len(udp) - len(udp6)},
        "counters": counters,
        "cpu_seconds": round(time.process_time() - started, 4),
    }


class NamespaceRunner:
    """Runs functions inside a namespace, in a worker thread that enters it and comes back.

    Its own thread: a snapshot of a namespace with many sockets never delays the opening of a new
    watcher's handles.
    """

    def __init__(self) -> None:
        self._executor = worker_threads("nstap-evidence")
        self._home_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    async def run(self, ns_fd: int, fn: Callable[[], T]) -> T:
        """``fn()`` in the namespace behind ``ns_fd`` (which must stay open until this returns)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, ns_fd, fn)

    def _run(self, ns_fd: int, fn: Callable[[], T]) -> T:
        _setns(ns_fd)
        try:
            return fn()
        finally:
            try:
                _setns(self._home_fd)
            except OSError:  # pragma: no cover - this thread would go on in the wrong namespace
                os.abort()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        os.close(self._home_fd)


def _tool(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin")


async def run_tool(argv: list[str], ns_fd: int | None = None, timeout: float = TOOL_TIMEOUT, cap: int = TOOL_OUTPUT_CAP) -> tuple[str, str]:
    """Run a tool (in the namespace behind ``ns_fd``, through nsenter); (stdout, error) with a time
    limit and an output cap (output beyond it is an error: a truncated ruleset would lie)."""
    tool = _tool(argv[0])
    if tool is None:
        return "", f"{argv[0]} is not installed"
    full = [tool, *argv[1:]]
    pass_fds: tuple[int, ...] = ()
    if ns_fd is not None:
        nsenter = _tool("nsenter")
        if nsenter is None:
            return "", "nsenter is not installed"
        full = [nsenter, f"--net=/proc/self/fd/{ns_fd}", "--", *full]
        pass_fds = (ns_fd,)
    try:
        proc = await spawn(
            *full, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, pass_fds=pass_fds,
        )
    except OSError as exc:
        return "", f"cannot run {argv[0]}: {exc}"
    try:
        out, err, over = await asyncio.wait_for(_read_capped(proc, cap), timeout)
    except asyncio.TimeoutError:
        await reap(proc)
        return "", f"{argv[0]} took longer than {timeout:g}s"
    except asyncio.CancelledError:
        await reap(proc)
        raise
    text = out.decode("utf-8", "replace")
    if over:
        return text, f"{argv[0]} printed more than {cap} bytes"
    if proc.returncode != 0:
        return text, (err.decode("utf-8", "replace").strip().splitlines() or [f"exit code {proc.returncode}"])[-1][:500]
    return text, ""


async def _read_capped(proc: asyncio.subprocess.Process, cap: int) -> tuple[bytes, bytes, bool]:
    """A tool's stdout as it comes, up to ``cap`` bytes (beyond, the tool is killed at once: what a
    container's firewall makes it print is never all held in memory), its stderr's last 64 KiB,
    and whether it went over."""
    assert proc.stdout is not None and proc.stderr is not None

    async def tail(stream: asyncio.StreamReader) -> bytes:
        kept = b""
        while chunk := await stream.read(1 << 16):
            kept = (kept + chunk)[-(1 << 16):]
        return kept

    errors = asyncio.ensure_future(tail(proc.stderr))
    chunks: list[bytes] = []
    size = 0
    over = False
    try:
        while chunk := await proc.stdout.read(1 << 16):
            size += len(chunk)
            if size > cap:
                over = True
                chunks.append(chunk[: cap - (size - len(chunk))])
                await reap(proc)
                break
            chunks.append(chunk)
        err = await errors
        await proc.wait()
    finally:
        if not errors.done():
            errors.cancel()
    return b"".join(chunks), err, over


async def ip_json(args: list[str], ns_fd: int | None) -> tuple[list[Any], str]:
    """``ip -json ARGS`` as a bounded list, with the error if it failed."""
    text, error = await run_tool(["ip", "-json", *args], ns_fd)
    if error and not text:
        return [], error
    try:
        data = json.loads(text or "[]")
    except ValueError:
        return [], f"ip {' '.join(args)}: unreadable output"
    return (data[:LIST_CAP] if isinstance(data, list) else []), error


async def ip_state(ns_fd: int | None) -> dict[str, Any]:
    """Interfaces with counters and addresses, routes (both families), neighbours."""
    (links, e1), (routes4, e2), (routes6, e3), (neigh, e4) = await asyncio.gather(
        ip_json(["-stats", "addr", "show"], ns_fd),
        ip_json(["-4", "route", "show", "table", "all"], ns_fd),
        ip_json(["-6", "route", "show", "table", "all"], ns_fd),
        ip_json(["neigh", "show"], ns_fd),
    )
    errors = [e for e in (e1, e2, e3, e4) if e]
    out: dict[str, Any] = {"interfaces": links, "routes": routes4 + routes6, "neighbours": neigh}
    if errors:
        out["errors"] = errors
    return out


async def host_interfaces(names: list[str]) -> list[Any]:
    """The host ends of the container's veths (in nstap's own namespace) with counters and addresses."""
    out: list[Any] = []
    for name in names[:16]:
        links, error = await ip_json(["-stats", "addr", "show", "dev", name], None)
        out.extend(links if not error else [{"ifname": name, "error": error}])
    return out


async def firewall_rules(ns_fd: int) -> dict[str, str]:
    """The namespace's own firewall, as the tools print it (a tool that is missing says so)."""
    names = ("iptables", "ip6tables", "nftables")
    runs = await asyncio.gather(
        run_tool(["iptables-save", "-c"], ns_fd),
        run_tool(["ip6tables-save", "-c"], ns_fd),
        run_tool(["nft", "list", "ruleset"], ns_fd),
    )
    return {name: (text if not error else f"# {error}\n{text}") for name, (text, error) in zip(names, runs)}


def interesting_neighbours(neighbours: list[Any]) -> list[Any]:
    """The neighbour entries people miss: FAILED and INCOMPLETE."""
    return [n for n in neighbours if isinstance(n, dict) and set(n.get("state") or []) & {"FAILED", "INCOMPLETE"}]

