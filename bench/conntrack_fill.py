"""Fill the host's conntrack table with UDP entries between documentation addresses, by hand.

The NAT and evidence benches need tens of thousands of entries: one ``conntrack -I`` process each
would take minutes, and pyroute2 is no longer installed (the daemon writes its netlink by hand).
Each entry is an IPCTNL_MSG_CT_NEW message (original and reply tuples, a timeout) sent in batches
of BATCH on one netlink socket, each acknowledged.

    from conntrack_fill import add_entries, remove_entries
    add_entries(50_000)     # 198.51.100.1..50 -> 198.51.100.200:53, one source port per entry
    remove_entries()
"""

from __future__ import annotations

import errno
import socket
import struct
import subprocess

SOURCES = 50  # entries come from 198.51.100.1..SOURCES, one port per entry
TARGET = "198.51.100.200"
BATCH = 200

NETLINK_NETFILTER = 12
IPCTNL_MSG_CT_NEW = (1 << 8) | 0  # NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_NEW
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_TIMEOUT = 1, 2, 7
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3


def _attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind | (NLA_F_NESTED if nested else 0))
    return head + payload + bytes(-len(payload) % 4)


def _tuple(kind: int, src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    ip = _attr(CTA_TUPLE_IP, _attr(CTA_IP_V4_SRC, src) + _attr(CTA_IP_V4_DST, dst), nested=True)
    proto = _attr(
        CTA_TUPLE_PROTO,
        _attr(CTA_PROTO_NUM, bytes([socket.IPPROTO_UDP])) + _attr(CTA_PROTO_SRC_PORT, struct.pack(">H", sport)) + _attr(CTA_PROTO_DST_PORT, struct.pack(">H", dport)),
        nested=True,
    )
    return _attr(kind, ip + proto, nested=True)


def entry_message(seq: int, src: str, dst: str, sport: int, dport: int, timeout: int) -> bytes:
    """One IPCTNL_MSG_CT_NEW request: a UDP flow src:sport -> dst:dport, answered, for ``timeout`` s."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    body = struct.pack("=BBH", socket.AF_INET, 0, 0)
    body += _tuple(CTA_TUPLE_ORIG, s, d, sport, dport) + _tuple(CTA_TUPLE_REPLY, d, s, dport, sport)
    body += _attr(CTA_TIMEOUT, struct.pack(">I", timeout))
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    return struct.pack("=LHHLL", 16 + len(body), IPCTNL_MSG_CT_NEW, flags, seq, 0) + body


def add_entries(count: int, timeout: int = 600) -> int:
    """Add ``count`` entries (SOURCES sources, one source port each); returns how many were new
    (an entry that exists already is answered EEXIST and not counted)."""
    added = 0
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER) as sock:
        sock.bind((0, 0))
        for start in range(0, count, BATCH):
            n = min(BATCH, count - start)
            batch = b"".join(
                entry_message(start + i + 1, f"198.51.100.{(start + i) % SOURCES + 1}", TARGET, 1024 + (start + i) // SOURCES, 53, timeout)
                for i in range(n)
            )
            sock.sendall(batch)
            answered = 0
            while answered < n:
                data = sock.recv(1 << 16)
                off = 0
                while off + 16 <= len(data):
                    length, mtype = struct.unpack_from("=LH", data, off)
                    if mtype == NLMSG_ERROR:
                        answered += 1
                        (code,) = struct.unpack_from("=i", data, off + 16)
                        if code == 0:
                            added += 1
                        elif -code != errno.EEXIST:
                            raise OSError(-code, f"conntrack entry refused: {errno.errorcode.get(-code, code)}")
                    off += (length + 3) & ~3
    return added


def remove_entries() -> None:
    """Delete every entry :func:`add_entries` may have made."""
    for i in range(SOURCES):
        subprocess.run(["conntrack", "-D", "-s", f"198.51.100.{i + 1}", "-d", TARGET], capture_output=True, check=False)
