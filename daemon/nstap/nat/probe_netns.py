"""nstap's own network namespace, from which published ports are probed as an outside client would.

A connection from the host to its own address goes out through ``OUTPUT`` and, for a port Docker
publishes, to docker-proxy's socket: not the ``PREROUTING`` DNAT rule a client on the network
meets. So the daemon makes a small namespace of its own, joined to the host by a veth pair::

    probe namespace                      host
    probe0 169.254.252.2/30  <--veth-->  nsp-<id> 169.254.252.1/30
           fd6e:7374:6170::2/64                   fd6e:7374:6170::1/64
    default via 169.254.252.1, default via fd6e:7374:6170::1

A probe's SYN leaves ``probe0`` and enters the host on ``nsp-<id>``: it meets ``PREROUTING``
(the runtimes' DNAT), then ``FORWARD`` to the container's bridge, exactly as a packet from the
network does but for its input interface (rules keyed on ``-i eth0`` are not tried).

The namespace has no name in ``/run/netns``: it lives as long as the daemon's probe thread (which
stays in it) and descriptor do, so a daemon killed with SIGKILL leaves nothing behind but, for a
moment, its half of the veth. The host side is named after the data directory (one daemon per
data directory), so the next start finds a stale one of its own and deletes it
(``probe_netns_recovered``), and never touches another daemon's. The /30 is the first of
``nat.probe.subnet`` that no route of the host overlaps, chosen under a host-wide lock so that
two daemons starting together take different ones; the IPv6 /64 likewise from
``nat.probe.subnet6`` (addresses without duplicate address detection, usable at once). A host
without IPv6 (or with it disabled on new links) gets IPv4 probes only, and the reason is kept.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import hashlib
import ipaddress
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import structlog

from ..netns.evidence import run_tool
from ..netns.handles import CLONE_NEWNET
from ..subprocesses import reap, spawn
from ..threads import worker_threads

log = structlog.get_logger("nstap.probe")

T = TypeVar("T")
LOCK_FILE = Path("/run/nstap-probe.lock")
INSIDE = "probe0"
_libc = ctypes.CDLL(None, use_errno=True)


class ProbeNetnsError(OSError):
    """The probe namespace could not be made (no privilege, no ``ip``, no free subnet)."""


def host_link_name(data_dir: Path) -> str:
    """The host side's name: ``nsp-`` and 8 hex digits of the data directory (IFNAMSIZ - 1 = 15)."""
    return "nsp-" + hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:8]


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PREFIX = {4: 30, 6: 64}  # the link's subnet, per family
MAX_CANDIDATES = 4096  # subnets of a pool looked at (an IPv6 pool holds millions of /64s)


def free_subnet(pool: Network, taken: list[Network]) -> Network | None:
    """The first /30 (IPv4) or /64 (IPv6) of ``pool`` that overlaps none of ``taken`` (the host's
    routes and addresses)."""
    new_prefix = max(PREFIX[pool.version], pool.prefixlen)
    for n, candidate in enumerate(pool.subnets(new_prefix=new_prefix)):
        if n >= MAX_CANDIDATES:
            break
        if not any(candidate.version == t.version and candidate.overlaps(t) for t in taken):
            return candidate
    return None


def _routes(text: str, version: int = 4) -> list[Network]:
    out = []
    try:
        entries = json.loads(text or "[]")
    except ValueError:
        return out
    for entry in entries if isinstance(entries, list) else []:
        dst = entry.get("dst") if isinstance(entry, dict) else None
        if isinstance(dst, str) and dst != "default":
            try:
                out.append(ipaddress.ip_network(dst, strict=False))
            except ValueError:
                continue
    return [n for n in out if n.version == version]


