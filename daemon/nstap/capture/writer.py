"""The capture file writer: one capture's pcap, filled from a flight recorder's ring or a live
tcpdump, within its window and its byte cap.

:class:`CaptureFile` writes; :func:`from_ring` reads the ring back from the window's start (in a
worker thread, whole segments copied by the kernel) and then takes the records as they arrive;
:func:`live` runs a tcpdump for the window (its output parsed and written in a worker thread);
:func:`summary` says what the finished file holds; :func:`take` does all of it for one capture
and returns its outcome.
A write that fails (a full disk) is never raised: the file keeps what it got and says why.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..gate import ROUND
from ..index.captures import COMPLETE, FAILED, INCOMPLETE

from .pcap import HEADER_LEN, PcapError, PcapHeader, PcapWriter, Record, StreamParser, read_file, sha256_file
from .ring import FlightRecorder, Span, WholeSegment, read_window
from .tcpdump import TcpdumpProcess, Tools

PUMP_INTERVAL = 0.25  # seconds between looks at a flight recorder while a capture waits for its end


class CaptureFile:
    """The pcap being written for one capture: the window, the byte cap, the counts.

    A write that fails (a full disk) is not raised: the file keeps what it got, ``write_error``
    says why, and later records are not written.
    """

    def __init__(self, path: Path, start: float, end: float, trigger: float, max_bytes: int) -> None:
        self.path = path
        self.start, self.end, self.trigger = start, end, trigger
        self.max_bytes = max_bytes
        self._f = open(path, "wb")  # created 0600 by the store
        self.writer: PcapWriter | None = None
        self.pre_packets = 0
        self.capped = False
        self.write_error = ""

    @property
    def packets(self) -> int:
        """Records written so far."""
        return self.writer.packets if self.writer is not None else 0

    def add(self, header: PcapHeader, records: list[Record]) -> None:
        """Write the records that fall in the window, until the byte cap.

        Each batch is handed to the kernel at once, so a daemon that dies mid-capture leaves
        every packet it had received in the file (marked incomplete at the next start).
        """
        if self.write_error:
            return
        try:
            if self.writer is None:
                self.writer = PcapWriter(self._f, header)
            for record in records:
                if not self.start <= record.ts <= self.end:
                    continue
                if self.writer.bytes + len(record.data) > self.max_bytes:
                    self.capped = True
                    return
                self.writer.add(record)
                if record.ts < self.trigger:
                    self.pre_packets += 1
        except OSError as exc:
            self.write_error = exc.strerror or str(exc)
        finally:
            if not self.write_error:
                try:
                    self._f.flush()
                except OSError as exc:
                    self.write_error = exc.strerror or str(exc)

    def add_window(self, header: PcapHeader, parts: list[Span | WholeSegment]) -> None:
        """Write what :func:`read_window` found, until the byte cap (blocking: a worker thread).

        Whole segments are copied from the ring's file into this one by the kernel
        (``copy_file_range``): a full ring never passes through the daemon's memory. Closes the
        segments' descriptors.
        """
        try:
            for part in parts:
                if self.write_error or self.capped:
                    return
                if self.writer is None:
                    self.writer = PcapWriter(self._f, header)
                size = part.bytes if isinstance(part, WholeSegment) else len(part.data)
                try:
                    if self.writer.bytes + size > self.max_bytes:
                        # The byte cap falls inside this part: record by record, up to it.
                        data = os.pread(part.fd, part.bytes, HEADER_LEN) if isinstance(part, WholeSegment) else part.data
                        self.add(header, StreamParser.with_header(header).feed(data))
                        continue
                    if isinstance(part, WholeSegment):
                        if os.fstat(part.fd).st_size < HEADER_LEN + part.bytes:  # never, unless someone cut it
                            self.add(header, StreamParser.with_header(header).feed(os.pread(part.fd, part.bytes, HEADER_LEN)))
                            continue
                        self._f.flush()
                        _copy(part.fd, self._f.fileno(), HEADER_LEN, part.bytes)
                        self.writer.add_copied(part.bytes, part.records)
                    else:
                        self.writer.add_records(part.data, part.records)
                        self._f.flush()
                except OSError as exc:
                    self.write_error = exc.strerror or str(exc)
                    return
                self.pre_packets += part.pre
        finally:
            for part in parts:
                if isinstance(part, WholeSegment):
                    os.close(part.fd)

    def close(self) -> None:
        try:
            self._f.close()
        except OSError as exc:  # the last flush failed: what was written before stays
            self.write_error = self.write_error or exc.strerror or str(exc)


def _copy(src: int, dst: int, offset: int, count: int) -> None:
    """Append ``count`` bytes of ``src`` from ``offset`` to ``dst``, in the kernel when it can."""
    while count > 0:
        try:
            done = os.copy_file_range(src, dst, count, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            done = os.write(dst, os.pread(src, min(count, 1 << 20), offset))
        if done == 0:
            raise OSError(errno.EIO, "the ring segment is shorter than it was")
        offset += done
        count -= done


def summary(path: Path, out: CaptureFile) -> tuple[int, int, str, int]:
    """Size, packets, sha256 and pre-trigger packets of the finished file (blocking: a thread)."""
    try:
        size = path.stat().st_size
    except OSError:
        return 0, 0, "", 0
    if size == 0:
        return 0, 0, "", 0
    if path == out.path and out.writer is not None and not out.write_error:
        digest = out.writer.sha256() if out.writer.hashed else sha256_file(path)
        return size, out.writer.packets, digest, out.pre_packets
    try:
        _, records = read_file(path)  # filtered or cut short: count what the file holds
    except (OSError, PcapError):
        records = []
    return size, len(records), sha256_file(path), sum(1 for r in records if r.ts < out.trigger)


async def from_ring(ring: FlightRecorder, out: CaptureFile) -> tuple[int, str]:
    """Fill ``out`` from a flight recorder: its ring back to the window's start, then the records
    as they arrive until the window's end; returns the kernel's drops meanwhile and an error ("")."""
    before = await ring.process.request_stats()
    pending: list[Record] | None = []  # records that arrive while the ring is read back

    def take(batch: list[Record]) -> None:
        if pending is not None:
            pending.extend(batch)
        elif ring.process.header is not None:
            out.add(ring.process.header, batch)

    # Pumping, subscribing and opening the ring's segments happen without an await in between:
    # every record is either in the segments as far as they are read back, or handed to the
    # listener, none is both or neither.
    ring.pump()
    ring.subscribe(take)
    try:
        snapshot = ring.window(out.start, out.end)
        header = ring.process.header
        if header is not None:
            # In a worker thread; the listener only buffers meanwhile. Shielded: a cancel (the
            # daemon stopping) waits for the thread, which writes the file the caller closes.
            work = asyncio.get_running_loop().run_in_executor(
                None, lambda: out.add_window(header, read_window(header, snapshot, out.start, out.end, out.trigger))
            )
            try:
                await asyncio.shield(work)
            except asyncio.CancelledError:
                await asyncio.gather(work, return_exceptions=True)
                raise
            out.add(header, pending)
        else:
            for view in snapshot:
                os.close(view.fd)
        pending = None
        # Until the end (+0.2 s: packets stamped before it, still in flight), or the byte cap.
        while not out.capped and not out.write_error and (remaining := out.end + 0.2 - time.time()) > 0:
            await asyncio.sleep(min(remaining, PUMP_INTERVAL))
        ring.pump()  # what arrived since the engine's last pump
    finally:
        ring.unsubscribe(take)
    if out.writer is None and ring.process.header is not None:
        out.add(ring.process.header, [])
    after = await ring.process.request_stats()
    drops = max(0, after.get("dropped", 0) - before.get("dropped", 0))
    if not ring.running:
        return drops, ring.error or "the flight recorder stopped during the capture"
    return drops, ""


async def live(tools: Tools, fd: int, bpf: str, out: CaptureFile, interface: str = "any") -> tuple[int, str]:
    """Fill ``out`` from a tcpdump in the namespace ``fd`` until the window's end; returns the
    kernel's drops and an error ("")."""
    proc = TcpdumpProcess(tools.argv(fd, bpf, interface))
    try:
        await proc.start(pass_fds=(fd,))
    except OSError as exc:
        return 0, f"cannot start tcpdump: {exc}"

    def take(chunk: bytes) -> bool:
        """Parse one chunk and write its records (in a worker thread, after the sampling round:
        a busy flow is hundreds of chunks a second of Python); whether to read on."""
        ROUND.pause()
        batch = proc.parser.feed(chunk)
        if batch:
            out.add(proc.header, batch)  # type: ignore[arg-type]
        return not (out.capped or out.write_error)

    writing: list[asyncio.Future] = []  # the chunk being written, awaited before the file is touched here

    async def read() -> None:
        loop = asyncio.get_running_loop()
        async for chunk in proc.chunks():
            writing[:] = [loop.run_in_executor(None, take, chunk)]  # the default executor: nstap-io
            if not await asyncio.shield(writing[0]):
                return

    reader = asyncio.create_task(read())  # awaited below, whatever happens
    try:
        remaining = out.end - time.time()
        done, _ = await asyncio.wait({reader}, timeout=max(remaining, 0) + 0.2)
    finally:
        code = await proc.stop()
        try:
            await asyncio.wait_for(reader, 5)
        except (asyncio.TimeoutError, PcapError):
            reader.cancel()
        if writing:  # a cancelled reader leaves its chunk's write running in the thread
            await asyncio.wait(writing)
    if out.writer is None and proc.header is not None:
        out.add(proc.header, [])
    error = ""
    if out.writer is None:
        error = proc.error_text() or f"tcpdump exited with {code} before writing anything"
    elif reader in done and not out.capped and not out.write_error:
        error = "tcpdump stopped early: " + (proc.error_text() or f"exit code {code}")
    return proc.stats.get("dropped", 0), error


