"""TCX links: a tc program attached to one interface for as long as the link's descriptor is open.

``BPF_LINK_CREATE`` with ``BPF_TCX_INGRESS``/``BPF_TCX_EGRESS`` (Linux 6.6) attaches a
``sched_cls`` program beside any other tc program (Docker's, Cilium's: ``TCX_NEXT`` hands the packet
on), and the kernel detaches it when the last descriptor of the link is closed, or when the
interface goes. So a daemon that is killed leaves nothing attached behind, which classic tc
filters (netlink ``RTM_NEWTFILTER``) would. The interface index is looked up in the calling
thread's network namespace: :func:`attach_namespace` enters the namespace through the descriptor
the watcher holds, attaches, and comes back.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import struct
from collections.abc import Iterable

from ..ebpf.maps import bpf
from ..netns.handles import CLONE_NEWNET, _setns

BPF_LINK_CREATE = 28
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
SO_NETNS_COOKIE = 71
MAX_INTERFACES = 32  # interfaces of one namespace given links (a container can make thousands)

_u32, _u64 = ctypes.c_uint32, ctypes.c_uint64
_libc = ctypes.CDLL(None, use_errno=True)


class LinkAttr(ctypes.Structure):
    """``union bpf_attr`` for BPF_LINK_CREATE with the tcx member."""

    _fields_ = [("prog_fd", _u32), ("target_ifindex", _u32), ("attach_type", _u32), ("flags", _u32),
                ("relative_fd", _u32), ("_pad", _u32), ("expected_revision", _u64)]


class NoTcx(OSError):
    """This kernel cannot create TCX links (before Linux 6.6)."""


def link_create(prog_fd: int, ifindex: int, attach_type: int) -> int:
    """A TCX link of ``prog_fd`` on interface ``ifindex`` of the calling thread's namespace: its
    descriptor (closing it detaches). NoTcx on a kernel without TCX."""
    try:
        return bpf(BPF_LINK_CREATE, LinkAttr(prog_fd=prog_fd, target_ifindex=ifindex, attach_type=attach_type))
    except OSError as exc:
        if exc.errno == errno.EINVAL and ifindex == 1:  # lo always exists: EINVAL there is the attach type
            raise NoTcx(exc.errno, "this kernel has no TCX links (BPF_TCX_EGRESS needs Linux 6.6 or later)") from None
        raise


def netns_cookie(sock: socket.socket) -> int:
    """The cookie of the namespace ``sock`` was made in (Linux 5.14): unique while the host runs."""
    return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]


class NamespaceLinks:
    """The links of one namespace: by interface index, its descriptors (egress, and ingress but on lo)."""

    def __init__(self, inode: int, cookie: int) -> None:
        self.inode = inode
        self.cookie = cookie
        self.links: dict[int, list[int]] = {}
        self.skipped = 0  # interfaces past MAX_INTERFACES

    def close(self) -> None:
        """Detach everything (close every link)."""
        for fds in self.links.values():
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.links = {}


def _interfaces() -> list[int]:
    """The interface indexes of the calling thread's namespace, lo first."""
    return sorted(index for index, _ in socket.if_nameindex())


def attach_here(links: NamespaceLinks, egress_fd: int, ingress_fd: int) -> int:
    """Give every interface of the calling thread's namespace that has none its links (interfaces
    that went are forgotten: the kernel detached them); how many interfaces were added."""
    present = _interfaces()
    for gone in set(links.links) - set(present):
        for fd in links.links.pop(gone):
            with contextlib.suppress(OSError):
                os.close(fd)
    added = 0
    links.skipped = max(0, len(present) - MAX_INTERFACES)
    for ifindex in present[:MAX_INTERFACES]:
        if ifindex in links.links:
            continue
        fds: list[int] = []
        try:
            fds.append(link_create(egress_fd, ifindex, BPF_TCX_EGRESS))
            if ifindex != 1:  # lo's egress is its ingress: each packet once
                fds.append(link_create(ingress_fd, ifindex, BPF_TCX_INGRESS))
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            if exc.errno in (errno.ENODEV, errno.ENXIO):  # the interface went meanwhile
                continue
            raise
        links.links[ifindex] = fds
        added += 1
    return added


def attach_namespace(ns_fd: int, home_fd: int, inode: int, egress_fd: int, ingress_fd: int, links: NamespaceLinks | None = None) -> NamespaceLinks:
    """Enter the namespace of ``ns_fd`` (blocking: a thread of its own, which comes back to
    ``home_fd``), learn its cookie, and attach on every interface. ``links``: those already made
    (a rescan for new interfaces)."""
    _setns(ns_fd)
    try:
        if links is None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:  # any socket is in a namespace
                links = NamespaceLinks(inode, netns_cookie(probe))
        try:
            attach_here(links, egress_fd, ingress_fd)
        except BaseException:
            if not links.links:
                links.close()
            raise
        return links
    finally:
        try:
            _setns(home_fd)
        except OSError:  # pragma: no cover - a thread left in a container's namespace must not go on
            os.abort()


def try_links(egress_fd: int) -> int:
    """Make and close a link on lo of a namespace made for the purpose (blocking: a thread of its
    own, which comes back to its namespace): NoTcx if this kernel cannot; the scratch
    namespace's cookie otherwise. For ``nstap doctor``."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
                cookie = netns_cookie(probe)
            os.close(link_create(egress_fd, 1, BPF_TCX_EGRESS))
            return cookie
        finally:
            try:
                _setns(home)
            except OSError:  # pragma: no cover
                os.abort()
    finally:
        os.close(home)


def close_all(namespaces: Iterable[NamespaceLinks]) -> None:
    """Detach every namespace's links."""
    for links in namespaces:
        links.close()
