"""Minimal netlink: the few rtnetlink and sock_diag requests nstap makes, built and parsed by hand.

pyroute2 parses every attribute of every message into Python objects; a kept-open pyroute2 link
dump costs about 1.2 ms, which alone is four times nstap's whole per-container budget. These
functions read only the fields nstap exports, with ``struct.unpack_from`` on the received buffer.

Every socket here is non-blocking: the kernel produces a dump's first batch during ``send`` and the
next ones during ``recv``, so a dump never has to wait; ``EAGAIN`` in the middle of a dump is an
error, not a reason to block the event loop.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from ..gate import ROUND

NETLINK_ROUTE = 0
NETLINK_SOCK_DIAG = 4
NETLINK_NETFILTER = 12

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300

RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWNSID = 88
RTM_GETNSID = 90
RTMGRP_LINK = 0x1

IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINK = 5
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1
IFLA_LINK_NETNSID = 37

NETNSA_NSID = 1
NETNSA_FD = 3

IFF_UP = 0x1
IFF_RUNNING = 0x40

SOCK_DIAG_BY_FAMILY = 20

_NLMSGHDR = struct.Struct("=LHHLL")
_IFINFOMSG = struct.Struct("=BxHiII")
_NLATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_S32 = struct.Struct("=i")
# inet_diag_msg: family, state, timer, retrans, sport, dport (network order) ... rqueue, wqueue.
_DIAG_HEAD = struct.Struct("=BBBB")  # family, state, timer, retransmits
_DIAG_PORTS = struct.Struct(">H")
_DIAG_QUEUES = struct.Struct("=II")
_DIAG_QUEUES_OFFSET = 56  # offsetof(struct inet_diag_msg, idiag_rqueue)

_RECV_SIZE = 1 << 16


class NetlinkError(OSError):
    """The kernel answered a netlink request with an error."""


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """One network interface as rtnetlink describes it (no counters: those come from /proc/net/dev)."""

    ifindex: int
    name: str
    up: bool
    mtu: int
    kind: str
    link: int  # IFLA_LINK: the peer's ifindex for a veth (in the peer's namespace), else 0
    link_netnsid: int  # IFLA_LINK_NETNSID: the peer namespace's id as this namespace sees it; -1 if none


def open_socket(protocol: int, groups: int = 0) -> socket.socket:
    """A non-blocking, close-on-exec netlink socket in the calling thread's network namespace."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, protocol)
    try:
        sock.bind((0, groups))
    except OSError:
        sock.close()
        raise
    return sock


def receive(sock: socket.socket) -> bytes:
    """The next batch of a dump's answers (the kernel makes it during this call)."""
    try:
        data = sock.recv(_RECV_SIZE)
    except BlockingIOError as exc:
        raise NetlinkError(errno.EAGAIN, "netlink dump stalled") from exc
    if not data:
        raise NetlinkError(errno.EPIPE, "netlink socket closed")
    return data


def _messages(sock: socket.socket, seq: int) -> Iterator[tuple[int, bytes, int]]:
    """Yield (type, buffer, offset) for each message answering request ``seq`` until NLMSG_DONE."""
    while True:
        data = receive(sock)
        off = 0
        end = len(data)
        while off + 16 <= end:
            length, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
            if length < 16:
                raise NetlinkError(errno.EPROTO, "truncated netlink message")
            if mseq == seq:
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    (code,) = _S32.unpack_from(data, off + 16)
                    if code:
                        raise NetlinkError(-code, "netlink: " + os.strerror(-code))
                    return  # an ACK
                yield mtype, data, off
            off += (length + 3) & ~3


def send(sock: socket.socket, mtype: int, body: bytes, flags: int = NLM_F_REQUEST | NLM_F_DUMP) -> int:
    """Send one request; its sequence number (its answers carry it)."""
    seq = _next_seq()
    sock.send(_NLMSGHDR.pack(16 + len(body), mtype, flags, seq, 0) + body)
    return seq


