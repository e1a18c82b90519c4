"""A small DNS server whose answers the tests choose by name (a real server on a real socket:
what the containers' lookups go to), and a client that sends a known number of lookups.

Names decide the answer, by their first label's prefix:

* ``nx*``: NXDOMAIN; ``fail*``: SERVFAIL; ``refuse*``: REFUSED; ``silent*``: no answer at all;
* ``slow<ms>*`` (``slow80x``): NOERROR after that many milliseconds;
* anything else: NOERROR with one A record (10.0.0.1) for A, no record for other types.

Run as ``python3 dnsserver.py serve --bind ADDR [--port 53]`` (UDP and TCP; prints "ready" when it
listens) or ``python3 dnsserver.py ask SERVER NAME [--type A|AAAA] [--count N] [--tcp]`` (prints one
JSON line: the rcodes answered, "timeout" for none, and the seconds each took), or ``blast SERVER
PREFIX --count N`` (a flood of distinct lookups, not waiting for their answers).
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import socketserver
import struct
import sys
import threading
import time

TYPES = {"A": 1, "AAAA": 28, "TXT": 16}
RCODES = {0: "NOERROR", 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}


def query(name: str, qtype: int, ident: int) -> bytes:
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.rstrip(".").split("."))
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", qtype, 1)


def parse_question(message: bytes) -> tuple[str, int, int]:
    """(name, qtype, end of the question) of a query."""
    pos, labels = 12, []
    while message[pos]:
        length = message[pos]
        labels.append(message[pos + 1 : pos + 1 + length].decode(errors="replace"))
        pos += 1 + length
    qtype = struct.unpack("!H", message[pos + 1 : pos + 3])[0]
    return ".".join(labels), qtype, pos + 5


def answer(message: bytes) -> tuple[bytes | None, float]:
    """(the answer, or None for silence; the delay before it)."""
    name, qtype, end = parse_question(message)
    first = name.split(".", 1)[0].lower()
    rcode, delay, records = 0, 0.0, b""
    if first.startswith("silent"):
        return None, 0.0
    if first.startswith("nx"):
        rcode = 3
    elif first.startswith("fail"):
        rcode = 2
    elif first.startswith("refuse"):
        rcode = 5
    elif first.startswith("slow"):
        digits = "".join(c for c in first[4:] if c.isdigit())
        delay = int(digits or 0) / 1000
    if rcode == 0 and qtype == 1:
        records = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton("10.0.0.1")
    flags = 0x8180 | rcode
    head = message[:2] + struct.pack("!HHHHH", flags, 1, 1 if records else 0, 0, 0)
    return head + message[12:end] + records, delay


class Udp(socketserver.ThreadingUDPServer):
    daemon_threads = True
    allow_reuse_address = True


class Tcp(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class UdpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        reply, delay = answer(data)
        if reply is not None:
            time.sleep(delay)
            sock.sendto(reply, self.client_address)


class TcpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        head = self.request.recv(2)
        if len(head) < 2:
            return
        size = struct.unpack("!H", head)[0]
        data = b""
        while len(data) < size:
            chunk = self.request.recv(size - len(data))
            if not chunk:
                return
            data += chunk
        reply, delay = answer(data)
        if reply is not None:
            time.sleep(delay)
            self.request.sendall(struct.pack("!H", len(reply)) + reply)
        else:
            time.sleep(30)


def serve(bind: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    Udp.address_family = Tcp.address_family = family
    servers = [Udp((bind, port), UdpHandler), Tcp((bind, port), TcpHandler)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


def ask(server: str, name: str, qtype: int, count: int, tcp: bool, timeout: float) -> list[tuple[str, float]]:
    """``count`` lookups, one after the other; (rcode or "timeout", seconds) each."""
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    out = []
    for _ in range(count):
        ident = random.randrange(1, 65535)
        message = query(name, qtype, ident)
        started = time.monotonic()
        try:
            with socket.socket(family, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as sock:
                sock.settimeout(timeout)
                if tcp:
                    sock.connect((server, 53))
                    sock.sendall(struct.pack("!H", len(message)) + message)
                    reply = sock.recv(4096)[2:]
                else:
                    sock.sendto(message, (server, 53))
                    reply = sock.recv(4096)
            out.append((RCODES.get(struct.unpack("!H", reply[2:4])[0] & 0xF, "other"), time.monotonic() - started))
        except (socket.timeout, ConnectionError):
            out.append(("timeout", time.monotonic() - started))
    return out


def blast(server: str, prefix: str, count: int, linger: float) -> int:
    """``count`` queries for distinct names (``<prefix><i>.test``), distinct ids, one socket, without
    waiting between them (a flood); then ``linger`` seconds taking answers. Prints how many came."""
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    answers = 0
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        for i in range(count):
            sock.sendto(query(f"{prefix}{i}.test", 1, i % 65535 + 1), (server, 53))
        sock.settimeout(0.2)
        end = time.monotonic() + linger
        while time.monotonic() < end:
            try:
                sock.recv(4096)
                answers += 1
            except socket.timeout:
                pass
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, default=53)
    a = sub.add_parser("ask")
    a.add_argument("server")
    a.add_argument("name")
    a.add_argument("--type", default="A", choices=sorted(TYPES))
    a.add_argument("--count", type=int, default=1)
    a.add_argument("--tcp", action="store_true")
    a.add_argument("--timeout", type=float, default=2.0)
    b = sub.add_parser("blast")
    b.add_argument("server")
    b.add_argument("prefix")
    b.add_argument("--count", type=int, default=1000)
    b.add_argument("--linger", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.command == "blast":
        print(json.dumps({"answers": blast(args.server, args.prefix, args.count, args.linger)}))
        return 0
    if args.command == "serve":
        serve(args.bind, args.port)
        return 0
    print(json.dumps(ask(args.server, args.name, TYPES[args.type], args.count, args.tcp, args.timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
