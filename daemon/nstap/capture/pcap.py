"""The classic pcap format: just enough to split tcpdump's output into records, trim and join them.

tcpdump writes to nstap's pipe (``-w -``), so nstap sees every record with its timestamp: that is
how a capture is cut to exactly [trigger - pre, trigger + post], how the flight recorder's
segments are kept and dropped, and how byte caps end on a record boundary.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import BinaryIO, NamedTuple

from ..gate import ROUND

MAGIC_US = 0xA1B2C3D4
MAGIC_NS = 0xA1B23C4D
HEADER_LEN = 24
RECORD_HEADER_LEN = 16
MAX_RECORD = 256 * 1024  # larger than any snap length tcpdump accepts: a bigger length is corruption


class PcapError(ValueError):
    """Bytes that are not a pcap stream."""


class PcapHeader(NamedTuple):
    """A pcap global header."""

    raw: bytes
    order: str  # "<" or ">"
    nanos: bool
    snaplen: int
    linktype: int


class Record(NamedTuple):
    """One packet record: its timestamp (seconds, float) and its bytes, record header included."""

    ts: float
    data: bytes


def parse_header(data: bytes) -> PcapHeader:
    """Parse the 24-byte global header."""
    if len(data) < HEADER_LEN:
        raise PcapError("short pcap header")
    for order in ("<", ">"):
        (magic,) = struct.unpack_from(order + "I", data, 0)
        if magic in (MAGIC_US, MAGIC_NS):
            _, major, minor, _zone, _sigfigs, snaplen, linktype = struct.unpack_from(order + "IHHiIII", data, 0)
            if major != 2:
                raise PcapError(f"pcap version {major}.{minor} not supported")
            return PcapHeader(bytes(data[:HEADER_LEN]), order, magic == MAGIC_NS, snaplen, linktype)
    raise PcapError("not a pcap stream (bad magic)")


class StreamParser:
    """Splits a byte stream (tcpdump -w -) into its header and records, chunk by chunk."""

    def __init__(self) -> None:
        self.header: PcapHeader | None = None
        self._buf = bytearray()
        self._rec: struct.Struct | None = None
        self._scale = 1e-6

    @classmethod
    def with_header(cls, header: PcapHeader) -> StreamParser:
        """A parser for records that follow ``header`` (the header itself is not in the bytes fed)."""
        parser = cls()
        parser._start(header)
        return parser

    def _start(self, header: PcapHeader) -> None:
        self.header = header
        self._rec = struct.Struct(header.order + "IIII")
        self._scale = 1e-9 if header.nanos else 1e-6

    def feed(self, chunk: bytes) -> list[Record]:
        """Add bytes; return the records they completed."""
        buf = self._buf
        buf += chunk
        if self.header is None:
            if len(buf) < HEADER_LEN:
                return []
            self._start(parse_header(bytes(buf[:HEADER_LEN])))
            del buf[:HEADER_LEN]
        rec = self._rec
        assert rec is not None
        out = []
        off = 0
        end = len(buf)
        scale = self._scale
        pause = ROUND.pause  # in a worker thread reading a ring back: it waits out each sampling round (see nstap.gate)
        while end - off >= RECORD_HEADER_LEN:
            if len(out) & 1023 == 1023:
                pause()
            sec, frac, incl, _orig = rec.unpack_from(buf, off)
            if incl > MAX_RECORD:
                raise PcapError(f"record of {incl} bytes")
            size = RECORD_HEADER_LEN + incl
            if end - off < size:
                break
            out.append(Record(sec + frac * scale, bytes(buf[off : off + size])))
            off += size
        if off:
            del buf[:off]
        return out


def read_records(data: bytes) -> tuple[PcapHeader, list[Record]]:
    """All complete records of a pcap file's bytes (a truncated last record is left out)."""
    parser = StreamParser()
    records = parser.feed(data)
    if parser.header is None:
        raise PcapError("empty or truncated pcap file")
    return parser.header, records


def read_file(path: Path) -> tuple[PcapHeader, list[Record]]:
    """All complete records of a pcap file."""
    return read_records(path.read_bytes())


class PcapWriter:
    """Writes one pcap file: header first, then records, counting bytes and packets and hashing."""

    def __init__(self, f: BinaryIO, header: PcapHeader) -> None:
        self.f = f
        self.bytes = 0
        self.packets = 0
        self.hashed = True  # False once bytes were written past this writer (see add_copied)
        self._hash = hashlib.sha256()
        self._write(header.raw)

    def _write(self, data: bytes) -> None:
        self.f.write(data)
        self._hash.update(data)
        self.bytes += len(data)

    def add(self, record: Record) -> None:
        """Append one record."""
        self._write(record.data)
        self.packets += 1

    def add_records(self, data: bytes, count: int) -> None:
        """Append ``count`` whole records given as their bytes, as written by another writer."""
        self._write(data)
        self.packets += count

    def add_copied(self, nbytes: int, count: int) -> None:
        """Account for ``count`` records (``nbytes``) copied into the file past this writer (it
        must have been flushed first); :meth:`sha256` then no longer covers the file."""
        self.bytes += nbytes
        self.packets += count
        self.hashed = False

    def sha256(self) -> str:
        """Hex digest of everything written so far (only while ``hashed``)."""
        return self._hash.hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
