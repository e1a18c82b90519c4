"""Per-namespace handles, opened once inside the namespace and kept for the watcher's lifetime.

A file under ``/proc/thread-self/net/`` and a netlink socket both bind to the network namespace of
the thread that opens them, and stay bound to it (holding a reference) until closed, whatever
happens to the process that created the namespace. So nstap opens them from one dedicated thread
that ``setns()``-es into the namespace, opens everything, and comes straight back; sampling then
needs no namespace switch, no fork and no child process (pyroute2's netns sockets fork one each).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from . import netlink
from ..threads import worker_threads

CLONE_NEWNET = 0x40000000
PROC_NET_FILES = ("dev", "snmp", "netstat", "sockstat", "sockstat6", "ip_tables_names", "ip6_tables_names")
OPTIONAL_PROC_FILES = frozenset({"sockstat6", "ip_tables_names", "ip6_tables_names"})  # no IPv6, no legacy iptables
RECORD_FILES = frozenset({"dev"})  # one seq_file record per line; the others are printed as one

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python >= 3.12
        os.setns(fd, CLONE_NEWNET)
        return
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class ProcFile:
    """A /proc file kept open; :meth:`read` returns its whole current content.

    Two kinds of seq_file matter here. snmp, netstat and sockstat print one record (single_open):
    one ``pread`` with a large enough buffer returns all of it, and a second ``pread`` would make
    the kernel print it all again. dev prints one record per interface and a read stops at a page
    (4 KiB) worth of records, so it is read on until a short chunk shows the end was reached.
    """

    __slots__ = ("fd", "records", "_size")

    PAGE = 4096
    RECORD_MAX = 512  # longer than any /proc/net/dev line

    def __init__(self, fd: int, records: bool = False) -> None:
        self.fd = fd
        self.records = records
        self._size = 1 << 14

    def read(self) -> bytes:
        """The file's content, read now."""
        if not self.records:
            while True:
                data = os.pread(self.fd, self._size, 0)
                if len(data) < self._size - self.PAGE:
                    return data
                self._size *= 2
        chunks = []
        offset = 0
        while True:
            chunk = os.pread(self.fd, self._size, offset)
            chunks.append(chunk)
            offset += len(chunk)
            if len(chunk) <= self.PAGE - self.RECORD_MAX:
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class NamespaceGone(OSError):
    """The process or namespace disappeared before its handles could be opened."""


@dataclass
class NamespaceHandles:
    """Descriptors bound to one network namespace. Close them to let the namespace go."""

    inode: int
    ns_fd: int
    proc: dict[str, ProcFile]
    rtnl: socket.socket
    rtnl_events: socket.socket
    diag: socket.socket
    diag_walk: socket.socket
    local_port_range: tuple[int, int]
    nfnl: socket.socket | None = None  # nfnetlink: the namespace's nftables generation id
    nft_events: socket.socket | None = None  # nfnetlink subscribed to the namespace's nftables changes
    closed: bool = field(default=False)

    def close(self) -> None:
        """Close every descriptor; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        for sock in (self.rtnl, self.rtnl_events, self.diag, self.diag_walk, self.nfnl, self.nft_events):
            if sock is not None:
                sock.close()
        for f in self.proc.values():
            os.close(f.fd)
        os.close(self.ns_fd)


def _open_here(ns_fd: int, inode: int, proc_root: Path) -> NamespaceHandles:
    """Open everything in the calling thread's current namespace."""
    proc: dict[str, ProcFile] = {}
    socks: list[socket.socket] = []
    try:
        for name in PROC_NET_FILES:
            try:
                proc[name] = ProcFile(os.open(proc_root / "thread-self/net" / name, os.O_RDONLY | os.O_CLOEXEC), records=name in RECORD_FILES)
            except FileNotFoundError:
                if name not in OPTIONAL_PROC_FILES:
                    raise
        socks.append(netlink.open_socket(netlink.NETLINK_ROUTE))
        socks.append(netlink.open_socket(netlink.NETLINK_ROUTE, netlink.RTMGRP_LINK))
        socks.append(netlink.open_socket(netlink.NETLINK_SOCK_DIAG))
        socks.append(netlink.open_socket(netlink.NETLINK_SOCK_DIAG))
        try:
            nfnl: socket.socket | None = netlink.open_socket(netlink.NETLINK_NETFILTER)
        except OSError:  # no nf_tables in this kernel: the firewall sampler reports it
            nfnl = None
        else:
            socks.append(nfnl)
        nft_events = netlink.open_nft_events() if nfnl is not None else None
        if nft_events is not None:
            socks.append(nft_events)
        port_range = _read_port_range(proc_root)
    except BaseException:
        for sock in socks:
            sock.close()
        for f in proc.values():
            os.close(f.fd)
        raise
    return NamespaceHandles(inode, ns_fd, proc, socks[0], socks[1], socks[2], socks[3], port_range, nfnl, nft_events)


def _read_port_range(proc_root: Path) -> tuple[int, int]:
    """This namespace's ephemeral port range (a per-namespace sysctl)."""
    try:
        low, high = (proc_root / "sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _close_unclaimed(opening: asyncio.Future) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


class NamespaceOpener:
    """Opens :class:`NamespaceHandles` from one thread that enters each namespace and comes back."""

    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        self.proc_root = proc_root
        self._executor = worker_threads("nstap-netns")
        self._home_fd = os.open(proc_root / "thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.home_inode = os.fstat(self._home_fd).st_ino

    async def open(self, pid: int, expect_inode: int | None = None) -> NamespaceHandles:
        """Handles for the network namespace of ``pid`` (checked against ``expect_inode``).

        A caller cancelled while the thread opens them (its container went away at once) does not
        leak them: they are closed as soon as the thread is done.
        """
        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(self._executor, self._open_in, pid, expect_inode)
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_unclaimed)
            raise

    def open_home(self) -> NamespaceHandles:
        """Handles for nstap's own (the host's) namespace, opened in the calling thread."""
        ns_fd = os.dup(self._home_fd)
        try:
            return _open_here(ns_fd, self.home_inode, self.proc_root)
        except BaseException:
            os.close(ns_fd)
            raise

    def _open_in(self, pid: int, expect_inode: int | None) -> NamespaceHandles:
        try:
            ns_fd = os.open(self.proc_root / str(pid) / "ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise NamespaceGone(exc.errno, f"process {pid} is gone") from exc
        try:
            inode = os.fstat(ns_fd).st_ino
            if expect_inode is not None and inode != expect_inode:
                raise NamespaceGone(0, f"process {pid} is in namespace {inode}, expected {expect_inode}")
            _setns(ns_fd)
            try:
                return _open_here(ns_fd, inode, self.proc_root)
            finally:
                # Coming back cannot fail for a valid fd of our own namespace; if it ever did, this
                # thread would open the next namespace's handles in the wrong place: stop for real.
                try:
                    _setns(self._home_fd)
                except OSError:  # pragma: no cover
                    os.abort()
        except BaseException:
            os.close(ns_fd)
            raise

    def close(self) -> None:
        """Stop the opener thread."""
        self._executor.shutdown(wait=True)
        os.close(self._home_fd)