STOPPED = "daemon stopped before the capture finished"


@dataclass(frozen=True, slots=True)
class Source:
    """Where a capture's packets come from: a flight recorder's ring, else a live tcpdump in the
    namespace ``fd`` (with the capture's filter, on ``interface``)."""

    ring: FlightRecorder | None
    tools: Tools | None
    fd: int | None
    bpf: str
    interface: str


async def _fill(source: Source, out: CaptureFile) -> tuple[int, str]:
    if source.ring is not None:
        return await from_ring(source.ring, out)
    assert source.fd is not None and source.tools is not None
    return await live(source.tools, source.fd, source.bpf, out, source.interface)


async def take(source: Source, path: Path, raw_path: Path, window: tuple[float, float, float], max_bytes: int, asked_pre: bool) -> dict[str, Any]:
    """Fill the pcap at ``path`` with the packets of ``window`` (start, end, trigger) and say what
    became of it: the outcome the index records. A ring's records are written unfiltered to
    ``raw_path`` first when the capture has a filter, then filtered by tcpdump into ``path``."""
    state, error, drops = COMPLETE, "", 0
    out: CaptureFile | None = None
    try:
        out = CaptureFile(raw_path, *window, max_bytes)
        drops, error = await _fill(source, out)
        if error and out.packets == 0:
            state = FAILED
    except asyncio.CancelledError:
        state, error = INCOMPLETE, STOPPED
    except (OSError, PcapError) as exc:
        state, error = FAILED, str(exc)
    finally:
        if out is not None:
            out.close()
    if out is None:
        return {"state": state, "error": error}
    if out.write_error:
        error = f"cannot write the capture: {out.write_error}"
        state = FAILED if out.packets == 0 else state
    if out.capped and not error:
        error = f"byte cap of {max_bytes} reached"
    if raw_path != path:
        if state == INCOMPLETE:
            # The daemon stops: no time to filter. The packets stay in raw_path, which the next
            # start filters (CaptureStore.open, CaptureEngine.recover).
            return {"state": state, "error": error}
        if state != FAILED:
            try:
                await source.tools.filter_file(raw_path, path, source.bpf)  # type: ignore[union-attr]
            except (OSError, ValueError) as exc:
                state, error = FAILED, f"filtering failed: {exc}"
        raw_path.unlink(missing_ok=True)
    size, packets, digest, pre_packets = await asyncio.to_thread(summary, path, out)
    if source.ring is None and asked_pre and not error:
        error = "no flight recorder for this container: the capture starts at the trigger"
    return {"state": state, "error": error, "bytes": size, "packets": packets, "pre_packets": pre_packets, "kernel_drops": drops, "sha256": digest}