def request(sock: socket.socket, mtype: int, body: bytes, flags: int = NLM_F_REQUEST | NLM_F_DUMP) -> Iterator[tuple[int, bytes, int]]:
    """Send one request and yield (type, buffer, offset) of every answer message. Read it to the
    end: a dump left half-read makes the socket's next dump fail (EBUSY)."""
    seq = send(sock, mtype, body, flags)
    yield from _messages(sock, seq)


NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
_GETGEN = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
_NFGENMSG = struct.pack("=BBH", 0, 0, 0)


def nft_generation(sock: socket.socket) -> int:
    """The nftables generation id of the socket's namespace: it moves on every ruleset commit
    (not on counter updates); 1 in a namespace nothing was ever committed to. About 5 µs here,
    against 130 µs through pyroute2's NFTSocket: per namespace and sample, that difference is
    the whole per-sample budget."""
    for mtype, data, off in request(sock, _GETGEN, _NFGENMSG, NLM_F_REQUEST):
        if mtype & 0xFF != NFT_MSG_NEWGEN:
            continue
        end = off + _NLMSGHDR.unpack_from(data, off)[0]
        pos = off + 20
        while pos + 4 <= end:
            length, kind = _NLATTR.unpack_from(data, pos)
            if length < 4:
                break
            if kind & 0x3FFF == NFTA_GEN_ID and length >= 8:
                return struct.unpack_from(">I", data, pos + 4)[0]
            pos += (length + 3) & ~3
    raise NetlinkError(errno.EPROTO, "no nftables generation id in the answer")


NFNLGRP_NFTABLES = 7
EVENTS_RCVBUF = 4096  # bytes: notifications only say "changed"; an overflow (ENOBUFS) says it as well


def open_nft_events() -> socket.socket | None:
    """A socket told of every nftables commit in the calling thread's namespace (None if the kernel
    refuses the subscription). Its receive buffer is small on purpose: a container committing a
    50,000-rule ruleset overflows it at once, which costs nothing and reads as "changed"."""
    try:
        sock = open_socket(NETLINK_NETFILTER, 1 << (NFNLGRP_NFTABLES - 1))
    except OSError:
        return None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, EVENTS_RCVBUF)
    return sock


NFT_MSG_NEWTABLE = 0
NFT_MSG_GETTABLE = 1
NFTA_TABLE_NAME = 1
_GETTABLE = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE


def nft_tables(sock: socket.socket) -> list[tuple[int, str]]:
    """(nfproto family, name) of every nftables table of the socket's namespace (a dump)."""
    out = []
    for mtype, data, off in request(sock, _GETTABLE, _NFGENMSG):
        if mtype & 0xFF != NFT_MSG_NEWTABLE:
            continue
        family = data[off + 16]
        end = off + _NLMSGHDR.unpack_from(data, off)[0]
        pos = off + 20
        while pos + 4 <= end:
            length, kind = _NLATTR.unpack_from(data, pos)
            if length < 4:
                break
            if kind & 0x3FFF == NFTA_TABLE_NAME:
                out.append((family, data[pos + 4 : pos + length].split(b"\0", 1)[0].decode("utf-8", "replace")))
                break
            pos += (length + 3) & ~3
    return out


def drain(sock: socket.socket) -> bool:
    """Read every queued notification; True if any arrived (or some were lost to an overflow)."""
    seen = False
    while True:
        try:
            data = sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return seen
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:  # the kernel dropped notifications: treat as "changed"
                seen = True
                continue
            raise
        if not data:
            return seen
        seen = True