class ProbeNamespace:
    """Makes, holds and removes the probe namespace; runs functions (socket creation) inside it."""

    def __init__(self, data_dir: Path, pool: ipaddress.IPv4Network, lock_file: Path = LOCK_FILE,
                 pool6: ipaddress.IPv6Network | None = None, proc_sys: Path = Path("/proc/sys")) -> None:
        self.name = host_link_name(data_dir)
        self.pool = pool
        self.pool6 = pool6
        self.lock_file = lock_file
        self.proc_sys = proc_sys
        self.subnet: ipaddress.IPv4Network | None = None
        self.host_address = ""
        self.probe_address = ""
        self.error = ""
        self.host_address6 = ""
        self.probe_address6 = ""
        self.error6 = ""  # why there are no IPv6 probes ("" when there are)
        self._fd: int | None = None
        self._thread = worker_threads("nstap-probe")  # lives in the probe namespace once it is made

    @property
    def up(self) -> bool:
        return self._fd is not None

    async def start(self) -> bool:
        """Make the namespace and the veth pair (a stale pair of this daemon's deleted first)."""
        try:
            await self._start()
        except (OSError, ProbeNetnsError) as exc:
            self.error = str(exc)
            log.warning("probe_netns_unavailable", error=self.error, fix="run nstap as root with iproute2 (ip) and nsenter installed")
            await self.stop()
            return False
        log.info("probe_netns_ready", host_link=self.name, host_address=self.host_address, probe_address=self.probe_address,
                 host_address6=self.host_address6, probe_address6=self.probe_address6, ipv6_error=self.error6)
        return True

    def addresses(self, version: int) -> tuple[str, str] | None:
        """(probe address, host-side address) of one family, None if the namespace has none."""
        if self._fd is None:
            return None
        pair = (self.probe_address, self.host_address) if version == 4 else (self.probe_address6, self.host_address6)
        return pair if pair[0] else None

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        lock = await loop.run_in_executor(None, self._lock)
        try:
            if await self._link_exists():
                await self._ip("link", "del", self.name)
                log.warning("probe_netns_recovered", host_link=self.name, reason="left by an earlier run of this daemon")
            routes, err = await run_tool(["ip", "-j", "-4", "route", "show", "table", "all"])
            if err:
                raise ProbeNetnsError(f"ip route: {err}")
            subnet = free_subnet(self.pool, _routes(routes))
            if subnet is None:
                raise ProbeNetnsError(f"no free /30 in nat.probe.subnet {self.pool}")
            self._fd = await loop.run_in_executor(self._thread, self._enter_new)
            hosts = list(subnet.hosts())
            self.subnet, self.host_address, self.probe_address = subnet, str(hosts[0]), str(hosts[1])
            fd = self._fd
            await self._ip("link", "add", self.name, "type", "veth", "peer", "name", INSIDE, "netns", f"/proc/self/fd/{fd}", pass_fd=fd)
            await self._ip("addr", "add", f"{self.host_address}/30", "dev", self.name)
            await self._ip("link", "set", self.name, "up")
            for argv in (["link", "set", "lo", "up"], ["addr", "add", f"{self.probe_address}/30", "dev", INSIDE],
                         ["link", "set", INSIDE, "up"], ["route", "add", "default", "via", self.host_address]):
                await self._ip(*argv, inside=True)
            try:
                await self._start6()
            except ProbeNetnsError as exc:
                self.error6, self.host_address6, self.probe_address6 = str(exc), "", ""
        finally:
            await loop.run_in_executor(None, self._unlock, lock)

    async def _start6(self) -> None:
        """The IPv6 side of the link, if the host has IPv6 on it (ProbeNetnsError saying why not)."""
        if self.pool6 is None:
            raise ProbeNetnsError("nat.probe.subnet6 is empty")
        conf = self.proc_sys / "net/ipv6/conf"
        for where in (conf / self.name, conf / "all"):
            try:
                disabled = (where / "disable_ipv6").read_text().strip() == "1"
            except OSError:
                raise ProbeNetnsError("the host has no IPv6") from None
            if disabled:
                raise ProbeNetnsError(f"IPv6 is disabled ({where}/disable_ipv6 = 1)")
        routes, err = await run_tool(["ip", "-j", "-6", "route", "show", "table", "all"])
        if err:
            raise ProbeNetnsError(f"ip -6 route: {err}")
        subnet = free_subnet(self.pool6, _routes(routes, 6))
        if subnet is None:
            raise ProbeNetnsError(f"no free /64 in nat.probe.subnet6 {self.pool6}")
        host, probe = str(subnet.network_address + 1), str(subnet.network_address + 2)
        await self._ip("-6", "addr", "add", f"{host}/{subnet.prefixlen}", "dev", self.name, "nodad")
        for argv in (["-6", "addr", "add", f"{probe}/{subnet.prefixlen}", "dev", INSIDE, "nodad"], ["-6", "route", "add", "default", "via", host]):
            await self._ip(*argv, inside=True)
        self.host_address6, self.probe_address6 = host, probe

    def _lock(self) -> int:
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    @staticmethod
    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _enter_new(self) -> int:
        """In the probe thread: a new network namespace, which the thread stays in; its descriptor."""
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
        return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    async def _link_exists(self) -> bool:
        out, err = await run_tool(["ip", "-j", "link", "show", "dev", self.name])
        return not err and self.name in out

    async def _ip(self, *argv: str, inside: bool = False, pass_fd: int | None = None) -> None:
        if pass_fd is not None:
            # ``netns /proc/self/fd/N``: the child must inherit the descriptor.
            proc = await spawn(
                "ip", *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                pass_fds=(pass_fd,),
            )
            try:
                _, stderr = await proc.communicate()
            except asyncio.CancelledError:
                await reap(proc)
                raise
            err = stderr.decode(errors="replace").strip() if proc.returncode else ""
        else:
            _, err = await run_tool(["ip", *argv], self._fd if inside else None)
        if err:
            raise ProbeNetnsError(f"ip {' '.join(argv)}: {err}")

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` in the probe namespace (a socket made there stays there)."""
        if self._fd is None:
            raise ProbeNetnsError("the probe namespace is not up")
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    async def stop(self) -> None:
        """Delete the veth pair (both ends go) and let the namespace go with its last reference."""
        if self.subnet is not None or self._fd is not None:
            if await self._link_exists():
                try:
                    await self._ip("link", "del", self.name)
                except ProbeNetnsError as exc:
                    log.warning("probe_netns_cleanup_failed", host_link=self.name, error=str(exc))
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._thread.shutdown(wait=True)  # the thread, the namespace's other reference, ends


def tcp_socket(family: int = socket.AF_INET) -> socket.socket:
    """A non-blocking TCP socket in the calling thread's namespace."""
    return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)


def udp_socket(family: int = socket.AF_INET) -> socket.socket:
    """A non-blocking UDP socket in the calling thread's namespace."""
    return socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)

