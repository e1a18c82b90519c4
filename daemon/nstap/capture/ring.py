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

Which segments to keep and which records a window wants are pure functions, tested as tables.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import structlog

from .pcap import HEADER_LEN, PcapError, Record, read_records
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
    bytes: int = 0


def segments_to_drop(segments: list[Segment], keep: int) -> list[Segment]:
    """The oldest segments beyond the ``keep`` newest (segments are in age order, oldest first)."""
    return segments[: max(0, len(segments) - keep)]


def segments_for_window(segments: list[Segment], start: float, end: float) -> list[Segment]:
    """The segments that may hold records with start <= ts <= end."""
    return [s for s in segments if s.bytes and s.last_ts >= start and s.first_ts <= end]


def read_window(snapshot: list[tuple[int, int]], start: float, end: float) -> list[Record]:
    """The records with start <= ts <= end in the segments of a :meth:`FlightRecorder.window` snapshot.

    Blocking (it reads and parses up to ``ring_bytes``): run it in a worker thread. Closes the
    snapshot's descriptors.
    """
    out: list[Record] = []
    for fd, length in snapshot:
        try:
            _, records = read_records(os.pread(fd, length, 0))
        except (OSError, PcapError):
            continue  # a segment that cannot be read holds nothing usable
        finally:
            os.close(fd)
        out.extend(r for r in records if start <= r.ts <= end)
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
        self._file: BinaryIO | None = None
        self._listeners: list[Listener] = []
        self._fd: int | None = None
        self._lock = asyncio.Lock()
        self.stopped = False
        self.running = False
        self.started_at = 0.0
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
            self.running = True
            return True

    def pump(self) -> int:
        """File what tcpdump wrote since the last pump and hand it to the listeners; returns records read.

        Reading and writing fail differently: output that cannot be read or parsed ends the
        recorder (tcpdump is broken); a ring segment that cannot be written (a full disk) only
        loses those records from the ring, counted in ``records_lost``, while listeners still
        get them and writing is tried again a second later.
        """
        if self._fd is None:
            return 0
        count = 0
        while True:
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
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as exc:
                self._write_failed(exc, 0)
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
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # what the buffer held is lost; write_error already says why
            self._file = None

    def _file_records(self, batch: list[Record]) -> None:
        if self.write_error and asyncio.get_running_loop().time() - self._write_failed_at < self.WRITE_RETRY:
            self.records_lost += len(batch)
            return
        header = self.process.header
        assert header is not None
        for i, record in enumerate(batch):
            try:
                seg = self.segments[-1] if self.segments else None
                if seg is None or self._file is None or seg.bytes + len(record.data) > self.segment_bytes:
                    seg = self._rotate(header.raw)
                self._file.write(record.data)  # type: ignore[union-attr]
            except OSError as exc:
                self._write_failed(exc, len(batch) - i)
                return
            seg.bytes += len(record.data)
            if record.ts < seg.first_ts:
                seg.first_ts = record.ts
            if record.ts > seg.last_ts:
                seg.last_ts = record.ts
        if self.write_error:
            log.info("ring_write_recovered", recorder=self.name, records_lost=self.records_lost)
            self.write_error = ""

    def _write_failed(self, exc: OSError, lost: int) -> None:
        # The segment being written may end in a partial record: close it, so that the next write
        # starts a new segment (a reader skips the truncated end of the old one).
        self._close_file()
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
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=64 * 1024)
        seg = Segment(path, bytes=0)
        self.segments.append(seg)
        self._file.write(header)
        return seg

    def window(self, start: float, end: float) -> list[tuple[int, int]]:
        """Open the segments that may hold records of [start, end], as of the last pump.

        Returns (descriptor, bytes written so far) for each, for :func:`read_window` to read in
        a worker thread: the descriptors keep rotated-away segments readable, and the lengths
        exclude what is written after this call (a capture gets those records from its listener).
        """
        out = []
        for seg in segments_for_window(self.segments, start, end):
            try:
                fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            out.append((fd, HEADER_LEN + seg.bytes))
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
