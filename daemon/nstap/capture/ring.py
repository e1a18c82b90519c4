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

from .pcap import PcapError, Record, read_file
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


class FlightRecorder:
    """A ring of recent packets for one namespace."""

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
        self.running = False
        self.started_at = 0.0
        self.ended_at = 0.0  # event-loop time tcpdump's output ended, 0 while it runs
        self.error = ""
        self.records_total = 0

    async def start(self) -> None:
        """Start tcpdump writing into a pipe that :meth:`pump` empties (OSError if it cannot run)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                fcntl.fcntl(read_fd, F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # the default 64 KiB then; pumped often enough for light traffic
            os.set_blocking(read_fd, False)
            await self.process.start(stdout=write_fd)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self._fd = read_fd
        self.started_at = asyncio.get_running_loop().time()
        self.running = True

    def pump(self) -> int:
        """File what tcpdump wrote since the last pump and hand it to the listeners; returns records read."""
        if self._fd is None:
            return 0
        count = 0
        try:
            while True:
                try:
                    chunk = os.read(self._fd, PIPE_SIZE)
                except BlockingIOError:
                    break
                if not chunk:  # tcpdump is gone
                    self._ended()
                    break
                batch = self.process.parser.feed(chunk)
                if batch:
                    self._file_records(batch)
                    for listener in list(self._listeners):
                        listener(batch)
                    count += len(batch)
        except (PcapError, OSError) as exc:
            self.error = f"unreadable tcpdump output: {exc}"
            self._ended()
        if self._file is not None:
            self._file.flush()
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
        if self._file is not None:
            self._file.close()
            self._file = None

    def _file_records(self, batch: list[Record]) -> None:
        header = self.process.header
        assert header is not None
        for record in batch:
            seg = self.segments[-1] if self.segments else None
            if seg is None or self._file is None or seg.bytes + len(record.data) > self.segment_bytes:
                seg = self._rotate(header.raw)
            self._file.write(record.data)  # type: ignore[union-attr]
            seg.bytes += len(record.data)
            if record.ts < seg.first_ts:
                seg.first_ts = record.ts
            if record.ts > seg.last_ts:
                seg.last_ts = record.ts
            self.records_total += 1

    def _rotate(self, header: bytes) -> Segment:
        if self._file is not None:
            self._file.close()
        number = int(self.segments[-1].path.stem.rsplit("-", 1)[1]) + 1 if self.segments else 0
        path = self.dir / f"segment-{number:08d}.pcap"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=64 * 1024)
        self._file.write(header)
        seg = Segment(path, bytes=0)
        self.segments.append(seg)
        for old in segments_to_drop(self.segments, self.keep):
            old.path.unlink(missing_ok=True)
            self.segments.remove(old)
        return seg

    def records_between(self, start: float, end: float) -> list[Record]:
        """The recorded packets with start <= ts <= end, read back from the segments (as of the last pump)."""
        out: list[Record] = []
        for seg in segments_for_window(self.segments, start, end):
            try:
                _, records = read_file(seg.path)
            except (OSError, PcapError):
                continue  # rotated away while we read: those records are gone
            out.extend(r for r in records if start <= r.ts <= end)
        return out

    @property
    def oldest_ts(self) -> float | None:
        """Timestamp of the oldest packet still in the ring."""
        firsts = [s.first_ts for s in self.segments if s.bytes]
        return min(firsts) if firsts else None

    def subscribe(self, listener: Listener) -> None:
        """Hand every new batch of records to ``listener`` (until :meth:`unsubscribe`)."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        """Stop handing records to ``listener``."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def stop(self) -> None:
        """Stop tcpdump and delete the ring's files."""
        await self.process.stop()
        self.pump()
        self.error = self.error or "stopped"
        self._ended()
        shutil.rmtree(self.dir, ignore_errors=True)