def queued(sock: socket.socket, kept: list[bytes], cap: int) -> bool:
    """Append every queued notification batch to ``kept``; False (and ``kept`` emptied) when they
    are more than ``cap`` bytes in all or the kernel dropped some: then only a new dump tells."""
    size = sum(map(len, kept))
    while True:
        try:
            data = sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return True
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            data = b""
            size = cap + 1  # the kernel dropped notifications: what is kept is not the whole story
        size += len(data)
        if size > cap:
            kept.clear()
            drain(sock)
            return False
        if not data:
            return True
        kept.append(data)


def link_changes(batches: list[bytes]) -> Iterator[int]:
    """The ifindex of each RTM_NEWLINK/RTM_DELLINK notification in ``batches``, in order.

    What a notification carries is not trusted as the link's state: the peer of a veth pair is
    announced before its other end exists (no IFLA_LINK yet), a veth whose peer moves to another
    namespace changes IFLA_LINK_NETNSID unannounced, and AF_BRIDGE ones are about a bridge port
    (partial, and a DELLINK of those only means the port left its bridge). Ask with
    :func:`get_link`.
    """
    for data in batches:
        off, end = 0, len(data)
        while off + 32 <= end:
            length, mtype = _NLMSGHDR.unpack_from(data, off)[:2]
            if length < 16:
                break
            family, _type, ifindex = _IFINFOMSG.unpack_from(data, off + 16)[:3]
            if family == 0 and mtype in (RTM_NEWLINK, RTM_DELLINK):
                yield ifindex
            off += (length + 3) & ~3


def get_link(sock: socket.socket, ifindex: int) -> LinkInfo | None:
    """The metadata of interface ``ifindex`` now; None if there is none."""
    seq = send(sock, RTM_GETLINK, _IFINFOMSG.pack(0, 0, ifindex, 0, 0), NLM_F_REQUEST)
    while True:
        data = receive(sock)
        off, end = 0, len(data)
        while off + 16 <= end:
            length, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
            if length < 16:
                raise NetlinkError(errno.EPROTO, "truncated netlink message")
            if mseq == seq:
                if mtype == RTM_NEWLINK:
                    return parse_link(data, off)
                if mtype == NLMSG_ERROR:
                    (code,) = _S32.unpack_from(data, off + 16)
                    if code in (-errno.ENODEV, 0):
                        return None
                    raise NetlinkError(-code, "netlink: " + os.strerror(-code))
            off += (length + 3) & ~3


_seq = 0


def _next_seq() -> int:
    global _seq
    _seq = (_seq + 1) & 0x7FFFFFFF or 1
    return _seq


