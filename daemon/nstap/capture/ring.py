"""The flight recorder: a continuous capture of one namespace into a ring of pcap segments on disk.

tcpdump runs for as long as the namespace is watched; its records go into segment files of
``ring_bytes / segments`` bytes each, and the oldest segment is deleted when a new one would make
more than ``segments``. So the ring always holds the most recent ~``ring_bytes`` of packets (at
snap length), which is what lets a capture start *before* its trigger: at the trigger the
records of the last ``pre`` seconds are read back from the segments, and the records that follow
are handed to the capture as they arrive.

tcpdump writes every packet to its pipe as it comes (``-U``). Handing each one to the event loop
would cost a wake-up per packet per namespace; instead the engine pumps every recorder's pipe a
few times a second (:meth:`FlightRecorder.pump`), and the pipe is made large enough (1 MiB) to
hold what arrives in between.

How far back a ring reaches (:meth:`FlightRecorder.holds_since`) is exact: everything since
tcpdump started, until the first segment is rotated away; from then on, everything after the
newest record of the segments that were dropped. A capture whose window starts earlier says so
(``pre_truncated``), and the exporter shows each ring's reach so that ``ring_bytes`` can be sized
to the traffic.

Which segments to keep and which records a window wants are pure functions, tested as tables.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import shutil
import struct
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import structlog

from .pcap import HEADER_LEN, PcapError, PcapHeader, Record, StreamParser
from .tcpdump import TcpdumpProcess

log = structlog.get_logger("nstap.capture")

Listener = Callable[[list[Record]], None]
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031


@dataclass
class Segment:
    """One file of the ring: where it is and the time span of its records."""

    path: Path
    first_ts: float = float("inf")
    last_ts: float = float("-inf")
    bytes: int = 0  # of records, the file's header not included
    records: int = 0


def _account(seg: Segment, records: list[Record], size: int) -> None:
    """Count whole records written to ``seg``."""
    if not records:
        return
    seg.bytes += size
    seg.records += len(records)
    first = min(r.ts for r in records)
    last = max(r.ts for r in records)
    if first < seg.first_ts:
        seg.first_ts = first
    if last > seg.last_ts:
        seg.last_ts = last


def segments_to_drop(segments: list[Segment], keep: int) -> list[Segment]:
    """The oldest segments beyond the ``keep`` newest (segments are in age order, oldest first)."""
    return segments[: max(0, len(segments) - keep)]


def segments_for_window(segments: list[Segment], start: float, end: float) -> list[Segment]:
    """The segments that may hold records with start <= ts <= end."""
    return [s for s in segments if s.bytes and s.last_ts >= start and s.first_ts <= end]


class Span(NamedTuple):
    """Whole records read back from a ring: their bytes as written, how many, how many before the trigger."""

    data: bytes
    records: int
    pre: int


class SegmentView(NamedTuple):
    """A segment as :meth:`FlightRecorder.window` saw it: an open descriptor and what it held then."""

    fd: int
    bytes: int
    records: int
    first_ts: float
    last_ts: float


class WholeSegment(NamedTuple):
    """A segment whose records all belong to a capture: copied as it is, never read into memory.

    The receiver closes ``fd``; the records start right after the file's header.
    """

    fd: int
    bytes: int
    records: int
    pre: int


def read_window(header: PcapHeader, snapshot: list[SegmentView], start: float, end: float, trigger: float) -> list[Span | WholeSegment]:
    """The records with start <= ts <= end in the segments of a :meth:`FlightRecorder.window` snapshot.

    A segment whose records all fall in the window, on one side of the trigger (in a full ring,
    nearly all of them), is handed on whole, to be copied by the kernel without looking at its
    records; only a segment that straddles a window edge or the trigger is read and parsed
    (blocking: run this in a worker thread). Closes the descriptors of the segments it read.
    """
    out: list[Span | WholeSegment] = []
    for view in snapshot:
        inside = start <= view.first_ts and view.last_ts <= end
        one_side = view.last_ts < trigger or view.first_ts >= trigger
        if inside and one_side:
            out.append(WholeSegment(view.fd, view.bytes, view.records, view.records if view.last_ts < trigger else 0))
            continue
        try:
            data = os.pread(view.fd, view.bytes, HEADER_LEN)
        except OSError:
            continue  # a segment that cannot be read holds nothing usable
        finally:
            os.close(view.fd)
        try:
            records = StreamParser.with_header(header).feed(data)
        except PcapError:
            continue
        kept = [r for r in records if start <= r.ts <= end]
        if kept:
            out.append(Span(b"".join(r.data for r in kept), len(kept), sum(1 for r in kept if r.ts < trigger)))
    return out


class FlightRecorder:
    """A ring of recent packets for one namespace.

    :meth:`start` and :meth:`stop` are serialised: a stop asked for while tcpdump is being started
    waits for it and stops it, and a start after a stop does nothing, so a recorder whose namespace
    went away before its tcpdump was running never leaves that tcpdump behind.
    """

    WRITE_RETRY = 1.0  # seconds between attempts to write the ring again after a write failed

    def __init__(self, name: str, argv: list[str], directory: Path, ring_bytes: int, segments: int) -> None:
        self.name = name
        self.dir = directory
        self.segment_bytes = max(64 * 1024, ring_bytes // max(segments, 2))
        self.keep = max(segments, 2)
        self.process = TcpdumpProcess(argv)
        self.segments: list[Segment] = []
        self._wfd: int | None = None  # the newest segment, written with os.write (no buffer)
        self._listeners: list[Listener] = []
        self._fd: int | None = None
        self._lock = asyncio.Lock()
        self.stopped = False
        self.running = False
        self.started_at = 0.0
        self.started_wall = 0.0  # wall-clock time tcpdump was started (records are stamped in it)
        self.dropped_until = 0.0  # the newest record of the segments rotated away so far
        self.ended_at = 0.0  # event-loop time tcpdump's output ended, 0 while it runs
        self.error = ""
        self.write_error = ""  # why the ring cannot be written now (disk full ...); "" once it can
        self.records_lost = 0  # records read from tcpdump but not written to the ring
        self._write_failed_at = 0.0
        self.on_listener_error: Callable[[BaseException], None] | None = None

    async def start(self, pass_fds: tuple[int, ...] = ()) -> bool:
        """Start tcpdump writing into a pipe that :meth:`pump` empties; False if stopped already.

        ``pass_fds`` are handed to the child (the namespace descriptor nsenter enters through).
        OSError if tcpdump cannot be run.
        """
        async with self._lock:
            if self.stopped:
                return False
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
            try:
                try:
                    fcntl.fcntl(read_fd, F_SETPIPE_SZ, PIPE_SIZE)
                except OSError:
                    pass  # the default 64 KiB then; pumped often enough for light traffic
                os.set_blocking(read_fd, False)
                await self.process.start(stdout=write_fd, pass_fds=pass_fds)
            except BaseException:
                os.close(read_fd)
                raise
            finally:
                os.close(write_fd)
            self._fd = read_fd
            self.started_at = asyncio.get_running_loop().time()
            self.started_wall = time.time()
            self.running = True
            return True

    def backlog(self) -> int:
        """Bytes tcpdump wrote that are not pumped yet (what waits in the pipe)."""
        if self._fd is None:
            return 0
        try:
            return struct.unpack("i", fcntl.ioctl(self._fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        except OSError:
            return 0

    def pump(self, max_reads: int | None = None) -> int:
        """File what tcpdump wrote since the last pump (at most ``max_reads`` pipe-fulls) and hand
        it to the listeners; returns records read.

        Reading and writing fail differently: output that cannot be read or parsed ends the
        recorder (tcpdump is broken); a ring segment that cannot be written (a full disk) only
        loses those records from the ring, counted in ``records_lost``, while listeners still
        get them and writing is tried again a second later.
        """
        if self._fd is None:
            return 0
        count = 0
        reads = 0
        while max_reads is None or reads < max_reads:
            reads += 1
            try:
                chunk = os.read(self._fd, PIPE_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                self.error = f"cannot read tcpdump output: {exc}"
                self._ended()
                break
            if not chunk:  # tcpdump is gone
                self._ended()
                break
            try:
                batch = self.process.parser.feed(chunk)
            except PcapError as exc:
                self.error = f"unreadable tcpdump output: {exc}"
                self._ended()
                break
            if batch:
                self._file_records(batch)
                for listener in list(self._listeners):
                    try:
                        listener(batch)
                    except Exception as exc:  # noqa: BLE001 - a capture's bug must not stop the ring
                        self.unsubscribe(listener)
                        if self.on_listener_error is not None:
                            self.on_listener_error(exc)
                count += len(batch)
        return count

    def _ended(self) -> None:
        if self.running:
            self.ended_at = asyncio.get_running_loop().time()
        self.running = False
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self.error:
            self.error = self.process.error_text() or "tcpdump exited"
        self._close_file()

    def _close_file(self) -> None:
        if self._wfd is not None:
            os.close(self._wfd)
            self._wfd = None

    def _file_records(self, batch: list[Record]) -> None:
        """Append a batch to the ring, one ``os.write`` per run of records that fits a segment.

        Without a write buffer the ring knows exactly what reached its files: a segment's byte
        and record counts and time span only ever describe whole records on disk. A write that
        fails or falls short (a full disk) keeps the whole records that made it, cuts the partial
        one, counts the rest as lost, and the next attempt (a second later) appends to the same
        segment: retrying never rotates good segments away.
        """
        if self.write_error and asyncio.get_running_loop().time() - self._write_failed_at < self.WRITE_RETRY:
            self.records_lost += len(batch)
            return
        header = self.process.header
        assert header is not None
        i, n = 0, len(batch)
        while i < n:
            seg = self.segments[-1] if self.segments else None
            try:
                if seg is None or self._wfd is None or seg.bytes + len(batch[i].data) > self.segment_bytes:
                    seg = self._rotate(header.raw)
            except OSError as exc:
                self._write_failed(exc, n - i)
                return
            room = self.segment_bytes - seg.bytes
            j, size = i, 0
            while j < n and (size + len(batch[j].data) <= room or j == i):
                size += len(batch[j].data)
                j += 1
            run = batch[i:j]
            data = b"".join(r.data for r in run)
            try:
                written = os.write(self._wfd, data)  # type: ignore[arg-type]
                error = None if written == len(data) else OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as exc:
                written, error = 0, exc
            if error is None:
                _account(seg, run, size)
                i = j
                continue
            whole = kept = 0
            for record in run:
                if kept + len(record.data) > written:
                    break
                kept += len(record.data)
                whole += 1
            _account(seg, run[:whole], kept)
            if written != kept:  # a partial record at the end: cut it, or give the segment up
                try:
                    os.ftruncate(self._wfd, HEADER_LEN + seg.bytes)  # type: ignore[arg-type]
                except OSError:
                    self._close_file()
            self._write_failed(error, n - i - whole)
            return
        if self.write_error:
            log.info("ring_write_recovered", recorder=self.name, records_lost=self.records_lost)
            self.write_error = ""

    def _write_failed(self, exc: OSError, lost: int) -> None:
        self.records_lost += lost
        self._write_failed_at = asyncio.get_running_loop().time()
        if not self.write_error:
            log.warning("ring_write_failed", recorder=self.name, error=str(exc))
        self.write_error = f"cannot write the ring: {exc.strerror or exc}"

    def _rotate(self, header: bytes) -> Segment:
        self._close_file()
        number = int(self.segments[-1].path.stem.rsplit("-", 1)[1]) + 1 if self.segments else 0
        path = self.dir / f"segment-{number:08d}.pcap"
        for old in segments_to_drop([*self.segments, Segment(path)], self.keep):
            old.path.unlink(missing_ok=True)  # the oldest goes first: room for the new one
            self.segments.remove(old)
            if old.records:
                self.dropped_until = max(self.dropped_until, old.last_ts)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            if os.write(fd, header) != len(header):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._wfd = fd
        seg = Segment(path)
        self.segments.append(seg)
        return seg

    def holds_since(self) -> float:
        """The wall-clock time from which the ring holds every packet tcpdump saw (0 before it started)."""
        return max(self.started_wall, self.dropped_until)

    def reach(self, now: float | None = None) -> float:
        """Seconds back from ``now`` the ring reaches (0 if it is not running)."""
        if not self.running or not self.started_wall:
            return 0.0
        return max(0.0, (now if now is not None else time.time()) - self.holds_since())

    def window(self, start: float, end: float) -> list[SegmentView]:
        """Open the segments that may hold records of [start, end], as of the last pump.

        For :func:`read_window` to read in a worker thread: the descriptors keep rotated-away
        segments readable, and the lengths and counts exclude what is written after this call
        (a capture gets those records from its listener).
        """
        out = []
        for seg in segments_for_window(self.segments, start, end):
            try:
                fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            out.append(SegmentView(fd, seg.bytes, seg.records, seg.first_ts, seg.last_ts))
        return out

    def subscribe(self, listener: Listener) -> None:
        """Hand every new batch of records to ``listener`` (until :meth:`unsubscribe`)."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        """Stop handing records to ``listener``."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def stop(self) -> None:
        """Stop tcpdump (waiting for a start in progress) and delete the ring's files."""
        self.stopped = True
        async with self._lock:
            await self.process.stop()
            self.pump()
            self.error = self.error or "stopped"
            self._ended()
            shutil.rmtree(self.dir, ignore_errors=True)