def dump_links(sock: socket.socket) -> list[LinkInfo]:
    """RTM_GETLINK dump of every interface in the socket's namespace."""
    seq = _next_seq()
    body = _IFINFOMSG.pack(0, 0, 0, 0, 0)
    sock.send(_NLMSGHDR.pack(16 + len(body), RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
    links = []
    for mtype, data, off in _messages(sock, seq):
        if mtype == RTM_NEWLINK:
            links.append(parse_link(data, off))
    return links


def parse_link(data: bytes, off: int) -> LinkInfo:
    """Parse one RTM_NEWLINK message that starts at ``off`` in ``data``."""
    (length,) = _U32.unpack_from(data, off)
    end = off + length
    _family, _type, ifindex, flags, _change = _IFINFOMSG.unpack_from(data, off + 16)
    name = ""
    mtu = 0
    kind = ""
    link = 0
    link_netnsid = -1
    pos = off + 32
    while pos + 4 <= end:
        alen, atype = _NLATTR.unpack_from(data, pos)
        if alen < 4:
            break
        atype &= 0x3FFF
        if atype == IFLA_IFNAME:
            name = data[pos + 4 : pos + alen].rstrip(b"\0").decode("utf-8", "replace")
        elif atype == IFLA_MTU:
            (mtu,) = _U32.unpack_from(data, pos + 4)
        elif atype == IFLA_LINK:
            (link,) = _U32.unpack_from(data, pos + 4)
        elif atype == IFLA_LINK_NETNSID:
            (link_netnsid,) = _S32.unpack_from(data, pos + 4)
        elif atype == IFLA_LINKINFO:
            kind = _info_kind(data, pos + 4, pos + alen)
        pos += (alen + 3) & ~3
    up = bool(flags & IFF_UP) and bool(flags & IFF_RUNNING)
    return LinkInfo(ifindex, name, up, mtu, kind, link, link_netnsid)


def _info_kind(data: bytes, pos: int, end: int) -> str:
    while pos + 4 <= end:
        alen, atype = _NLATTR.unpack_from(data, pos)
        if alen < 4:
            break
        if atype & 0x3FFF == IFLA_INFO_KIND:
            return data[pos + 4 : pos + alen].rstrip(b"\0").decode("ascii", "replace")
        pos += (alen + 3) & ~3
    return ""


def get_nsid(sock: socket.socket, netns_fd: int) -> int:
    """The id the socket's namespace has assigned to the namespace behind ``netns_fd``; -1 if none."""
    seq = _next_seq()
    body = b"\0\0\0\0" + _NLATTR.pack(8, NETNSA_FD) + _U32.pack(netns_fd)
    sock.send(_NLMSGHDR.pack(16 + len(body), RTM_GETNSID, NLM_F_REQUEST, seq, 0) + body)
    for mtype, data, off in _messages(sock, seq):
        if mtype != RTM_NEWNSID:
            continue
        (length,) = _U32.unpack_from(data, off)
        pos, end = off + 20, off + length
        while pos + 4 <= end:
            alen, atype = _NLATTR.unpack_from(data, pos)
            if alen < 4:
                break
            if atype & 0x3FFF == NETNSA_NSID:
                (nsid,) = _S32.unpack_from(data, pos + 4)
                return nsid
            pos += (alen + 3) & ~3
        return -1
    return -1


def diag_request(family: int, protocol: int, states: int, seq: int, sockid: bytes = bytes(48), dump: bool = True) -> bytes:
    """An inet_diag_req_v2 request: a dump, or (``dump=False``) the one socket that ``sockid`` names."""
    body = struct.pack("=BBBxI", family, protocol, 0, states) + sockid
    flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
    return _NLMSGHDR.pack(16 + len(body), SOCK_DIAG_BY_FAMILY, flags, seq, 0) + body


class DiagSocket(NamedTuple):
    """One socket of a sock_diag answer: state, local port, queues, retransmits, and its id.

    ``sockid`` is the raw ``inet_diag_sockid`` (ports, addresses, interface, cookie): sent back in
    a non-dump request it asks for exactly this socket again.
    """

    state: int
    port: int
    rqueue: int
    wqueue: int
    retransmits: int
    sockid: bytes


def _diag_socket(data: bytes, off: int) -> DiagSocket:
    _fam, state, _timer, retrans = _DIAG_HEAD.unpack_from(data, off + 16)
    (sport,) = _DIAG_PORTS.unpack_from(data, off + 20)
    rq, wq = _DIAG_QUEUES.unpack_from(data, off + 16 + _DIAG_QUEUES_OFFSET)
    return DiagSocket(state, sport, rq, wq, retrans, data[off + 20 : off + 68])


def dump_inet(sock: socket.socket, family: int, protocol: int, states: int) -> list[DiagSocket]:
    """Every socket of ``family``/``protocol`` in one of ``states`` (a bit mask of TCP states)."""
    seq = _next_seq()
    sock.send(diag_request(family, protocol, states, seq))
    return [_diag_socket(data, off) for _mtype, data, off in _messages(sock, seq)]


def count_inet(sock: socket.socket, family: int, protocol: int, states: int, counts: list[int], syn_sent: int = 2) -> int:
    """Add the sockets of ``family``/``protocol`` in ``states`` to ``counts`` (indexed by TCP state).

    Builds no per-socket object, so a namespace with a hundred thousand sockets costs a walk and a
    byte read per socket. Returns the highest retransmit count of a socket in state ``syn_sent``.
    """
    seq = _next_seq()
    sock.send(diag_request(family, protocol, states, seq))
    syn_retrans = 0
    head = _DIAG_HEAD.unpack_from
    pause = ROUND.pause  # in the walk's thread: it waits out each sampling round (see nstap.gate)
    for _mtype, data, off in _messages(sock, seq):
        pause()
        _fam, state, _timer, retrans = head(data, off + 16)
        if state < len(counts):
            counts[state] += 1
            if state == syn_sent and retrans > syn_retrans:
                syn_retrans = retrans
    return syn_retrans


class LookupRequest:
    """Exact-socket requests for a set of sockets, built once and sent as they are every time.

    Only one batch is ever in flight on a socket and every answer is read before the next send,
    so the same sequence numbers can be reused.
    """

    __slots__ = ("data", "first", "last", "parts", "answers")

    def __init__(self, family: int, protocol: int, states: int, sockids: list[bytes]) -> None:
        # The previous answer as it was received (one datagram per socket asked for), each part
        # with what it was parsed into: a part received byte for byte again is not parsed again.
        self.parts: list[tuple[bytes, dict[int, DiagSocket | None]]] = []
        self.answers: list[DiagSocket | None] = []
        self.first = _next_seq()
        global _seq
        _seq = self.last = self.first + len(sockids) - 1
        self.data = b"".join(
            diag_request(family, protocol, states, self.first + i, sockid, dump=False) for i, sockid in enumerate(sockids)
        )


def _lookup_answers(data: bytes, first: int, last: int) -> dict[int, DiagSocket | None]:
    """The answers in one datagram of a lookup: sequence number -> the socket, None if it is gone."""
    answers: dict[int, DiagSocket | None] = {}
    off, end = 0, len(data)
    while off + 16 <= end:
        length, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < 16:
            raise NetlinkError(errno.EPROTO, "truncated netlink message")
        if first <= mseq <= last:
            if mtype == NLMSG_ERROR:
                (code,) = _S32.unpack_from(data, off + 16)
                if code and code != -errno.ENOENT:
                    raise NetlinkError(-code, "netlink: " + os.strerror(-code))
                answers.setdefault(mseq, None)
            elif mtype == SOCK_DIAG_BY_FAMILY:
                answers[mseq] = _diag_socket(data, off)
        off += (length + 3) & ~3
    return answers


def lookup_inet(sock: socket.socket, request: LookupRequest) -> list[DiagSocket | None]:
    """The current state of each socket of ``request`` (None for one that is gone), asked in one send.

    An exact lookup costs the kernel one hash probe, where a dump of listeners walks the whole
    listening hash (tens of thousands of buckets, most of them cold in cache). The kernel queues
    one datagram per socket asked for: each that is byte for byte the one at its place in the
    previous answer is not parsed again, and when all of them are, the previous list object is
    returned.
    """
    first, last = request.first, request.last
    if last < first:
        return []
    sock.send(request.data)
    wanted = last - first + 1
    before = request.parts
    parts: list[tuple[bytes, dict[int, DiagSocket | None]]] = []
    got = reused = 0
    while got < wanted:
        try:
            data = sock.recv(_RECV_SIZE)
        except BlockingIOError as exc:
            raise NetlinkError(errno.EAGAIN, "sock_diag lookup stalled") from exc
        n = len(parts)
        if n < len(before) and before[n][0] == data:
            part = before[n]
            reused += 1
        else:
            part = (data, _lookup_answers(data, first, last))
        parts.append(part)
        got += len(part[1])
    if reused == len(parts) == len(before):
        return request.answers
    answers: dict[int, DiagSocket | None] = {}
    for _data, found in parts:
        answers.update(found)
    request.parts = parts
    request.answers = [answers[seq] for seq in range(first, last + 1)]
    return request.answers
